"""Files from strangers: every loader of the library refuses a file that would run code, says which global it
refers to, and never advises loading it with ``weights_only=False``."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from digits import digits_module

from lightning_compress import ClassificationModule, DistillationModule
from lightning_compress.deploy import load_quantized
from lightning_compress.models import SmallCNN
from lightning_compress.preflight import check_resume_checkpoint
from lightning_compress.safe_loading import load_weights


class Runs:
    """Unpickled, it calls ``function(argument)``: what a hostile file does on ``torch.load(weights_only=False)``."""

    def __init__(self, function: Callable, argument: object) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self):
        return (self.function, (self.argument,))


def hostile_files(folder: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """Checkpoints that would write ``marker``, each with the global its refusal must name: through ``os.system``,
    ``subprocess.call`` and ``exec`` in torch's format, and ``os.system`` in a plain pickle (no zip archive)."""
    write = f"open({str(marker)!r}, 'w').write('ran')"
    shell = f"echo ran > {marker}"
    module = digits_module()
    calls = {
        "system": (Runs(os.system, shell), r"posix\.system"),
        "subprocess": (Runs(subprocess.call, ["sh", "-c", shell]), r"(subprocess|commands)\.call"),  # protocol 2's name
        "exec": (Runs(exec, write), r"exec"),
    }
    files = {}
    for name, (planted, named) in calls.items():
        path = folder / f"{name}.ckpt"
        torch.save({"state_dict": module.state_dict(), "epoch": 0, "global_step": 0, "loops": {}, "x": planted}, path)
        files[name] = (path, f"it refers to {named}, code that loading it would run: the file is refused")
    plain = folder / "plain.ckpt"
    plain.write_bytes(pickle.dumps({"state_dict": module.state_dict(), "x": Runs(os.system, shell)}))
    files["plain"] = (plain, "it is not a file of tensors and plain values .*: the file is refused")
    return files


LOADERS: dict[str, Callable[[Path], object]] = {
    "ckpt_path": lambda path: check_resume_checkpoint(str(path), digits_module(), max_epochs=2),
    "load_from_checkpoint": lambda path: ClassificationModule.load_from_checkpoint(
        path, model=SmallCNN(num_classes=10, image_size=8)
    ),
    "load_quantized": lambda path: load_quantized(SmallCNN(num_classes=10, image_size=8), path),
    "teacher": lambda path: DistillationModule(
        SmallCNN(num_classes=10, image_size=8), path, 10, teacher_model=SmallCNN(num_classes=10, image_size=8)
    ),
    "load_weights": lambda path: load_weights(path, str(path)),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_refuses_a_file_that_would_run_code_and_never_advises_weights_only_false(tmp_path, loader) -> None:
    marker = tmp_path / "ran"
    for name, (path, refusal) in hostile_files(tmp_path, marker).items():
        with pytest.raises(ValueError) as raised:
            LOADERS[loader](path)
        message = str(raised.value)
        assert "weights_only=False" not in message and "set to `False`" not in message, (name, message)
        assert str(path) in message or path.name in message, (name, message)
        assert re.search(refusal, message), (name, message)
    assert not marker.exists()

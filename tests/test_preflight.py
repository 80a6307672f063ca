"""Every input of a job is checked before its first run trains, naming the key, the value and what is allowed."""

from __future__ import annotations

import json
import os
import socket

import lightning as L
import pytest
import torch
from commands import run_command
from digits import digits_module

from lightning_compress import ClassificationModule, job, run
from lightning_compress.models import MLP
from lightning_compress.run_folder import LOCK_FILE, RunFolderError


@pytest.fixture
def no_training(monkeypatch) -> None:
    """A run that starts fails the test: every case below must stop before the first one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a run started training")

    for module in (job, run):  # the job fits one run itself, the others in their folders
        monkeypatch.setattr(module, "fit_and_test", refuse)


def save_checkpoint(module: L.LightningModule, path) -> None:
    """A Lightning checkpoint of ``module`` as an unfitted Trainer writes it (epoch 0, nothing trained)."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer.max_epochs=-1"],
            r"trainer.max_epochs=-1 is not allowed: use a whole number >= 1: the epochs each run trains",
        ),
        (["trainer.max_epochs=0"], r"trainer.max_epochs=0 is not allowed"),
        (["trainer.max_epochs=abc"], r"trainer.max_epochs='abc' is not allowed: use a whole number >= 1"),
        (["trainer.limit_train_batches=0"], r"trainer.limit_train_batches=0 is not allowed: .*0 trains nothing"),
        (["trainer.limit_train_batches=0.0"], r"trainer.limit_train_batches=0.0 is not allowed"),
        (["+trainer.max_steps=0"], r"trainer.max_steps=0 is not allowed: use -1 \(no limit\) or a whole number >= 1"),
        (["seed=abc"], r"seed='abc' is not allowed: use a whole number from 0 to 4294967295 .*, or null"),
        (["seed=-1"], r"seed=-1 is not allowed: use a whole number from 0 to 4294967295"),
        (
            ["+compression/distillation=kd", "teacher_run={trainer: {max_epochs: -1}}"],
            r"teacher_run.trainer.max_epochs=-1 is not allowed",
        ),
        (
            ["+compression/distillation=fitnets", "compression.distillation.hints=[[features.9,features.4]]"],
            r"compression/distillation: .*features.9",
        ),
        (
            ["+compression.pruning.targets=[model.featurs.*]"],
            r"compression/pruning: the pattern 'model.featurs.\*' matches no layer with a weight; near names: \['model.features",
        ),
        (
            ["compression/pruning=nm24", "+compression.pruning.targets=[model.features.0]"],
            r"compression/pruning: 2:4 sparsity needs the input dimension",
        ),
        (
            ["+compression.quantization.exclude=[model.nothing]"],
            r"compression/quantization: the pattern 'model.nothing' matches no layer",
        ),
        (
            ["+compression/clustering=k16", "compression.clustering.start_epoch=3"],
            r"compression/clustering: start_epoch must be after Pruning's last step \(epoch 9\), as the clusters fix which weights are zero; got 3",
        ),
    ],
)
def test_a_bad_setting_fails_before_any_run_trains(compose_config, tmp_path, no_training, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        job.train(compose_config(*overrides, f"output_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_that_does_not_fit_fails_before_any_run_trains(compose_config, tmp_path, no_training) -> None:
    with pytest.raises(
        ValueError, match=r"ckpt_path='/nonexistent.ckpt': no such file; give the checkpoint of the run to resume"
    ):
        job.train(compose_config("ckpt_path=/nonexistent.ckpt", f"output_dir={tmp_path / 'run'}"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"ckpt_path='.*garbage.ckpt': it is not a file of tensors and plain values"):
        job.train(compose_config(f"ckpt_path={garbage}", f"output_dir={tmp_path / 'run'}"))
    not_lightning = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, not_lightning)
    with pytest.raises(
        ValueError,
        match=r"is not a checkpoint that Lightning's Trainer wrote: it lacks \['epoch', 'global_step', 'state_dict', 'loops'\]",
    ):
        job.train(compose_config(f"ckpt_path={not_lightning}", f"output_dir={tmp_path / 'run'}"))
    other_model = tmp_path / "mlp.ckpt"
    save_checkpoint(ClassificationModule(MLP(num_classes=10, image_size=8), num_classes=10), other_model)
    with pytest.raises(
        ValueError,
        match=r"does not fit the model SmallCNN: 16 of its tensors are missing or shaped otherwise: model.features.0.weight \(32, 1, 3, 3\) \(checkpoint: missing\).*; the checkpoint holds 6 tensors it lacks: model.layers.1.weight",
    ):
        job.train(
            compose_config(
                f"ckpt_path={other_model}",
                "~compression/pruning",
                "~compression/quantization",
                f"output_dir={tmp_path / 'run'}",
            )
        )
    # the last run of the default job quantizes: its checkpoints hold the quantizers, a float one does not fit
    float_model = tmp_path / "float.ckpt"
    save_checkpoint(digits_module(), float_model)
    with pytest.raises(
        ValueError,
        match=r"does not fit the model SmallCNN: \d+ of its tensors are missing or shaped otherwise: model.features.0.weight_quantizer.scale \(32,\) \(checkpoint: missing\)",
    ):
        job.train(compose_config(f"ckpt_path={float_model}", f"output_dir={tmp_path / 'run'}"))


def test_a_checkpoint_with_no_epoch_left_to_train_fails_before_any_run_trains(
    compose_config, tmp_path, no_training
) -> None:
    finished = tmp_path / "finished.ckpt"
    save_checkpoint(digits_module(), finished)
    checkpoint = torch.load(finished, weights_only=True)
    checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] = 3
    torch.save(checkpoint, finished)
    overrides = [
        "~compression/pruning",
        "~compression/quantization",
        f"output_dir={tmp_path / 'run'}",
        f"ckpt_path={finished}",
    ]
    with pytest.raises(
        ValueError,
        match=r"holds 3 trained epochs and trainer.max_epochs=3 leaves none to train: raise trainer.max_epochs above 3",
    ):
        job.train(compose_config(*overrides, "trainer.max_epochs=3"))


def test_an_unwritable_run_folder_is_one_line_naming_hydra_run_dir(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = run_command("lightning-compress", f"hydra.run.dir={blocker}/run", cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert (
        done.stderr.strip().splitlines()[-1]
        == f"hydra.run.dir='{blocker}/run' cannot be written: Not a directory; choose a folder you can write"
    )
    assert "Traceback" not in done.stderr


def test_a_folder_held_by_a_live_run_or_holding_a_finished_one_is_refused_before_training(
    compose_config, tmp_path, no_training
) -> None:
    held = tmp_path / "held"
    held.mkdir()
    (held / LOCK_FILE).write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-12-01T10:00:00+00:00"})
    )
    with pytest.raises(
        RunFolderError,
        match=rf"run folder {held} is in use by pid {os.getpid()} \(started 2026-12-01T10:00:00\+00:00\)",
    ):
        job.train(compose_config(f"output_dir={held}"))
    assert (held / LOCK_FILE).exists()  # the live run's lock stays
    finished = tmp_path / "finished"
    (finished / "dense" / "checkpoints").mkdir(parents=True)
    (finished / "report.json").write_text("{}")
    with pytest.raises(
        RunFolderError,
        match=r"holds dense/checkpoints/, report.json from an earlier run: choose another hydra.run.dir, .* or pass overwrite=true",
    ):
        job.train(compose_config(f"output_dir={finished}"))
    assert sorted(path.name for path in finished.iterdir()) == ["dense", "report.json"]  # nothing written, no lock left

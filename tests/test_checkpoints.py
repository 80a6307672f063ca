"""Checkpoints that mean what they say: ``last`` is the last epoch, ``best`` the best compressed one, no code
runs from a checkpoint, and a run whose loss or weights stop being finite stops instead of being reported."""

from __future__ import annotations

import functools
import http.server
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from commands import QUICK_REPORT
from digits import digits_module, fit_digits, quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import ClassificationModule, CompressionCheckpoint, CompressionReport, FiniteCheck, Pruning, job
from lightning_compress.models import SmallCNN


class ValidationAccuracies(L.Callback):
    """``val/acc`` of each epoch, in order."""

    def __init__(self) -> None:
        self.accuracies: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.accuracies.append(float(trainer.callback_metrics["val/acc"]))


def zeros_in(checkpoint_path: str | Path, weights: list[str]) -> int:
    state = torch.load(checkpoint_path, weights_only=True)["state_dict"]
    return sum(int((state[name] == 0).sum()) for name in weights)


def test_last_is_the_last_epoch_and_best_the_best_epoch_at_the_final_sparsity(tmp_path) -> None:
    pruning = Pruning(amount=0.98, schedule="oneshot", start_epoch=2)
    accuracies = ValidationAccuracies()
    checkpoint = CompressionCheckpoint(
        dirpath=tmp_path / "checkpoints", monitor="val/acc", mode="max", save_top_k=1, filename="{epoch}"
    )
    fit_digits(tmp_path, [pruning, accuracies, checkpoint], max_epochs=5)
    dense, pruned = accuracies.accuracies[:2], accuracies.accuracies[2:]
    assert max(dense) > max(pruned)  # the accuracy falls: a plain "best val/acc" is a dense epoch
    weights = list(pruning.masks)
    total = sum(mask.numel() for mask in pruning.masks.values())
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 4
    assert zeros_in(tmp_path / "checkpoints" / "last.ckpt", weights) == round(0.98 * total)
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    assert best["epoch"] == 2 + pruned.index(max(pruned))
    assert zeros_in(checkpoint.best_model_path, weights) == round(0.98 * total)
    assert checkpoint.best_model_score == pytest.approx(max(pruned))


def test_a_fit_that_ends_before_the_final_state_keeps_no_best_but_its_last_epoch(tmp_path) -> None:
    checkpoint = CompressionCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/acc", mode="max")
    with pytest.warns(
        UserWarning,
        match=r"reaches its final state at epoch 3, after this fit's last epoch \(1\): no best checkpoint is kept",
    ):
        fit_digits(tmp_path, [Pruning(amount=0.5, start_epoch=1, end_epoch=3), checkpoint], max_epochs=2)
    assert checkpoint.best_model_path == ""
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


def nan_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 1, 8, 8, generator=generator)
    inputs[0, 0, 0, 0] = math.nan
    return DataLoader(TensorDataset(inputs, torch.randint(0, 10, (64,), generator=generator)), batch_size=16)


def test_a_nan_loss_stops_the_run_before_anything_is_checkpointed(tmp_path) -> None:
    checkpoint = CompressionCheckpoint(dirpath=tmp_path / "checkpoints")
    trainer = quiet_trainer(tmp_path, [Pruning(amount=0.5, schedule="oneshot"), FiniteCheck(), checkpoint])
    with pytest.raises(
        FloatingPointError,
        match=r"the training loss is nan \(or not finite on another process\) at epoch 0, batch 0: training diverged or the inputs hold NaN",
    ):
        trainer.fit(digits_module(), nan_loader(), nan_loader())
    assert trainer.global_step == 1 and not (tmp_path / "checkpoints").exists()


def test_non_finite_weights_stop_the_run_after_the_epochs_last_batch_before_its_checkpoint(tmp_path) -> None:
    class Overflow(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
            if trainer.current_epoch == 1 and trainer.is_last_batch:
                with torch.no_grad():
                    pl_module.model.features[0].weight[0, 0, 0, 0] = math.inf

    loader = DataLoader(TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))), batch_size=16)
    checkpoint = CompressionCheckpoint(dirpath=tmp_path / "checkpoints")
    trainer = quiet_trainer(tmp_path, [Overflow(), FiniteCheck(), checkpoint], max_epochs=3)
    with pytest.raises(
        FloatingPointError,
        match=r"after the training batches of epoch 1, 1 parameter elements \(1 of 'model.features.0.weight'\) are NaN or infinite",
    ):
        trainer.fit(digits_module(), loader, loader)
    assert (
        torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    )  # epoch 1 was never checkpointed


def test_without_the_check_a_nan_model_has_no_zeros_and_is_not_reported(tmp_path) -> None:
    pruning = Pruning(amount=0.5, schedule="oneshot")
    report = CompressionReport(
        output_dir=tmp_path / "report",
        latency_batch_sizes=(1,),
        latency_repeats=1,
        evaluate_before=False,
        verbose=False,
    )
    trainer = quiet_trainer(tmp_path, [pruning, report])
    with pytest.raises(
        FloatingPointError,
        match=r"CompressionReport: the fitted model has \d+ parameter elements \(.*\) that are NaN or infinite; it is not reported",
    ):
        trainer.fit(digits_module(), nan_loader(), nan_loader())
    assert sum(int((~mask).sum()) for mask in pruning.masks.values()) > 0  # masks were set ...
    assert pruning.sparsity()["pruning/sparsity"] == 0.0  # ... but NaN * 0 is NaN: no weight is really zero
    assert not (tmp_path / "report" / "report.json").exists()


class Planted:
    """Unpickled, it writes ``marker``: what a hostile checkpoint does on ``torch.load(weights_only=False)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def loopback_server(tmp_path, monkeypatch) -> Iterator[tuple[str, Path]]:
    """An HTTP server on a loopback port serving the folder it yields with its address."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch.hub's download cache
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_planted_checkpoint_on_a_loopback_server_runs_no_code(compose_config, loopback_server, tmp_path) -> None:
    address, folder = loopback_server
    marker = tmp_path / "ran"
    module = digits_module()
    torch.save(
        {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0, "loops": {}, "planted": Planted(marker)},
        folder / "planted.ckpt",
    )
    torch.load(
        folder / "planted.ckpt", weights_only=False
    )  # the file is really hostile: loading it unsafely runs its code
    assert marker.read_text() == "ran"
    marker.unlink()
    with pytest.raises(
        ValueError, match=r"ckpt_path=.*/resume-from.ckpt': it refers to exec, code that loading it would run"
    ):
        job.train(compose_config(f"ckpt_path={address}/planted.ckpt", f"output_dir={tmp_path / 'run'}"))
    with pytest.raises(ValueError, match="planted.ckpt': it refers to exec, code that loading it would run"):
        ClassificationModule.load_from_checkpoint(
            f"{address}/planted.ckpt", model=SmallCNN(num_classes=10, image_size=8)
        )
    assert not marker.exists()


def test_a_safe_checkpoint_on_a_loopback_server_resumes(compose_config, loopback_server, tmp_path) -> None:
    address, folder = loopback_server
    first = tmp_path / "first"
    common = ["~compression/pruning", "~compression/quantization", "test=false", *QUICK_REPORT]
    job.train(compose_config("trainer.max_epochs=1", f"output_dir={first}", *common))
    (folder / "last.ckpt").write_bytes((first / "checkpoints" / "last.ckpt").read_bytes())
    resumed = tmp_path / "resumed"
    job.train(
        compose_config("trainer.max_epochs=2", f"ckpt_path={address}/last.ckpt", f"output_dir={resumed}", *common)
    )
    assert (resumed / "resume-from.ckpt").read_bytes() == (folder / "last.ckpt").read_bytes()
    last = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 2 * 21)  # epoch 1 trained on top of epoch 0: 21 batches each


def test_a_local_ckpt_path_that_starts_with_http_resumes_from_the_local_file(
    compose_config, tmp_path, monkeypatch
) -> None:
    """Lightning takes ``httpx/last.ckpt`` for an address, and torch's hub cache held a file of that base name: the
    run resumed from it, silently. A local path is a local path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.chdir(tmp_path)
    common = ["~compression/pruning", "~compression/quantization", "test=false", *QUICK_REPORT]
    job.train(compose_config("trainer.max_epochs=1", f"output_dir={tmp_path / 'first'}", *common))
    local = tmp_path / "httpx" / "last.ckpt"
    local.parent.mkdir()
    local.write_bytes((tmp_path / "first" / "checkpoints" / "last.ckpt").read_bytes())
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "last.ckpt"
    cached.parent.mkdir(parents=True)
    stale = torch.load(local, weights_only=True)  # another run's checkpoint of the same name, 2 epochs trained
    stale["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] = 2
    torch.save(stale, cached)
    resumed = tmp_path / "resumed"
    job.train(compose_config("trainer.max_epochs=2", "ckpt_path=httpx/last.ckpt", f"output_dir={resumed}", *common))
    last = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 2 * 21)  # epoch 1 on top of the local file's epoch 0

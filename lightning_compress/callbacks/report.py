"""The ``CompressionReport`` callback: measure the model before and after fit and write the report."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console

from lightning_compress.analysis import Report, evaluate_accuracy, profile_model


class CompressionReport(L.Callback):
    """Profile the model at the start and at the end of fit, log the numbers and write the report files.

    Each profile holds parameters, non-zero parameters, weight sparsity (global and per layer), bytes of
    the saved state dict, MACs per sample and the median latency at each of ``latency_batch_sizes``.
    The ``"before"`` stage gets the validation accuracy of the untouched model (when the trainer has a
    datamodule); the ``"after"`` stage takes ``val_metric`` from the trainer's metrics and, after
    ``trainer.test``, ``test_metric``. ``report.json``, ``report.md`` and ``report.png`` are written to
    ``output_dir`` (the trainer's log dir by default), and the numbers are logged to every logger as
    ``report/<stage>/<metric>``. The report lives in the callback's checkpoint state, so a resumed run
    keeps its ``"before"`` stage.

    Example:
        >>> import lightning as L
        >>> from lightning_compress import CompressionReport
        >>> report = CompressionReport(output_dir="outputs/report", latency_batch_sizes=(1, 64))
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=5, logger=False, callbacks=[report])
        >>> trainer.fit(module, datamodule=datamodule)  # doctest: +SKIP
        >>> report.report.entry("after").profile.macs  # doctest: +SKIP
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str] | None = None,
        input_shape: Sequence[int] | None = None,
        latency_batch_sizes: Sequence[int] = (1, 256),
        latency_warmup: int = 5,
        latency_repeats: int = 30,
        num_threads: int | None = None,
        val_metric: str = "val/acc",
        test_metric: str = "test/acc",
        evaluate_before: bool = True,
        verbose: bool = True,
    ) -> None:
        if any(batch < 1 for batch in latency_batch_sizes):
            raise ValueError(f"latency_batch_sizes must be positive integers, got {list(latency_batch_sizes)}")
        if latency_repeats < 1 or latency_warmup < 0:
            raise ValueError(f"latency_repeats must be >= 1 and latency_warmup >= 0, got {latency_repeats} and {latency_warmup}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer or None, got {num_threads}")
        self.output_dir = output_dir
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.latency_batch_sizes = tuple(latency_batch_sizes)
        self.latency_warmup = latency_warmup
        self.latency_repeats = latency_repeats
        self.num_threads = num_threads
        self.val_metric = val_metric
        self.test_metric = test_metric
        self.evaluate_before = evaluate_before
        self.verbose = verbose
        self.report = Report()
        self.written: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.input_shape is None:
            example = getattr(pl_module, "example_input_array", None)
            if not isinstance(example, torch.Tensor):
                raise ValueError(
                    "CompressionReport needs the shape of one input: pass input_shape=(C, H, W) or set "
                    f"`example_input_array` on {type(pl_module).__name__}"
                )
            self.input_shape = tuple(example.shape[1:])

    def _profile(self, pl_module: L.LightningModule) -> Any:
        return profile_model(
            pl_module,
            self.input_shape,
            latency_batch_sizes=self.latency_batch_sizes,
            latency_warmup=self.latency_warmup,
            latency_repeats=self.latency_repeats,
            num_threads=self.num_threads,
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or any(entry.name == "before" for entry in self.report.entries):
            return
        accuracy = None
        if self.evaluate_before and trainer.datamodule is not None:
            accuracy = evaluate_accuracy(pl_module, trainer.datamodule.val_dataloader())
        self.report.metadata.update(
            model=type(getattr(pl_module, "model", pl_module)).__name__,
            data=type(trainer.datamodule).__name__ if trainer.datamodule is not None else None,
            torch=str(torch.__version__),
            input_shape=list(self.input_shape),
        )
        self.report.add("before", self._profile(pl_module), val_accuracy=accuracy)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.report.add("after", self._profile(pl_module), val_accuracy=_metric(trainer, self.val_metric))
        self._log(trainer)
        self._write(trainer)
        if self.verbose:
            self.print()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        accuracy = _metric(trainer, self.test_metric)
        if not trainer.is_global_zero or accuracy is None or not self.report.entries:
            return
        self.report.entries[-1].test_accuracy = accuracy
        self._write(trainer)

    def _log(self, trainer: L.Trainer) -> None:
        metrics: dict[str, float] = {}
        for entry in self.report.entries:
            profile = entry.profile
            values = {
                "parameters": profile.parameters,
                "nonzero_parameters": profile.nonzero_parameters,
                "weight_sparsity": profile.weight_sparsity.sparsity,
                "size_bytes": profile.size_bytes,
                "macs": profile.macs,
                **{f"latency_b{batch}_ms": result.median_ms for batch, result in profile.latency.items()},
            }
            if entry.val_accuracy is not None:
                values["val_accuracy"] = entry.val_accuracy
            metrics.update({f"report/{entry.name}/{key}": float(value) for key, value in values.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    def _write(self, trainer: L.Trainer) -> None:
        directory = self.output_dir or trainer.log_dir or trainer.default_root_dir
        self.written = self.report.write(directory)

    @rank_zero_only
    def print(self) -> None:
        """Print the report as a table on the console (rank zero only)."""
        Console().print(self.report.to_rich_table())

    def state_dict(self) -> dict[str, Any]:
        return {"report": self.report.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.report = Report.from_dict(state_dict["report"])


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)

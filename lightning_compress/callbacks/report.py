"""The ``CompressionReport`` callback: measure the model before and after fit and write the report."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lightning_compress.analysis import (
    Inputs,
    ModelProfile,
    Report,
    TimedModel,
    check_latency_options,
    evaluate_accuracy,
    is_example_batch,
    profile_model,
    time_models,
)
from lightning_compress.analysis.cpu import cpu_flags
from lightning_compress.batches import first_training_input, map_inputs
from lightning_compress.callbacks.finite import describe_non_finite, non_finite_parameters
from lightning_compress.deploy.half import HALF_DTYPES, half_precision
from lightning_compress.modules import model_copy
from lightning_compress.quantization.layers import quantized_layers


class CompressionReport(L.Callback):
    """Profile the model at the start and at the end of fit, log the numbers and write the report files.

    Each profile holds parameters, non-zero parameters, weight sparsity (global and per layer), bytes of
    the saved state dict and of its ``export(..., format="compressed")`` file (``compressed_size=False``
    leaves that out), MACs per sample and the median latency at each of ``latency_batch_sizes``
    (in eager PyTorch, or in ONNX Runtime on the CPU with ``latency_runtime="onnxruntime"``, where
    fake-quantized layers run as the integer layers :func:`lightning_compress.export` writes). At the
    end of fit every stage is timed again, together, in ``latency_rounds`` interleaved rounds of a new
    random order (against a copy of the model kept from the start), so the ratios compare medians of
    the same stretch of a noisy machine; ``models`` keeps each stage's model for timing it with others
    (:meth:`time_stages`).
    With ``half_precision="float16"`` or ``"bfloat16"``, a float model gets a third stage after fit:
    the fitted model converted by :func:`lightning_compress.half_precision`, measured in eager PyTorch.
    Both stages, ``"before"`` and ``"after"``, get the accuracy over the datamodule's whole validation
    set, measured the same way (without a datamodule, ``"after"`` takes ``val_metric`` from the
    trainer's metrics). After ``trainer.test`` on the fitted weights, ``"after"`` gets ``test_metric``.
    ``report.json``, ``report.md`` and ``report.png`` are written to ``output_dir`` (the trainer's log
    dir by default), and the numbers are logged to every logger as ``report/<stage>/<metric>``. The
    report is part of the callback's checkpoint state, so a resumed run keeps its ``"before"`` stage.
    A fitted model with NaN or infinite weights is not reported: ``on_fit_end`` raises ``FloatingPointError``.

    Example:
        >>> import lightning as L
        >>> from lightning_compress import ClassificationModule, CompressionReport
        >>> from lightning_compress.data import DigitsDataModule
        >>> from lightning_compress.models import SmallCNN
        >>> module = ClassificationModule(SmallCNN(num_classes=10, image_size=8), num_classes=10, input_shape=(1, 8, 8))
        >>> report = CompressionReport(output_dir="outputs/report", latency_batch_sizes=(1, 64), verbose=False)
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[report])
        >>> trainer.fit(module, datamodule=DigitsDataModule())  # doctest: +SKIP
        >>> report.report.entry("after").profile.macs  # doctest: +SKIP
        347392
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str] | None = None,
        input_shape: Sequence[int] | None = None,
        latency_batch_sizes: Sequence[int] = (1, 256),
        latency_warmup: int = 5,
        latency_repeats: int = 30,
        latency_rounds: int = 10,
        num_threads: int | None = None,
        latency_runtime: str = "torch",
        val_metric: str = "val/acc",
        test_metric: str = "test/acc",
        evaluate_before: bool = True,
        half_precision: str | None = None,
        compressed_size: bool = True,
        verbose: bool = True,
    ) -> None:
        check_latency_options(
            latency_batch_sizes, latency_warmup, latency_repeats, num_threads, latency_runtime, latency_rounds
        )
        if half_precision is not None and half_precision not in HALF_DTYPES:
            raise ValueError(f"half_precision must be None or one of {', '.join(HALF_DTYPES)}, got {half_precision!r}")
        self.output_dir = output_dir
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.latency_batch_sizes = tuple(latency_batch_sizes)
        self.latency_warmup = latency_warmup
        self.latency_repeats = latency_repeats
        self.latency_rounds = latency_rounds
        self.num_threads = num_threads
        self.latency_runtime = latency_runtime
        self.val_metric = val_metric
        self.test_metric = test_metric
        self.evaluate_before = evaluate_before
        self.half_precision = half_precision
        self.compressed_size = compressed_size
        self.verbose = verbose
        self.report = Report()
        #: The model of each stage measured in this process (``"before"`` is a copy of the model at the start of fit).
        self.models: dict[str, torch.nn.Module] = {}
        self.written: dict[str, Any] = {}
        self._fit_inputs: Inputs | None = None
        self._checkpoint_report: Report | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning restores callback state after setup for every entry point; only a resumed fit adopts it.
        self._checkpoint_report = None
        if stage != "fit":
            return
        if self.input_shape is not None:
            self._fit_inputs = self.input_shape
            return
        example = getattr(pl_module, "example_input_array", None)
        if example is None:
            example = first_training_input(trainer)
        if example is None:
            raise ValueError(
                "CompressionReport needs the shape of one input: pass input_shape=(C, H, W), set "
                f"`example_input_array` on {type(pl_module).__name__}, or fit it with one training dataloader"
            )
        if isinstance(example, torch.Tensor) and example.is_floating_point():
            self._fit_inputs = tuple(example.shape[1:])
        else:  # token ids, a Hugging Face model's inputs by keyword: measured on the example itself
            self._fit_inputs = map_inputs(example, lambda tensor: tensor[:1].detach().cpu().clone())

    def time_stages(self, models: Mapping[str, torch.nn.Module], runtimes: Mapping[str, str]) -> dict[str, TimedModel]:
        """Time ``models`` (each in ``runtimes[name]``) together with this report's latency settings, in interleaved rounds."""
        return time_models(
            models,
            self._fit_inputs,
            runtimes,
            self.latency_batch_sizes,
            warmup=self.latency_warmup,
            repeats=self.latency_repeats,
            rounds=self.latency_rounds,
            num_threads=self.num_threads,
        )

    def _profile(self, model: torch.nn.Module, timed: bool = True) -> ModelProfile:
        """``model``'s profile; with ``timed=False`` without latency (:meth:`_time_stages_together` adds it)."""
        return profile_model(
            model,
            self._fit_inputs,
            latency_batch_sizes=self.latency_batch_sizes if timed else (),
            latency_warmup=self.latency_warmup,
            latency_repeats=self.latency_repeats,
            num_threads=self.num_threads,
            latency_runtime=self.latency_runtime,
            compressed_size=self.compressed_size,
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._checkpoint_report is not None:
            self.report, self._checkpoint_report = self._checkpoint_report, None
        if not trainer.is_global_zero or any(entry.name == "before" for entry in self.report.entries):
            return
        self.report.metadata.update(
            model=type(getattr(pl_module, "model", pl_module)).__name__,
            data=type(trainer.datamodule).__name__ if trainer.datamodule is not None else None,
            torch=str(torch.__version__),
            cpu=cpu_flags(),  # the kind of CPU the latencies are measured on, for the notes on them
            **_input_description(self._fit_inputs),
        )
        accuracy = _validation_accuracy(trainer, pl_module) if self.evaluate_before else None
        self.report.add("before", self._profile(pl_module), val_accuracy=accuracy)
        if self.latency_batch_sizes:
            self.models["before"] = model_copy(pl_module).eval()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        broken = non_finite_parameters(pl_module)
        if broken:
            raise FloatingPointError(
                f"CompressionReport: the fitted model has {describe_non_finite(broken)} that are NaN or infinite; it is not reported"
            )
        accuracy = _validation_accuracy(trainer, pl_module)
        if accuracy is None:
            accuracy = self._metric(trainer, self.val_metric)
        from lightning_compress.deploy.qdq import uint8_weight_layers  # imports onnx: not at import time

        self.report.add(
            "after",
            self._profile(pl_module, timed=False),
            val_accuracy=accuracy,
            uint8_weight_layers=len(uint8_weight_layers(pl_module)),
        )
        self.models["after"] = pl_module
        if self.half_precision is not None and not quantized_layers(pl_module):
            half = half_precision(pl_module, self.half_precision)
            # eager PyTorch: ONNX Runtime's CPU kernels mostly lack 16-bit floats
            note = (
                None
                if self.latency_runtime == "torch"
                else f"latency in eager PyTorch: ONNX Runtime's CPU kernels lack {self.half_precision}, so it has no ratio"
            )
            self.report.add(
                self.half_precision,
                self._profile(half, timed=False),
                val_accuracy=_validation_accuracy(trainer, half),
                note=note,
                derived_from="after",
            )
            self.models[self.half_precision] = half
        self._time_stages_together()
        self._log(trainer)
        self._write(trainer)
        if self.verbose:
            self.print()

    def _time_stages_together(self) -> None:
        """Replace each stage's latency by one measured with every other stage, in interleaved rounds."""
        if not self.latency_batch_sizes:
            return
        if "before" not in self.models:  # a resumed fit: the model it started from is gone
            before = self.report.entry("before")
            before.note = (
                before.note
                or "latency measured at the start of the first fit, not with the other stages: the run resumed"
            )
        runtimes = {name: self.latency_runtime if name in ("before", "after") else "torch" for name in self.models}
        for name, timed in self.time_stages(self.models, runtimes).items():
            entry = self.report.entry(name)
            entry.profile = dataclasses.replace(entry.profile, latency=timed.latency, onnx_bytes=timed.onnx_bytes)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.report.entries:
            return
        if trainer.ckpt_path is not None:
            rank_zero_warn(
                f"CompressionReport: the test ran on the weights of {trainer.ckpt_path}, not on the fitted model "
                "the report measured, so its accuracy is not added to the report"
            )
            return
        accuracy = self._metric(trainer, self.test_metric)
        if accuracy is not None:
            fitted = [entry for entry in self.report.entries if entry.name == "after"] or self.report.entries
            fitted[-1].test_accuracy = accuracy
            self._log(trainer)
            self._write(trainer)

    def _metric(self, trainer: L.Trainer, name: str) -> float | None:
        value = trainer.callback_metrics.get(name)
        if value is None:
            rank_zero_warn(
                f"CompressionReport: no metric {name!r} was logged; the logged ones are {sorted(trainer.callback_metrics)}"
            )
            return None
        return float(value)

    def _log(self, trainer: L.Trainer) -> None:
        metrics: dict[str, float] = {}
        for entry in self.report.entries:
            profile = entry.profile
            values = {
                "parameters": profile.parameters,
                "nonzero_parameters": profile.nonzero_parameters,
                "weight_sparsity": profile.weight_sparsity.sparsity,
                "size_bytes": profile.size_bytes,
                "compressed_bytes": profile.compressed_bytes,
                "macs": profile.macs,
                "val_accuracy": entry.val_accuracy,
                "test_accuracy": entry.test_accuracy,
                **{f"latency_b{batch}_ms": result.median_ms for batch, result in profile.latency.items()},
            }
            metrics.update(
                {f"report/{entry.name}/{key}": float(value) for key, value in values.items() if value is not None}
            )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    def _write(self, trainer: L.Trainer) -> None:
        directory = self.output_dir or trainer.log_dir or trainer.default_root_dir
        self.written = self.report.write(directory)

    @rank_zero_only
    def print(self) -> None:
        """Print the report as a table on the console (rank zero only)."""
        self.report.print()

    def state_dict(self) -> dict[str, Any]:
        return {"report": self.report.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._checkpoint_report = Report.from_dict(state_dict["report"])


def _input_description(inputs: Inputs) -> dict[str, Any]:
    """The report's metadata of what the stages were measured on: one input's shape, and its dtype if it is
    an example batch (token ids); by name for inputs by keyword.

    Example:
        >>> _input_description({"input_ids": torch.ones(1, 8, dtype=torch.long), "attention_mask": torch.ones(1, 8)})
        {'input_shape': {'input_ids': [8], 'attention_mask': [8]}, 'input_dtype': {'input_ids': 'int64', 'attention_mask': 'float32'}}
    """
    if not is_example_batch(inputs):
        return {"input_shape": list(inputs)}

    def shape(tensor: torch.Tensor) -> list[int]:
        return list(tensor.shape[1:])

    def dtype(tensor: torch.Tensor) -> str:
        return str(tensor.dtype).removeprefix("torch.")

    if isinstance(inputs, Mapping):
        return {
            "input_shape": {key: shape(value) for key, value in inputs.items()},
            "input_dtype": {key: dtype(value) for key, value in inputs.items()},
        }
    if isinstance(inputs, tuple):
        return {"input_shape": [shape(value) for value in inputs], "input_dtype": [dtype(value) for value in inputs]}
    return {"input_shape": shape(inputs), "input_dtype": dtype(inputs)}


def _validation_accuracy(trainer: L.Trainer, model: torch.nn.Module) -> float | None:
    """Accuracy over the datamodule's whole validation set, or None without a datamodule."""
    if trainer.datamodule is None:
        return None
    return evaluate_accuracy(model, trainer.datamodule.val_dataloader())

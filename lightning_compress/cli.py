"""The ``lightning-compress`` command: a Hydra application over ``configs/train.yaml``.

Run it with no arguments to train the default model on the bundled digits dense, pruned, quantized, and
pruned and quantized, with the same epochs and seed, and print the four side by side; override anything
Hydra-style, e.g. ``lightning-compress data=fashion_mnist compression/pruning=taylor_channel50 trainer.max_epochs=8``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from torch import nn

from lightning_compress.analysis import Report
from lightning_compress.callbacks import CompressionReport
from lightning_compress.deploy import check_export_format, export
from lightning_compress.models import ClassificationModule


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a config node with plain Python lists and dicts as arguments, not OmegaConf containers."""
    return instantiate(node, _convert_="all", **kwargs)


@dataclasses.dataclass
class Run:
    """A finished run: the fitted module, and the ``CompressionReport``'s report on the global-zero process
    (``None`` elsewhere, since other ranks measure nothing, or when the configuration has no report)."""

    module: L.LightningModule
    report: Report | None


def fit_and_test(cfg: DictConfig, compression: list[L.Callback], wrap: Callable[[ClassificationModule], L.LightningModule] | None = None) -> Run:
    """One run: build data, model (passed through ``wrap``), callbacks (``compression`` first), loggers and
    trainer; fit, test, export. With ``export`` set, the final model is written to
    ``output_dir/model.<format>`` (int8 layers where it is quantized).
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = build(cfg.data)
    module: L.LightningModule = build(cfg.model)
    if wrap is not None:
        module = wrap(module)
    callbacks: list[L.Callback] = [*compression, *(build(c) for c in (cfg.get("callbacks") or {}).values())]
    loggers = [build(logger) for logger in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule)
    if cfg.get("export") and trainer.is_global_zero:
        suffix = {"onnx": "onnx", "torch": "pt"}[cfg.export]
        export(module.cpu(), Path(cfg.output_dir) / f"model.{suffix}", module.example_input_array, format=cfg.export)
    reporter = next((callback for callback in callbacks if isinstance(callback, CompressionReport)), None)
    return Run(module, reporter.report if reporter is not None and trainer.is_global_zero else None)


def train(cfg: DictConfig) -> Report | None:
    """The main job. Without compression: one run, reported before and after fit. With compression recipes:
    runs with the same epochs and seed, each in its own folder under ``output_dir``: dense, each recipe
    alone, and with ``combined`` all recipes together, named like ``pruning+quantization``; one report
    with a row for each, and the dense model in ``half_precision`` too. A distillation recipe first
    trains the ``teacher`` (in ``output_dir/teacher``, a row of the report) and wraps the model in its
    ``DistillationModule``; pruning and quantization recipes are callbacks. ``ckpt_path`` resumes the
    last run; the others, seeded and deterministic in their data order, are trained again.
    """
    if cfg.get("export"):
        check_export_format(cfg.export)
    recipes = {name: node for name, node in (cfg.get("compression") or {}).items() if node is not None}
    if "distillation" in recipes and cfg.get("teacher") is None:
        raise ValueError("compression/distillation needs a teacher: choose one with model/teacher=<name> (e.g. small_cnn_wide)")
    if not recipes:
        report = fit_and_test(cfg, []).report
        if report is not None:
            _print(report)
        return report
    phases = {"dense": [], **{name: [name] for name in recipes}}
    if cfg.get("combined") and len(recipes) > 1:
        phases["+".join(recipes)] = list(recipes)
    runs = {}
    if "distillation" in recipes:
        teacher_cfg = cfg.copy()
        teacher_cfg.model = cfg.teacher
        runs["teacher"] = _phase(teacher_cfg, "teacher", [], resume=False)
    for index, (name, names) in enumerate(phases.items()):
        callbacks = [build(recipes[recipe]) for recipe in names if recipe != "distillation"]
        wrap = partial(_distill, recipes["distillation"], runs["teacher"].module.model) if "distillation" in names else None
        runs[name] = _phase(cfg, name, callbacks, resume=index == len(phases) - 1, wrap=wrap, dense=not names)
    if any(run.report is None for run in runs.values()):
        return None
    entries = [dataclasses.replace(run.report.entry("after"), name=name) for name, run in runs.items()]
    half = [entry for entry in runs["dense"].report.entries if entry.name not in ("before", "after")]
    entries.insert(0, entries.pop(list(runs).index("dense")))  # dense first: the reference of the ratios
    entries[1:1] = [dataclasses.replace(entry, name=f"dense {entry.name}") for entry in half]
    report = Report(entries=entries, metadata=list(runs.values())[-1].report.metadata)
    report.write(cfg.output_dir)
    _print(report)
    return report


def _print(report: Report) -> None:
    Console(width=max(Console().width, 100)).print(report.to_rich_table())


def _distill(recipe: DictConfig, teacher: nn.Module, module: ClassificationModule) -> L.LightningModule:
    """The student ``module``'s network, data settings and optimizer in the recipe's ``DistillationModule``."""
    return build(recipe)(
        student=module.model,
        teacher=teacher,
        num_classes=module.hparams.num_classes,
        input_shape=module.hparams.input_shape,
        label_smoothing=module.hparams.label_smoothing,
        optimizer=module.optimizer_factory,
        scheduler=module.scheduler_factory,
    )


def _phase(
    cfg: DictConfig, name: str, compression: list[L.Callback], resume: bool, wrap: Callable[[ClassificationModule], L.LightningModule] | None = None, dense: bool = False
) -> Run:
    """Run ``cfg`` with its outputs in ``output_dir/name``, resuming from ``ckpt_path`` only when ``resume``;
    the ``dense`` run's report adds the model in ``half_precision``."""
    phase = cfg.copy()
    phase.output_dir = str(Path(cfg.output_dir) / name)
    report = (phase.get("callbacks") or {}).get("compression_report")
    if report is not None and dense:
        report.half_precision = cfg.get("half_precision")
    if not resume:
        phase.ckpt_path = None
    return fit_and_test(phase, compression, wrap)


@hydra.main(version_base="1.3", config_path="pkg://lightning_compress.configs", config_name="train")
def main(cfg: DictConfig) -> None:
    for exporter in ("onnx_ir", "onnxscript"):  # the ONNX exporter reports each pass at INFO
        logging.getLogger(exporter).setLevel(logging.WARNING)
    train(cfg)


if __name__ == "__main__":
    main()

"""One run of the main job: data, model, callbacks and trainer built from a config; fit, test, export."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_compress.analysis import Report
from lightning_compress.callbacks import CompressionReport
from lightning_compress.deploy import FILE_SUFFIXES, export
from lightning_compress.distributed import launched_processes
from lightning_compress.models import ClassificationModule
from lightning_compress.run_folder import clear_earlier_run, is_global_zero


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a config node with plain Python lists and dicts as arguments, not OmegaConf containers.

    Example:
        >>> from omegaconf import OmegaConf
        >>> build(OmegaConf.create({"_target_": "builtins.dict", "sizes": [1, 2]}))
        {'sizes': [1, 2]}
    """
    return instantiate(node, _convert_="all", **kwargs)


@dataclasses.dataclass
class Run:
    """A finished run: the fitted module, its ``CompressionReport`` on the global-zero process (``None``
    elsewhere, since other ranks measure nothing, or when the configuration has no report), and the
    processes its trainer launched for the further DDP ranks (the first run of a job launches them).

    Example:
        >>> import torch
        >>> run = Run(ClassificationModule(torch.nn.Linear(4, 2), num_classes=2), reporter=None)
        >>> run.report is None
        True
    """

    module: L.LightningModule
    reporter: CompressionReport | None
    launched: list[subprocess.Popen] = dataclasses.field(default_factory=list)

    @property
    def report(self) -> Report | None:
        return self.reporter.report if self.reporter is not None else None


def fit_and_test(
    cfg: DictConfig,
    compression: list[L.Callback],
    wrap: Callable[[ClassificationModule], L.LightningModule] | None = None,
) -> Run:
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
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
    )  # no code runs from a checkpoint
    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule)
    if cfg.get("export") and trainer.is_global_zero:
        export(
            module.cpu(),
            Path(cfg.output_dir) / f"model.{FILE_SUFFIXES[cfg.export]}",
            module.example_input_array,
            format=cfg.export,
        )
    reporter = next((callback for callback in callbacks if isinstance(callback, CompressionReport)), None)
    return Run(module, reporter if trainer.is_global_zero else None, launched_processes(trainer))


def run_in_folder(
    cfg: DictConfig,
    name: str,
    compression: list[L.Callback],
    resume: bool,
    wrap: Callable[[ClassificationModule], L.LightningModule] | None = None,
    dense: bool = False,
) -> Run:
    """Run ``cfg`` with its outputs in ``output_dir/name``, resuming from ``ckpt_path`` only when ``resume``;
    the ``dense`` run's report adds the model in ``half_precision``."""
    run_cfg = cfg.copy()
    run_cfg.output_dir = str(Path(cfg.output_dir) / name)
    report = (run_cfg.get("callbacks") or {}).get("compression_report")
    if report is not None and dense:
        report.half_precision = cfg.get("half_precision")
    if not resume:
        run_cfg.ckpt_path = None
        folder = Path(run_cfg.output_dir)
        if folder.is_dir() and is_global_zero():  # trained again from the start: nothing of an earlier run stays
            clear_earlier_run(folder)  # (its last.ckpt would make this run's last-v1.ckpt)
    return fit_and_test(run_cfg, compression, wrap)

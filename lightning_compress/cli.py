"""The ``lightning-compress`` command: a Hydra application over ``configs/train.yaml``.

Run it with no arguments to train the default model on the bundled digits dense, pruned, quantized, and
pruned and quantized, with the same epochs and seed, and print the four side by side; override anything
Hydra-style, e.g. ``lightning-compress data=fashion_mnist compression/pruning=taylor_channel50 trainer.max_epochs=8``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console

from lightning_compress.analysis import Report
from lightning_compress.callbacks import CompressionReport
from lightning_compress.deploy import check_export_format, export


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a config node with plain Python lists and dicts as arguments, not OmegaConf containers."""
    return instantiate(node, _convert_="all", **kwargs)


def fit_and_test(cfg: DictConfig, compression: list[L.Callback]) -> Report | None:
    """One run: build data, model, callbacks (``compression`` first), loggers and trainer; fit, test, export.

    Returns the ``CompressionReport``'s report on the global-zero process, else ``None`` (other ranks
    measure nothing, and a configuration may have no report). With ``export`` set, the final model is
    written to ``output_dir/model.<format>`` (int8 layers where it is quantized).
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = build(cfg.data)
    module: L.LightningModule = build(cfg.model)
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
    return reporter.report if reporter is not None and trainer.is_global_zero else None


def train(cfg: DictConfig) -> Report | None:
    """The main job. Without compression: one run, reported before and after fit. With compression recipes:
    runs with the same epochs and seed, each in its own folder under ``output_dir``: dense, each recipe
    alone, and with ``combined`` all recipes together, named like ``pruning+quantization``; one report
    with a row for each, and the dense model in ``half_precision`` too. ``ckpt_path`` resumes the last
    run; the others, seeded and deterministic in their data order, are trained again.
    """
    if cfg.get("export"):
        check_export_format(cfg.export)
    recipes = {name: node for name, node in (cfg.get("compression") or {}).items() if node is not None}
    if not recipes:
        report = fit_and_test(cfg, [])
    else:
        phases = {"dense": [], **{name: [node] for name, node in recipes.items()}}
        if cfg.get("combined") and len(recipes) > 1:
            phases["+".join(recipes)] = list(recipes.values())
        reports = {}
        for index, (name, nodes) in enumerate(phases.items()):
            reports[name] = _phase(cfg, name, [build(node) for node in nodes], resume=index == len(phases) - 1)
        if any(phase_report is None for phase_report in reports.values()):
            return None
        entries = [dataclasses.replace(phase_report.entry("after"), name=name) for name, phase_report in reports.items()]
        half = [entry for entry in reports["dense"].entries if entry.name not in ("before", "after")]
        entries[1:1] = [dataclasses.replace(entry, name=f"dense {entry.name}") for entry in half]
        last = list(reports.values())[-1]
        report = Report(entries=entries, metadata=last.metadata)
        report.write(cfg.output_dir)
    if report is not None:
        Console(width=max(Console().width, 100)).print(report.to_rich_table())
    return report


def _phase(cfg: DictConfig, name: str, compression: list[L.Callback], resume: bool) -> Report | None:
    """Run ``cfg`` with its outputs in ``output_dir/name``, resuming from ``ckpt_path`` only when ``resume``."""
    phase = cfg.copy()
    phase.output_dir = str(Path(cfg.output_dir) / name)
    report = (phase.get("callbacks") or {}).get("compression_report")
    if report is not None and not compression:
        report.half_precision = cfg.get("half_precision")
    if not resume:
        phase.ckpt_path = None
    return fit_and_test(phase, compression)


@hydra.main(version_base="1.3", config_path="pkg://lightning_compress.configs", config_name="train")
def main(cfg: DictConfig) -> None:
    for exporter in ("onnx_ir", "onnxscript"):  # the ONNX exporter reports each pass at INFO
        logging.getLogger(exporter).setLevel(logging.WARNING)
    train(cfg)


if __name__ == "__main__":
    main()

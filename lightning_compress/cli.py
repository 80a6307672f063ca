"""The ``lightning-compress`` command: a Hydra application over ``configs/train.yaml``.

Run it with no arguments to train the default model on the bundled digits, dense and compressed with
the same epochs and seed, and print the two side by side; override anything Hydra-style, e.g.
``lightning-compress data=fashion_mnist compression/pruning=taylor_channel50 trainer.max_epochs=8``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console

from lightning_compress.analysis import Report
from lightning_compress.callbacks import CompressionReport


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a config node with plain Python lists and dicts as arguments, not OmegaConf containers."""
    return instantiate(node, _convert_="all", **kwargs)


def fit_and_test(cfg: DictConfig, compression: list[L.Callback]) -> Report | None:
    """One run: build data, model, callbacks (``compression`` first), loggers and trainer; fit, test.

    Returns the ``CompressionReport``'s report on the global-zero process, else ``None`` (other ranks
    measure nothing, and a configuration may have no report).
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
    reporter = next((callback for callback in callbacks if isinstance(callback, CompressionReport)), None)
    return reporter.report if reporter is not None and trainer.is_global_zero else None


def train(cfg: DictConfig) -> Report | None:
    """The main job. Without compression: one run, reported before and after fit. With compression: a dense
    run and a compressed run with the same epochs and seed, each in its own folder under ``output_dir``,
    and one report with a row for each. ``ckpt_path`` resumes the compressed run; the dense run, seeded
    and deterministic in its data order, is trained again.
    """
    compression = {name: node for name, node in (cfg.get("compression") or {}).items() if node is not None}
    if not compression:
        report = fit_and_test(cfg, [])
    else:
        dense = _phase(cfg, "dense", [])
        compressed = _phase(cfg, "compressed", [build(node) for node in compression.values()])
        if dense is None or compressed is None:
            return None
        report = Report(
            entries=[
                dataclasses.replace(dense.entry("after"), name="dense"),
                dataclasses.replace(compressed.entry("after"), name="+".join(compression)),
            ],
            metadata=compressed.metadata,
        )
        report.write(cfg.output_dir)
    if report is not None:
        Console(width=max(Console().width, 100)).print(report.to_rich_table())
    return report


def _phase(cfg: DictConfig, name: str, compression: list[L.Callback]) -> Report | None:
    """Run ``cfg`` with its outputs in ``output_dir/name``; only the compressed phase resumes from ``ckpt_path``."""
    phase = cfg.copy()
    phase.output_dir = str(Path(cfg.output_dir) / name)
    if not compression:
        phase.ckpt_path = None
    return fit_and_test(phase, compression)


@hydra.main(version_base="1.3", config_path="pkg://lightning_compress.configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()

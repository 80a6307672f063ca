"""The ``lightning-compress`` command: a Hydra application over ``configs/train.yaml``.

Run it with no arguments to train the default model on the bundled digits and print the compression
report; override anything Hydra-style, e.g. ``lightning-compress data=fashion_mnist trainer.max_epochs=5``.
"""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_compress.analysis import Report
from lightning_compress.callbacks import CompressionReport


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a config node with plain Python lists and dicts as arguments, not OmegaConf containers."""
    return instantiate(node, _convert_="all", **kwargs)


def train(cfg: DictConfig) -> Report | None:
    """Build data, model, callbacks, loggers and trainer from ``cfg``; fit, test, and return the report.

    Returns ``None`` when the configuration has no ``CompressionReport`` callback.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = build(cfg.data)
    module: L.LightningModule = build(cfg.model)
    callbacks: list[L.Callback] = [build(callback) for callback in (cfg.get("callbacks") or {}).values()]
    loggers = [build(logger) for logger in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule)

    reporter = next((callback for callback in callbacks if isinstance(callback, CompressionReport)), None)
    if reporter is None:
        return None
    reporter.print()
    return reporter.report


@hydra.main(version_base="1.3", config_path="pkg://lightning_compress.configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()

"""A callback for the DDP tests: each process saves what must be identical on every rank."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lightning_compress import Pruning


class SaveRankState(L.Callback):
    """When fit ends, saves this rank's pruning masks and the module's parameters and quantizer state
    (not BatchNorm statistics: each rank's last step moves its own) to ``directory/rank<N>.pt``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pruning = next(callback for callback in trainer.callbacks if isinstance(callback, Pruning))
        state = {
            name: tensor.detach().cpu()
            for name, tensor in pl_module.state_dict().items()
            if "running_" not in name and "num_batches" not in name
        }
        masks = {name: mask.cpu() for name, mask in pruning.masks.items()}
        self.directory.mkdir(parents=True, exist_ok=True)
        torch.save({"masks": masks, "state": state}, self.directory / f"rank{trainer.global_rank}.pt")

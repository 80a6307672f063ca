"""Run by test_pruning_ddp.py: prune on two CPU processes under DDP and save each rank's masks, once for
each CRITERION:GRANULARITY (one fit after the other in the same two processes), in OUTPUT_DIR/CRITERION-GRANULARITY/.
A criterion ``oneshot_<method>`` prunes with ``OneShotPruning(method)`` before the first step, and
``oneshot_gptq`` rounds the weights with ``OneShotQuantization`` when training ends, each rank calibrating on
its own batches. ``taylor_agp`` prunes by Taylor importance on the AGP schedule at epochs 0, 1 and 2 of a 3-epoch fit,
whose epochs of 4 steps per rank are shorter than ``taylor_steps``. Each rank also saves the number of pruned
weights at the end of every epoch.

    python tests/ddp_masks.py OUTPUT_DIR CRITERION:GRANULARITY [CRITERION:GRANULARITY ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from digits import digits_module

from lightning_compress.data import DigitsDataModule
from lightning_compress.oneshot import OneShotPruning, OneShotQuantization
from lightning_compress.pruning import Pruning

ONE_SHOT = "oneshot_"
TAYLOR_FROM_EPOCH_0 = "taylor_agp"


class CountPruned(L.Callback):
    """The number of pruned weights at the end of each epoch (after the pruning step of an epoch that ends it)."""

    def __init__(self) -> None:
        self.pruned: list[int] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pruning = next((callback for callback in trainer.callbacks if isinstance(callback, Pruning)), None)
        masks = pruning.masks if pruning is not None else {}
        self.pruned.append(sum(int((~mask).sum()) for mask in masks.values()))


def prune(output: Path, criterion: str, granularity: str) -> None:
    L.seed_everything(0)
    if criterion == f"{ONE_SHOT}gptq":
        pruning = OneShotQuantization(calibration_batches=2, progress=False)
    elif criterion == TAYLOR_FROM_EPOCH_0:
        pruning = Pruning(
            amount=0.5, criterion="taylor", granularity=granularity, schedule="agp", start_epoch=0, end_epoch=2
        )
    elif criterion.startswith(ONE_SHOT):
        method = criterion.removeprefix(ONE_SHOT)
        pruning = OneShotPruning(method, granularity=granularity, calibration_batches=2, progress=False)
    else:
        pruning = Pruning(amount=0.5, criterion=criterion, granularity=granularity, schedule="oneshot", start_epoch=1)
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        max_epochs=3 if criterion == TAYLOR_FROM_EPOCH_0 else 2,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, counted := CountPruned()],
    )
    module = digits_module()
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    folder = output / f"{criterion}-{granularity}"
    folder.mkdir(exist_ok=True)
    masks = getattr(pruning, "masks", {})
    state = {"masks": masks, "weights": module.state_dict(), "pruned": counted.pruned}
    torch.save(state, folder / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    for case in sys.argv[2:]:
        prune(Path(sys.argv[1]), *case.split(":"))

"""Run by test_pruning_ddp.py: prune on two CPU processes under DDP and save each rank's masks, once for
each CRITERION:GRANULARITY (one fit after the other in the same two processes), in OUTPUT_DIR/CRITERION-GRANULARITY/.
A criterion ``oneshot_<method>`` prunes with ``OneShotPruning(method)`` before the first step, and
``oneshot_gptq`` rounds the weights with ``OneShotQuantization`` when training ends, each rank calibrating on
its own batches.

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


def prune(output: Path, criterion: str, granularity: str) -> None:
    L.seed_everything(0)
    if criterion == f"{ONE_SHOT}gptq":
        pruning = OneShotQuantization(calibration_batches=2, progress=False)
    elif criterion.startswith(ONE_SHOT):
        method = criterion.removeprefix(ONE_SHOT)
        pruning = OneShotPruning(method, granularity=granularity, calibration_batches=2, progress=False)
    else:
        pruning = Pruning(amount=0.5, criterion=criterion, granularity=granularity, schedule="oneshot", start_epoch=1)
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning],
    )
    module = digits_module()
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    folder = output / f"{criterion}-{granularity}"
    folder.mkdir(exist_ok=True)
    masks = getattr(pruning, "masks", {})
    torch.save({"masks": masks, "weights": module.state_dict()}, folder / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    for case in sys.argv[2:]:
        prune(Path(sys.argv[1]), *case.split(":"))

"""Prune the small CNN on the bundled digits with a plain Lightning Trainer, then read the report.

python examples/prune_and_report.py --granularity channel --amount 0.5 --max-epochs 6
"""

from __future__ import annotations

import argparse

import lightning as L

from lightning_compress import ClassificationModule, CompressionReport, Pruning
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import SmallCNN


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--granularity", default="unstructured", help='"unstructured", "channel" or "N:M" such as "2:4"'
    )
    parser.add_argument("--amount", type=float, default=0.9)
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--output-dir", default="outputs/prune_example")
    args = parser.parse_args(argv)

    L.seed_everything(0)
    module = ClassificationModule(
        SmallCNN(num_classes=10, image_size=8), num_classes=10, input_shape=DigitsDataModule.input_shape
    )
    channel = args.granularity == "channel"
    pruning = Pruning(
        amount=None if ":" in args.granularity else args.amount,
        criterion="l1" if channel else "magnitude",
        granularity=args.granularity,
        schedule="agp",
        start_epoch=1,
        remove_channels=channel,
    )
    report = CompressionReport(output_dir=args.output_dir, latency_batch_sizes=(1, 64))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.max_epochs,
        logger=False,
        callbacks=[pruning, report],
        default_root_dir=args.output_dir,
    )
    datamodule = DigitsDataModule()
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)
    before, after = report.report.entries
    print(
        f"non-zero parameters {before.profile.nonzero_parameters:,} -> {after.profile.nonzero_parameters:,}, "
        f"parameters {before.profile.parameters:,} -> {after.profile.parameters:,}; report in {report.written['markdown']}"
    )


if __name__ == "__main__":
    main()

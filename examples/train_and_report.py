"""Train the small CNN on the bundled digits with a plain Lightning Trainer and write the compression report.

python examples/train_and_report.py --max-epochs 5 --output-dir outputs/example
"""

from __future__ import annotations

import argparse

import lightning as L

from lightning_compress import ClassificationModule, CompressionReport
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import SmallCNN


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--output-dir", default="outputs/example")
    parser.add_argument("--latency-repeats", type=int, default=30)
    args = parser.parse_args(argv)

    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64)
    model = SmallCNN(num_classes=10, in_channels=1, image_size=8)
    module = ClassificationModule(model, num_classes=10, input_shape=DigitsDataModule.input_shape)
    report = CompressionReport(
        output_dir=args.output_dir, latency_batch_sizes=(1, 64), latency_repeats=args.latency_repeats
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.max_epochs,
        logger=False,
        callbacks=[report],
        default_root_dir=args.output_dir,
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)
    print(f"report written to {report.written['markdown']}")


if __name__ == "__main__":
    main()

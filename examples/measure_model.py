"""Measure any model in plain PyTorch (no Trainer): parameters, sparsity, bytes, MACs and latency.

python examples/measure_model.py --arch resnet18 --image-size 32
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console

from lightning_compress.analysis import Report, profile_model
from lightning_compress.models import RESNET_ARCHITECTURES, resnet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", choices=RESNET_ARCHITECTURES)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    model = resnet(args.arch, num_classes=10, in_channels=3, small_input=True)
    input_shape = (3, args.image_size, args.image_size)
    report = Report(metadata={"model": args.arch, "input_shape": list(input_shape)})
    options = {"latency_batch_sizes": args.batch_sizes, "latency_repeats": args.repeats, "num_threads": args.threads}
    report.add("dense", profile_model(model, input_shape, **options))

    # Zero the half of each convolution's weights with the smallest magnitude, to show what the report
    # counts: non-zeros and sparsity change, dense bytes, MACs and latency do not.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                weights = module.weight.view(-1)
                weights[weights.abs().argsort()[: weights.numel() // 2]] = 0.0
    report.add("half of conv weights zeroed", profile_model(model, input_shape, **options))
    Console().print(report.to_rich_table())


if __name__ == "__main__":
    main()

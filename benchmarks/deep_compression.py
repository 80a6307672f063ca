"""Deep Compression on real Fashion-MNIST: pruning, weight clustering and the compressed artifact, against
what a user gets without them (gzip and xz of the same model's ONNX file and state dict), in one process.

For each model (LeNet-300-100, LeNet-5) and seed, the same network trains for the same epochs twice:
- dense;
- ``Pruning`` (global magnitude, AGP schedule) to ``--amount``, then ``WeightClustering`` (``--clusters``
  shared values per layer, linearly spaced start, zeros kept), fine-tuned to the end.
It records test accuracy, and for the compressed model the bytes of ``export(format="compressed")`` against
the dense model's float32 state dict (``torch.save``), beside the same pruned and clustered model's
float32 ONNX file and state dict through gzip -9 and xz -9. Deep Compression's published ratios (MNIST,
pruning + sharing + Huffman coding) are in the table for reference. The order of the two runs rotates from
seed to seed. Writes ``results/<name>.json`` and ``results/<name>.md`` (``--name``, ``deep_compression`` by default);
``--combine`` merges results files of seeds run in separate processes into one table.

    apt-get install dataset-fashion-mnist
    python benchmarks/deep_compression.py --models lenet300_100 lenet5 --seeds 0 1 2
    python benchmarks/deep_compression.py --combine results/a.json results/b.json --name deep_compression_lenet5
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import lzma
import statistics
from pathlib import Path

import lightning as L
import torch
from common import cpu_trainer, write_results
from torch import nn

from lightning_compress import ClassificationModule, Pruning, WeightClustering, compressed_bytes
from lightning_compress.analysis import evaluate_accuracy, size_on_disk
from lightning_compress.data import FashionMNISTDataModule
from lightning_compress.deploy import onnx_bytes
from lightning_compress.models import MLP, LeNet5

INPUT_SHAPE = (1, 28, 28)
#: Deep Compression's compression rates on MNIST (Han, Mao & Dally, ICLR 2016, Table 1).
PUBLISHED = {"lenet300_100": 40.0, "lenet5": 39.0}
MODELS = {
    "lenet300_100": lambda: MLP(num_classes=10, in_channels=1, image_size=28, hidden_sizes=(300, 100)),
    "lenet5": lambda: LeNet5(num_classes=10, in_channels=1, image_size=28),
}


def train(model_name: str, compress: bool, seed: int, args: argparse.Namespace) -> tuple[ClassificationModule, float]:
    L.seed_everything(seed)
    module = ClassificationModule(MODELS[model_name](), num_classes=10, input_shape=INPUT_SHAPE)
    callbacks: list[L.Callback] = []
    if compress:
        callbacks = [
            Pruning(amount=args.amount, schedule="agp", start_epoch=args.prune_start, end_epoch=args.prune_end),
            WeightClustering(clusters=args.clusters, init="linear", start_epoch=args.cluster_epoch),
        ]
    datamodule = FashionMNISTDataModule(idx_dir=args.idx_dir, batch_size=128)
    cpu_trainer(args.epochs, callbacks).fit(module, datamodule=datamodule)
    return module, evaluate_accuracy(module, datamodule.test_dataloader())


def generic_coders(module: nn.Module) -> dict[str, int]:
    """Bytes of the model's float32 ONNX file and state dict through gzip -9 and xz -9."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    files = {"onnx": onnx_bytes(module, torch.zeros(1, *INPUT_SHAPE)), "state_dict": buffer.getvalue()}
    return {
        f"{coder}_{kind}_bytes": len(compress(data))
        for kind, data in files.items()
        for coder, compress in (
            ("gzip", lambda data: gzip.compress(data, 9)),
            ("xz", lambda data: lzma.compress(data, preset=9)),
        )
    }


def measure(model_name: str, seed: int, args: argparse.Namespace) -> dict:
    order = [False, True] if seed % 2 == 0 else [True, False]
    results = {}
    for compress in order:
        module, accuracy = train(model_name, compress, seed, args)
        results["compressed" if compress else "dense"] = (module, accuracy)
    dense, dense_accuracy = results["dense"]
    compressed, compressed_accuracy = results["compressed"]
    dense_bytes = size_on_disk(dense)
    artifact = len(compressed_bytes(compressed))
    weights = [p for name, p in compressed.named_parameters() if name.endswith("weight") and p.dim() > 1]
    return {
        "seed": seed,
        "dense_accuracy": dense_accuracy,
        "compressed_accuracy": compressed_accuracy,
        "accuracy_drop_points": 100 * (dense_accuracy - compressed_accuracy),
        "dense_state_dict_bytes": dense_bytes,
        "compressed_bytes": artifact,
        "compression_ratio": dense_bytes / artifact,
        "weight_sparsity": sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights),
        "distinct_nonzero_values_per_layer": [int(torch.unique(p[p != 0]).numel()) for p in weights],
        **generic_coders(compressed),
    }


def markdown(summary: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"Deep Compression on Fashion-MNIST: magnitude pruning to {args.amount:.0%} (AGP, epochs {args.prune_start}-{args.prune_end}), "
        f"{args.clusters} shared values per layer from epoch {args.cluster_epoch}, {args.epochs} epochs, Adam 1e-3, batch 128; "
        f"median of seeds {args.seeds}. Ratios: the dense float32 state dict's bytes over each file's.",
        "",
        "| model | dense acc | compressed acc | drop (points) | compressed file | ratio | gzip ONNX | xz ONNX | gzip state dict | xz state dict | Deep Compression (MNIST) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        dense = row["dense_state_dict_bytes"]
        lines.append(
            f"| {name} | {100 * row['dense_accuracy']:.2f}% | {100 * row['compressed_accuracy']:.2f}% | {row['accuracy_drop_points']:.2f} | "
            f"{row['compressed_bytes'] / 1024:,.1f} KiB | **{row['compression_ratio']:.1f}x** | "
            + " | ".join(
                f"{dense / row[key]:.1f}x"
                for key in ("gzip_onnx_bytes", "xz_onnx_bytes", "gzip_state_dict_bytes", "xz_state_dict_bytes")
            )
            + f" | {PUBLISHED[name]:.0f}x |"
        )
    return "\n".join(lines) + "\n"


def combine(paths: list[Path]) -> tuple[argparse.Namespace, dict[str, list[dict]]]:
    """The settings and the runs of earlier results files (seeds run in separate processes), which must share
    every setting but the seeds."""
    loaded = [json.loads(path.read_text()) for path in paths]
    settings = [{key: value for key, value in data["settings"].items() if key != "seeds"} for data in loaded]
    if any(other != settings[0] for other in settings[1:]):
        raise SystemExit(f"--combine: the files differ in settings other than the seeds: {settings}")
    runs: dict[str, list[dict]] = {}
    for data in loaded:
        for name, model_runs in data["runs"].items():
            runs.setdefault(name, []).extend(model_runs)
    seeds = sorted({run["seed"] for model_runs in runs.values() for run in model_runs})
    return argparse.Namespace(**settings[0], seeds=seeds), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--amount", type=float, default=0.92)
    parser.add_argument("--prune-start", type=int, default=3)
    parser.add_argument("--prune-end", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--cluster-epoch", type=int, default=14)
    parser.add_argument("--idx-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch's intra-op threads (two benchmarks side by side: 1 each)"
    )
    parser.add_argument("--name", default="deep_compression", help="results/<name>.json and .md")
    parser.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        help="instead of training: merge the runs of these results files (seeds run apart)",
    )
    args = parser.parse_args()
    if args.combine:
        name = args.name
        args, runs = combine(args.combine)
        args.name = name
    else:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        runs = {name: [measure(name, seed, args) for seed in args.seeds] for name in args.models}
    numbers = [
        key for key, value in next(iter(runs.values()))[0].items() if isinstance(value, (int, float)) and key != "seed"
    ]
    summary = {
        name: {key: statistics.median(run[key] for run in model_runs) for key in numbers}
        for name, model_runs in runs.items()
    }
    settings = {
        key: getattr(args, key)
        for key in ("seeds", "epochs", "amount", "prune_start", "prune_end", "clusters", "cluster_epoch")
    }
    write_results(
        args.name,
        {"settings": settings},
        {"median": summary, "runs": runs, "published_mnist_ratio": PUBLISHED},
        markdown(summary, args),
    )


if __name__ == "__main__":
    main()

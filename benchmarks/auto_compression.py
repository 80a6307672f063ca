"""AutoCompression on real Fashion-MNIST against the hand Deep Compression recipe, from the same dense weights, in one
process.

For each seed, LeNet-300-100 trains dense for ``--epochs`` epochs (Adam 1e-3, batch 128) on 50,000 training images:
``--val-fraction`` (10,000 images) is held out for validation, where an accuracy's noise is 1.4x smaller than on
5,000. From a copy of those weights each contender then trains:

- the hand recipe (``experiment=deep_compression``): ``Pruning(0.92)`` by global magnitude on an AGP schedule over
  epochs 3-10, ``WeightClustering(16, init="linear")`` from epoch 14, ``--epochs`` epochs in all;
- ``AutoCompression(objective="compressed_bytes", max_accuracy_drop=--budget, confidence=--confidence)``, which chooses
  each layer's sparsity and shared values itself and stops when its search ends, within ``--auto-epochs`` epochs.

The test set is used once per model, at the end. Records the test accuracy, the bytes of the compressed file
(``export(format="compressed")``) and its ratio to the dense float32 state dict, the validation drop the search
reached, and the search's cost: its epochs, the seconds of its measurements (also in dense epochs' time) and its
wall time. The order of the two contenders alternates from seed to seed. Writes ``results/auto_compression.json``
and ``.md`` after every seed (``auto_compression_confidence90.*`` with ``--confidence 0.9``).

    apt-get install dataset-fashion-mnist
    python benchmarks/auto_compression.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import lightning as L
import torch
from common import EpochTimer, cpu_trainer, measure_seeds

from lightning_compress import AutoCompression, ClassificationModule, Pruning, WeightClustering, compressed_bytes
from lightning_compress.analysis import evaluate_accuracy, size_on_disk
from lightning_compress.analysis.cpu import cpu_flags
from lightning_compress.data import FashionMNISTDataModule
from lightning_compress.models import MLP

INPUT_SHAPE = (1, 28, 28)


def dense_model(seed: int, args: argparse.Namespace) -> tuple[ClassificationModule, float]:
    """LeNet-300-100 trained dense, and the mean seconds of its epochs."""
    L.seed_everything(seed)
    module = ClassificationModule(
        MLP(num_classes=10, in_channels=1, image_size=28, hidden_sizes=(300, 100)),
        num_classes=10,
        input_shape=INPUT_SHAPE,
    )
    timer = EpochTimer()
    cpu_trainer(args.epochs, [timer]).fit(module, datamodule=data(seed, args))
    return module, statistics.median(timer.seconds)


def data(seed: int, args: argparse.Namespace) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(idx_dir=args.idx_dir, batch_size=128, seed=seed, val_fraction=args.val_fraction)


def hand_recipe(dense: ClassificationModule, seed: int, args: argparse.Namespace) -> tuple[ClassificationModule, dict]:
    module = copy.deepcopy(dense)
    L.seed_everything(seed)
    callbacks = [
        Pruning(amount=0.92, schedule="agp", start_epoch=3, end_epoch=10),
        WeightClustering(clusters=16, init="linear", start_epoch=14),
    ]
    start = time.perf_counter()
    cpu_trainer(args.epochs, callbacks).fit(module, datamodule=data(seed, args))
    return module, {"epochs": args.epochs, "seconds": time.perf_counter() - start}


def auto_compression(
    dense: ClassificationModule, seed: int, args: argparse.Namespace
) -> tuple[ClassificationModule, dict]:
    module = copy.deepcopy(dense)
    L.seed_everything(seed)
    auto = AutoCompression(
        max_accuracy_drop=args.budget,
        monitor="val/acc",
        recovery_epochs=args.recovery_epochs,
        confidence=args.confidence,
    )
    trainer = cpu_trainer(args.auto_epochs, [auto])
    start = time.perf_counter()
    trainer.fit(module, datamodule=data(seed, args))
    return module, {
        "epochs": trainer.current_epoch,
        "seconds": time.perf_counter() - start,
        "measurement_seconds": auto.measure_seconds,
        "reference_val_accuracy": auto.reference,
        "levels": [vars(level) for level in auto.history],
        "plan": {layer: vars(plan) for layer, plan in auto.plan.items()},
    }


CONTENDERS = {"hand": hand_recipe, "auto": auto_compression}


def measure(seed: int, args: argparse.Namespace) -> dict:
    dense, epoch_seconds = dense_model(seed, args)
    datamodule = data(seed, args)
    datamodule.setup("fit")
    datamodule.setup("test")
    dense_accuracy = evaluate_accuracy(dense, datamodule.test_dataloader())
    dense_val_accuracy = evaluate_accuracy(dense, datamodule.val_dataloader())
    dense_bytes = size_on_disk(dense)
    order = list(CONTENDERS) if seed % 2 == 0 else list(reversed(CONTENDERS))
    results = {
        "seed": seed,
        "dense_accuracy": dense_accuracy,
        "dense_val_accuracy": dense_val_accuracy,
        "dense_state_dict_bytes": dense_bytes,
        "dense_epoch_seconds": epoch_seconds,
    }
    for name in order:
        module, cost = CONTENDERS[name](dense, seed, args)
        accuracy = evaluate_accuracy(module, datamodule.test_dataloader())
        val_accuracy = evaluate_accuracy(module, datamodule.val_dataloader())
        artifact = len(compressed_bytes(module))
        results[name] = {
            "test_accuracy": accuracy,
            "test_drop_points": 100 * (dense_accuracy - accuracy),
            "val_accuracy": val_accuracy,
            "val_drop_points": 100 * (dense_val_accuracy - val_accuracy),
            "compressed_bytes": artifact,
            "compression_ratio": dense_bytes / artifact,
            **cost,
        }
        if "measurement_seconds" in cost:
            results[name]["measurement_epochs"] = cost["measurement_seconds"] / epoch_seconds
        summary = {key: value for key, value in results[name].items() if not isinstance(value, (list, dict))}
        print(json.dumps({"seed": seed, "contender": name, **summary}), flush=True)
    return results


def markdown(runs: list[dict], args: argparse.Namespace) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(run[name][key] for run in runs)

    dense = statistics.median(run["dense_accuracy"] for run in runs)
    lines = [
        f"LeNet-300-100 on Fashion-MNIST ({args.val_fraction:.3g} of the training images held out for validation), "
        f"dense {args.epochs} epochs (test {100 * dense:.2f}%), then from the same weights: "
        f"the hand Deep Compression recipe ({args.epochs} epochs) and AutoCompression (objective compressed_bytes, budget "
        f"{100 * args.budget:.1f} point of validation accuracy, confidence {args.confidence}, levels of {args.recovery_epochs} epochs, at most "
        f"{args.auto_epochs}); median of seeds {args.seeds}. Ratio: the dense float32 state dict's bytes over the "
        "compressed file's. CPU: " + ", ".join(f"{key} {value}" for key, value in cpu_flags().items()) + ".",
        "",
        "| contender | test acc | test drop (points) | validation drop (points) | compressed file | ratio | epochs | "
        "measurements (epochs' time) | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("hand", "hand recipe (`experiment=deep_compression`)"), ("auto", "AutoCompression")):
        measured = f"{median(name, 'measurement_epochs'):.2f}" if "measurement_epochs" in runs[0][name] else "-"
        lines.append(
            f"| {label} | {100 * median(name, 'test_accuracy'):.2f}% | {median(name, 'test_drop_points'):.2f} | "
            f"{median(name, 'val_drop_points'):.2f} | {median(name, 'compressed_bytes') / 1024:,.1f} KiB | **{median(name, 'compression_ratio'):.1f}x** | "
            f"{median(name, 'epochs'):.0f} | {measured} | {median(name, 'seconds'):.0f} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="the dense training's and the hand recipe's")
    parser.add_argument("--auto-epochs", type=int, default=36, help="AutoCompression's most epochs")
    parser.add_argument("--recovery-epochs", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.005)
    parser.add_argument("--confidence", type=float, default=None, help="AutoCompression's (None: the drop itself)")
    parser.add_argument(
        "--val-fraction", type=float, default=1 / 6, help="of the training images, held out for validation"
    )
    parser.add_argument("--idx-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    suffix = "" if args.confidence is None else f"_confidence{round(100 * args.confidence)}"
    measure_seeds(f"auto_compression{suffix}", args, measure, markdown)


if __name__ == "__main__":
    main()

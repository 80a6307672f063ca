"""Pruning on real Fashion-MNIST, side by side with Lightning's ModelPruning, in one process.

For each seed, the project's SmallCNN trains for the same epochs four ways:
- dense, no pruning;
- ``Pruning(amount=0.9)``: global magnitude, unstructured, cubic (AGP) schedule;
- Lightning's ``ModelPruning("l1_unstructured", use_global_unstructured=True)`` reaching the same
  sparsity at the same epoch boundaries (its per-step amounts are the increments of the same AGP
  targets, since its ``amount`` compounds), without lottery-ticket resets;
- ``Pruning(amount=0.5, granularity="channel", criterion="l1", scope="layer", remove_channels=True)``.
It records test accuracy, the median training step time (interval between consecutive batch starts,
so every callback's work counts), the sparsity of the targeted weights, and for channel removal the
parameters, MACs and CPU latency (2 threads, batch 1 and 256; eager PyTorch and ONNX Runtime) against
the dense model. The order of the four runs rotates from seed to seed, so a slow spell of the shared
machine does not always land on the same method.
Writes ``results/pruning.json`` and ``results/pruning.md``.

    apt-get install dataset-fashion-mnist
    python benchmarks/pruning_vs_modelpruning.py --epochs 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics

import lightning as L
import torch
from common import StepTimer, cpu_trainer, write_results
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_compress import ClassificationModule
from lightning_compress.analysis import (
    count_macs,
    count_parameters,
    global_sparsity,
    profile_model,
)
from lightning_compress.data import FashionMNISTDataModule
from lightning_compress.models import SmallCNN
from lightning_compress.pruning import Pruning, SparsitySchedule

LATENCIES = ("latency_b1_ms", "latency_b256_ms", "ort_latency_b1_ms", "ort_latency_b256_ms")
INPUT_SHAPE = (1, 28, 28)


def modelpruning_amounts(schedule: SparsitySchedule) -> dict[int, float]:
    """ModelPruning compounds and prunes at epoch ends: the fraction of the survivors to cut at the end of
    epoch e so that the start of epoch e + 1 has the schedule's target."""
    amounts, previous = {}, 0.0
    for epoch in schedule.pruning_epochs():
        target = schedule.sparsity_at(epoch)
        amounts[epoch - 1] = 1.0 - (1.0 - target) / (1.0 - previous)
        previous = target
    return amounts


def run(method: str, seed: int, epochs: int, data_root: str) -> dict:
    L.seed_everything(seed)
    module = ClassificationModule(
        SmallCNN(num_classes=10, in_channels=1, image_size=28), num_classes=10, input_shape=INPUT_SHAPE
    )
    weights = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    schedule = SparsitySchedule(amount=0.9, kind="agp", start_epoch=1, end_epoch=epochs - 2)
    timer = StepTimer()
    methods = {
        "dense": [],
        "pruning_unstructured_90": [Pruning(amount=0.9, schedule="agp", start_epoch=1, end_epoch=epochs - 2)],
        "modelpruning_unstructured_90": [
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=[(m, "weight") for m in weights],
                use_global_unstructured=True,
                amount=lambda epoch, amounts=modelpruning_amounts(schedule): amounts.get(epoch, 0.0),
                use_lottery_ticket_hypothesis=False,
            )
        ],
        "pruning_channel_50_removed": [
            Pruning(
                amount=0.5,
                criterion="l1",
                granularity="channel",
                scope="layer",
                schedule="agp",
                start_epoch=1,
                end_epoch=epochs - 2,
                remove_channels=True,
            )
        ],
    }
    trainer = cpu_trainer(epochs, [timer, *methods[method]])
    datamodule = FashionMNISTDataModule(root=data_root, batch_size=128, seed=seed)
    trainer.fit(module, datamodule=datamodule)
    accuracy = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]
    model = module.model
    result = {
        "method": method,
        "seed": seed,
        "test_accuracy": accuracy,
        "step_ms": 1000 * statistics.median(timer.intervals),
        "weight_sparsity": global_sparsity(model).sparsity,
        "parameters": count_parameters(model),
        "macs": count_macs(model, torch.zeros(1, *INPUT_SHAPE)),
    }
    if method in ("dense", "pruning_channel_50_removed"):
        for runtime, prefix in (("torch", ""), ("onnxruntime", "ort_")):
            profile = profile_model(
                model,
                INPUT_SHAPE,
                latency_batch_sizes=(1, 256),
                latency_repeats=50,
                num_threads=2,
                latency_runtime=runtime,
            )
            result |= {f"{prefix}latency_b{batch}_ms": profile.latency[batch].median_ms for batch in (1, 256)}
    return result


def median_of(runs: list[dict], method: str, key: str) -> float:
    return statistics.median(run[key] for run in runs if run["method"] == method)


def summary(runs: list[dict]) -> dict:
    dense = {
        key: median_of(runs, "dense", key) for key in ("test_accuracy", "step_ms", "parameters", "macs", *LATENCIES)
    }
    result = {"dense": dense}
    for method in ("pruning_unstructured_90", "modelpruning_unstructured_90"):
        result[method] = {
            "test_accuracy": median_of(runs, method, "test_accuracy"),
            "accuracy_drop_points": 100 * (dense["test_accuracy"] - median_of(runs, method, "test_accuracy")),
            "weight_sparsity": median_of(runs, method, "weight_sparsity"),
            "step_time_ratio_to_dense": median_of(runs, method, "step_ms") / dense["step_ms"],
        }
    channel = "pruning_channel_50_removed"
    result[channel] = {
        "test_accuracy": median_of(runs, channel, "test_accuracy"),
        "accuracy_drop_points": 100 * (dense["test_accuracy"] - median_of(runs, channel, "test_accuracy")),
        **{f"{key}_ratio": median_of(runs, channel, key) / dense[key] for key in ("parameters", "macs", *LATENCIES)},
    }
    return result


def markdown(result: dict, epochs: int, seeds: list[int]) -> str:
    dense, ours, theirs, channel = (
        result[k]
        for k in ("dense", "pruning_unstructured_90", "modelpruning_unstructured_90", "pruning_channel_50_removed")
    )
    return "\n".join(
        [
            f"Fashion-MNIST, SmallCNN, {epochs} epochs, Adam 1e-3, batch 128, seeds {seeds}; medians over seeds. "
            f"Pruning steps at the starts of epochs 1..{epochs - 2} (AGP), last epoch to recover.",
            "",
            "| method | test acc | drop vs dense (points) | weight sparsity | step time vs dense |",
            "|---|---|---|---|---|",
            f"| dense | {100 * dense['test_accuracy']:.2f}% | – | – | 1.000x ({dense['step_ms']:.1f} ms) |",
            f"| `Pruning` unstructured 90% | {100 * ours['test_accuracy']:.2f}% | {ours['accuracy_drop_points']:.2f} | "
            f"{100 * ours['weight_sparsity']:.2f}% | {ours['step_time_ratio_to_dense']:.3f}x |",
            f"| Lightning `ModelPruning` 90% | {100 * theirs['test_accuracy']:.2f}% | {theirs['accuracy_drop_points']:.2f} | "
            f"{100 * theirs['weight_sparsity']:.2f}% | {theirs['step_time_ratio_to_dense']:.3f}x |",
            "",
            "| channel 50% (L1, per layer), removed | test acc | drop (points) | parameters | MACs "
            "| latency b1, ONNX Runtime | latency b256, ONNX Runtime | latency b1, eager torch | latency b256, eager torch |",
            "|---|---|---|---|---|---|---|---|---|",
            f'| `Pruning(granularity="channel", remove_channels=True)` | {100 * channel["test_accuracy"]:.2f}% | '
            f"{channel['accuracy_drop_points']:.2f} | {channel['parameters_ratio']:.3f}x | {channel['macs_ratio']:.3f}x | "
            f"{channel['ort_latency_b1_ms_ratio']:.3f}x | {channel['ort_latency_b256_ms_ratio']:.3f}x | "
            f"{channel['latency_b1_ms_ratio']:.3f}x | {channel['latency_b256_ms_ratio']:.3f}x |",
            "",
            "Ratios are the method's median over seeds divided by the dense model's median. Latency is on the CPU with 2 threads, "
            f"in ONNX Runtime (dense: {dense['ort_latency_b1_ms']:.3f} ms at batch 1, {dense['ort_latency_b256_ms']:.1f} ms at 256) "
            f"and in eager PyTorch (dense: {dense['latency_b1_ms']:.3f} ms, {dense['latency_b256_ms']:.1f} ms), "
            "where per-operator overhead dominates at batch 1.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs must be at least 3: one dense epoch, pruning steps, one epoch to recover")
    torch.set_num_threads(2)
    methods = ("dense", "pruning_unstructured_90", "modelpruning_unstructured_90", "pruning_channel_50_removed")
    runs = []
    for turn, seed in enumerate(args.seeds):
        rotated = methods[turn % len(methods) :] + methods[: turn % len(methods)]
        runs += [run(method, seed, args.epochs, args.data_root) for method in rotated]
    result = summary(runs)
    settings = {"epochs": args.epochs, "seeds": args.seeds}
    write_results("pruning", settings, {"summary": result, "runs": runs}, markdown(result, args.epochs, args.seeds))


if __name__ == "__main__":
    main()

"""AutoCompression for ONNX Runtime's latency on real Fashion-MNIST against the main job's hand ``pruning+quantization``
stage, from the same dense weights, in one process.

For each seed the main job's SmallCNN trains dense for ``--epochs`` epochs (Adam 1e-3, batch 128) on the training
images less ``--val-fraction`` held out for validation. From a copy of those weights each contender then trains:

- the hand stage: the main job's recipes as its configs write them (``compression/pruning=agp90``: 90% of the
  weights by global magnitude on an AGP schedule; ``compression/quantization=int8_qat``: 8-bit weights and
  activations), over ``--hand-epochs`` epochs with the quantization's epochs scaled as the main job places them
  in its 20 (from the middle, observers and BatchNorm frozen at 80%); exported as an int8 ONNX graph;
- ``AutoCompression(objective="latency", max_accuracy_drop=--budget, confidence=--confidence)``, which removes whole
  channels layer by layer where ONNX Runtime's time at batch 256 (one thread) drops the most for the least damage
  and takes the layers to int8 where that is faster, within ``--auto-epochs``; exported as the ONNX graph of the
  smaller model (integer where it kept int8).

The test set is used once per model, at the end. The three graphs (dense, hand, auto) are then timed together in a
new process, in interleaved shuffled rounds (1 and 2 threads, batch 1 and 256). Writes
``results/auto_latency.json`` and ``.md`` after every seed.

    apt-get install dataset-fashion-mnist
    python benchmarks/auto_latency.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from common import EpochTimer, cpu_trainer, measure_seeds, time_graphs_in_fresh_process
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_compress import AutoCompression, ClassificationModule
from lightning_compress.analysis import count_macs, evaluate_accuracy
from lightning_compress.analysis.cpu import cpu_flags
from lightning_compress.data import FashionMNISTDataModule
from lightning_compress.deploy.onnx import onnx_bytes
from lightning_compress.models import SmallCNN

CONFIGS = Path(__file__).parent.parent / "configs" / "compression"
INPUT_SHAPE = (1, 28, 28)
#: The main job's 20 epochs: quantization from epoch 10, observers and BatchNorm frozen from epoch 16.
QUANTIZATION_START, QUANTIZATION_FREEZE = 10 / 20, 16 / 20
CONTENDERS = ("dense", "hand", "auto")


def data(seed: int, args: argparse.Namespace) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(
        idx_dir=args.idx_dir,
        batch_size=128,
        seed=seed,
        val_fraction=args.val_fraction,
        train_samples=args.train_samples,
    )


def dense_model(seed: int, args: argparse.Namespace) -> tuple[ClassificationModule, float]:
    """The main job's SmallCNN trained dense, and the median seconds of its epochs."""
    L.seed_everything(seed)
    module = ClassificationModule(SmallCNN(num_classes=10, in_channels=1, image_size=28), 10, input_shape=INPUT_SHAPE)
    timer = EpochTimer()
    cpu_trainer(args.epochs, [timer]).fit(module, datamodule=data(seed, args))
    return module, statistics.median(timer.seconds)


def hand_stage(dense: ClassificationModule, seed: int, args: argparse.Namespace) -> tuple[ClassificationModule, dict]:
    module = copy.deepcopy(dense)
    L.seed_everything(seed)
    pruning = instantiate(OmegaConf.load(CONFIGS / "pruning" / "agp90.yaml"))
    quantization = OmegaConf.load(CONFIGS / "quantization" / "int8_qat.yaml")
    freeze = round(QUANTIZATION_FREEZE * args.hand_epochs)
    quantization.start_epoch = round(QUANTIZATION_START * args.hand_epochs)
    quantization.freeze_observers_epoch = quantization.freeze_bn_epoch = freeze
    start = time.perf_counter()
    cpu_trainer(args.hand_epochs, [pruning, instantiate(quantization)]).fit(module, datamodule=data(seed, args))
    return module, {"epochs": args.hand_epochs, "seconds": time.perf_counter() - start}


def auto_compression(
    dense: ClassificationModule, seed: int, args: argparse.Namespace
) -> tuple[ClassificationModule, dict]:
    module = copy.deepcopy(dense)
    L.seed_everything(seed)
    auto = AutoCompression(
        objective="latency",
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


def measure(seed: int, args: argparse.Namespace) -> dict:
    dense, epoch_seconds = dense_model(seed, args)
    datamodule = data(seed, args)
    datamodule.setup("fit")
    datamodule.setup("test")
    test_images = torch.cat([images for images, _ in datamodule.test_dataloader()])
    example = test_images[:2]
    models, results = {"dense": dense}, {"seed": seed, "dense_epoch_seconds": epoch_seconds}
    order = ["hand", "auto"] if seed % 2 == 0 else ["auto", "hand"]
    for name in order:
        models[name], results[name] = (hand_stage if name == "hand" else auto_compression)(dense, seed, args)
    for name in CONTENDERS:
        module = models[name]
        results.setdefault(name, {}).update(
            test_accuracy=evaluate_accuracy(module, datamodule.test_dataloader()),
            val_accuracy=evaluate_accuracy(module, datamodule.val_dataloader()),
            macs_per_sample=count_macs(module, example) // 2,
        )
    graphs = {name: onnx_bytes(models[name], example) for name in CONTENDERS}
    timings = time_graphs_in_fresh_process(graphs, test_images, seed, threads=(1, 2), batches=(1, 256))
    for name in CONTENDERS:
        entry = results[name]
        entry["onnx_bytes"] = len(graphs[name])
        entry["test_drop_points"] = 100 * (results["dense"]["test_accuracy"] - entry["test_accuracy"])
        entry["val_drop_points"] = 100 * (results["dense"]["val_accuracy"] - entry["val_accuracy"])
        for key, milliseconds in timings.items():
            if key.startswith(f"{name}_latency_"):
                field = key.removeprefix(f"{name}_")
                entry[field] = milliseconds
                entry[f"{field.removesuffix('_ms')}_vs_dense"] = milliseconds / timings[f"dense_{field}"]
    if "measurement_seconds" in results["auto"]:
        results["auto"]["measurement_epochs"] = results["auto"]["measurement_seconds"] / epoch_seconds
    summary = {name: {k: v for k, v in results[name].items() if not isinstance(v, (list, dict))} for name in CONTENDERS}
    print(json.dumps({"seed": seed, **summary}), flush=True)
    return results


def markdown(runs: list[dict], args: argparse.Namespace) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(run[name][key] for run in runs)

    seeds = [run["seed"] for run in runs]
    lines = [
        f"SmallCNN on Fashion-MNIST ({args.val_fraction:.3g} of the training images held out for validation), dense "
        f"{args.epochs} epochs (test {100 * median('dense', 'test_accuracy'):.2f}%), then from the same weights: the main "
        f"job's hand `pruning+quantization` stage (agp90 + int8_qat, {args.hand_epochs} epochs, int8 ONNX) and "
        f"AutoCompression (objective latency: ONNX Runtime, 1 thread, batch 256; budget {100 * args.budget:.1f} point "
        f"of validation accuracy, confidence {args.confidence}, levels of {args.recovery_epochs} epochs, at most "
        f"{args.auto_epochs}; methods channels and int8, ONNX with the channels removed); median of seeds {seeds}. Latency: ONNX Runtime, each graph timed with the others in "
        "interleaved shuffled rounds in a fresh process; ratios to the dense graph. CPU: "
        + ", ".join(f"{key} {value}" for key, value in cpu_flags().items())
        + ".",
        "",
        "| contender | test acc | test drop (points) | validation drop (points) | MACs / sample | b1, 1 thread | "
        "b256, 1 thread | b1, 2 threads | b256, 2 threads | epochs | measurements (epochs' time) | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("dense", "dense"), ("hand", "hand `pruning+quantization`"), ("auto", "AutoCompression")):
        times = " | ".join(
            f"{median(name, f'latency_t{threads}_b{batch}_ms'):.3f} ms ({median(name, f'latency_t{threads}_b{batch}_vs_dense'):.2f}x)"
            for threads in (1, 2)
            for batch in (1, 256)
        )
        epochs = f"{median(name, 'epochs'):.0f}" if "epochs" in runs[0][name] else f"{args.epochs}"
        measured = f"{median(name, 'measurement_epochs'):.2f}" if "measurement_epochs" in runs[0][name] else "-"
        wall = f"{median(name, 'seconds'):.0f} s" if "seconds" in runs[0][name] else "-"
        lines.append(
            f"| {label} | {100 * median(name, 'test_accuracy'):.2f}% | {median(name, 'test_drop_points'):.2f} | "
            f"{median(name, 'val_drop_points'):.2f} | {median(name, 'macs_per_sample'):,.0f} | {times} | {epochs} | "
            f"{measured} | {wall} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12, help="the dense training's")
    parser.add_argument("--hand-epochs", type=int, default=12)
    parser.add_argument("--auto-epochs", type=int, default=12, help="AutoCompression's most epochs")
    parser.add_argument("--recovery-epochs", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.005)
    parser.add_argument("--confidence", type=float, default=None, help="AutoCompression's (None: the drop itself)")
    parser.add_argument("--val-fraction", type=float, default=1 / 6)
    parser.add_argument("--train-samples", type=int, default=None, help="fewer training images (a quick check)")
    parser.add_argument("--idx-dir", default="/usr/share/datasets/fashion-mnist")
    args = parser.parse_args()
    measure_seeds("auto_latency", args, measure, markdown)


if __name__ == "__main__":
    main()

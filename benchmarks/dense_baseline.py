"""Dense baselines on real Fashion-MNIST, and the measurement checked against Torch-Pruning's counter.

Trains the project's SmallCNN and MLP for the same epochs over several seeds with a plain Trainer,
measures each trained model with ``profile_model`` (CPU, 2 threads), and counts the same models'
parameters and operations with Torch-Pruning's ``count_ops_and_params`` in the same process.
Writes ``results/dense_baseline.json`` and ``results/dense_baseline.md``.

    pip install torch-pruning && apt-get install dataset-fashion-mnist
    python benchmarks/dense_baseline.py --epochs 3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics

import lightning as L
import torch
from common import EpochTimer, cpu_trainer, write_results

from lightning_compress import ClassificationModule
from lightning_compress.analysis import profile_model
from lightning_compress.data import FashionMNISTDataModule
from lightning_compress.models import MLP, SmallCNN

MODELS = {
    "small_cnn": lambda: SmallCNN(num_classes=10, in_channels=1, image_size=28),
    "mlp": lambda: MLP(num_classes=10, in_channels=1, image_size=28),
}


def run(model_name: str, seed: int, epochs: int, data_root: str) -> dict:
    L.seed_everything(seed)
    datamodule = FashionMNISTDataModule(root=data_root, batch_size=128, seed=seed)
    module = ClassificationModule(MODELS[model_name](), num_classes=10, input_shape=(1, 28, 28))
    timer = EpochTimer()
    trainer = cpu_trainer(epochs, [timer])
    trainer.fit(module, datamodule=datamodule)
    accuracy = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]
    profile = profile_model(module.model, (1, 28, 28), latency_batch_sizes=(1, 256), latency_repeats=50, num_threads=2)
    return {
        "seed": seed,
        "test_accuracy": accuracy,
        "epoch_seconds": statistics.median(timer.seconds),
        "parameters": profile.parameters,
        "size_bytes": profile.size_bytes,
        "macs": profile.macs,
        "latency_b1_ms": profile.latency[1].median_ms,
        "latency_b256_ms": profile.latency[256].median_ms,
    }


def torch_pruning_counts(model_name: str) -> dict | None:
    try:
        import torch_pruning
    except ImportError:
        return None
    model = MODELS[model_name]().eval()
    operations, parameters = torch_pruning.utils.count_ops_and_params(model, torch.randn(1, 1, 28, 28))
    return {"operations": int(operations), "parameters": int(parameters), "version": torch_pruning.__version__}


def summarize(model_name: str, runs: list[dict]) -> dict:
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "seed"}
    return {"model": model_name, "runs": runs, "median": median, "torch_pruning": torch_pruning_counts(model_name)}


def markdown(results: list[dict], epochs: int, seeds: list[int]) -> str:
    lines = [
        f"Fashion-MNIST, {epochs} epochs, Adam 1e-3, batch 128, seeds {seeds}; medians over seeds. "
        "Latency: eager PyTorch on CPU, 2 threads, median of 50 runs.",
        "",
        "| model | test acc | s / epoch | parameters | bytes | MACs | latency b1 (ms) | latency b256 (ms) | Torch-Pruning params | Torch-Pruning ops |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        m, peer = result["median"], result["torch_pruning"] or {}
        lines.append(
            f"| {result['model']} | {100 * m['test_accuracy']:.2f}% | {m['epoch_seconds']:.1f} | {int(m['parameters']):,} | "
            f"{int(m['size_bytes']):,} | {int(m['macs']):,} | {m['latency_b1_ms']:.3f} | {m['latency_b256_ms']:.2f} | "
            f"{peer.get('parameters', '–'):,} | {peer.get('operations', '–'):,} |"
        )
    lines += [
        "",
        "Torch-Pruning's `count_ops_and_params` agrees on parameters; its operation count adds BatchNorm, ReLU and "
        "pooling to the multiply-accumulates of convolutions and linear layers that `count_macs` counts.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = [
        summarize(name, [run(name, seed, args.epochs, args.data_root) for seed in args.seeds]) for name in args.models
    ]
    write_results(
        "dense_baseline",
        {"epochs": args.epochs, "seeds": args.seeds},
        {"results": results},
        markdown(results, args.epochs, args.seeds),
    )


if __name__ == "__main__":
    main()

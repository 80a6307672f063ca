"""The small vision transformer on real Fashion-MNIST: dense, int8 QAT and half its heads (and MLP neurons) pruned,
side by side in one process.

For each seed, ``vision_transformer(num_classes=10)`` (4 layers, hidden size 64, 4 heads, MLP 128, 7x7
patches; ``model=vit_tiny``) trains dense for ``--epochs`` epochs (AdamW 1e-3, weight decay 0.05, a cosine
schedule, batch 128). A copy of that trained model is then fine-tuned three ways, as the field does (QAT as
a short fine-tuning of the trained float model, pruning as train, prune, fine-tune):

- int8 ``QuantizationAwareTraining`` (``compression/quantization=int8_qat``'s settings: every weight layer,
  the attention's projections included, int8 weights per channel with ``reduce_range``, int8 activations,
  moving-average ranges) for 1 epoch, fake quantization on from the first step, at 1% of the training
  learning rate with a cosine schedule (NVIDIA's rule for QAT fine-tuning); exported with our int8 ONNX export;
- half the heads of every layer by Taylor importance (``compression/pruning=heads50``: ``granularity="head"``,
  ``scope="layer"``), pruned in one shot after the first 16 steps and removed at the end, recovering for 2
  epochs at a tenth of the training learning rate (cosine);
- the same, with half the MLP neurons of every layer too (a second ``Pruning`` of ``*.mlp.0``,
  ``compression/neuron_pruning=mlp50``).

The peer is ONNX Runtime's ``quantize_static`` (QDQ, int8 weights per channel and int8 activations, min-max
calibration on 32 training batches) of the dense model's fp32 ONNX file, as ``quantization_vs_ort.py`` uses.
Records test accuracy on the 10,000 test images in PyTorch and, for every ONNX file, in ONNX Runtime (with
the top-1 agreement of each file with its PyTorch model), parameters, ONNX bytes, and ONNX Runtime latency
at batch 1 and 256 with 1 and 2 threads: the five files timed together in a fresh process, in 30
interleaved rounds of a new random order each. Training runs on 1 torch thread: on this 2-core machine,
shared with other jobs, a step at 2 threads took 6.5x as long as at 1. Writes
``results/vit_fashion_mnist.json`` and ``.md``.

    apt-get install dataset-fashion-mnist
    python benchmarks/vit_fashion_mnist.py --quick          # a few batches per epoch, one seed, nothing written
    python benchmarks/vit_fashion_mnist.py --epochs 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import time
from functools import partial
from pathlib import Path

import lightning as L
import onnxruntime
import torch
from common import (
    cpu_description,
    cpu_trainer,
    fashion_mnist,
    ort_quantize_static,
    time_graphs_in_fresh_process,
    write_results,
)

import lightning_compress.deploy.qdq  # noqa: F401  (imported once, now: every seed exports with the same code)
from lightning_compress import ClassificationModule, Pruning, QuantizationAwareTraining
from lightning_compress.analysis import count_parameters
from lightning_compress.data import FashionMNISTDataModule
from lightning_compress.deploy import OnnxRuntimeModel, onnx_bytes
from lightning_compress.models.vit import vision_transformer

INPUT_SHAPE = (1, 28, 28)
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
QAT_EPOCHS = 1
QAT_LEARNING_RATE = LEARNING_RATE / 100
PRUNING_EPOCHS = 2
PRUNING_LEARNING_RATE = LEARNING_RATE / 10
CALIBRATION_BATCHES = 32
TRAIN_THREADS = 1
BATCHES = (1, 256)
THREADS = (1, 2)
#: compression/quantization=int8_qat's quantizer settings
QAT_SETTINGS = dict(
    weight_bits=8,
    activation_bits=8,
    per_channel=True,
    symmetric=True,
    reduce_range=True,
    observer="moving_average",
    learnable_scales=False,
)
#: compression/pruning=heads50 and compression/neuron_pruning=mlp50, in one shot at the start of fine-tuning
PRUNING_SETTINGS = dict(amount=0.5, criterion="taylor", scope="layer", schedule="oneshot", remove_channels=True)
METHODS = ("dense", "qat_int8", "heads50", "heads50_mlp50")
#: the ONNX files timed against each other; "ort_static" is the peer's int8 file of the dense model
TIMED = ("dense", "qat_int8", "ort_static", "heads50", "heads50_mlp50")
NAMES = {
    "dense": "dense (fp32)",
    "qat_int8": "`QuantizationAwareTraining` int8, our `export`",
    "ort_static": "peer: ONNX Runtime `quantize_static` int8 of dense",
    "heads50": "half the heads pruned and removed (fp32)",
    "heads50_mlp50": "half the heads and half the MLP neurons (fp32)",
}


def classifier(model: torch.nn.Module, learning_rate: float, epochs: int) -> ClassificationModule:
    """``model`` with AdamW at ``learning_rate`` (weight decay 0.05) on a cosine schedule over ``epochs``."""
    return ClassificationModule(
        model,
        num_classes=10,
        optimizer=partial(torch.optim.AdamW, lr=learning_rate, weight_decay=WEIGHT_DECAY),
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
        input_shape=INPUT_SHAPE,
    )


def fit(
    module: ClassificationModule,
    datamodule: FashionMNISTDataModule,
    epochs: int,
    callbacks: list[L.Callback],
    seed: int,
    limit_batches: int | None,
) -> float:
    """Train ``module`` (no validation); the seconds it took."""
    L.seed_everything(seed)
    trainer = cpu_trainer(
        epochs, callbacks, limit_train_batches=limit_batches, limit_val_batches=0, num_sanity_val_steps=0
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def train_all(
    seed: int, epochs: int, datamodule: FashionMNISTDataModule, limit_batches: int | None
) -> tuple[dict[str, ClassificationModule], dict[str, float]]:
    """The dense model trained from scratch, and the three fine-tuned from copies of it."""
    torch.manual_seed(seed)
    dense = classifier(vision_transformer(num_classes=10), LEARNING_RATE, epochs)
    seconds = {"dense": fit(dense, datamodule, epochs, [], seed, limit_batches)}
    plans = {
        "qat_int8": (QAT_LEARNING_RATE, QAT_EPOCHS, lambda: [QuantizationAwareTraining(start_epoch=0, **QAT_SETTINGS)]),
        "heads50": (PRUNING_LEARNING_RATE, PRUNING_EPOCHS, lambda: [Pruning(granularity="head", **PRUNING_SETTINGS)]),
        "heads50_mlp50": (
            PRUNING_LEARNING_RATE,
            PRUNING_EPOCHS,
            lambda: [
                Pruning(granularity="head", **PRUNING_SETTINGS),
                Pruning(granularity="channel", targets=["*.mlp.0"], **PRUNING_SETTINGS),
            ],
        ),
    }
    trained = {"dense": dense.eval()}
    for method, (learning_rate, fine_tune_epochs, callbacks) in plans.items():
        module = classifier(copy.deepcopy(dense.model), learning_rate, fine_tune_epochs)
        seconds[method] = fit(module, datamodule, fine_tune_epochs, callbacks(), seed, limit_batches)
        trained[method] = module.eval()
    return trained, seconds


def ort_latencies(graphs: dict[str, bytes], seed: int, quick: bool) -> dict[str, float]:
    """``<model>_latency_t<threads>_b<batch>_ms`` of each graph, timed together in a fresh process (a tenth of the
    repeats with ``quick``)."""
    inputs = torch.randn((max(BATCHES), *INPUT_SHAPE), generator=torch.Generator().manual_seed(0))
    repeats = {batch: (300 if batch == 1 else 30) // (10 if quick else 1) for batch in BATCHES}
    return time_graphs_in_fresh_process(
        graphs, inputs, seed, THREADS, BATCHES, repeats=repeats, warmup=3 if quick else 20, rounds=30
    )


def architecture(model: torch.nn.Module) -> dict[str, list[int]]:
    """Heads and MLP width of each encoder layer."""
    layers = model.encoder.layers
    return {
        "heads": [layer.self_attention.num_heads for layer in layers],
        "mlp_width": [layer.mlp[0].out_features for layer in layers],
    }


def run_seed(seed: int, epochs: int, data_root: str, limit_batches: int | None, quick: bool) -> dict:
    datamodule, calibration, test_inputs, test_targets = fashion_mnist(seed, BATCH_SIZE, CALIBRATION_BATCHES, data_root)

    trained, seconds = train_all(seed, epochs, datamodule, limit_batches)
    result: dict = {"seed": seed, **{f"{method}_fit_s": value for method, value in seconds.items()}}
    torch_predictions = {}
    for method, module in trained.items():
        with torch.no_grad():
            torch_predictions[method] = torch.cat([module(batch).argmax(1) for batch in test_inputs.split(500)])
        result[f"{method}_test_accuracy"] = (torch_predictions[method] == test_targets).float().mean().item()
        result[f"{method}_parameters"] = count_parameters(module.model)
        result[f"{method}_architecture"] = architecture(module.model)
    result["ort_static_parameters"] = result["dense_parameters"]

    graphs = {method: onnx_bytes(module, test_inputs[:1]) for method, module in trained.items()}
    graphs["ort_static"] = ort_quantize_static(graphs["dense"], calibration)
    for name, graph in graphs.items():
        predictions = OnnxRuntimeModel(graph, num_threads=TRAIN_THREADS)(test_inputs).argmax(1)
        result[f"{name}_onnx_bytes"] = len(graph)
        result[f"{name}_ort_test_accuracy"] = (predictions == test_targets).float().mean().item()
        # the peer's file against the dense model it quantized; each of ours against its own PyTorch model
        reference = torch_predictions["dense" if name == "ort_static" else name]
        result[f"{name}_ort_agreement_with_torch"] = (predictions == reference).float().mean().item()
    result |= ort_latencies({name: graphs[name] for name in TIMED}, seed, quick)
    print(json.dumps(result), flush=True)
    return result


def source_state() -> dict[str, object]:
    """The commit measured and the files that differed from it."""

    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], capture_output=True, text=True, cwd=Path(__file__).parent).stdout

    return {"commit": git("rev-parse", "HEAD").strip(), "modified": git("status", "--porcelain").splitlines()}


def latency_key(model: str, threads: int, batch: int) -> str:
    return f"{model}_latency_t{threads}_b{batch}_ms"


def summary(runs: list[dict]) -> dict:
    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    def median_ratio(key: str, reference: str) -> float:
        """The median over seeds of each seed's ratio (both sides of a latency ratio were timed in the same rounds)."""
        return statistics.median(run[key] / run[reference] for run in runs)

    dense = median("dense_test_accuracy")
    dense_ort = median("dense_ort_test_accuracy")
    result: dict = {
        "test_accuracy": {m: median(f"{m}_test_accuracy") for m in METHODS},
        "drop_points_vs_dense": {m: 100 * (dense - median(f"{m}_test_accuracy")) for m in METHODS if m != "dense"},
        "ort_test_accuracy": {m: median(f"{m}_ort_test_accuracy") for m in TIMED},
        "ort_drop_points_vs_dense": {
            m: 100 * (dense_ort - median(f"{m}_ort_test_accuracy")) for m in TIMED if m != "dense"
        },
        "ort_agreement_with_torch": {m: median(f"{m}_ort_agreement_with_torch") for m in TIMED},
        "parameters": {m: median(f"{m}_parameters") for m in TIMED},
        "parameters_ratio_to_dense": {m: median_ratio(f"{m}_parameters", "dense_parameters") for m in TIMED},
        "architecture": {m: runs[0][f"{m}_architecture"] for m in METHODS},
        "onnx_bytes": {m: median(f"{m}_onnx_bytes") for m in TIMED},
        "bytes_ratio_to_dense": {m: median_ratio(f"{m}_onnx_bytes", "dense_onnx_bytes") for m in TIMED},
        "ort_latency_ms": {
            f"{m}_t{t}_b{b}": median(latency_key(m, t, b)) for m in TIMED for t in THREADS for b in BATCHES
        },
        "latency_ratio_to_dense": {
            f"{m}_t{t}_b{b}": median_ratio(latency_key(m, t, b), latency_key("dense", t, b))
            for m in TIMED
            for t in THREADS
            for b in BATCHES
        },
        "qat_int8_latency_ratio_to_peer": {
            f"t{t}_b{b}": median_ratio(latency_key("qat_int8", t, b), latency_key("ort_static", t, b))
            for t in THREADS
            for b in BATCHES
        },
        "fit_s": {m: median(f"{m}_fit_s") for m in METHODS},
    }
    return result


def header(epochs: int, seeds: list[int], limit_batches: int | None) -> str:
    limited = f" (only {limit_batches} batches an epoch)" if limit_batches else ""
    return (
        f"Fashion-MNIST, `vision_transformer(num_classes=10)` (4 layers, hidden 64, 4 heads, MLP 128, 7x7 patches), "
        f"seeds {seeds}, medians over seeds. Dense: {epochs} epochs{limited}, AdamW {LEARNING_RATE:g} (weight decay "
        f"{WEIGHT_DECAY:g}), cosine, batch {BATCH_SIZE}. Each compressed model fine-tunes a copy of the trained dense "
        f"model: int8 QAT for {QAT_EPOCHS} epoch at {QAT_LEARNING_RATE:g} (fake quantization from the first step, "
        f"per-channel int8 weights with reduce_range, int8 activations, moving-average ranges); pruning by Taylor "
        f"importance in one shot after 16 steps, half of every layer's heads (and MLP neurons), removed at the end, "
        f"{PRUNING_EPOCHS} epochs at {PRUNING_LEARNING_RATE:g}, cosine. The peer quantizes the dense fp32 ONNX file "
        f"with `quantize_static` (QDQ, per channel, {CALIBRATION_BATCHES} calibration batches). Training on "
        f"{TRAIN_THREADS} torch thread."
    )


def markdown(result: dict, epochs: int, seeds: list[int], limit_batches: int | None) -> str:
    acc, ort_acc, drop = result["test_accuracy"], result["ort_test_accuracy"], result["ort_drop_points_vs_dense"]
    agreement, params, params_ratio = (
        result["ort_agreement_with_torch"],
        result["parameters"],
        result["parameters_ratio_to_dense"],
    )
    nbytes, bytes_ratio = result["onnx_bytes"], result["bytes_ratio_to_dense"]
    latency, latency_ratio, peer = (
        result["ort_latency_ms"],
        result["latency_ratio_to_dense"],
        result["qat_int8_latency_ratio_to_peer"],
    )
    lines = [
        header(epochs, seeds, limit_batches),
        "",
        "| model | test acc (PyTorch) | test acc in ONNX Runtime | vs dense (points) | top-1 agreement ORT / PyTorch | parameters | vs dense | ONNX bytes | vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in TIMED:
        torch_acc = f"{100 * acc[model]:.2f}%" if model in acc else "–"
        points = "–" if model == "dense" else f"{-drop[model]:+.2f}"
        ratio = "1.000x" if model == "dense" else f"{params_ratio[model]:.3f}x"
        size_ratio = "1.000x" if model == "dense" else f"{bytes_ratio[model]:.3f}x"
        lines.append(
            f"| {NAMES[model]} | {torch_acc} | {100 * ort_acc[model]:.2f}% | {points} | {100 * agreement[model]:.2f}% | "
            f"{params[model]:,.0f} | {ratio} | {nbytes[model]:,.0f} | {size_ratio} |"
        )
    lines += [
        "",
        "ONNX Runtime latency (ms; ratios are medians over seeds of each seed's ratio): for each seed the five files "
        "are timed in one fresh process, in 30 interleaved rounds of a new random order each.",
        "",
        "| model | threads | b1 | b256 | b1 vs dense | b256 vs dense | b1 vs peer | b256 vs peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for threads in THREADS:
        for model in TIMED:
            cells = [NAMES[model], str(threads)]
            cells += [f"{latency[f'{model}_t{threads}_b{batch}']:.3f}" for batch in BATCHES]
            cells += [
                "–" if model == "dense" else f"{latency_ratio[f'{model}_t{threads}_b{batch}']:.3f}x"
                for batch in BATCHES
            ]
            cells += [f"{peer[f't{threads}_b{batch}']:.3f}x" if model == "qat_int8" else "–" for batch in BATCHES]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="dense training epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a check of the script: 20 batches an epoch, 2 epochs, seed 0, short timing, results printed, not written",
    )
    args = parser.parse_args()
    onnxruntime.set_default_logger_severity(3)  # our int8 files' overridable scales warn at every session
    if args.quick:
        args.epochs, args.seeds, args.limit_batches = 2, [0], args.limit_batches or 20
    torch.set_num_threads(TRAIN_THREADS)
    source = source_state()
    start = time.perf_counter()
    runs = [run_seed(seed, args.epochs, args.data_root, args.limit_batches, args.quick) for seed in args.seeds]
    result = summary(runs)
    wall_s = time.perf_counter() - start
    table = markdown(result, args.epochs, args.seeds, args.limit_batches)
    if args.quick:
        print(table, f"\n{wall_s:.0f} s")
        return
    settings = {
        "epochs": args.epochs,
        "seeds": args.seeds,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY,
        "qat_epochs": QAT_EPOCHS,
        "qat_learning_rate": QAT_LEARNING_RATE,
        "qat_settings": QAT_SETTINGS,
        "pruning_epochs": PRUNING_EPOCHS,
        "pruning_learning_rate": PRUNING_LEARNING_RATE,
        "pruning_settings": PRUNING_SETTINGS,
        "calibration_batches": CALIBRATION_BATCHES,
        "train_threads": TRAIN_THREADS,
        "limit_batches": args.limit_batches,
        "cpu": cpu_description(),
        "wall_s": wall_s,
        "source": source,
    }
    write_results("vit_fashion_mnist", settings, {"summary": result, "runs": runs}, table)


if __name__ == "__main__":
    main()

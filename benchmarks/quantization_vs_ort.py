"""Quantization on real Fashion-MNIST, side by side with ONNX Runtime's own ``quantize_static``, in one process.

For each seed, the project's SmallCNN trains for the same epochs four ways:
- fp32;
- ``QuantizationAwareTraining`` int8 with its defaults (fake quantization from epoch 1, observers and BatchNorm
  frozen for the last epoch): 7-bit weights for ``target_cpu="avx2"``, exact and fast on every x86 CPU;
- the same with full 8-bit weights (``reduce_range=False``), exported twice: for ``target_cpu="vnni"`` (int8
  weights: exact only on CPUs with VNNI) and for ``"avx2"`` (uint8 weights: exact on every CPU);
- ``QuantizationAwareTraining`` W4A8 with learned step sizes (LSQ).
The trained fp32 model is then quantized without training by ``PostTrainingQuantization`` (int8 with 7 and
8-bit weights, W4A8, calibrated on 32 training batches) and by the peer, ONNX Runtime's ``quantize_static`` (QDQ,
int8 weights per channel and int8 activations, min-max calibration on the same 32 batches).
Records test accuracy (in PyTorch and, for the ONNX artifacts, in ONNX Runtime), top-1 agreement and the largest
difference of our artifacts' logits with their fake-quantized models', ONNX file bytes, ONNX Runtime latency at
batch 1 and 256 of every ONNX model, and the median training step time with fake quantization on against plain
training. The ONNX models are timed together in a fresh process, in interleaved rounds of a new random order each,
at 1 thread and at 2 threads. The JSON records the CPU's flags (avx2, avx512_vnni, avx_vnni): ONNX Runtime's int8
kernels differ with them, so timings hold for the kind of CPU they were measured on.
Writes ``results/quantization.json`` and ``results/quantization.md``.

    apt-get install dataset-fashion-mnist
    python benchmarks/quantization_vs_ort.py --epochs 3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics

import lightning as L
import torch
from common import (
    StepTimer,
    cpu_description,
    cpu_trainer,
    fashion_mnist,
    ort_quantize_static,
    time_graphs_in_fresh_process,
    write_results,
)

from lightning_compress import (
    ClassificationModule,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_compress.analysis import evaluate_accuracy
from lightning_compress.data import FashionMNISTDataModule
from lightning_compress.deploy import OnnxRuntimeModel, onnx_bytes
from lightning_compress.models import SmallCNN
from lightning_compress.quantization import quantized_layers

INPUT_SHAPE = (1, 28, 28)
CALIBRATION_BATCHES = 32
BATCHES = (1, 256)
THREADS = (1, 2)
#: The trained models: fp32, QAT int8 with the defaults (7-bit weights), with full 8-bit weights, W4A8 with LSQ.
METHODS = ("fp32", "qat_int8", "qat_int8_w8", "qat_w4a8_lsq")
#: The ONNX models timed against each other: the QAT model with full 8-bit weights is exported for VNNI CPUs (int8
#: weights) and for every x86 CPU (uint8 weights).
TIMED = ("fp32", "qat_int8", "ort_static", "qat_int8_w8_vnni", "qat_int8_w8_avx2", "qat_w4a8_lsq")
#: Each ONNX model of ours: the trained model it is exported from, and the CPU it is exported for
EXPORTED = {
    "qat_int8": ("qat_int8", "avx2"),
    "qat_int8_w8_vnni": ("qat_int8_w8", "vnni"),
    "qat_int8_w8_avx2": ("qat_int8_w8", "avx2"),
    "qat_w4a8_lsq": ("qat_w4a8_lsq", "avx2"),
}


def train(
    method: str, seed: int, epochs: int, datamodule: FashionMNISTDataModule, limit_batches: int | None
) -> tuple[ClassificationModule, float]:
    L.seed_everything(seed)
    module = ClassificationModule(
        SmallCNN(num_classes=10, in_channels=1, image_size=28), num_classes=10, input_shape=INPUT_SHAPE
    )
    last = epochs - 1
    callbacks = {
        "fp32": [],
        "qat_int8": [QuantizationAwareTraining(start_epoch=1, freeze_observers_epoch=last, freeze_bn_epoch=last)],
        "qat_int8_w8": [
            QuantizationAwareTraining(
                start_epoch=1, freeze_observers_epoch=last, freeze_bn_epoch=last, reduce_range=False
            )
        ],
        "qat_w4a8_lsq": [
            QuantizationAwareTraining(weight_bits=4, learnable_scales=True, start_epoch=1, freeze_bn_epoch=last)
        ],
    }[method]
    timer = StepTimer(from_epoch=1)  # fake quantization is on from epoch 1
    trainer = cpu_trainer(epochs, [timer, *callbacks], limit_train_batches=limit_batches)
    trainer.fit(module, datamodule=datamodule)
    return module.eval(), 1000 * statistics.median(timer.intervals)


def for_cpu(model: ClassificationModule, target_cpu: str) -> ClassificationModule:
    """A copy of ``model`` whose quantized layers are exported for ``target_cpu``: the same grids (their
    ``reduce_range`` is set), only the ONNX storage of their weights differs."""
    copied = copy.deepcopy(model)
    for layer in quantized_layers(copied).values():
        layer.quant_config = dataclasses.replace(layer.quant_config, target_cpu=target_cpu)
    return copied


#: Post-training quantization of the fp32 model: the defaults (7-bit weights), full 8-bit weights, W4A8
PTQ = {"ptq_int8": {}, "ptq_int8_w8": {"reduce_range": False}, "ptq_w4a8": {"weight_bits": 4}}


def ort_latencies(graphs: dict[str, bytes], seed: int) -> dict[str, float]:
    """``<model>_latency_t<threads>_b<batch>_ms`` of each graph, timed together in a fresh process.

    In the process that trained them, the int8 models measured 2-11% apart at batch 256 (three seeds)
    while ONNX Runtime's profiler gave their kernels the same times; a fresh process, as a server
    loads its model, times the same graphs alike.
    """
    inputs = torch.randn((max(BATCHES), *INPUT_SHAPE), generator=torch.Generator().manual_seed(0))
    repeats = {batch: 600 if batch == 1 else 90 for batch in BATCHES}
    return time_graphs_in_fresh_process(graphs, inputs, seed, THREADS, BATCHES, repeats=repeats, warmup=20, rounds=30)


def run_seed(seed: int, epochs: int, data_root: str, limit_batches: int | None = None) -> dict:
    datamodule, calibration, test_inputs, test_targets = fashion_mnist(seed, 128, CALIBRATION_BATCHES, data_root)
    test = list(zip(test_inputs.split(500), test_targets.split(500)))

    def ort_logits(graph: bytes) -> torch.Tensor:
        return OnnxRuntimeModel(graph, num_threads=2)(test_inputs)

    result: dict = {"seed": seed}
    rotation = seed % len(METHODS)
    trained = {}
    for method in METHODS[rotation:] + METHODS[:rotation]:
        trained[method], result[f"{method}_step_ms"] = train(method, seed, epochs, datamodule, limit_batches)
        result[f"{method}_test_accuracy"] = evaluate_accuracy(trained[method], test)

    fp32 = trained["fp32"]
    graphs = {"fp32": onnx_bytes(fp32, test_inputs[:1])}

    for name, settings in PTQ.items():
        quantized = copy.deepcopy(fp32)
        PostTrainingQuantization(calibration_batches=CALIBRATION_BATCHES, **settings).quantize(quantized, calibration)
        result[f"{name}_test_accuracy"] = evaluate_accuracy(quantized, test)

    for name, (method, target_cpu) in EXPORTED.items():
        graphs[name] = onnx_bytes(for_cpu(trained[method], target_cpu), test_inputs[:1])

    graphs["ort_static"] = ort_quantize_static(graphs["fp32"], calibration)
    for name, graph in graphs.items():
        result[f"{name}_onnx_bytes"] = len(graph)
        logits = ort_logits(graph)
        result[f"{name}_ort_test_accuracy"] = (logits.argmax(1) == test_targets).float().mean().item()
        if name in EXPORTED:
            with torch.no_grad():
                expected = trained[EXPORTED[name][0]](test_inputs)
            result[f"{name}_ort_agreement_with_fake_quant"] = (
                (logits.argmax(1) == expected.argmax(1)).float().mean().item()
            )
            result[f"{name}_ort_largest_difference_from_fake_quant"] = (logits - expected).abs().max().item()
    return result | ort_latencies({name: graphs[name] for name in TIMED}, seed)


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def latency_key(model: str, threads: int, batch: int) -> str:
    return f"{model}_latency_t{threads}_b{batch}_ms"


#: Latency ratios the benchmark reports: each of our ONNX models and the peer against fp32, ours against the peer.
RATIOS = (
    *((model, "fp32") for model in TIMED if model != "fp32"),
    *((model, "ort_static") for model in EXPORTED),
)
#: The accuracy rows: name, the model's accuracy key in PyTorch (None: ONNX only), its ONNX model (None: not exported)
ROWS = (
    ("`QuantizationAwareTraining` int8, defaults (7-bit weights)", "qat_int8", "qat_int8"),
    ("`QuantizationAwareTraining` int8, 8-bit weights for VNNI CPUs (int8)", "qat_int8_w8", "qat_int8_w8_vnni"),
    ("`QuantizationAwareTraining` int8, 8-bit weights for any x86 CPU (uint8)", "qat_int8_w8", "qat_int8_w8_avx2"),
    ("`QuantizationAwareTraining` W4A8, LSQ", "qat_w4a8_lsq", "qat_w4a8_lsq"),
    ("`PostTrainingQuantization` int8, defaults (7-bit weights)", "ptq_int8", None),
    ("`PostTrainingQuantization` int8, 8-bit weights", "ptq_int8_w8", None),
    ("`PostTrainingQuantization` W4A8", "ptq_w4a8", None),
    ("ONNX Runtime `quantize_static` int8 (peer)", None, "ort_static"),
)
NAMES = {
    "fp32": "fp32",
    "qat_int8": "ours, QAT int8, defaults (7-bit weights, int8)",
    "ort_static": "peer, `quantize_static`",
    "qat_int8_w8_vnni": "ours, QAT int8, 8-bit weights, `target_cpu='vnni'` (int8)",
    "qat_int8_w8_avx2": "ours, QAT int8, 8-bit weights, `target_cpu='avx2'` (uint8)",
    "qat_w4a8_lsq": "ours, QAT W4A8 (4-bit weights)",
}


def summary(runs: list[dict]) -> dict:
    fp32 = median(runs, "fp32_test_accuracy")
    accuracies = {method: median(runs, f"{method}_test_accuracy") for method in (*METHODS, *PTQ)}
    result = {
        "test_accuracy": accuracies,
        "drop_points_vs_fp32": {
            method: 100 * (fp32 - accuracy) for method, accuracy in accuracies.items() if method != "fp32"
        },
        "ort_test_accuracy": {m: median(runs, f"{m}_ort_test_accuracy") for m in TIMED},
        "ort_agreement_with_fake_quant": {m: median(runs, f"{m}_ort_agreement_with_fake_quant") for m in EXPORTED},
        "ort_largest_difference_from_fake_quant": {
            m: max(run[f"{m}_ort_largest_difference_from_fake_quant"] for run in runs) for m in EXPORTED
        },
        "onnx_bytes": {m: median(runs, f"{m}_onnx_bytes") for m in TIMED},
        "bytes_ratio_to_fp32": {
            m: median(runs, f"{m}_onnx_bytes") / median(runs, "fp32_onnx_bytes") for m in TIMED if m != "fp32"
        },
        "ort_latency_ms": {
            f"{m}_t{t}_b{b}": median(runs, latency_key(m, t, b)) for m in TIMED for t in THREADS for b in BATCHES
        },
        # the median over seeds of each seed's ratio: both sides of a ratio were timed in the same rounds
        "latency_ratio": {
            f"{m}_vs_{reference}_t{t}_b{b}": statistics.median(
                run[latency_key(m, t, b)] / run[latency_key(reference, t, b)] for run in runs
            )
            for m, reference in RATIOS
            for t in THREADS
            for b in BATCHES
        },
        "step_ms": {m: median(runs, f"{m}_step_ms") for m in METHODS},
    }
    result["step_time_ratio_to_fp32"] = {
        m: result["step_ms"][m] / result["step_ms"]["fp32"] for m in METHODS if m != "fp32"
    }
    return result


def markdown(result: dict, epochs: int, seeds: list[int], cpu: dict) -> str:
    acc, drop, ort_acc = result["test_accuracy"], result["drop_points_vs_fp32"], result["ort_test_accuracy"]
    ratio, nbytes, latency = result["latency_ratio"], result["bytes_ratio_to_fp32"], result["ort_latency_ms"]
    steps, agreement = result["step_time_ratio_to_fp32"], result["ort_agreement_with_fake_quant"]
    difference = result["ort_largest_difference_from_fake_quant"]
    flags = ", ".join(f"{flag} {'yes' if cpu[flag] else 'no'}" for flag in ("avx2", "avx512_vnni", "avx_vnni"))
    lines = [
        f"Fashion-MNIST, SmallCNN, {epochs} epochs, Adam 1e-3, batch 128, seeds {seeds}; medians over seeds. "
        f"QAT fake-quantizes from epoch 1; post-training calibration uses {CALIBRATION_BATCHES} training batches. "
        f"CPU: {cpu['model']} ({flags}).",
        "",
        "| model | test acc (PyTorch) | drop vs fp32 (points) | test acc in ONNX Runtime | training step vs fp32 |",
        "|---|---|---|---|---|",
        f"| fp32 | {100 * acc['fp32']:.2f}% | – | {100 * ort_acc['fp32']:.2f}% | 1.000x ({result['step_ms']['fp32']:.1f} ms) |",
    ]
    for name, method, graph in ROWS:
        cells = [name, "–", "–", "–", "–"]
        if method is not None:
            cells[1:3] = [f"{100 * acc[method]:.2f}%", f"{drop[method]:.2f}"]
            cells[4] = f"{steps[method]:.3f}x" if method in steps else "–"
        if graph is not None:
            cells[3] = f"{100 * ort_acc[graph]:.2f}%"
        if graph in EXPORTED:
            cells[3] += f" (top-1 agreement {100 * agreement[graph]:.2f}%, logits within {difference[graph]:.1e})"
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"ONNX Runtime latency: for each seed the {len(TIMED)} models are timed in one fresh process, in 30 "
        "interleaved rounds of a new random order each; ratios are medians over seeds of each seed's ratio.",
        "",
        "| model | bytes vs fp32 | threads | latency b1 | latency b256 | b1 vs fp32 | b256 vs fp32 | b1 vs peer | b256 vs peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for threads in THREADS:
        for model in TIMED:
            size = f"1.000x ({result['onnx_bytes']['fp32']:,.0f} B)" if model == "fp32" else f"{nbytes[model]:.3f}x"
            cells = [
                NAMES[model],
                size,
                str(threads),
                *(f"{latency[f'{model}_t{threads}_b{batch}']:.3f} ms" for batch in BATCHES),
            ]
            for reference in ("fp32", "ort_static"):
                cells += [
                    f"{ratio[f'{model}_vs_{reference}_t{threads}_b{batch}']:.3f}x"
                    if (model, reference) in RATIOS
                    else "–"
                    for batch in BATCHES
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-root", default="data")
    parser.add_argument(
        "--limit-batches", type=int, default=None, help="training batches per epoch (a quick check of the script)"
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: one float epoch, then fake quantization")
    torch.set_num_threads(2)
    runs = [run_seed(seed, args.epochs, args.data_root, args.limit_batches) for seed in args.seeds]
    result = summary(runs)
    cpu = cpu_description()
    settings = {"epochs": args.epochs, "seeds": args.seeds, "cpu": cpu}
    write_results(
        "quantization", settings, {"summary": result, "runs": runs}, markdown(result, args.epochs, args.seeds, cpu)
    )


if __name__ == "__main__":
    main()

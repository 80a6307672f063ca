"""Quantization on real Fashion-MNIST, side by side with ONNX Runtime's own ``quantize_static``, in one process.

For each seed, the project's SmallCNN trains for the same epochs three ways:
- fp32;
- ``QuantizationAwareTraining`` int8 (fake quantization from epoch 1, observers and BatchNorm frozen
  for the last epoch, 7-bit weights with ``reduce_range`` as this AVX2 CPU's int8 kernels need);
- ``QuantizationAwareTraining`` W4A8 with learned step sizes (LSQ).
The trained fp32 model is then quantized without training by ``PostTrainingQuantization`` (int8 and
W4A8, calibrated on 32 training batches) and by the peer, ONNX Runtime's ``quantize_static`` (QDQ,
int8 weights per channel and int8 activations, min-max calibration on the same 32 batches).
Records test accuracy (in PyTorch and, for the int8 artifacts, in ONNX Runtime), top-1 agreement of
our int8 artifact with the fake-quantized model, ONNX file bytes, ONNX Runtime latency (2 threads,
batch 1 and 256) of fp32, our int8 and the peer's int8, and the median training step time with fake
quantization on against plain training.
Writes ``results/quantization.json`` and ``results/quantization.md``.

    apt-get install dataset-fashion-mnist
    python benchmarks/quantization_vs_ort.py --epochs 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from common import StepTimer, cpu_trainer, write_results
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from lightning_compress import (
    ClassificationModule,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_compress.analysis import evaluate_accuracy, measure_latency
from lightning_compress.data import FashionMNISTDataModule
from lightning_compress.deploy import OnnxRuntimeModel, onnx_bytes
from lightning_compress.models import SmallCNN

INPUT_SHAPE = (1, 28, 28)
CALIBRATION_BATCHES = 32
BATCHES = (1, 256)


class Batches(CalibrationDataReader):
    """ONNX Runtime's calibration reader over the same input batches our calibration sees."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self._batches = iter([{"x": batch.numpy()} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def train(method: str, seed: int, epochs: int, datamodule: FashionMNISTDataModule, limit_batches: int | None) -> tuple[ClassificationModule, float]:
    L.seed_everything(seed)
    module = ClassificationModule(SmallCNN(num_classes=10, in_channels=1, image_size=28), num_classes=10, input_shape=INPUT_SHAPE)
    last = epochs - 1
    callbacks = {
        "fp32": [],
        "qat_int8": [QuantizationAwareTraining(start_epoch=1, freeze_observers_epoch=last, freeze_bn_epoch=last, reduce_range=True)],
        "qat_w4a8_lsq": [QuantizationAwareTraining(weight_bits=4, learnable_scales=True, start_epoch=1, freeze_bn_epoch=last)],
    }[method]
    timer = StepTimer(from_epoch=1)  # fake quantization is on from epoch 1
    trainer = cpu_trainer(epochs, [timer, *callbacks], limit_train_batches=limit_batches)
    trainer.fit(module, datamodule=datamodule)
    return module.eval(), 1000 * statistics.median(timer.intervals)


def ort_latencies(graph: bytes, prefix: str) -> dict[str, float]:
    runtime = OnnxRuntimeModel(graph, num_threads=2)
    generator = torch.Generator().manual_seed(0)
    return {
        f"{prefix}_latency_b{batch}_ms": measure_latency(runtime, torch.randn((batch, *INPUT_SHAPE), generator=generator), warmup=10, repeats=50).median_ms
        for batch in BATCHES
    }


def run_seed(seed: int, epochs: int, data_root: str, limit_batches: int | None = None) -> dict:
    datamodule = FashionMNISTDataModule(root=data_root, batch_size=128, seed=seed)
    datamodule.setup("fit")
    calibration = [batch[0] for _, batch in zip(range(CALIBRATION_BATCHES), datamodule.train_dataloader())]
    datamodule.setup("test")
    test = list(datamodule.test_dataloader())
    test_inputs = torch.cat([inputs for inputs, _ in test])
    test_targets = torch.cat([targets for _, targets in test])

    def ort_accuracy(graph: bytes) -> tuple[float, torch.Tensor]:
        predictions = OnnxRuntimeModel(graph, num_threads=2)(test_inputs).argmax(1)
        return (predictions == test_targets).float().mean().item(), predictions

    result: dict = {"seed": seed}
    methods = ["fp32", "qat_int8", "qat_w4a8_lsq"]
    rotation = seed % len(methods)
    trained = {}
    for method in methods[rotation:] + methods[:rotation]:
        trained[method], result[f"{method}_step_ms"] = train(method, seed, epochs, datamodule, limit_batches)
        result[f"{method}_test_accuracy"] = evaluate_accuracy(trained[method], test)

    fp32 = trained["fp32"]
    fp32_graph = onnx_bytes(fp32, test_inputs[:1])
    result["fp32_onnx_bytes"] = len(fp32_graph)
    result["fp32_ort_test_accuracy"], _ = ort_accuracy(fp32_graph)
    result |= ort_latencies(fp32_graph, "fp32")

    for name, weight_bits in (("ptq_int8", 8), ("ptq_w4a8", 4)):
        quantized = copy.deepcopy(fp32)
        PostTrainingQuantization(weight_bits=weight_bits, reduce_range=weight_bits == 8, calibration_batches=CALIBRATION_BATCHES).quantize(quantized, calibration)
        result[f"{name}_test_accuracy"] = evaluate_accuracy(quantized, test)

    qat = trained["qat_int8"]
    ours = onnx_bytes(qat, test_inputs[:1])
    result["qat_int8_onnx_bytes"] = len(ours)
    result["qat_int8_ort_test_accuracy"], ours_predictions = ort_accuracy(ours)
    with torch.no_grad():
        fake_quant_predictions = qat(test_inputs).argmax(1)
    result["qat_int8_ort_agreement_with_fake_quant"] = (ours_predictions == fake_quant_predictions).float().mean().item()
    result |= ort_latencies(ours, "qat_int8")

    with tempfile.TemporaryDirectory() as directory:
        source, target = Path(directory) / "fp32.onnx", Path(directory) / "int8.onnx"
        source.write_bytes(fp32_graph)
        quantize_static(
            str(source),
            str(target),
            Batches(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        peer = target.read_bytes()
    result["ort_static_onnx_bytes"] = len(peer)
    result["ort_static_ort_test_accuracy"], _ = ort_accuracy(peer)
    result |= ort_latencies(peer, "ort_static")
    return result


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def summary(runs: list[dict]) -> dict:
    fp32 = median(runs, "fp32_test_accuracy")
    accuracies = {
        method: median(runs, f"{method}_test_accuracy") for method in ("fp32", "qat_int8", "qat_w4a8_lsq", "ptq_int8", "ptq_w4a8")
    }
    result = {
        "test_accuracy": accuracies,
        "drop_points_vs_fp32": {method: 100 * (fp32 - accuracy) for method, accuracy in accuracies.items() if method != "fp32"},
        "ort_test_accuracy": {m: median(runs, f"{m}_ort_test_accuracy") for m in ("fp32", "qat_int8", "ort_static")},
        "qat_int8_ort_agreement_with_fake_quant": median(runs, "qat_int8_ort_agreement_with_fake_quant"),
        "onnx_bytes": {m: median(runs, f"{m}_onnx_bytes") for m in ("fp32", "qat_int8", "ort_static")},
        "bytes_ratio_to_fp32": {m: median(runs, f"{m}_onnx_bytes") / median(runs, "fp32_onnx_bytes") for m in ("qat_int8", "ort_static")},
        "ort_latency_ms": {f"{m}_b{b}": median(runs, f"{m}_latency_b{b}_ms") for m in ("fp32", "qat_int8", "ort_static") for b in BATCHES},
        "step_ms": {m: median(runs, f"{m}_step_ms") for m in ("fp32", "qat_int8", "qat_w4a8_lsq")},
    }
    latency = result["ort_latency_ms"]
    result["latency_ratio"] = {
        f"{m}_vs_{reference}_b{b}": latency[f"{m}_b{b}"] / latency[f"{reference}_b{b}"]
        for m, reference in (("qat_int8", "fp32"), ("ort_static", "fp32"), ("qat_int8", "ort_static"))
        for b in BATCHES
    }
    result["step_time_ratio_to_fp32"] = {m: result["step_ms"][m] / result["step_ms"]["fp32"] for m in ("qat_int8", "qat_w4a8_lsq")}
    return result


def markdown(result: dict, epochs: int, seeds: list[int]) -> str:
    acc, drop, ort_acc = result["test_accuracy"], result["drop_points_vs_fp32"], result["ort_test_accuracy"]
    ratio, nbytes, latency = result["latency_ratio"], result["bytes_ratio_to_fp32"], result["ort_latency_ms"]
    steps = result["step_time_ratio_to_fp32"]
    lines = [
        f"Fashion-MNIST, SmallCNN, {epochs} epochs, Adam 1e-3, batch 128, seeds {seeds}; medians over seeds. "
        f"QAT fake-quantizes from epoch 1; post-training calibration uses {CALIBRATION_BATCHES} training batches.",
        "",
        "| model | test acc (PyTorch) | drop vs fp32 (points) | test acc in ONNX Runtime | training step vs fp32 |",
        "|---|---|---|---|---|",
        f"| fp32 | {100 * acc['fp32']:.2f}% | – | {100 * ort_acc['fp32']:.2f}% | 1.000x ({result['step_ms']['fp32']:.1f} ms) |",
        f"| `QuantizationAwareTraining` int8 | {100 * acc['qat_int8']:.2f}% | {drop['qat_int8']:.2f} | {100 * ort_acc['qat_int8']:.2f}% "
        f"(top-1 agreement {100 * result['qat_int8_ort_agreement_with_fake_quant']:.2f}%) | {steps['qat_int8']:.3f}x |",
        f"| `QuantizationAwareTraining` W4A8, LSQ | {100 * acc['qat_w4a8_lsq']:.2f}% | {drop['qat_w4a8_lsq']:.2f} | – | {steps['qat_w4a8_lsq']:.3f}x |",
        f"| `PostTrainingQuantization` int8 | {100 * acc['ptq_int8']:.2f}% | {drop['ptq_int8']:.2f} | – | – |",
        f"| `PostTrainingQuantization` W4A8 | {100 * acc['ptq_w4a8']:.2f}% | {drop['ptq_w4a8']:.2f} | – | – |",
        f"| ONNX Runtime `quantize_static` int8 (peer) | – | – | {100 * ort_acc['ort_static']:.2f}% | – |",
        "",
        "| ONNX Runtime, 2 threads | bytes vs fp32 | latency b1 | latency b256 | b1 vs fp32 | b256 vs fp32 | b1 vs peer | b256 vs peer |",
        "|---|---|---|---|---|---|---|---|",
        f"| fp32 | 1.000x ({result['onnx_bytes']['fp32']:,.0f} B) | {latency['fp32_b1']:.3f} ms | {latency['fp32_b256']:.2f} ms | – | – | – | – |",
        f"| ours, QAT int8 | {nbytes['qat_int8']:.3f}x | {latency['qat_int8_b1']:.3f} ms | {latency['qat_int8_b256']:.2f} ms | "
        f"{ratio['qat_int8_vs_fp32_b1']:.3f}x | {ratio['qat_int8_vs_fp32_b256']:.3f}x | "
        f"{ratio['qat_int8_vs_ort_static_b1']:.3f}x | {ratio['qat_int8_vs_ort_static_b256']:.3f}x |",
        f"| peer, `quantize_static` | {nbytes['ort_static']:.3f}x | {latency['ort_static_b1']:.3f} ms | {latency['ort_static_b256']:.2f} ms | "
        f"{ratio['ort_static_vs_fp32_b1']:.3f}x | {ratio['ort_static_vs_fp32_b256']:.3f}x | – | – |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (a quick check of the script)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: one float epoch, then fake quantization")
    torch.set_num_threads(2)
    runs = [run_seed(seed, args.epochs, args.data_root, args.limit_batches) for seed in args.seeds]
    result = summary(runs)
    settings = {"epochs": args.epochs, "seeds": args.seeds}
    write_results("quantization", settings, {"summary": result, "runs": runs}, markdown(result, args.epochs, args.seeds))


if __name__ == "__main__":
    main()

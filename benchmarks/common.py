"""What the benchmark scripts share: timing callbacks and writing results as JSON plus a Markdown table."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from lightning_compress.analysis import measure_latencies
from lightning_compress.analysis.cpu import cpu_flags
from lightning_compress.data import FashionMNISTDataModule
from lightning_compress.deploy import OnnxRuntimeModel

RESULTS = Path(__file__).parent / "results"
#: This machine's CPU model and its flags avx2, avx512_vnni and avx_vnni (``vnni``: either), which decide ONNX Runtime's
#: int8 kernels: every benchmark's JSON records them beside its timings
cpu_description = cpu_flags


class StepTimer(L.Callback):
    """Wall time between consecutive training batch starts (data, forward, backward, step, every callback),
    from epoch ``from_epoch`` on; the median of ``intervals`` is a run's step time."""

    def __init__(self, from_epoch: int = 0) -> None:
        self.from_epoch = from_epoch
        self.intervals: list[float] = []
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.current_epoch >= self.from_epoch:
            self.intervals.append(now - self._last)
        self._last = now


class EpochTimer(L.Callback):
    """Wall time of each training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def cpu_trainer(max_epochs: int, callbacks: list[L.Callback], **options: Any) -> L.Trainer:
    """A quiet single-process CPU ``Trainer`` (no logger, checkpoints, progress bar or model summary);
    ``options`` go to the ``Trainer`` as they are."""
    return L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **options,
    )


def write_results(name: str, settings: dict, results: dict, markdown: str) -> None:
    """``results/<name>.json`` (the settings, torch's version and the results) and ``results/<name>.md``; prints the table."""
    RESULTS.mkdir(exist_ok=True)
    payload = {**settings, "torch": str(torch.__version__), **results}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def measure_seeds(
    name: str,
    args: argparse.Namespace,
    measure: Callable[[int, argparse.Namespace], dict],
    markdown: Callable[[list[dict], argparse.Namespace], str],
) -> list[dict]:
    """``measure(seed, args)`` for each of ``args.seeds``, the results written (:func:`write_results`, with the
    settings and the CPU's flags) after every seed, so that a long run that stops keeps the seeds it finished."""
    runs: list[dict] = []
    for seed in args.seeds:
        runs.append(measure(seed, args))
        write_results(name, {"settings": vars(args), "cpu_flags": cpu_flags()}, {"runs": runs}, markdown(runs, args))
    return runs


def fashion_mnist(
    seed: int, batch_size: int, calibration_batches: int, data_root: str
) -> tuple[FashionMNISTDataModule, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Real Fashion-MNIST split by ``seed``: the data module, the first ``calibration_batches`` training
    batches' inputs, and the test images and labels."""
    datamodule = FashionMNISTDataModule(root=data_root, batch_size=batch_size, seed=seed)
    datamodule.setup("fit")
    calibration = [batch[0] for _, batch in zip(range(calibration_batches), datamodule.train_dataloader())]
    datamodule.setup("test")
    test = list(datamodule.test_dataloader())
    return datamodule, calibration, torch.cat([x for x, _ in test]), torch.cat([y for _, y in test])


class Batches(CalibrationDataReader):
    """ONNX Runtime's calibration reader over the same input batches our calibration sees (input ``x``)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self._batches = iter([{"x": batch.numpy()} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def ort_quantize_static(graph: bytes, calibration: list[torch.Tensor]) -> bytes:
    """The peer of our int8 export on images: ONNX Runtime's ``quantize_static`` of the fp32 ``graph`` (QDQ,
    int8 activations and weights, per channel), calibrated on the ``calibration`` batches."""
    with tempfile.TemporaryDirectory() as directory:
        source, target = Path(directory) / "fp32.onnx", Path(directory) / "int8.onnx"
        source.write_bytes(graph)
        quantize_static(
            str(source),
            str(target),
            Batches(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        return target.read_bytes()


#: The peers of our int8 export on transformers, each a ``quantize_dynamic`` of the fp32 export (see dynamic_peers)
DYNAMIC_PEERS = ("ort_dynamic", "optimum_dynamic")


def dynamic_peers(graph: bytes) -> dict[str, bytes]:
    """The peers of our int8 export on transformers, ONNX Runtime's ``quantize_dynamic`` of the fp32 ``graph``:
    ``ort_dynamic`` with its defaults (int8 weights, one scale a matrix), and ``optimum_dynamic`` as Hugging Face
    Optimum configures it for this CPU (``AutoQuantizationConfig.avx2`` or ``.avx512_vnni``, ``is_static=False``):
    symmetric weights with a scale per channel, uint8 where the CPU lacks VNNI (its uint8 x int8 products saturate,
    which ONNX Runtime's default int8 weights then suffer), int8 where it has it."""
    weight_type = QuantType.QInt8 if cpu_description()["vnni"] else QuantType.QUInt8
    settings = {
        "ort_dynamic": {"weight_type": QuantType.QInt8},
        "optimum_dynamic": {
            "weight_type": weight_type,
            "per_channel": True,
            "extra_options": {"WeightSymmetric": True},
        },
    }
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "fp32.onnx"
        source.write_bytes(graph)
        for name, options in settings.items():
            quantize_dynamic(str(source), f"{directory}/{name}.onnx", **options)
        return {name: (Path(directory) / f"{name}.onnx").read_bytes() for name in DYNAMIC_PEERS}


def peer_ratios(
    result: dict, name: str, peer: str, threads: Sequence[int] = (1, 2), batches: Sequence[int] = (1, 32)
) -> str:
    """A sentence of ``name``'s latency against ``peer``'s: ``result[name]["vs_<peer>_t<threads>_b<batch>"]``, medians
    of the per-seed ratios."""
    ratios = ", ".join(
        f"{count} thread{'s' if count > 1 else ''} b{batch} {result[name][f'vs_{peer}_t{count}_b{batch}']:.3f}x"
        for count in threads
        for batch in batches
    )
    return f"{name} against {peer} (median of the per-seed ratios of latency): {ratios}."


def time_graphs_in_fresh_process(
    graphs: dict[str, bytes],
    inputs: torch.Tensor,
    seed: int,
    threads: Sequence[int] = (1, 2),
    batches: Sequence[int] = (1, 32),
    *,
    repeats: dict[int, int] | None = None,
    warmup: int = 5,
    rounds: int = 15,
) -> dict[str, float]:
    """``<name>_latency_t<threads>_b<batch>_ms`` of each ONNX graph in ONNX Runtime on the first ``batch`` rows of
    ``inputs``: all timed together, ``repeats[batch]`` times each (100 at batch 1, 8 above, by default) after
    ``warmup`` runs, in up to ``rounds`` interleaved rounds of a new random order (``seed``), in a new Python
    process, as a server loads its model, so that the memory and threads of the training before leave the
    timings alone."""
    repeats = repeats or {batch: 100 if batch == 1 else 8 for batch in batches}
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        for name, graph in graphs.items():
            (folder / f"{name}.onnx").write_bytes(graph)
        torch.save(inputs[: max(batches)].clone(), folder / "inputs.pt")
        settings = {"seed": seed, "threads": list(threads), "repeats": repeats, "warmup": warmup, "rounds": rounds}
        (folder / "settings.json").write_text(json.dumps(settings))
        command = [sys.executable, __file__, "--time-graphs", directory]
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def _time_graphs(folder: Path) -> dict[str, float]:
    settings = json.loads((folder / "settings.json").read_text())
    inputs = torch.load(folder / "inputs.pt")
    graphs = {path.stem: path.read_bytes() for path in sorted(folder.glob("*.onnx"))}
    result = {}
    for count in settings["threads"]:
        runtimes = {name: OnnxRuntimeModel(graph, num_threads=count) for name, graph in graphs.items()}
        for batch, repeats in settings["repeats"].items():
            timed = measure_latencies(
                {name: (runtime, inputs[: int(batch)]) for name, runtime in runtimes.items()},
                warmup=settings["warmup"],
                repeats=repeats,
                rounds=min(settings["rounds"], repeats),
                seed=settings["seed"],
            )
            result |= {f"{name}_latency_t{count}_b{batch}_ms": latency.median_ms for name, latency in timed.items()}
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="time the ONNX graphs of a folder (time_graphs_in_fresh_process)")
    parser.add_argument("--time-graphs", type=Path, required=True)
    print(json.dumps(_time_graphs(parser.parse_args().time_graphs)))

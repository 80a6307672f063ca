from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_compress.pruning.schedules import SparsitySchedule

SCRIPT = Path(__file__).with_name("ddp_masks.py")


CASES = [("taylor", "unstructured"), ("random", "channel"), ("oneshot_sparsegpt", "unstructured")]
#: A case that rounds the weights (GPTQ) rather than pruning them: it has no masks, its weights and quantizer
#: state (the rest of the state dict) must be the same on every rank.
ROUNDING = ("oneshot_gptq", "per_channel")
#: Taylor pruning at epochs 0, 1 and 2 (AGP to 0.5) of epochs of 4 steps per rank, fewer than taylor_steps.
TAYLOR_FROM_EPOCH_0 = ("taylor_agp", "unstructured")
ALL_CASES = (*CASES, ROUNDING, TAYLOR_FROM_EPOCH_0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[tuple[str, str], tuple[dict, dict]]:
    """What rank 0 and rank 1 saved for each case, the cases run one after the other in the same two processes."""
    output = tmp_path_factory.mktemp("ddp")
    cases = [f"{criterion}:{granularity}" for criterion, granularity in ALL_CASES]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(output), *cases], capture_output=True, text=True, timeout=360
    )
    assert done.returncode == 0, done.stderr
    return {
        case: tuple(torch.load(output / "-".join(case) / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
        for case in ALL_CASES
    }


@pytest.mark.parametrize("case", ALL_CASES, ids="-".join)
def test_every_rank_holds_the_same_masks(ranks, case) -> None:
    rank0, rank1 = ranks[case]
    assert rank0["masks"].keys() == rank1["masks"].keys()
    assert bool(rank0["masks"]) == (case != ROUNDING)
    for name, mask in rank0["masks"].items():
        assert torch.equal(mask, rank1["masks"][name]), (case, name)
    for name, weight in rank0["weights"].items():  # and DDP kept the weights, pruned zeros included, in step
        torch.testing.assert_close(weight, rank1["weights"][name], rtol=0, atol=1e-6, msg=f"{case}: {name}")


def test_taylor_pruning_from_epoch_0_follows_the_schedule_on_every_rank(ranks) -> None:
    """Each epoch (4 steps per rank) is shorter than taylor_steps: its step is scored by its own steps and prunes at
    its end, on both ranks, to the schedule's sparsity (epoch 1 used to find no scores left by epoch 0's step)."""
    rank0, rank1 = ranks[TAYLOR_FROM_EPOCH_0]
    total = sum(mask.numel() for mask in rank0["masks"].values())
    schedule = SparsitySchedule(0.5, "agp", start_epoch=0, end_epoch=2)
    assert rank0["pruned"] == rank1["pruned"] == [round(schedule.sparsity_at(epoch) * total) for epoch in range(3)]
    assert 0 < rank0["pruned"][0] < rank0["pruned"][1] < rank0["pruned"][2] == round(0.5 * total)

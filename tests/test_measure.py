from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch import nn

from lightning_compress.analysis import (
    ModelProfile,
    count_macs,
    count_nonzero_parameters,
    count_parameters,
    eval_mode,
    evaluate_accuracy,
    global_sparsity,
    layer_sparsity,
    measure_latencies,
    measure_latency,
    profile_model,
    size_on_disk,
)
from lightning_compress.models import SmallCNN


def linear_with_known_zeros() -> nn.Linear:
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 4.0], [5.0, 6.0, 7.0, 0.0]]))
        layer.bias.copy_(torch.tensor([1.0, 0.0, 2.0]))
    return layer


def test_parameters_and_nonzeros_by_hand() -> None:
    layer = linear_with_known_zeros()
    assert count_parameters(layer) == 15
    assert count_nonzero_parameters(layer) == 15 - 5 - 1  # five zero weights, one zero bias


def test_layer_and_global_sparsity_by_hand() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 2, bias=False), nn.Flatten(), linear_with_known_zeros())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 3.0, 0.0, 4.0]).view(2, 1, 2, 2))
    per_layer = layer_sparsity(model)
    assert set(per_layer) == {"0", "2"}
    assert (per_layer["0"].zeros, per_layer["0"].total) == (4, 8)
    assert (per_layer["2"].zeros, per_layer["2"].total) == (5, 12)
    overall = global_sparsity(model)
    assert (overall.zeros, overall.total) == (9, 20)
    assert overall.sparsity == pytest.approx(0.45)


def test_shared_weights_are_counted_once() -> None:
    first, second = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    second.weight = first.weight
    with torch.no_grad():
        first.weight[0] = 0.0
    model = nn.Sequential(first, nn.ReLU(), second)
    assert count_parameters(model) == 16
    assert count_nonzero_parameters(model) == 12
    assert list(layer_sparsity(model)) == ["0"]
    assert (global_sparsity(model).zeros, global_sparsity(model).total) == (4, 16)


def test_macs_of_linear_and_conv_by_hand() -> None:
    assert count_macs(nn.Linear(10, 5), torch.randn(4, 10)) == 4 * 10 * 5
    # 3x3 conv, 3 -> 8 channels, padding 1 on 16x16: every output pixel costs 3 * 9 MACs per output channel.
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 16, 16)) == 16 * 16 * 8 * 3 * 9


@pytest.mark.parametrize("kind, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_macs_of_recurrent_layers_by_hand(kind, gates) -> None:
    layer = kind(8, 16, num_layers=2, batch_first=True, bidirectional=True)
    steps = 2 * 5  # sequences times time steps, in each direction of each layer
    first, second = gates * 16 * (8 + 16), gates * 16 * (2 * 16 + 16)  # the second reads both directions
    assert count_macs(layer, torch.randn(2, 5, 8)) == 2 * steps * (first + second)


def test_macs_of_small_cnn_by_hand() -> None:
    model = SmallCNN(num_classes=10, in_channels=1, image_size=8, channels=(32, 64), hidden=128).train()
    expected = 8 * 8 * 32 * 1 * 9 + 4 * 4 * 64 * 32 * 9 + (64 * 2 * 2) * 128 + 128 * 10
    assert count_macs(model, torch.randn(1, 1, 8, 8)) == expected
    assert model.training  # mode restored


def test_size_on_disk_is_the_saved_file_and_grows_with_the_weights(tmp_path) -> None:
    small, large = nn.Linear(100, 100), nn.Linear(200, 200)
    path = tmp_path / "state_dict.pt"  # torch.save names the archive's folder after the file
    torch.save(small.state_dict(), path)
    assert size_on_disk(small) == os.path.getsize(path)
    growth = size_on_disk(large) - size_on_disk(small)
    assert growth == pytest.approx(4 * (count_parameters(large) - count_parameters(small)), abs=256)


def test_latency_result_and_thread_count_restored() -> None:
    model = nn.Linear(16, 4).train()
    threads_before = torch.get_num_threads()
    result = measure_latency(model, torch.randn(8, 16), warmup=2, repeats=5, num_threads=1)
    assert result.batch_size == 8
    assert result.repeats == 5 and result.warmup == 2
    assert result.num_threads == 1
    assert result.min_ms <= result.median_ms <= result.max_ms
    assert torch.get_num_threads() == threads_before
    assert model.training


class CallRecorder(nn.Module):
    """Appends its name to ``calls`` at every forward."""

    def __init__(self, name: str, calls: list[str]) -> None:
        super().__init__()
        self.name, self.calls = name, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.name)
        return x


def test_models_are_timed_in_interleaved_rounds_of_shuffled_order() -> None:
    calls: list[str] = []
    contenders = {name: (CallRecorder(name, calls), torch.zeros(1, 2)) for name in "abc"}
    results = measure_latencies(contenders, warmup=1, repeats=7, rounds=3, seed=1)
    assert [result.repeats for result in results.values()] == [7, 7, 7]
    assert sorted(calls[:3]) == ["a", "b", "c"]  # one warm-up call each
    # 7 calls over 3 rounds: 3, 2 and 2 in a row for each model, every model once per round
    rounds = [calls[3:12], calls[12:18], calls[18:]]
    orders = [[name for name, _ in itertools.groupby(calls_of_round)] for calls_of_round in rounds]
    assert [
        calls_of_round == [name for name in order for _ in range(len(calls_of_round) // 3)]
        for calls_of_round, order in zip(rounds, orders)
    ] == [True] * 3
    assert [sorted(order) for order in orders] == [["a", "b", "c"]] * 3 and len(calls) == 3 + 21
    assert len({tuple(order) for order in orders}) > 1  # a new order each round
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        measure_latencies(contenders, rounds=0)


def test_latency_rejects_bad_repeats() -> None:
    with pytest.raises(ValueError, match="repeats=0"):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), repeats=0)


def test_profile_round_trips_through_a_dict() -> None:
    model = nn.Sequential(nn.Flatten(), linear_with_known_zeros())
    profile = profile_model(model, (4,), latency_batch_sizes=(1, 3), latency_warmup=1, latency_repeats=2)
    assert profile.parameters == 15
    assert profile.nonzero_parameters == 9
    assert profile.macs == 12
    assert sorted(profile.latency) == [1, 3]
    assert profile.to_dict()["weight_sparsity"]["sparsity"] == pytest.approx(5 / 12)
    assert ModelProfile.from_dict(profile.to_dict()) == profile


def test_evaluate_accuracy_counts_correct_predictions() -> None:
    model = nn.Identity()
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [1.0, 0.0]])
    targets = torch.tensor([0, 1, 1, 0])
    assert evaluate_accuracy(model, [(logits[:2], targets[:2]), (logits[2:], targets[2:])]) == 0.75
    with pytest.raises(ValueError, match="no batches"):
        evaluate_accuracy(model, [])


def test_measurements_give_each_submodule_its_own_mode_back() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    model[1].eval()  # a deliberately frozen part
    count_macs(model, torch.randn(2, 4))
    measure_latency(model, torch.randn(2, 4), warmup=0, repeats=1)
    evaluate_accuracy(model, [(torch.randn(2, 4), torch.tensor([0, 1]))])
    with eval_mode(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == [True, True, False, True]


def test_evaluate_accuracy_casts_inputs_to_a_half_precision_model() -> None:
    model = nn.Linear(2, 2, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    inputs, targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1])
    assert evaluate_accuracy(model, [(inputs, targets)]) == pytest.approx(2 / 3)


def test_profile_measures_latency_in_onnx_runtime() -> None:
    model = SmallCNN(num_classes=3, image_size=8).train()
    profile = profile_model(
        model,
        (1, 8, 8),
        latency_batch_sizes=(1, 4),
        latency_warmup=1,
        latency_repeats=2,
        num_threads=1,
        latency_runtime="onnxruntime",
    )
    assert {
        batch: (result.runtime, result.num_threads, result.batch_size) for batch, result in profile.latency.items()
    } == {
        1: ("onnxruntime", 1, 1),
        4: ("onnxruntime", 1, 4),
    }
    assert profile.macs == count_macs(model, torch.zeros(1, 1, 8, 8))
    assert model.training
    assert ModelProfile.from_dict(profile.to_dict()) == profile


@pytest.mark.parametrize(
    "options, message",
    [
        ({"latency_batch_sizes": (0,)}, "got \\[0\\]"),
        ({"num_threads": 0}, "got 0"),
        ({"latency_runtime": "tvm"}, "'tvm'.*torch, onnxruntime"),
    ],
)
def test_profile_rejects_bad_latency_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        profile_model(nn.Linear(2, 2), (2,), **options)

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.models import SmallCNN
from lightning_compress.pruning import (
    SparsitySchedule,
    channel_scores,
    element_scores,
    forget_pruned,
    n_of_m_masks,
    rank_masks,
    select_layers,
    taylor_scores,
    threshold_masks,
)


def test_agp_follows_zhu_and_gupta_and_ends_on_the_amount() -> None:
    schedule = SparsitySchedule(amount=0.8, kind="agp", start_epoch=2, end_epoch=5)
    assert schedule.pruning_epochs() == [2, 3, 4, 5]
    expected = [0.8 * (1 - (1 - k / 4) ** 3) for k in (1, 2, 3, 4)]
    assert [schedule.sparsity_at(e) for e in (2, 3, 4, 5)] == pytest.approx(expected)
    assert schedule.sparsity_at(1) == 0.0 and schedule.sparsity_at(9) == pytest.approx(0.8)


def test_linear_oneshot_frequency_and_callable_schedules() -> None:
    linear = SparsitySchedule(amount=0.6, kind="linear", start_epoch=0, end_epoch=5, frequency=2)
    assert linear.pruning_epochs() == [0, 2, 4, 5]
    assert [linear.sparsity_at(e) for e in range(6)] == pytest.approx([0.15, 0.15, 0.3, 0.3, 0.45, 0.6])
    oneshot = SparsitySchedule(amount=0.5, kind="oneshot", start_epoch=3, end_epoch=3)
    assert oneshot.pruning_epochs() == [3] and oneshot.sparsity_at(2) == 0.0 and oneshot.sparsity_at(3) == 0.5
    custom = SparsitySchedule(amount=0.0, kind=lambda epoch: 0.1 * epoch, start_epoch=1, end_epoch=3)
    assert [custom.sparsity_at(e) for e in range(5)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.3])
    with pytest.raises(ValueError, match="returned 1.0 for epoch 2"):
        SparsitySchedule(amount=0.0, kind=lambda epoch: 0.5 * epoch, start_epoch=2, end_epoch=2).sparsity_at(2)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kind": "cubic"}, "unknown schedule 'cubic'"),
        ({"start_epoch": 3, "end_epoch": 2}, "end_epoch \\(2\\) must not be before start_epoch \\(3\\)"),
    ],
)
def test_schedule_rejects_bad_settings(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparsitySchedule(amount=0.5, **options)


def test_global_and_layer_masks_prune_exact_counts() -> None:
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0, 16.0).view(2, 3)}
    global_masks = rank_masks(scores, 0.5)  # 8 of 16, the lowest scores: all of a but 8 and 9
    assert global_masks["a"].tolist() == [False] * 8 + [True] * 2
    assert global_masks["b"].all() and global_masks["b"].shape == (2, 3)
    layer_masks = rank_masks(scores, 0.5, scope="layer")
    assert int((~layer_masks["a"]).sum()) == 5 and int((~layer_masks["b"]).sum()) == 3
    assert rank_masks({"a": torch.zeros(7)}, 0.3)["a"].sum() == 5  # round(2.1) = 2 pruned, ties broken exactly


def test_a_one_dimensional_score_keeps_its_top_entry_in_a_global_ranking() -> None:
    masks = rank_masks({"small": torch.tensor([0.1, 0.2]), "large": torch.tensor([5.0, 6.0, 7.0, 8.0])}, 0.5)
    assert masks["small"].tolist() == [False, True]
    assert int((~masks["large"]).sum()) == 2


def test_pruned_entries_are_never_revived() -> None:
    previous = {"w": torch.tensor([True, False, True, True])}
    scores = forget_pruned({"w": torch.tensor([1.0, 9.0, 2.0, 3.0])}, previous)
    assert rank_masks(scores, 0.5)["w"].tolist() == [False, False, True, True]


def test_threshold_rule_prunes_at_and_below_theta() -> None:
    masks = threshold_masks({"w": torch.tensor([-0.3, 0.1, 0.2, -0.05])}, 0.1)
    assert masks["w"].tolist() == [True, False, True, False]


def test_n_of_m_runs_along_the_input_dimension() -> None:
    conv_scores = torch.tensor([1.0, 4.0, 2.0, 3.0]).view(1, 4, 1, 1)
    assert n_of_m_masks({"w": conv_scores}, 2, 4)["w"].flatten().tolist() == [False, True, False, True]
    weight = torch.randn(8, 16, 3, 3)
    mask = n_of_m_masks({"w": weight}, 2, 4)["w"]
    per_group = mask.movedim(1, -1).reshape(-1, 4).sum(dim=1)
    assert torch.equal(per_group, torch.full_like(per_group, 2))
    with pytest.raises(ValueError, match="divisible by 4.*\\(3, 6\\)"):
        n_of_m_masks({"linear": torch.randn(3, 6)}, 2, 4)


def test_scores_by_hand() -> None:
    weight = torch.tensor([[3.0, -4.0], [-1.0, 0.0]])
    assert element_scores(weight, "magnitude").tolist() == [[3.0, 4.0], [1.0, 0.0]]
    assert channel_scores(weight, "l1").tolist() == [7.0, 1.0]
    assert channel_scores(weight, "l2").tolist() == [5.0, 1.0]
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(
        element_scores(weight, "random", generator=generator),
        torch.rand(2, 2, generator=torch.Generator().manual_seed(0)),
    )
    with pytest.raises(ValueError, match="unknown criterion 'size'"):
        element_scores(weight, "size")


def test_taylor_scores_are_weight_times_gradient() -> None:
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    layer(torch.tensor([[2.0, 1.0, -4.0]])).sum().backward()  # dL/dw = x
    assert taylor_scores(layer.weight).tolist() == [[2.0, 2.0, 2.0]]


def test_select_layers_by_type_pattern_and_exclusion() -> None:
    model = SmallCNN(image_size=8)
    assert list(select_layers(model)) == ["features.0", "features.4", "classifier.1", "classifier.4"]
    assert list(select_layers(model, targets=["features.*"])) == ["features.0", "features.4"]
    assert list(select_layers(model, targets=[nn.Linear, "features.0"])) == [
        "features.0",
        "classifier.1",
        "classifier.4",
    ]
    assert list(select_layers(model, exclude=["classifier.4"])) == ["features.0", "features.4", "classifier.1"]
    assert list(select_layers(model, targets=nn.BatchNorm2d)) == ["features.1", "features.5"]
    with pytest.raises(ValueError, match="'feature.0' matches no layer.*'features.0'"):
        select_layers(model, targets=["feature.0"])
    with pytest.raises(ValueError, match="leave no layer"):
        select_layers(model, targets=[nn.Linear], exclude=["classifier.*"])


def test_channel_groups_follow_residual_connections() -> None:
    from lightning_compress.models import resnet
    from lightning_compress.pruning.structured import ChannelGroups

    torch.manual_seed(0)
    model = resnet("resnet18", num_classes=10, in_channels=1, small_input=True).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics that make a wrongly kept channel show
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.bias.data.uniform_(-1, 1)
    inputs = torch.randn(4, 1, 8, 8)
    groups = ChannelGroups(model, inputs[:1], select_layers(model))
    assert "fc" not in groups.units  # the output layer is never pruned
    keep = rank_masks(groups.scores("l1"), 0.5)
    assert sum(int((~kept).sum()) for kept in keep.values()) == round(0.5 * sum(groups.units.values()))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in groups.masks(keep).items():
            parameters[name].mul_(mask)
        masked = model(inputs)
    groups.remove(keep)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), masked, rtol=0, atol=1e-5)
    assert (
        model.layer1[0].conv2.out_channels == model.layer1[1].conv2.out_channels == model.conv1.out_channels
    )  # coupled by the adds
    assert sum(p.numel() for p in model.parameters()) < 0.5 * 11_172_810


class ShiftedHidden(nn.Module):
    """A hidden layer shifted by a parameter of its own, outside any layer, then read by the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 8)
        self.shift = nn.Parameter(torch.randn(8))
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x) + self.shift))


def test_a_parameter_outside_any_layer_is_masked_cut_and_cut_on_load_with_its_channels() -> None:
    from lightning_compress.pruning import Pruner, PruningConfig

    torch.manual_seed(0)
    model = ShiftedHidden()
    full_size = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    inputs = torch.randn(5, 6)
    pruner = Pruner(model, PruningConfig(amount=0.5, granularity="channel", criterion="l1"), inputs[:1])
    pruner.prune()
    kept = pruner.channel_keep["hidden"]
    assert torch.equal(pruner.masks["shift"], kept) and torch.all(model.shift[~kept] == 0)
    with torch.no_grad():
        masked = model(inputs)
        pruner.remove_channels(model)
        torch.testing.assert_close(model(inputs), masked, rtol=0, atol=1e-6)
    assert model.shift.shape == (4,) and model.out.in_features == 4
    model.load_state_dict(full_size)  # a checkpoint from before the removal: the parameter is cut as it loads
    torch.testing.assert_close(model.shift.detach(), full_size["shift"][kept])

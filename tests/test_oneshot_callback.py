"""The ``OneShotPruning`` callback: pruning in validate, at the start of a fit that then recovers with the zeros
kept, at its end, and a resumed fit that keeps the masks without pruning again."""

from __future__ import annotations

import copy

import pytest
import torch
from digits import digits_module, fit_digits, quiet_trainer, straight_and_resumed
from text_models import fit_text, tiny_bert
from torch import nn

from lightning_compress import DistillationModule
from lightning_compress.data import DigitsDataModule
from lightning_compress.data.wordnet import SUPERSENSES
from lightning_compress.oneshot import OneShotPruning, OneShotPruningConfig

LINEAR = ("model.classifier.1.weight", "model.classifier.4.weight")


def zeros(module: nn.Module) -> dict[str, int]:
    return {name: int((module.get_parameter(name) == 0).sum()) for name in LINEAR}


def test_pruned_at_the_start_of_a_fit_the_zeros_stay_through_training(tmp_path):
    pruning = OneShotPruning(method="sparsegpt", amount=0.6, calibration_batches=2, progress=False)
    trainer, module, _ = fit_digits(tmp_path, [pruning], max_epochs=2)
    assert trainer.global_step > 0
    assert zeros(module) == {LINEAR[0]: round(0.6 * 128 * 256), LINEAR[1]: round(0.6 * 10 * 128)}
    assert sorted(pruning.masks) == sorted(LINEAR)
    assert all(bool((module.get_parameter(name)[~mask] == 0).all()) for name, mask in pruning.masks.items())


def test_a_resumed_fit_keeps_the_masks_and_ends_where_the_straight_one_does(tmp_path):
    def make() -> OneShotPruning:
        return OneShotPruning(method="wanda", granularity="2:4", calibration_batches=2, progress=False)

    (straight, whole), (resumed, continued) = straight_and_resumed(tmp_path, make, max_epochs=3)
    assert all(torch.equal(straight.masks[name], resumed.masks[name]) for name in LINEAR)
    for name, value in whole.state_dict().items():
        assert torch.allclose(value, continued.state_dict()[name]), name


def test_pruned_at_the_end_of_a_fit_after_dense_training(tmp_path):
    pruning = OneShotPruning(method="magnitude", amount=0.25, prune_at="end", progress=False)
    _, module, _ = fit_digits(tmp_path, [pruning], max_epochs=1)
    assert zeros(module) == {LINEAR[0]: 128 * 256 // 4, LINEAR[1]: 10 * 128 // 4}


def test_validate_prunes_before_the_pass_so_it_measures_the_pruned_model(tmp_path):
    module = digits_module()
    datamodule = DigitsDataModule()
    datamodule.setup()
    loader = datamodule.val_dataloader()
    dense_loss = quiet_trainer(tmp_path, []).validate(module, loader, verbose=False)[0]["val/loss"]
    pruning = OneShotPruning(method="sparsegpt", amount=0.9, calibration_batches=1, progress=False)
    pruned_loss = quiet_trainer(tmp_path, [pruning]).validate(module, loader, verbose=False)[0]["val/loss"]
    assert zeros(module)[LINEAR[0]] == round(0.9 * 128 * 256)
    assert pruned_loss != dense_loss


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"calibration_batches": 0}, "calibration_batches must be an int >= 1"),
        ({"prune_at": "middle"}, "prune_at must be one of start, end"),
        ({"config": OneShotPruningConfig(), "method": "wanda"}, r"not both: got config and \['method'\]"),
        ({"config": OneShotPruningConfig(), "reconstruct": True}, r"not both: got config and \['reconstruct'\]"),
        ({"reconstruct": "yes"}, "reconstruct must be True or False"),
    ],
)
def test_bad_settings_fail_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        OneShotPruning(**settings)


def test_a_target_that_names_no_layer_fails_at_setup_before_training(tmp_path):
    pruning = OneShotPruning(targets=["model.clasifier.*"], progress=False)
    with pytest.raises(ValueError, match="classifier"):
        fit_digits(tmp_path, [pruning], max_epochs=1)


def test_apply_prunes_a_plain_model_from_a_dataloader():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    datamodule = DigitsDataModule()
    datamodule.setup()
    pruner = OneShotPruning(method="wanda", amount=0.5, calibration_batches=3, progress=False).apply(
        model, datamodule.train_dataloader()
    )
    assert pruner.sparsity()["pruning/sparsity"] == 0.5


def test_apply_with_reconstruction_keeps_the_masks_and_solves_the_surviving_weights_again():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    solved = copy.deepcopy(plain)
    datamodule = DigitsDataModule()
    datamodule.setup()
    for model, reconstruct in ((plain, False), (solved, True)):
        OneShotPruning(method="wanda", calibration_batches=3, progress=False, reconstruct=reconstruct).apply(
            model, datamodule.train_dataloader()
        )
    assert torch.equal(plain[1].weight == 0, solved[1].weight == 0)  # the first layer's inputs are the same
    assert int((solved[1].weight == 0).sum()) == 1024 and int((solved[3].weight == 0).sum()) == 160
    assert not torch.allclose(plain[1].weight, solved[1].weight)


def test_a_student_pruned_at_the_start_of_distillation_recovers_with_its_zeros_and_the_teacher_untouched(tmp_path):
    teacher = tiny_bert(seed=0).eval()
    teacher_state = {name: value.clone() for name, value in teacher.state_dict().items()}
    module = DistillationModule(copy.deepcopy(teacher).train(), teacher, num_classes=len(SUPERSENSES))
    pruning = OneShotPruning(method="wanda", granularity="2:4", calibration_batches=2, progress=False)
    fit_text(tmp_path, module, [pruning])
    linear = {name: layer for name, layer in module.student.named_modules() if isinstance(layer, nn.Linear)}
    for name, layer in linear.items():
        kept = (layer.weight != 0).view(layer.out_features, -1, 4).sum(-1)
        assert (kept <= 2).all() and int((layer.weight == 0).sum()) >= layer.weight.numel() // 2, name
    assert all(torch.equal(value, teacher.state_dict()[name]) for name, value in teacher_state.items())

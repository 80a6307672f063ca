from __future__ import annotations

import csv
from functools import partial, reduce

import lightning as L
import pytest
import torch
from digits import digits_module, fit_digits, quiet_trainer, straight_and_resumed
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from lightning_compress import ClassificationModule
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import SmallCNN
from lightning_compress.pruning import Pruner, Pruning, PruningConfig, taylor_scores

TARGETS = [
    "model.features.0.weight",
    "model.features.4.weight",
    "model.classifier.1.weight",
    "model.classifier.4.weight",
]


def zeros(module: ClassificationModule) -> dict[str, int]:
    state = module.state_dict()
    return {name: int((state[name] == 0).sum()) for name in TARGETS}


def test_global_amount_is_exact_and_the_checkpoint_loads_into_the_plain_model(tmp_path) -> None:
    pruning = Pruning(amount=0.9, schedule="agp", start_epoch=0, end_epoch=1)
    trainer, module, _ = fit_digits(tmp_path, [pruning], max_epochs=3)
    total = sum(module.state_dict()[name].numel() for name in TARGETS)
    assert sum(zeros(module).values()) == round(0.9 * total)
    assert pruning.sparsity()["pruning/sparsity"] == pytest.approx(round(0.9 * total) / total)
    assert list(module.state_dict()) == list(digits_module().state_dict())  # no weight_orig / weight_mask
    plain = SmallCNN(num_classes=10, image_size=8)
    plain.load_state_dict(
        {key.removeprefix("model."): value for key, value in module.state_dict().items()}, strict=True
    )
    inputs = torch.randn(5, 1, 8, 8)
    assert torch.equal(module.eval()(inputs), plain.eval()(inputs))


@pytest.mark.parametrize(
    "optimizer",
    [
        partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-2),
        partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
    ],
    ids=["sgd-momentum-wd", "adamw"],
)
def test_pruned_weights_stay_exactly_zero_through_the_optimizer(tmp_path, optimizer) -> None:
    masks_per_epoch = []

    class RecordMasks(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            masks_per_epoch.append({name: mask.clone() for name, mask in pruning.masks.items()})
            for name, mask in pruning.masks.items():
                assert torch.all(pl_module.state_dict()[name][~mask] == 0)

    pruning = Pruning(amount=0.8, schedule="linear", start_epoch=0, end_epoch=2)
    fit_digits(tmp_path, [pruning, RecordMasks()], max_epochs=4, optimizer=optimizer)
    for earlier, later in zip(masks_per_epoch, masks_per_epoch[1:]):
        assert all(torch.all(later[name] <= earlier[name]) for name in TARGETS)  # masks only grow
    assert [
        round(1 - sum(m.sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values()), 3)
        for masks in masks_per_epoch
    ] == [
        0.267,
        0.533,
        0.8,
        0.8,
    ]


def test_a_lower_later_target_does_not_revive_weights(tmp_path) -> None:
    pruning = Pruning(schedule=lambda epoch: 0.6 if epoch == 0 else 0.2, start_epoch=0, end_epoch=1)
    _, module, _ = fit_digits(tmp_path, [pruning], max_epochs=3)
    assert pruning.pruned_epochs == [0, 1]
    total = sum(module.state_dict()[name].numel() for name in TARGETS)
    assert sum(zeros(module).values()) >= round(0.6 * total)


def test_sparsity_is_logged_at_each_pruning_step(tmp_path) -> None:
    fit_digits(
        tmp_path,
        [Pruning(amount=0.5, schedule="linear", start_epoch=0, end_epoch=1)],
        max_epochs=2,
        logger=CSVLogger(tmp_path, name="csv"),
    )
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["pruning/sparsity"]]
    assert [float(row["pruning/sparsity"]) for row in rows] == pytest.approx([0.25, 0.5], abs=1e-4)
    assert float(rows[-1]["pruning/sparsity/model.classifier.1.weight"]) > 0


def test_layer_scope_prunes_each_layer_to_the_amount(tmp_path) -> None:
    _, module, _ = fit_digits(tmp_path, [Pruning(amount=0.7, scope="layer", schedule="oneshot")], max_epochs=1)
    state = module.state_dict()
    assert zeros(module) == {name: round(0.7 * state[name].numel()) for name in TARGETS}


def test_two_of_four_keeps_two_in_every_group_and_skips_layers_that_cannot(tmp_path) -> None:
    pruning = Pruning(granularity="2:4", schedule="oneshot")
    with pytest.warns(UserWarning, match="leaving \\['model.features.0.weight'\\] dense"):
        _, module, _ = fit_digits(tmp_path, [pruning], max_epochs=1)
    for name in TARGETS[1:]:
        groups = (module.state_dict()[name] != 0).movedim(1, -1).reshape(-1, 4).sum(dim=1)
        assert groups.max() <= 2 and (groups == 2).float().mean() > 0.99
    assert zeros(module)["model.features.0.weight"] == 0


def test_threshold_rule_zeroes_small_weights(tmp_path) -> None:
    seen = {}

    class Capture(L.Callback):  # runs before Pruning at the start of epoch 0: sees the weights the rule judges
        def on_train_epoch_start(self, trainer, pl_module):
            seen.update({name: pl_module.state_dict()[name].clone() for name in TARGETS})

    pruning = Pruning(threshold=0.05, schedule="oneshot")
    _, module, _ = fit_digits(tmp_path, [Capture(), pruning], max_epochs=1)
    for name in TARGETS:
        assert torch.equal(pruning.masks[name], seen[name].abs() > 0.05)
        assert torch.all(module.state_dict()[name][~pruning.masks[name]] == 0)


def test_random_criterion_is_reproducible_from_its_seed(tmp_path) -> None:
    first = Pruning(amount=0.5, criterion="random", schedule="oneshot", seed=7)
    second = Pruning(amount=0.5, criterion="random", schedule="oneshot", seed=7)
    fit_digits(tmp_path, [first], max_epochs=1)
    fit_digits(tmp_path, [second], max_epochs=1, seed=1)
    assert all(torch.equal(first.masks[name], second.masks[name]) for name in TARGETS)


def test_taylor_criterion_uses_the_epoch_before_pruning(tmp_path) -> None:
    taylor = Pruning(amount=0.5, criterion="taylor", schedule="oneshot", start_epoch=1)
    magnitude = Pruning(amount=0.5, criterion="magnitude", schedule="oneshot", start_epoch=1)
    _, module, _ = fit_digits(tmp_path, [taylor], max_epochs=2)
    fit_digits(tmp_path, [magnitude], max_epochs=2)
    assert sum(zeros(module).values()) == round(0.5 * sum(module.state_dict()[n].numel() for n in TARGETS))
    assert any(not torch.equal(taylor.masks[name], magnitude.masks[name]) for name in TARGETS)


def test_taylor_pruning_at_epoch_0_scores_the_first_steps_and_prunes_after_them(tmp_path) -> None:
    pruned_at_batch_start = []

    class RecordPruned(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pruned_at_batch_start.append((trainer.global_step, bool(taylor.masks)))

    taylor = Pruning(amount=0.5, criterion="taylor", schedule="oneshot", start_epoch=0, taylor_steps=3)
    _, module, _ = fit_digits(tmp_path, [taylor, RecordPruned()], max_epochs=1)
    assert pruned_at_batch_start[:5] == [(0, False), (1, False), (2, False), (3, True), (4, True)]
    assert taylor.pruned_epochs == [0]
    assert sum(zeros(module).values()) == round(0.5 * sum(module.state_dict()[n].numel() for n in TARGETS))

    scores: dict[str, torch.Tensor] = {}

    class SumFirstScores(L.Callback):  # the same seeded fit, unpruned: the same first three steps
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step < 3:
                for name, weight in pl_module.named_parameters():
                    if name in TARGETS:
                        scores[name] = scores.get(name, 0) + taylor_scores(weight)

    fit_digits(tmp_path, [SumFirstScores()], max_epochs=1)
    expected = Pruner(digits_module(), PruningConfig(amount=0.5, criterion="taylor"))
    expected.prune(taylor=scores)
    assert all(torch.equal(taylor.masks[name], expected.masks[name]) for name in TARGETS)


def test_taylor_pruning_at_epoch_0_of_fewer_steps_prunes_at_its_end(tmp_path) -> None:
    pruned_at_epoch_start = []

    class RecordPruned(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            pruned_at_epoch_start.append(bool(taylor.masks))

    taylor = Pruning(amount=0.5, criterion="taylor", schedule="oneshot", start_epoch=0, taylor_steps=10_000)
    _, module, _ = fit_digits(tmp_path, [taylor, RecordPruned()], max_epochs=2)
    assert pruned_at_epoch_start == [False, True] and taylor.pruned_epochs == [0]
    assert sum(zeros(module).values()) == round(0.5 * sum(module.state_dict()[n].numel() for n in TARGETS))


class EpochsOf(L.LightningDataModule):
    """Random 8x8 images in batches of 8: ``steps[epoch]`` batches at each epoch (rebuilt every epoch)."""

    def __init__(self, steps: list[int]) -> None:
        super().__init__()
        self.steps = steps

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        count = 8 * self.steps[self.trainer.current_epoch]
        generator = torch.Generator().manual_seed(self.trainer.current_epoch)
        inputs, targets = (
            torch.randn(count, 1, 8, 8, generator=generator),
            torch.randint(10, (count,), generator=generator),
        )
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=8)


def test_a_taylor_step_after_a_step_that_took_its_epoch_sums_its_own_first_steps(tmp_path) -> None:
    """Epoch 0 (2 steps, fewer than taylor_steps=3) prunes at its end; epoch 1's step has no steps before it, so it
    sums epoch 1's first 3 and prunes after them; epoch 2's step sums the last 2 of epoch 1 and prunes at its start."""
    steps: list[dict[str, torch.Tensor]] = []
    pruned: list[tuple[int, dict[str, torch.Tensor]]] = []

    class RecordScores(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps.append(
                {name: taylor_scores(w).float() for name, w in pl_module.named_parameters() if name in TARGETS}
            )

        def on_train_start(self, trainer, pl_module):
            prune = taylor.pruner.prune

            def recorded(*args, taylor: dict[str, torch.Tensor], **options):
                pruned.append((trainer.global_step, {name: score.clone() for name, score in taylor.items()}))
                return prune(*args, taylor=taylor, **options)

            taylor.pruner.prune = recorded

    taylor = Pruning(amount=0.5, criterion="taylor", schedule="linear", start_epoch=0, end_epoch=2, taylor_steps=3)
    L.seed_everything(0)
    trainer = quiet_trainer(
        tmp_path, [RecordScores(), taylor], max_epochs=3, reload_dataloaders_every_n_epochs=1, limit_val_batches=0
    )
    trainer.fit(digits_module(), datamodule=EpochsOf([2, 5, 1]))
    assert taylor.pruned_epochs == [0, 1, 2]
    assert [step for step, _ in pruned] == [2, 5, 7]  # epoch 0's end, epoch 1's third step, epoch 2's start
    for (_, scores), summed in zip(pruned, (steps[0:2], steps[2:5], steps[5:7]), strict=True):
        assert all(torch.equal(scores[name], reduce(torch.add, [step[name] for step in summed])) for name in TARGETS)
    total = sum(mask.numel() for mask in taylor.masks.values())
    assert sum(int((~mask).sum()) for mask in taylor.masks.values()) == round(0.5 * total)


def test_rewinding_resets_survivors_to_the_rewind_epoch(tmp_path) -> None:
    snapshots = {}

    class Capture(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                snapshots["rewind"] = {name: pl_module.state_dict()[name].clone() for name in TARGETS}

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                snapshots["after_pruning"] = {name: pl_module.state_dict()[name].clone() for name in TARGETS}

    pruning = Pruning(amount=0.6, schedule="oneshot", start_epoch=2, rewind_epoch=0)
    fit_digits(tmp_path, [pruning, Capture()], max_epochs=3)
    for name in TARGETS:
        assert torch.equal(snapshots["after_pruning"][name], snapshots["rewind"][name] * pruning.masks[name])


RESUMABLE = {
    "magnitude": {"amount": 0.9, "schedule": "agp", "start_epoch": 0, "end_epoch": 3},
    "taylor": {"amount": 0.8, "criterion": "taylor", "start_epoch": 1, "end_epoch": 3},
    "random_rewind": {
        "amount": 0.8,
        "criterion": "random",
        "schedule": "linear",
        "start_epoch": 1,
        "end_epoch": 3,
        "rewind_epoch": 0,
        "seed": 3,
    },
    "taylor_channel": {
        "amount": 0.5,
        "criterion": "taylor",
        "granularity": "channel",
        "start_epoch": 1,
        "end_epoch": 3,
    },
}


@pytest.mark.parametrize("options", RESUMABLE.values(), ids=RESUMABLE.keys())
def test_a_resumed_run_ends_with_the_same_masks_and_weights(tmp_path, options: dict) -> None:
    """Stopped after epoch 1 (mid-schedule, with Taylor sums or a rewind snapshot in flight) and resumed."""
    (straight, whole), (resumed, continued) = straight_and_resumed(tmp_path, lambda: Pruning(**options), max_epochs=4)
    assert resumed.pruned_epochs == straight.pruned_epochs == list(range(options["start_epoch"], 4))
    assert straight.masks.keys() == resumed.masks.keys() and len(straight.masks) >= len(TARGETS)
    assert all(torch.equal(straight.masks[name], resumed.masks[name]) for name in straight.masks)
    for (name, value), other in zip(whole.state_dict().items(), continued.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=0, atol=1e-6, msg=name)


def test_a_taylor_checkpoint_from_before_the_step_count_resumes_as_the_straight_run(tmp_path) -> None:
    """Pruning state saved before ``scored_steps`` and ``waiting_epoch`` existed, with scores summed mid-schedule."""
    options = RESUMABLE["taylor"]
    straight = Pruning(**options)
    _, whole, _ = fit_digits(tmp_path / "a", [straight], max_epochs=4)
    fit_digits(
        tmp_path / "b", [Pruning(**options), ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)], max_epochs=2
    )
    checkpoint_path = tmp_path / "b" / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    for key, state in checkpoint["callbacks"].items():
        if key.startswith("Pruning"):
            assert state["taylor"] and state.pop("scored_steps") > 0 and state.pop("waiting_epoch") is None
    torch.save(checkpoint, checkpoint_path)
    resumed = Pruning(**options)
    _, continued, _ = fit_digits(tmp_path / "c", [resumed], max_epochs=4, ckpt_path=str(checkpoint_path))
    assert resumed.pruned_epochs == straight.pruned_epochs == [1, 2, 3]
    assert all(torch.equal(straight.masks[name], resumed.masks[name]) for name in straight.masks)
    for (name, value), other in zip(whole.state_dict().items(), continued.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=0, atol=1e-6, msg=name)


def test_fit_twice_validate_test_and_test_from_checkpoint(tmp_path) -> None:
    pruning = Pruning(amount=0.5, schedule="oneshot")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer, module, datamodule = fit_digits(tmp_path, [pruning, checkpoint], max_epochs=1)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module, datamodule=datamodule)
    assert pruning.pruned_epochs == [0]
    assert sum(zeros(module).values()) >= round(0.5 * sum(module.state_dict()[n].numel() for n in TARGETS))
    assert trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/acc"] > 0.5
    assert (
        trainer.test(module, datamodule=datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)[0][
            "test/acc"
        ]
        > 0.5
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"amount": 1.0}, "amount must be in \\[0, 1\\), got 1.0"),
        ({"amount": -0.1}, "amount must be in \\[0, 1\\), got -0.1"),
        ({"amount": 0.5, "threshold": 0.1}, "either amount \\(0.5\\) or threshold \\(0.1\\)"),
        ({}, "give amount"),
        ({"amount": 0.5, "criterion": "size"}, "unknown criterion 'size'.*magnitude, taylor, random"),
        ({"amount": 0.5, "criterion": "l1"}, "l1 and l2 rank whole channels"),
        ({"amount": 0.5, "granularity": "block"}, "unknown granularity 'block'"),
        ({"granularity": "3:2"}, "unknown granularity '3:2'.*0 < N < M"),
        ({"amount": 0.3, "granularity": "2:4"}, "means sparsity 0.5; amount=0.3"),
        ({"amount": 0.5, "scope": "model"}, "unknown scope 'model'"),
        ({"amount": 0.5, "schedule": "cubic"}, "unknown schedule 'cubic'"),
        ({"amount": 0.5, "start_epoch": 3, "end_epoch": 2}, "end_epoch \\(2\\) must not be before start_epoch \\(3\\)"),
        ({"amount": 0.5, "criterion": "taylor", "taylor_steps": 0}, "taylor_steps must be an int >= 1"),
        ({"amount": 0.5, "frequency": 0}, "frequency must be a positive number of epochs, got 0"),
        ({"amount": 0.5, "start_epoch": 1, "rewind_epoch": 1}, "rewind_epoch must be in \\[0, start_epoch=1\\)"),
    ],
)
def test_bad_arguments_fail_in_init(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pruning(**options)


def test_an_end_epoch_past_training_warns_at_setup(tmp_path) -> None:
    with pytest.warns(
        UserWarning, match="end_epoch=2 .* max_epochs=2: the target is reached only if training is resumed"
    ):
        fit_digits(tmp_path, [Pruning(amount=0.5, end_epoch=2)], max_epochs=2)


def test_a_pattern_that_matches_nothing_fails_before_training(tmp_path) -> None:
    module = digits_module()
    before = {name: value.clone() for name, value in module.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        callbacks=[Pruning(amount=0.5, targets=["model.feature.*"])],
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="'model.feature.\\*' matches no layer.*model.features"):
        trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.global_step == 0
    assert all(torch.equal(before[name], value) for name, value in module.state_dict().items())


class CaptureOutputs(L.Callback):
    """Record the masked model's outputs on fixed inputs when training ends, before Pruning (listed after it) removes channels."""

    def on_train_end(self, trainer, pl_module):
        self.inputs = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.outputs = pl_module.eval()(self.inputs)


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "random"])
def test_channel_pruning_with_removal_gives_a_smaller_model_with_the_same_outputs(tmp_path, criterion) -> None:
    capture = CaptureOutputs()
    pruning = Pruning(
        amount=0.5,
        criterion=criterion,
        granularity="channel",
        scope="layer",
        schedule="oneshot",
        start_epoch=1,
        remove_channels=True,
    )
    _, module, _ = fit_digits(tmp_path, [capture, pruning], max_epochs=2)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(capture.inputs), capture.outputs, rtol=0, atol=1e-5)
    assert capture.outputs.shape == (16, 10)
    model = module.model
    assert (model.features[0].out_channels, model.features[4].out_channels, model.classifier[1].out_features) == (
        16,
        32,
        64,
    )
    assert model.classifier[4].out_features == 10  # the output layer keeps its classes
    # conv 1*16*9 + bn 2*16 + conv 16*32*9 + bn 2*32 + linear 32*2*2*64 + 64 + linear 64*10 + 10, by hand:
    assert sum(p.numel() for p in module.parameters()) == 144 + 32 + 4608 + 64 + 8192 + 64 + 650


def test_checkpoints_from_before_removal_load_into_the_removed_model(tmp_path) -> None:
    pruning = Pruning(amount=0.5, granularity="channel", scope="layer", schedule="oneshot", remove_channels=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_top_k=1)
    trainer, module, datamodule = fit_digits(tmp_path, [pruning, checkpoint], max_epochs=2)
    assert module.model.features[0].out_channels == 16
    full_size = ClassificationModule.load_from_checkpoint(
        checkpoint.best_model_path, model=SmallCNN(num_classes=10, image_size=8)
    )
    assert full_size.model.features[0].out_channels == 32  # the checkpoint holds the masked full-size model
    metrics = trainer.test(module, datamodule=datamodule, ckpt_path="best", verbose=False)[0]
    assert metrics["test/acc"] == trainer.test(full_size, datamodule=datamodule, verbose=False)[0]["test/acc"]
    inputs = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(inputs), full_size.eval()(inputs), rtol=0, atol=1e-5)


def test_channel_masks_zero_everything_a_pruned_channel_touches(tmp_path) -> None:
    pruning = Pruning(amount=0.25, granularity="channel", schedule="oneshot")
    _, module, _ = fit_digits(tmp_path, [pruning], max_epochs=1)
    model = module.model
    pruned = (~pruning.channel_keep["model.features.0"]).nonzero().flatten()
    assert len(pruned) > 0
    # One global ranking over the 32 + 64 + 128 channels of the three prunable groups:
    assert sum(int((~keep).sum()) for keep in pruning.channel_keep.values()) == round(0.25 * (32 + 64 + 128))
    assert torch.all(model.features[0].weight[pruned] == 0)
    assert torch.all(model.features[1].weight[pruned] == 0) and torch.all(model.features[1].bias[pruned] == 0)
    assert torch.all(model.features[4].weight[:, pruned] == 0)
    assert "model.classifier.4.weight" in pruning.masks  # inputs of the output layer, never its outputs
    assert bool(pruning.masks["model.classifier.4.weight"].any(dim=1).all())


def test_what_to_prune_comes_as_a_config_or_as_arguments_never_both(tmp_path) -> None:
    config = PruningConfig(amount=0.5, granularity="2:4")
    by_config = Pruning(config=config, schedule="oneshot", start_epoch=0)
    assert by_config.config is config and Pruning(granularity="2:4").config == config
    _, module, _ = fit_digits(tmp_path, [by_config], max_epochs=1)
    groups = module.model.classifier[1].weight.reshape(-1, 4)
    assert bool(((groups != 0).sum(1) <= 2).all())  # 2 of each 4 kept, as with granularity="2:4" itself
    with pytest.raises(
        ValueError, match=r"as config=PruningConfig\(...\) or as arguments, not both: got config and \['amount'\]"
    ):
        Pruning(amount=0.9, config=config)


def test_channel_options_fail_before_training(tmp_path) -> None:
    with pytest.raises(
        ValueError, match="remove_channels=True .* needs granularity='channel' or 'head', not 'unstructured'"
    ):
        Pruning(amount=0.5, remove_channels=True)


def test_channel_pruning_without_an_example_input_traces_the_first_training_batch(tmp_path) -> None:
    module = ClassificationModule(SmallCNN(num_classes=10, image_size=8), num_classes=10)  # no example_input_array
    pruning = Pruning(
        amount=0.25, granularity="channel", criterion="l1", scope="layer", schedule="oneshot", start_epoch=0
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        callbacks=[pruning],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.global_step > 0
    # a quarter of each layer's output channels, as with an example_input_array
    assert {name: int((~keep).sum()) for name, keep in pruning.channel_keep.items()} == {
        "model.features.0": 8,
        "model.features.4": 16,
        "model.classifier.1": 32,
    }


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"amount": "0.5"},
            "amount must be a number in \\[0, 1\\), a dict of layer name -> amount, or None \\(with threshold or a callable schedule\\); got '0.5' \\(str\\)$",
        ),
        ({"amount": True}, "amount must be a number .*; got True \\(bool\\)$"),
        ({"amount": [0.5]}, "amount must be a number .*; got \\[0.5\\] \\(list\\)$"),
        (
            {"amount": {"model.features.0": "0.5"}},
            "amount per layer needs a number in \\[0, 1\\) for each layer; got '0.5' \\(str\\) for 'model.features.0'$",
        ),
        ({"threshold": "0.1"}, "threshold must be a number >= 0 or None; got '0.1' \\(str\\)$"),
        ({"threshold": float("nan")}, "threshold=nan needs a value >= 0"),
        (
            {"amount": 0.5, "schedule": 3},
            "schedule must be one of oneshot, linear, agp or a callable epoch -> sparsity; got 3 \\(int\\)$",
        ),
        ({"amount": 0.5, "start_epoch": "1"}, "start_epoch must be an int >= 0; got '1' \\(str\\)$"),
        ({"amount": 0.5, "start_epoch": 1.5}, "start_epoch must be an int >= 0; got 1.5 \\(float\\)$"),
        ({"amount": 0.5, "end_epoch": "3"}, "end_epoch must be an int >= start_epoch or None; got '3' \\(str\\)$"),
        ({"amount": 0.5, "end_epoch": 2.5}, "end_epoch must be an int >= start_epoch or None; got 2.5 \\(float\\)$"),
        (
            {"amount": 0.5, "frequency": "2"},
            "frequency must be a positive int \\(epochs between pruning steps\\); got '2' \\(str\\)$",
        ),
        (
            {"amount": 0.5, "frequency": True},
            "frequency must be a positive int \\(epochs between pruning steps\\); got True \\(bool\\)$",
        ),
        (
            {"amount": 0.5, "start_epoch": 2, "rewind_epoch": "1"},
            "rewind_epoch must be an int in \\[0, start_epoch\\) or None; got '1' \\(str\\)$",
        ),
    ],
)
def test_arguments_of_the_wrong_type_fail_in_init_naming_the_argument(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pruning(**options)


class _TwoLinears(L.LightningModule):
    """Weights 2, 4, ..., 24 (first layer) and 1, 3, ..., 11 (second): a global 50% prunes 7 + 2 of the 18 (ranked
    by LAMP scores, each weight against its own layer; the largest of every row kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.first.weight.copy_(torch.arange(2.0, 25.0, 2.0).view(3, 4))
            self.second.weight.copy_(torch.arange(1.0, 12.0, 2.0).view(2, 3))


class _Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append(dict(metrics))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def test_sparsity_counts_the_weights_that_are_zero_not_the_masks() -> None:
    module, recorder, pruning = _TwoLinears(), _Recorder(), Pruning(amount=0.5, schedule="oneshot")
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=recorder, callbacks=[pruning], enable_progress_bar=False
    )
    pruning.setup(trainer, module, "fit")
    pruning.on_train_epoch_start(trainer, module)  # epoch 0: the one-shot step, logged
    expected = {
        "pruning/sparsity": 9 / 18,
        "pruning/sparsity/first.weight": 7 / 12,
        "pruning/sparsity/second.weight": 2 / 6,
    }
    assert recorder.logged == [expected] and pruning.sparsity() == expected
    with torch.no_grad():
        module.first.weight.fill_(float("nan"))
        module.second.weight.fill_(float("nan"))
    pruning.apply_masks()  # NaN * 0 is NaN: nothing is zero any more, whatever the masks say
    assert pruning.sparsity() == {
        "pruning/sparsity": 0.0,
        "pruning/sparsity/first.weight": 0.0,
        "pruning/sparsity/second.weight": 0.0,
    }

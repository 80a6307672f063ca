"""AutoCompression: the plan chosen within an accuracy budget, trained with the dense teacher, proven on validation."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from commands import EAGER_QUICK_REPORT
from digits import digits_module, quiet_trainer
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import AutoCompression, ClassificationModule, compressed_bytes
from lightning_compress.analysis import count_macs
from lightning_compress.auto import LayerSetting, least_damage_plan, measure_candidates
from lightning_compress.auto.integer import Int8Layers
from lightning_compress.auto.margin import standard_errors, validation_classes
from lightning_compress.auto.objectives import ChannelLatency, ChannelONNXBytes
from lightning_compress.auto.settings import next_settings
from lightning_compress.auto.teacher import TeacherGradient
from lightning_compress.data import DigitsDataModule
from lightning_compress.deploy import OnnxRuntimeModel
from lightning_compress.deploy.onnx import onnx_bytes
from lightning_compress.distillation.losses import kd_loss
from lightning_compress.job import train
from lightning_compress.quantization import QuantConfig, quantize_model, quantized_layers


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> ClassificationModule:
    """The small CNN trained dense on the digits for 6 epochs: what a user starts AutoCompression from."""
    L.seed_everything(0)
    module = digits_module()
    quiet_trainer(tmp_path_factory.mktemp("dense"), [], max_epochs=6, enable_checkpointing=False).fit(
        module, datamodule=DigitsDataModule()
    )
    return module


def fit_saving_every_epoch(
    folder, auto: AutoCompression, trained: L.LightningModule, max_epochs: int, ckpt_path: str | None
) -> L.LightningModule:
    """A copy of ``trained`` compressed by ``auto`` (resumed from ``ckpt_path``), a checkpoint saved every epoch."""
    module = copy.deepcopy(trained)
    L.seed_everything(0)
    every_epoch = ModelCheckpoint(dirpath=folder, save_top_k=-1, filename="{epoch}")
    quiet_trainer(folder, [auto, every_epoch], max_epochs=max_epochs).fit(
        module, datamodule=DigitsDataModule(), ckpt_path=ckpt_path
    )
    return module


def compress(tmp_path, module: L.LightningModule, auto: AutoCompression, max_epochs: int) -> L.Trainer:
    L.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [auto], max_epochs=max_epochs, enable_checkpointing=False)
    trainer.fit(module, datamodule=DigitsDataModule())
    return trainer


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"objective": "flops"}, r"objective must be one of compressed_bytes, onnx_bytes, macs, latency; got 'flops'"),
        ({"max_accuracy_drop": 0.0}, r"max_accuracy_drop must be a number in \(0, 1\).*got 0.0"),
        ({"max_accuracy_drop": 1.0}, r"max_accuracy_drop must be a number in \(0, 1\).*got 1.0"),
        ({"max_accuracy_drop": math.nan}, r"max_accuracy_drop must be a number in \(0, 1\).*got nan"),
        ({"methods": ["pruning", "distillation"]}, r"methods must be a non-empty list of pruning, clustering"),
        ({"methods": []}, r"methods must be a non-empty list"),
        ({"confidence": 0.3}, r"confidence must be None or a number in \[0.5, 1\)"),
        ({"mode": "maximum"}, r"mode must be one of max, min; got 'maximum'"),
        ({"recovery_epochs": 0}, r"recovery_epochs must be an int >= 1; got 0"),
    ],
)
def test_bad_settings_fail_when_made(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AutoCompression(**arguments)


def test_a_monitor_validation_does_not_log_fails_before_training_naming_what_it_logs(tmp_path, trained) -> None:
    module = copy.deepcopy(trained)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(
        ValueError, match=r"monitors 'val_acc', which validation does not log; it logs val/acc, val/loss"
    ):
        compress(tmp_path, module, AutoCompression(monitor="val_acc"), max_epochs=2)
    assert all(torch.equal(before[name], value) for name, value in module.state_dict().items())


def test_a_fit_shorter_than_one_recovery_fails_at_setup(tmp_path, trained) -> None:
    with pytest.raises(ValueError, match=r"max_epochs >= recovery_epochs=3 \(one level's recovery\), got max_epochs=2"):
        compress(tmp_path, copy.deepcopy(trained), AutoCompression(recovery_epochs=3), max_epochs=2)


def test_a_fit_without_validation_data_fails_before_training(tmp_path, trained) -> None:
    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.arange(8) % 10), batch_size=4)
    with pytest.raises(ValueError, match=r"measures the dense model on validation data before training"):
        quiet_trainer(tmp_path, [AutoCompression()], max_epochs=2, enable_checkpointing=False).fit(
            copy.deepcopy(trained), data
        )


def test_a_model_without_a_layer_to_compress_is_refused_at_setup(tmp_path, trained) -> None:
    with pytest.raises(ValueError, match=r"leave no layer to compress"):
        compress(tmp_path, copy.deepcopy(trained), AutoCompression(exclude=["model.*"]), max_epochs=2)


def test_the_teacher_adds_the_gradient_of_its_distillation_loss() -> None:
    torch.manual_seed(0)
    student, inputs, targets = nn.Linear(6, 4), torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0])
    teacher = nn.Linear(6, 4)
    explicit = copy.deepcopy(student)
    loss = nn.functional.cross_entropy(explicit(inputs), targets)
    (loss + 0.7 * kd_loss(explicit(inputs), teacher(inputs).detach(), temperature=2.0)).backward()

    handle = TeacherGradient(teacher, temperature=2.0, weight=0.7).attach(student)
    nn.functional.cross_entropy(student(inputs), targets).backward()
    handle.remove()
    torch.testing.assert_close(student.weight.grad, explicit.weight.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(student.bias.grad, explicit.bias.grad, rtol=1e-6, atol=1e-7)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    handle = TeacherGradient(teacher, temperature=2.0, weight=0.7).attach(student)
    student(inputs).sum().backward()
    assert len(calls) == 1  # a training forward runs the teacher
    with torch.no_grad():  # evaluation and inference do not
        student.eval()(inputs)
    student.train()(inputs.requires_grad_(False)).detach()
    with torch.no_grad():
        student(inputs)
    handle.remove()
    assert len(calls) == 2  # the training forward with gradients only


class WithIdleBranch(nn.Module):
    """A classifier and a branch that adds nothing to its output: compressing the branch costs no accuracy."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(16, 4)
        self.idle = nn.Linear(16, 4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.used(inputs) + 0.0 * self.idle(inputs)


def pruning_table(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list]:
    settings = {name: next_settings("pruning", LayerSetting(), layer.weight.shape) for name, layer in layers.items()}
    return measure_candidates(
        model, layers, settings, [torch.randn(64, 16, generator=torch.Generator().manual_seed(1))]
    )


def test_a_layer_that_costs_nothing_to_compress_gets_the_most_compression() -> None:
    torch.manual_seed(0)
    model = WithIdleBranch()
    table = pruning_table(model, {"used": model.used, "idle": model.idle})
    assert all(candidate.damage == 0.0 for candidate in table["idle"])
    dense_cost = sum(candidates[0].cost for candidates in table.values())
    plan = least_damage_plan(table, max_cost=0.75 * dense_cost)
    assert plan["idle"].cost == min(candidate.cost for candidate in table["idle"])
    assert plan["idle"].setting == LayerSetting(sparsity=0.93)  # 60 of 64 pruned: each of 4 rows keeps one
    assert plan["used"].setting == LayerSetting()  # the idle branch alone meets the budget


def test_the_plan_is_the_least_predicted_damage_within_the_budget() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    table = pruning_table(model, {"0": model[0], "2": model[2]})
    budget = 0.3 * sum(candidates[0].cost for candidates in table.values())
    plan = least_damage_plan(table, max_cost=budget)
    best = min(a.damage + b.damage for a in table["0"] for b in table["2"] if a.cost + b.cost <= budget)
    assert sum(c.damage for c in plan.values()) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert sum(c.cost for c in plan.values()) <= budget
    assert (
        least_damage_plan(table, max_cost=min(c.cost for c in table["0"]) + min(c.cost for c in table["2"]) - 1) is None
    )


class Unchanged(ClassificationModule):
    """Validation logs how close the weights are to where they started: any compression makes it worse."""

    def on_fit_start(self) -> None:
        self.start = [parameter.detach().clone() for parameter in self.parameters()]

    def validation_step(self, batch, batch_idx: int) -> None:
        moved = sum(float((p.detach() - s).abs().sum()) for p, s in zip(self.parameters(), self.start))
        self.log("val/closeness", -moved)


def test_a_budget_nothing_fits_in_gives_back_the_dense_model_exactly(tmp_path, trained) -> None:
    module = Unchanged(copy.deepcopy(trained.model), num_classes=10, input_shape=(1, 8, 8))
    dense = copy.deepcopy(module.state_dict())
    auto = AutoCompression(max_accuracy_drop=1e-9, monitor="val/closeness", recovery_epochs=1)
    compress(tmp_path, module, auto, max_epochs=12)
    assert [level.accepted for level in auto.history] == [False] * len(auto.history)
    assert {level.method for level in auto.history} == {"pruning", "clustering"}  # each method tried, then done
    assert auto.done and auto.accepted_ratio == 1.0
    assert all(torch.equal(dense[name], value) for name, value in module.state_dict().items())
    assert all(layer.sparsity == 0.0 and layer.bits is None for layer in auto.plan.values())


def test_the_search_compresses_within_the_budget_and_the_model_holds_the_plan(tmp_path, trained) -> None:
    module = copy.deepcopy(trained)
    auto = AutoCompression(max_accuracy_drop=0.01, recovery_epochs=1)
    trainer = compress(tmp_path, module, auto, max_epochs=24)
    accepted = [level for level in auto.history if level.accepted]
    assert accepted and auto.done
    assert all(level.drop <= 0.01 for level in accepted)
    levels = [level for level in auto.history if level.method != "recovery"]
    assert all((level.drop <= level.allowed_drop) == level.accepted for level in levels)
    round_start, first_round = 0, True  # the methods go round again (pruning after clustering) only after a round
    for index, (previous, level) in enumerate(zip(levels, levels[1:]), start=1):  # that kept a level
        if (previous.method, level.method) == ("clustering", "pruning"):
            assert any(kept.accepted for kept in levels[round_start:index])
            round_start, first_round = index, False
        # in the first round pruning stops at half the budget, leaving the rest to shared values
        assert level.allowed_drop == (0.005 if first_round and level.method == "pruning" else 0.01)
    assert levels[0].allowed_drop == 0.005
    assert trainer.current_epoch == 24 and any(level.method == "recovery" for level in auto.history)
    kept_metric = auto.reference
    for level in auto.history:  # after the search, an epoch is kept where it validates better than the kept level
        assert level.method != "recovery" or level.accepted == (level.metric > kept_metric)
        kept_metric = level.metric if level.accepted else kept_metric
    assert auto.accepted_ratio == max(level.ratio for level in accepted) > 4.0
    # The model is the last accepted level: validated again, its metric is the one that was accepted.
    metric = trainer.validate(module, datamodule=DigitsDataModule(), verbose=False)[0]["val/acc"]
    assert auto.reference - metric <= 0.01
    assert metric == pytest.approx(accepted[-1].metric, abs=1e-6)
    for name, layer in auto.plan.items():
        weight = module.get_submodule(name).weight.detach()
        assert int((weight == 0).sum()) == round(layer.sparsity * weight.numel())  # to the element
        if layer.bits is not None:
            assert weight[weight != 0].unique().numel() <= 2**layer.bits
        # float non-zeros take the bytes predicted exactly; shared values were estimated before recovery
        assert layer.predicted_cost == layer.cost if layer.bits is None else 0.5 < layer.predicted_cost / layer.cost < 2
        assert layer.cost > 0
    assert len(compressed_bytes(module)) == accepted[-1].measured_cost


def test_a_resumed_search_equals_an_uninterrupted_one_and_its_checkpoint_runs_no_code(tmp_path, trained) -> None:
    """Levels of 2 epochs: resumed after epoch 1, between the first and the second, and after epoch 2, inside the
    second."""

    def fit(folder: str, ckpt_path: str | None = None) -> tuple[AutoCompression, ClassificationModule]:
        auto = AutoCompression(max_accuracy_drop=0.02, recovery_epochs=2, calibration_batches=2)
        return auto, fit_saving_every_epoch(tmp_path / folder, auto, trained, max_epochs=6, ckpt_path=ckpt_path)

    straight, whole = fit("straight")
    assert len(straight.history) == 3
    for resumed_after in (1, 2):
        resumed, continued = fit(f"resumed{resumed_after}", str(tmp_path / "straight" / f"epoch={resumed_after}.ckpt"))
        assert resumed.history == straight.history, resumed_after
        assert resumed.reference == straight.reference and resumed.plan == straight.plan
        for name, value in whole.state_dict().items():
            assert torch.equal(value, continued.state_dict()[name]), (resumed_after, name)
    state = torch.load(tmp_path / "straight" / "epoch=5.ckpt", map_location="cpu", weights_only=True)
    (saved,) = [value for key, value in state["callbacks"].items() if key.startswith("AutoCompression")]
    assert saved["reference"] == straight.reference
    assert [level["accepted"] for level in saved["history"]] == [level.accepted for level in straight.history]


def test_the_app_runs_auto_from_the_dense_run_and_writes_its_search(compose_config, tmp_path) -> None:
    cfg = compose_config(
        "compression=auto",
        "compression.auto.recovery_epochs=1",
        "trainer.max_epochs=3",
        "export=compressed",
        f"output_dir={tmp_path}",
        *EAGER_QUICK_REPORT,
    )
    dense, _, auto = train(cfg).entries  # dense, its bfloat16 copy, auto
    assert (dense.name, auto.name) == ("dense", "auto")
    assert auto.val_accuracy >= dense.val_accuracy - 0.005  # the budget, on the validation split
    assert auto.profile.compressed_bytes < dense.profile.compressed_bytes
    assert auto.note.startswith("AutoCompression (compressed_bytes): budget 0.005 of val/acc from the dense model's")
    search = (tmp_path / "auto_compression.md").read_text()
    assert "| level | method |" in search and (tmp_path / "auto_compression.png").stat().st_size > 0
    assert len((tmp_path / "auto" / "model.lcz").read_bytes()) == auto.profile.compressed_bytes


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["+compression/clustering=k16"],
            r"compression/auto chooses every layer's pruning and shared values itself: "
            r"leave out \['clustering'\] \(~compression/clustering\)",
        ),
        (["runs=[combined]"], r"compression/auto starts from the dense run's trained weights: keep dense in runs"),
        (
            ["compression.auto.objective=flops"],
            r"objective must be one of compressed_bytes, onnx_bytes, macs, latency; got 'flops'",
        ),
    ],
)
def test_the_app_refuses_auto_settings_it_cannot_run_before_training(
    compose_config, tmp_path, overrides, message
) -> None:
    cfg = compose_config("compression=auto", *overrides, f"output_dir={tmp_path / 'job'}")
    with pytest.raises((ValueError, InstantiationException), match=message):  # Hydra wraps what a recipe raises
        train(cfg)
    assert not (tmp_path / "job").exists()


def test_the_macs_objective_removes_channels_and_the_model_has_the_macs_it_measured(tmp_path, trained) -> None:
    module = copy.deepcopy(trained)
    example = module.example_input_array  # what the channel objectives trace and count on
    auto = AutoCompression(objective="macs", max_accuracy_drop=0.02, recovery_epochs=1)
    trainer = compress(tmp_path, module, auto, max_epochs=8)
    accepted = [level for level in auto.history if level.accepted and level.method == "channels"]
    assert accepted and {level.method for level in auto.history} <= {"channels", "recovery"}
    assert all(level.drop <= 0.02 for level in accepted)
    # At the end of fit the pruned channels are gone: the smaller model has the MACs the search measured.
    assert count_macs(module, example) == accepted[-1].measured_cost < count_macs(trained, example) / 1.5
    features = module.model.features
    assert features[0].out_channels == 32 - round(32 * auto.plan["model.features.0"].channels)
    assert features[4].in_channels == features[0].out_channels == features[1].num_features
    assert sum(plan.cost for plan in auto.plan.values()) < accepted[-1].measured_cost  # the layers' part of it
    # Removing them changed no output: validated again, the metric is the one that was accepted.
    metric = trainer.validate(module, datamodule=DigitsDataModule(), verbose=False)[0]["val/acc"]
    kept = [level for level in auto.history if level.accepted][-1]
    assert metric == pytest.approx(kept.metric, abs=1e-6)


def test_an_objective_refuses_methods_it_cannot_use() -> None:
    with pytest.raises(ValueError, match=r"methods must be a non-empty list of channels for macs; got \['pruning'\]"):
        AutoCompression(objective="macs", methods=["pruning"])


def test_the_latency_objective_times_the_model_with_the_channels_removed_and_computing_the_same(trained) -> None:
    """A cost is a time (not asserted); what is timed is checked: the smaller graph computes what the masked model
    does, with the channels gone."""
    module = copy.deepcopy(trained)
    layers = {"model.features.0": module.model.features[0], "model.features.4": module.model.features[4]}
    objective = ChannelLatency(module, layers, torch.zeros(4, 1, 8, 8), batch_size=8, repeats=2)
    kept = {"model.features.0": torch.arange(32) % 4 != 0, "model.features.4": torch.arange(64) < 40}
    dense, smaller = objective.costs([{}, kept])
    assert isinstance(dense, int) and isinstance(smaller, int) and dense > 0 and smaller > 0
    smaller = objective.removed(kept)
    features = smaller.model.features
    assert (features[0].out_channels, features[4].in_channels, features[4].out_channels) == (24, 24, 40)
    objective.channels.load_state_dict({"kept": kept})  # the masked model, to compare
    objective.keep()
    x = torch.randn(8, 1, 8, 8)
    module.eval()
    runtime = OnnxRuntimeModel.from_module(smaller, x, num_threads=1)
    assert torch.allclose(runtime(x), module(x), atol=1e-5)


def test_the_onnx_bytes_objective_leaves_a_graph_of_the_bytes_it_measured(tmp_path, trained) -> None:
    """One group (the second convolution), one level: the exported graph has the measured bytes, to the byte."""
    module = copy.deepcopy(trained)
    example = torch.zeros(2, 1, 8, 8)
    dense_bytes = len(onnx_bytes(module, example))
    auto = AutoCompression(
        objective="onnx_bytes",
        max_accuracy_drop=0.05,
        recovery_epochs=1,
        exclude=["model.classifier.*", "model.features.0"],
    )
    compress(tmp_path, module, auto, max_epochs=1)
    (level,) = auto.history
    assert level.method == "channels" and level.accepted == (level.drop <= 0.05)
    assert set(auto.plan) == {"model.features.4"}
    assert len(onnx_bytes(module, example)) == (level.measured_cost if level.accepted else dense_bytes)
    if level.accepted:
        assert level.measured_cost < dense_bytes / 1.5  # the level halves the predicted bytes


def test_the_app_runs_a_channel_objective_and_its_report_counts_the_macs_kept(compose_config, tmp_path) -> None:
    cfg = compose_config(
        "compression=auto",
        "compression.auto.objective=macs",
        "compression.auto.recovery_epochs=1",
        "compression.auto.max_accuracy_drop=0.02",
        "trainer.max_epochs=2",
        f"output_dir={tmp_path}",
        *EAGER_QUICK_REPORT,
    )
    dense, _, auto = train(cfg).entries
    assert auto.note.startswith("AutoCompression (macs): budget 0.02 of val/acc")
    kept = "no level within the budget" not in auto.note
    assert (auto.profile.macs < dense.profile.macs / 1.5) if kept else (auto.profile.macs == dense.profile.macs)
    assert "| MACs (predicted) | MACs (measured) |" in (tmp_path / "auto_compression.md").read_text()


def test_the_int8_method_leaves_an_integer_graph_of_the_bytes_it_measured(tmp_path, trained) -> None:
    """One level, every layer to 8 bits: kept, the model exports the integer graph it measured, to the byte; undone,
    the model is float again and computes what it did."""
    module = copy.deepcopy(trained)
    example = torch.zeros(2, 1, 8, 8)
    x = torch.randn(16, 1, 8, 8)
    module.eval()
    dense_bytes, dense_outputs = len(onnx_bytes(module, example)), module(x)
    module.train()
    auto = AutoCompression(objective="onnx_bytes", methods=["int8"], max_accuracy_drop=0.05, recovery_epochs=1)
    compress(tmp_path, module, auto, max_epochs=1)
    (level,) = auto.history
    assert level.method == "int8" and level.accepted == (level.drop <= 0.05)
    graph = onnx_bytes(module, example)
    if level.accepted:
        assert set(quantized_layers(module)) == {
            "model.features.0",
            "model.features.4",
            "model.classifier.1",
            "model.classifier.4",
        }
        assert len(graph) == level.measured_cost < dense_bytes / 2  # int8 weights: a quarter of the float bytes
        assert {plan.bits for plan in auto.plan.values()} == {8}
    else:
        module.eval()
        assert not quantized_layers(module) and len(graph) == dense_bytes
        assert torch.equal(module(x), dense_outputs)


def test_a_rejected_int8_level_goes_back_to_float_with_the_model_state(trained) -> None:
    """What AutoCompression does to undo a level (the model's state back) switches 8 bits off; at the end of fit a
    model that kept none has its float layers back, computing exactly what it did."""
    module = copy.deepcopy(trained).eval()
    x = torch.randn(16, 1, 8, 8)
    before = module(x)
    layers = {"model.features.0": module.model.features[0], "model.classifier.1": module.model.classifier[1]}
    objective = ChannelONNXBytes(module, layers, torch.zeros(2, 1, 8, 8), int8=True)
    assert torch.equal(module(x), before) and not objective.int8_on  # quantized layers, computing in float
    snapshot = {name: value.clone() for name, value in module.state_dict().items()}
    objective.apply({name: LayerSetting(bits=8) for name in objective.layers}, [x])
    assert objective.int8_on and not torch.equal(module(x), before)
    module.load_state_dict(snapshot)
    assert not objective.int8_on and torch.equal(module(x), before)
    objective.finish()
    assert not quantized_layers(module) and torch.equal(module(x), before)


def test_the_int8_method_refuses_a_model_already_quantized(trained) -> None:
    module = copy.deepcopy(trained)
    quantize_model(module, QuantConfig())
    with pytest.raises(ValueError, match=r"int8 method quantizes the model itself, which already has quantized layers"):
        Int8Layers(module, {"model.features.0": module.model.features[0]})


def test_a_search_resumed_inside_its_int8_level_equals_an_uninterrupted_one(tmp_path, trained) -> None:
    """The checkpoint after the int8 level's first epoch holds fake quantization switched on; a fresh float module
    resumed from it gets the same quantized layers at setup and ends with the same weights, ranges and history."""

    def fit(folder: str, ckpt_path: str | None = None) -> tuple[AutoCompression, ClassificationModule]:
        auto = AutoCompression(objective="onnx_bytes", methods=["int8"], max_accuracy_drop=0.05, calibration_batches=2)
        return auto, fit_saving_every_epoch(tmp_path / folder, auto, trained, max_epochs=3, ckpt_path=ckpt_path)

    straight, whole = fit("straight")
    resumed, continued = fit("resumed", str(tmp_path / "straight" / "epoch=0.ckpt"))
    assert [level.method for level in straight.history][:1] == ["int8"] and resumed.history == straight.history
    assert set(quantized_layers(continued)) == set(quantized_layers(whole))
    assert whole.state_dict().keys() == continued.state_dict().keys()
    for name, value in whole.state_dict().items():
        assert torch.equal(value, continued.state_dict()[name]), name


def test_with_confidence_a_level_is_kept_only_where_its_drop_and_margin_fit_the_budget(tmp_path, trained) -> None:
    """On the digits' 144 validation images each changed prediction adds z / 144 to a level's margin: its square
    times (144 / z)^2 counts them, a whole number."""
    module = copy.deepcopy(trained)
    auto = AutoCompression(max_accuracy_drop=0.02, confidence=0.9, recovery_epochs=1, calibration_batches=2)
    compress(tmp_path, module, auto, max_epochs=4)
    levels = [level for level in auto.history if level.method != "recovery"]
    assert any(level.margin > 0 for level in levels)
    for level in levels:
        changed = (level.margin * 144 / standard_errors(0.9)) ** 2
        assert abs(changed - round(changed)) < 1e-6
        assert level.accepted == (level.drop + level.margin <= level.allowed_drop + 1e-12)


def test_confidence_refuses_a_shuffled_validation_set_and_outputs_that_are_not_class_scores() -> None:
    images, labels = torch.randn(8, 4), torch.arange(8) % 2

    class Trainer:
        val_dataloaders = DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=True)

    with pytest.raises(ValueError, match="give a validation dataloader that is not shuffled"):
        validation_classes(Trainer(), nn.Linear(4, 2))
    Trainer.val_dataloaders = DataLoader(TensorDataset(images, labels), batch_size=4)
    assert validation_classes(Trainer(), nn.Linear(4, 2)).shape == (8,)
    with pytest.raises(ValueError, match=r"class scores of shape \(batch, classes\), got \(4, 2, 1\)"):
        validation_classes(Trainer(), nn.Sequential(nn.Linear(4, 2), nn.Unflatten(1, (2, 1))))

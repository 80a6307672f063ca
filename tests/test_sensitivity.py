from __future__ import annotations

import pytest
import torch
import yaml
from digits import fit_digits

from lightning_compress import Pruning
from lightning_compress.analysis import evaluate_accuracy, layer_amounts, sensitivity_analysis
from lightning_compress.analysis.sensitivity import (
    DENSE,
    SensitivityPoint,
    read_points,
    write_points,
)
from lightning_compress.sensitivity_app import analyse

LEVELS = [0.5, 0.9]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    _, module, datamodule = fit_digits(tmp_path_factory.mktemp("fit"), [], max_epochs=2)
    return module, list(datamodule.val_dataloader())


def test_each_layer_alone_is_pruned_to_each_level_and_the_weights_come_back(trained, tmp_path) -> None:
    module, batches = trained
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    points = sensitivity_analysis(module, batches, LEVELS, tmp_path / "s.csv", progress=False)
    layers = ["model.features.0", "model.features.4", "model.classifier.1", "model.classifier.4"]
    assert [(p.layer, p.sparsity) for p in points] == [(DENSE, 0.0)] + [
        (layer, level) for layer in layers for level in LEVELS
    ]
    assert all(torch.equal(tensor, before[name]) for name, tensor in module.state_dict().items())
    conv = module.model.features[4]
    with torch.no_grad():  # the point of one layer by hand: its 90% smallest weights zeroed
        threshold = conv.weight.abs().flatten().kthvalue(round(0.9 * conv.weight.numel())).values
        conv.weight.mul_(conv.weight.abs() > threshold)
    expected = evaluate_accuracy(module, batches)
    module.load_state_dict(before)
    assert next(p.accuracy for p in points if (p.layer, p.sparsity) == ("model.features.4", 0.9)) == expected
    assert points[0].accuracy == evaluate_accuracy(module, batches)
    assert read_points(tmp_path / "s.csv") == points


def test_an_interrupted_analysis_measures_only_the_missing_points(trained, tmp_path) -> None:
    module, batches = trained
    path = tmp_path / "s.csv"
    first = sensitivity_analysis(module, batches, LEVELS, path, progress=False)
    marked = [SensitivityPoint(p.layer, p.sparsity, 0.123) for p in first[:3]]  # what an interrupted run left
    write_points(path, marked)
    resumed = sensitivity_analysis(module, batches, LEVELS, path, progress=False)
    assert resumed[:3] == marked and resumed[3:] == first[3:]
    with pytest.raises(ValueError, match=r"levels must be sparsities in \(0, 1\), got \[0.5, 1.0\]"):
        sensitivity_analysis(module, batches, [0.5, 1.0], path, progress=False)


def test_layer_amounts_feed_pruning_each_layer_to_its_own_sparsity(tmp_path) -> None:
    path = tmp_path / "s.csv"
    rows = [
        (DENSE, 0.0, 0.90),
        ("model.features.4", 0.5, 0.90),
        ("model.features.4", 0.9, 0.895),
        ("model.classifier.1", 0.5, 0.899),
        ("model.classifier.1", 0.9, 0.80),
    ]
    rows += [("model.features.0", 0.5, 0.70), ("model.features.0", 0.9, 0.895)]  # a failing lower level stops the layer
    write_points(path, [SensitivityPoint(*row) for row in rows])
    amounts = layer_amounts(path, max_accuracy_drop=0.01)
    assert amounts == {"model.classifier.1": 0.5, "model.features.4": 0.9}
    pruning = Pruning(amount=amounts, schedule="agp", start_epoch=0, end_epoch=1)
    _, module, _ = fit_digits(tmp_path, [pruning], max_epochs=2)
    for layer, amount in amounts.items():
        weight = module.get_submodule(layer).weight
        assert int((weight == 0).sum()) == round(amount * weight.numel())
    assert int((module.model.features[0].weight == 0).sum()) == 0  # not named: not pruned
    assert pruning.sparsity()["pruning/sparsity/model.features.4.weight"] == round(0.9 * 18432) / 18432


def test_amounts_per_layer_are_checked() -> None:
    with pytest.raises(ValueError, match="leave out targets, threshold and N:M"):
        Pruning(amount={"model.features.0": 0.5}, targets=["model.*"])
    with pytest.raises(ValueError, match=r"each amount in \[0, 1\); got \{'a': 1.5\}"):
        Pruning(amount={"a": 1.5, "b": 0.5})


def test_the_command_trains_analyses_and_resumes_from_its_folder(compose_config, tmp_path) -> None:
    from hydra import compose

    compose_config()  # initializes Hydra with the packaged configs
    cfg = compose(
        config_name="sensitivity",
        overrides=["trainer.max_epochs=1", "sensitivity.levels=[0.5]", f"output_dir={tmp_path}"],
    )
    amounts = analyse(cfg)
    assert (tmp_path / "dense.pt").is_file() and (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert yaml.safe_load((tmp_path / "layer_amounts.yaml").read_text()) == amounts
    points = read_points(tmp_path / "sensitivity.csv")
    assert len(points) == 1 + 4
    write_points(tmp_path / "sensitivity.csv", points[:2])
    (tmp_path / "sensitivity.png").unlink()
    assert analyse(cfg) == amounts  # the same trained weights (dense.pt), the missing points measured again
    assert read_points(tmp_path / "sensitivity.csv") == points
    other = compose(
        config_name="sensitivity",
        overrides=["trainer.max_epochs=2", "sensitivity.levels=[0.5]", f"output_dir={tmp_path}"],
    )
    with pytest.raises(ValueError, match="holds an analysis of other data, model, trainer or seed settings"):
        analyse(other)


def test_amounts_per_layer_that_pruning_would_leave_out_fail_before_training(tmp_path) -> None:
    pruning = Pruning(
        amount={"model.features.0": 0.5, "model.classifier.4": 0.5},
        granularity="channel",
        criterion="l1",
        start_epoch=0,
    )
    with pytest.raises(
        ValueError, match=r"amount per layer names \['model.classifier.4'\], which this pruning would leave"
    ):
        fit_digits(tmp_path, [pruning])
    excluded = Pruning(amount={"model.features.0": 0.5, "model.features.4": 0.5}, exclude=["model.features.0"])
    with pytest.raises(ValueError, match=r"names \['model.features.0'\]"):
        fit_digits(tmp_path, [excluded])

from __future__ import annotations

import importlib.util

import lightning as L
import pytest
import torch
from config_groups import options, sample_text_overrides
from hydra import compose
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.utils import instantiate

from lightning_compress import (
    ClassificationModule,
    DistillationModule,
    PostTrainingQuantization,
    Pruning,
    QuantizationAwareTraining,
)
from lightning_compress.analysis.sensitivity import DENSE, SensitivityPoint, write_points
from lightning_compress.data import InMemoryImageDataModule


def test_every_group_has_its_options() -> None:
    assert options("data") == ["cifar10", "digits", "fashion_mnist", "wordnet_supersenses"]
    assert {"small_cnn", "mlp", "resnet18", "resnet50"} <= set(options("model"))
    assert options("trainer") == ["cpu", "ddp", "default", "gpu"]
    assert options("logger") == ["csv", "none", "tensorboard"]
    assert options("callbacks") == ["default", "none"]
    assert options("hydra") == ["default"]
    assert options("hydra/launcher") == ["local_processes", "slurm"]
    assert options("compression/pruning") == [
        "agp90",
        "heads50",
        "nm24",
        "oneshot50",
        "sensitivity",
        "taylor_channel50",
    ]
    assert options("compression/neuron_pruning") == ["mlp50"]
    assert options("compression/quantization") == ["int8_ptq", "int8_ptq_transformer", "int8_qat", "w4a8_lsq"]
    assert options("compression/distillation") == ["dkd", "fitnets", "kd", "tinybert"]
    assert options("compression/clustering") == ["k16", "k32"]
    assert options("model/teacher") == ["bert_tiny", "minilm", "resnet50", "small_cnn_wide", "vit_tiny"]


TEXT_DATA, TEXT_MODELS = ["wordnet_supersenses"], ["bert_tiny", "minilm", "minilm_student"]


@pytest.mark.parametrize("data", [data for data in options("data") if data not in TEXT_DATA])
@pytest.mark.parametrize("model", [model for model in options("model") if model not in TEXT_MODELS])
def test_every_data_and_model_pair_composes_and_builds(compose_config, tmp_path, data: str, model: str) -> None:
    cfg = compose_config(f"data={data}", f"model={model}", f"output_dir={tmp_path}")
    datamodule = instantiate(cfg.data)
    if model == "vit_tiny" and cfg.dataset.input_shape[1] % cfg.model.model.patch_size:  # digits, CIFAR-10
        with pytest.raises(InstantiationException, match="image_size .* must be a multiple of patch_size 7"):
            instantiate(cfg.model)
        return
    module = instantiate(cfg.model)
    assert isinstance(datamodule, InMemoryImageDataModule)
    assert isinstance(module, ClassificationModule)
    assert list(cfg.dataset.input_shape) == list(datamodule.input_shape)
    assert module.eval()(module.example_input_array).shape == (1, datamodule.num_classes)


def test_the_text_data_and_models_compose_and_build(compose_config, tmp_path) -> None:
    text = [*sample_text_overrides(tmp_path), f"output_dir={tmp_path}"]
    cfg = compose_config(*text, "model=bert_tiny")
    datamodule, module = instantiate(cfg.data), instantiate(cfg.model, _convert_="all")
    datamodule.setup()
    ids, labels = next(iter(datamodule.train_dataloader()))
    assert module.example_input_array.dtype == torch.int64 and module.example_input_array.shape == (1, 16)
    assert module(ids).shape == (len(ids), 26) and int(labels.max()) < 26
    pretrained = compose_config(*text, "model=minilm")  # built in benchmarks/ and experiments: the 83 MB wheel
    assert pretrained.model.model._target_ == "lightning_compress.models.minilm"
    assert pretrained.model.input_dtype == "int64" and list(pretrained.model.input_shape) == [16]


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_config_composes(compose_config, tmp_path, trainer: str) -> None:
    cfg = compose_config(f"trainer={trainer}", f"output_dir={tmp_path}")
    expected = {"cpu": ("cpu", None), "default": ("cpu", None), "gpu": ("gpu", None), "ddp": ("auto", "ddp")}[trainer]
    assert (cfg.trainer.accelerator, cfg.trainer.get("strategy")) == expected
    if trainer != "gpu":  # the gpu config needs a GPU to build
        built = instantiate(cfg.trainer, logger=False)
        assert isinstance(built, L.Trainer)
        assert built.world_size == (2 if trainer == "ddp" else 1)


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_config_builds(compose_config, tmp_path, logger: str) -> None:
    cfg = compose_config(f"logger={logger}", f"output_dir={tmp_path}")
    if logger == "tensorboard" and not (
        importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    ):
        pytest.skip("the tensorboard extra is not installed")
    built = [instantiate(entry) for entry in (cfg.logger or {}).values()]
    assert len(built) == (0 if logger == "none" else 1)


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_every_callbacks_config_builds(compose_config, tmp_path, callbacks: str) -> None:
    cfg = compose_config(f"callbacks={callbacks}", f"output_dir={tmp_path}")
    built = [instantiate(entry) for entry in (cfg.callbacks or {}).values()]
    assert [type(c).__name__ for c in built] == (
        [] if callbacks == "none" else ["CompressionReport", "CompressionCheckpoint", "FiniteCheck"]
    )


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_builds(compose_config, tmp_path, experiment: str) -> None:
    cfg = compose_config(f"experiment={experiment}", f"output_dir={tmp_path}")
    module = instantiate(cfg.model)
    assert module.eval()(module.example_input_array).shape == (1, cfg.dataset.num_classes)


@pytest.mark.parametrize("recipe", options("compression/pruning"))
def test_every_pruning_recipe_builds(compose_config, tmp_path, recipe: str) -> None:
    sensitivity = tmp_path / "sensitivity.csv"
    write_points(sensitivity, [SensitivityPoint(DENSE, 0.0, 0.9), SensitivityPoint("model.features.4", 0.7, 0.9)])
    cfg = compose_config(
        f"compression/pruning={recipe}",
        f"output_dir={tmp_path}",
        *([f"compression.pruning.amount.path={sensitivity}"] if recipe == "sensitivity" else []),
    )
    pruning = instantiate(cfg.compression.pruning, _convert_="all")
    assert isinstance(pruning, Pruning)
    expected = {
        "agp90": (0.9, "unstructured"),
        "heads50": (0.5, "head"),
        "oneshot50": (0.5, "unstructured"),
        "taylor_channel50": (0.5, "channel"),
        "nm24": (0.5, "2:4"),
        "sensitivity": (0.7, "unstructured"),
    }
    assert (pruning.config.final_amount, pruning.config.granularity) == expected[recipe]
    assert pruning.config.layer_amounts == ({"model.features.4": 0.7} if recipe == "sensitivity" else None)


def test_the_neuron_pruning_recipe_cuts_half_the_mlp_neurons_of_a_bert(compose_config, tmp_path) -> None:
    cfg = compose_config("+compression/neuron_pruning=mlp50", f"output_dir={tmp_path}")
    pruning = instantiate(cfg.compression.neuron_pruning, _convert_="all")
    assert (pruning.config.final_amount, pruning.config.granularity, pruning.remove_channels) == (0.5, "channel", True)
    assert pruning.config.targets == ["*.intermediate.dense"]


@pytest.mark.parametrize("recipe", options("compression/quantization"))
def test_every_quantization_recipe_builds(compose_config, tmp_path, recipe: str) -> None:
    cfg = compose_config(f"compression/quantization={recipe}", f"output_dir={tmp_path}")
    callback = instantiate(cfg.compression.quantization)
    expected = {
        "int8_qat": (QuantizationAwareTraining, 8, False),
        "w4a8_lsq": (QuantizationAwareTraining, 4, True),
        "int8_ptq": (PostTrainingQuantization, 8, False),
        "int8_ptq_transformer": (PostTrainingQuantization, 8, False),
    }
    assert (type(callback), callback.config.weight_bits, callback.config.learnable_scales) == expected[recipe]
    assert callback.config.activation_bits == 8


@pytest.mark.parametrize("recipe", options("compression/distillation"))
def test_every_distillation_recipe_builds_around_the_model_and_its_teacher(
    compose_config, tmp_path, recipe: str
) -> None:
    text = recipe == "tinybert"  # layer to layer: Hugging Face encoders, here the tiny BERT's 2 layers
    overrides = [f"+compression/distillation={recipe}", f"output_dir={tmp_path}"]
    if text:
        overrides += [*sample_text_overrides(tmp_path), "model=bert_tiny", "model/teacher=bert_tiny"]
        overrides += ["~compression.distillation.layer_map", "+compression.distillation.layer_map={0:0,1:1,2:2}"]
    cfg = compose_config(*overrides)
    student, teacher = instantiate(cfg.model), instantiate(cfg.teacher)
    module = instantiate(cfg.compression.distillation)(
        student=student.model,
        teacher=teacher.model,
        num_classes=cfg.dataset.num_classes,
        input_shape=[int(size) for size in cfg.dataset.input_shape],
        input_dtype=cfg.dataset.get("input_dtype", "float32"),
    )
    assert isinstance(module, DistillationModule) and module.teacher is teacher.model
    expected = {
        "kd": ("kd", 0, {}),
        "dkd": ("dkd", 0, {}),
        "fitnets": ("kd", 1, {}),
        "tinybert": ("kd", 0, {0: 0, 1: 1, 2: 2}),
    }
    assert (module.logit_loss, len(module.hints), module.layer_map) == expected[recipe]


def test_the_minilm_student_keeps_every_other_layer_of_minilm(compose_config, tmp_path) -> None:
    cfg = compose_config("data=wordnet_supersenses", "model=minilm_student", f"output_dir={tmp_path}")
    student = cfg.model.model  # built in the experiments: the 83 MB wheel
    assert (student._target_, student.every, student._args_[0]._target_) == (
        "lightning_compress.models.student_from_teacher",
        2,
        "lightning_compress.models.minilm",
    )
    assert list(cfg.model.input_shape) == [32] and cfg.model.input_dtype == "int64"


def test_compression_can_be_left_out(compose_config, tmp_path) -> None:
    cfg = compose_config("~compression/pruning", "~compression/quantization", f"output_dir={tmp_path}")
    assert cfg.get("compression") is None


def test_command_line_overrides_reach_the_objects(compose_config, tmp_path) -> None:
    cfg = compose_config(
        "data.batch_size=7", "model.optimizer.lr=0.5", "trainer.max_epochs=3", f"output_dir={tmp_path}"
    )
    assert instantiate(cfg.data).batch_size == 7
    assert instantiate(cfg.model).configure_optimizers().param_groups[0]["lr"] == 0.5
    assert instantiate(cfg.trainer, logger=False).max_epochs == 3


def test_a_typo_in_a_key_or_a_group_is_hydras_error(compose_config) -> None:
    with pytest.raises(ConfigCompositionException, match="Could not override 'trainer.max_epoch'"):
        compose_config("trainer.max_epoch=3")
    with pytest.raises(MissingConfigException, match="Could not find 'data/digitz'"):
        compose_config("data=digitz")


@pytest.mark.parametrize("search", options("hparams_search"))
def test_every_search_maximizes_validation_accuracy_and_never_sees_the_test_set(compose_config, search: str) -> None:
    cfg = compose(config_name="train", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    directions = dict(zip(cfg.optimized_metrics, cfg.hydra.sweeper.direction))
    assert directions["val_accuracy"] == "maximize"
    assert not [name for name in directions if name.startswith("test")]
    instantiate(cfg.hydra.callbacks.optimized_metrics).on_multirun_start(config=cfg)  # the check before the first trial

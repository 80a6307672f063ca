from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from lightning_compress import ClassificationModule
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import MLP, LeNet5, SmallCNN, resnet


@pytest.mark.parametrize("image_size", [8, 28])
def test_small_cnn_and_mlp_shapes(image_size: int) -> None:
    inputs = torch.zeros(3, 1, image_size, image_size)
    assert SmallCNN(num_classes=7, in_channels=1, image_size=image_size)(inputs).shape == (3, 7)
    assert MLP(num_classes=7, in_channels=1, image_size=image_size, hidden_sizes=(16, 8))(inputs).shape == (3, 7)


def test_small_cnn_rejects_sizes_it_cannot_pool() -> None:
    with pytest.raises(ValueError, match="divisible by 4.*got 30"):
        SmallCNN(image_size=30)


def test_resnet_small_stem_and_input_channels() -> None:
    small = resnet("resnet18", num_classes=5, in_channels=1, small_input=True)
    assert (small.conv1.in_channels, small.conv1.kernel_size, small.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(small.maxpool, nn.Identity)
    assert small(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    wide = resnet("resnet18", num_classes=5, in_channels=4)
    assert (wide.conv1.in_channels, wide.conv1.kernel_size, wide.conv1.stride) == (4, (7, 7), (2, 2))
    assert wide.fc.out_features == 5


def test_resnet_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown ResNet architecture 'resnet19'.*resnet18"):
        resnet("resnet19")


def test_classifier_learns_digits_and_its_checkpoint_loads_into_the_plain_model(tmp_path) -> None:
    L.seed_everything(0)
    module = ClassificationModule(SmallCNN(num_classes=10, image_size=8), num_classes=10, input_shape=(1, 8, 8))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    datamodule = DigitsDataModule()
    trainer.fit(module, datamodule=datamodule)
    accuracy = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]
    assert accuracy > 0.9

    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = ClassificationModule.load_from_checkpoint(
        tmp_path / "model.ckpt", model=SmallCNN(num_classes=10, image_size=8)
    )
    assert restored.hparams.num_classes == 10
    plain = SmallCNN(num_classes=10, image_size=8)
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)["state_dict"]
    plain.load_state_dict({key.removeprefix("model."): value for key, value in state.items()}, strict=True)
    inputs = torch.randn(4, 1, 8, 8)
    module.eval(), restored.eval(), plain.eval()
    assert torch.equal(module(inputs), restored(inputs))
    assert torch.equal(module(inputs), plain(inputs))


def test_classifier_uses_the_given_optimizer_and_scheduler_factories() -> None:
    module = ClassificationModule(
        nn.Linear(4, 3),
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=0.25, momentum=0.5),
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2),
    )
    configured = module.configure_optimizers()
    assert isinstance(configured["optimizer"], torch.optim.SGD)
    assert configured["optimizer"].param_groups[0]["lr"] == 0.25
    assert configured["lr_scheduler"]["scheduler"].step_size == 2
    assert isinstance(ClassificationModule(nn.Linear(4, 3), num_classes=3).configure_optimizers(), torch.optim.Adam)


def test_classifier_rejects_a_single_class() -> None:
    with pytest.raises(ValueError, match="num_classes must be at least 2, got 1"):
        ClassificationModule(nn.Linear(4, 1), num_classes=1)


def test_lenets_have_deep_compressions_parameter_counts(compose_config, tmp_path) -> None:
    lenet5 = LeNet5(num_classes=10, image_size=28)
    assert sum(parameter.numel() for parameter in lenet5.parameters()) == 431_080  # Caffe's LeNet-5
    assert lenet5(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert LeNet5(num_classes=10, image_size=8)(torch.zeros(3, 1, 8, 8)).shape == (3, 10)  # the digits, padded
    lenet300 = instantiate(compose_config("model=lenet300_100", "data=fashion_mnist", f"output_dir={tmp_path}").model)
    assert sum(parameter.numel() for parameter in lenet300.parameters()) == 266_610  # 784-300-100-10

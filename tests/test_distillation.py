from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F

from lightning_compress import ClassificationModule, DistillationModule, Pruning, QuantizationAwareTraining
from lightning_compress.batches import UNLABELED
from lightning_compress.data import DigitsDataModule
from lightning_compress.distillation import attention_loss, dkd_loss, kd_loss
from lightning_compress.models import SmallCNN
from lightning_compress.quantization import quantized_layers

INPUT = (1, 8, 8)


def teacher_net() -> SmallCNN:
    torch.manual_seed(1)
    return SmallCNN(num_classes=10, image_size=8)


def student_net() -> SmallCNN:
    torch.manual_seed(2)
    return SmallCNN(num_classes=10, image_size=8, channels=(8, 16), hidden=32)


def fit(module: L.LightningModule, tmp_path, callbacks=(), max_epochs: int = 1) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=DigitsDataModule())
    return trainer


def test_kd_loss_is_the_softened_kl_times_t_squared_in_float32() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    expected = F.kl_div(F.log_softmax(student / 3, -1), F.softmax(teacher / 3, -1), reduction="batchmean") * 9
    torch.testing.assert_close(kd_loss(student, teacher, 3.0), expected)
    half = kd_loss(student.bfloat16(), teacher.bfloat16(), 3.0)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), 3.0))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        kd_loss(student, teacher, 0)


def test_dkd_splits_target_and_non_target_knowledge() -> None:
    torch.manual_seed(0)
    student, teacher, targets = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    tckd = dkd_loss(student, teacher, targets, 1.0, alpha=1.0, beta=0.0)
    p_s, p_t = F.softmax(student, -1), F.softmax(teacher, -1)
    s_target, t_target = p_s[range(4), targets], p_t[range(4), targets]
    binary = (t_target * (t_target / s_target).log() + (1 - t_target) * ((1 - t_target) / (1 - s_target)).log()).mean()
    torch.testing.assert_close(tckd, binary)
    nckd = dkd_loss(student, teacher, targets, 1.0, alpha=0.0, beta=1.0)
    mask = F.one_hot(targets, 5).bool()
    others_s = F.log_softmax(student.masked_fill(mask, -1e9), -1).masked_fill(mask, 0)
    others_t = F.softmax(teacher.masked_fill(mask, -1e9), -1)
    torch.testing.assert_close(nckd, (others_t * (others_t.clamp_min(1e-30).log() - others_s)).sum(-1).mean())
    features = torch.randn(2, 4, 3, 3)
    assert (
        attention_loss(features, features * 2).item() < 1e-12 < attention_loss(features, torch.randn(2, 6, 3, 3)).item()
    )


def test_the_teacher_never_changes_and_is_not_saved(tmp_path) -> None:
    teacher, student = teacher_net(), student_net()
    original = copy.deepcopy(teacher.state_dict())
    module = DistillationModule(student, teacher, num_classes=10, input_shape=INPUT)
    assert module.student is student and module.model is student and module.teacher is teacher
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = fit(module, tmp_path, [checkpoint], max_epochs=2)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, original[name]), name  # weights and BatchNorm statistics
    module.train()
    assert not module.teacher.training and not any(p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.model.parameters()}
    assert all(key.startswith("model.") for key in module.state_dict())
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    assert all(not key.startswith("teacher") for key in saved["state_dict"])
    restored = DistillationModule.load_from_checkpoint(
        checkpoint.last_model_path, student=student_net(), teacher=teacher_net()
    )
    for name, value in module.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], value), name
    plain = SmallCNN(num_classes=10, image_size=8, channels=(8, 16), hidden=32)
    plain.load_state_dict(module.model.state_dict(), strict=True)  # the student alone, as a plain model
    assert trainer.callback_metrics["train/distill"] > 0 and "val/acc" in trainer.callback_metrics


def test_pruning_and_quantization_act_on_the_student_only(tmp_path) -> None:
    teacher = teacher_net()
    module = DistillationModule(
        student_net(), teacher, num_classes=10, input_shape=INPUT, hints=[("features.4", "features.4")]
    )
    fit(
        module,
        tmp_path,
        [Pruning(amount=0.5, schedule="oneshot", start_epoch=1), QuantizationAwareTraining(start_epoch=1)],
        max_epochs=2,
    )
    assert set(quantized_layers(module)) == {
        "model.features.0",
        "model.features.4",
        "model.classifier.1",
        "model.classifier.4",
    }
    assert not quantized_layers(teacher) and all(type(m) in (nn.Conv2d, nn.Identity) for m in module.adapters)
    assert all(
        (layer.weight != 0).all()
        for layer in [*teacher.modules(), *module.adapters]
        if isinstance(layer, (nn.Conv2d, nn.Linear))
    )
    zeros = sum(int((layer.weight == 0).sum()) for layer in quantized_layers(module).values())
    assert zeros == round(0.5 * sum(layer.weight.numel() for layer in quantized_layers(module).values()))


def test_a_checkpoint_with_adapters_loads_back_given_the_teacher(tmp_path) -> None:
    hints = [("features.4", "features.4")]
    module = DistillationModule(
        student_net(), teacher_net(), num_classes=10, input_shape=INPUT, hints=hints, attention_weight=1.0
    )
    trainer = fit(module, tmp_path)
    trainer.save_checkpoint(tmp_path / "distilled.ckpt")
    restored = DistillationModule.load_from_checkpoint(
        tmp_path / "distilled.ckpt", student=student_net(), teacher=teacher_net()
    )
    assert restored.hints == hints and restored.attention_weight == 1.0
    for name, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name  # student and adapter


def test_without_input_shape_the_adapters_are_sized_on_the_first_training_batch(tmp_path) -> None:
    hints = [("features.4", "features.4")]  # 16 student channels against 64 of the teacher's
    module = DistillationModule(student_net(), teacher_net(), num_classes=10, hints=hints)
    assert len(module.adapters) == 0
    trainer = fit(module, tmp_path)
    (adapter,) = module.adapters
    assert tuple(adapter.weight.shape) == (64, 16, 1, 1) and module.hparams.input_shape == list(INPUT)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in adapter.parameters()} <= optimized  # built before the optimizer, so it trains
    trainer.save_checkpoint(tmp_path / "lazy.ckpt")
    restored = DistillationModule.load_from_checkpoint(
        tmp_path / "lazy.ckpt", student=student_net(), teacher=teacher_net()
    )
    for name, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    # a dataloader given to fit itself: its first batch sizes them as well
    unsized = DistillationModule(student_net(), teacher_net(), num_classes=10, hints=hints)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    trainer.fit(unsized, train_dataloaders=datamodule.train_dataloader())
    assert tuple(unsized.adapters[0].weight.shape) == (64, 16, 1, 1) and unsized.hparams.input_shape == list(INPUT)


def test_a_subclass_changes_only_the_distance(tmp_path) -> None:
    class MSEDistillation(DistillationModule):
        calls = 0

        def distillation_loss(self, student_output, teacher_output, batch):
            MSEDistillation.calls += 1
            return F.mse_loss(student_output, teacher_output)

    module = MSEDistillation(
        student_net(), teacher_net(), num_classes=10, ce_weight=0.0, kd_weight=1.0, input_shape=INPUT
    )
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer = fit(module, tmp_path)
    assert MSEDistillation.calls == trainer.global_step > 0
    assert any(not torch.equal(p, b) for p, b in zip(module.model.parameters(), before, strict=True))
    torch.testing.assert_close(trainer.callback_metrics["train/loss_epoch"], trainer.callback_metrics["train/distill"])


def test_teacher_from_a_classification_checkpoint(tmp_path) -> None:
    trained = ClassificationModule(teacher_net(), num_classes=10, input_shape=INPUT)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "teacher", save_last=True)
    fit(trained, tmp_path, [checkpoint])
    module = DistillationModule(
        student_net(), checkpoint.last_model_path, num_classes=10, teacher_model=SmallCNN(num_classes=10, image_size=8)
    )
    for name, value in trained.model.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[name], value), name
    with pytest.raises(ValueError, match="is a checkpoint path: pass teacher_model="):
        DistillationModule(student_net(), checkpoint.last_model_path, num_classes=10)


def test_bad_input_fails_before_training() -> None:
    with pytest.raises(ValueError, match="outputs differ in shape: \\(2, 10\\) and \\(2, 5\\)"):
        DistillationModule(student_net(), SmallCNN(num_classes=5, image_size=8), num_classes=10, input_shape=INPUT)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        DistillationModule(student_net(), teacher_net(), num_classes=10, temperature=0)
    with pytest.raises(ValueError, match="kd_weight must be >= 0, got -1"):
        DistillationModule(student_net(), teacher_net(), num_classes=10, kd_weight=-1)
    with pytest.raises(ValueError, match="unknown logit_loss 'kl'; use one of kd, dkd"):
        DistillationModule(student_net(), teacher_net(), num_classes=10, logit_loss="kl")
    with pytest.raises(ValueError, match="the teacher has no module 'feature.4'; near names: \\['features.4'"):
        DistillationModule(
            student_net(), teacher_net(), num_classes=10, input_shape=INPUT, hints=[("features.4", "feature.4")]
        )


def test_cached_teacher_outputs_train_the_same_student_without_the_teacher_after_epoch_one(tmp_path) -> None:
    runs = {}
    for cache in (False, True):
        module = DistillationModule(
            student_net(), teacher_net(), num_classes=10, input_shape=INPUT, cache_teacher=cache
        )
        calls = []
        module.teacher.register_forward_hook(lambda m, i, o, calls=calls: calls.append(len(i[0])))
        trainer = fit(module, tmp_path, max_epochs=2)
        runs[cache] = module, sum(calls), trainer
    plain, plain_samples, _ = runs[False]
    cached, cached_samples, trainer = runs[True]
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(cached.model.state_dict()[name], value, msg=name)
    train_size = len(trainer.datamodule.train_dataloader().dataset)
    assert cached_samples == train_size == plain_samples // 2  # the second epoch read every logit from the cache
    with pytest.raises(ValueError, match="cache_teacher keeps the teacher's logits only"):
        DistillationModule(
            student_net(),
            teacher_net(),
            num_classes=10,
            input_shape=INPUT,
            cache_teacher=True,
            hints=[("features.4", "features.4")],
        )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step called without a Trainer
@pytest.mark.parametrize("logit_loss", ["kd", "dkd"])
def test_unlabeled_samples_are_learnt_from_the_teacher_alone(logit_loss: str) -> None:
    module = DistillationModule(student_net().eval(), teacher_net(), num_classes=10, logit_loss=logit_loss)
    torch.manual_seed(0)
    images, labels = torch.randn(6, *INPUT), torch.tensor([3, 1, 4, 1, 5, 9])
    targets = torch.tensor([UNLABELED, 1, UNLABELED, 1, 5, UNLABELED])
    student, teacher = module(images), module.teacher(images)
    distill = module.distillation_loss(student, teacher, (images, targets))
    teacher_targets = torch.where(targets == UNLABELED, teacher.argmax(dim=-1), targets)
    torch.testing.assert_close(distill, module.distillation_loss(student, teacher, (images, teacher_targets)))
    # KD never reads the targets; DKD reads the unlabeled samples' from the teacher, not the true labels.
    assert (distill == module.distillation_loss(student, teacher, (images, labels))) == (logit_loss == "kd")

    labelled = targets != UNLABELED
    expected = 0.5 * F.cross_entropy(student[labelled], targets[labelled]) + 0.5 * distill
    torch.testing.assert_close(module.training_step((images, targets), 0), expected)
    correct = (student[labelled].argmax(dim=-1) == targets[labelled]).float().mean()
    assert module.train_accuracy.compute() == correct  # the accuracy of the three labelled samples
    nothing_labelled = torch.full_like(labels, UNLABELED)
    loss = module.training_step((images, nothing_labelled), 0)
    torch.testing.assert_close(loss, 0.5 * module.distillation_loss(student, teacher, (images, nothing_labelled)))

"""Distillation of transformers: hidden states and attention maps paired across depths (``layer_map``), batches as
Hugging Face dicts, and students initialised from a teacher's layers."""

from __future__ import annotations

import copy
import re

import lightning as L
import pytest
import torch
from text_models import dict_collate, quiet_trainer, sample_datamodule, tiny_bert
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import ClassificationModule, DistillationModule
from lightning_compress.batches import batch_targets, model_inputs
from lightning_compress.distillation import attention_map_loss, hidden_state_loss
from lightning_compress.models import SmallCNN, student_from_teacher

CLASSES = 26
#: No dropout anywhere: the student computes in training what it computes in eval, so losses can be recomputed.
NO_DROPOUT = {"dropout": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def teacher_bert(sharpness: float = 1.0, **options) -> nn.Module:
    """Two layers of width 16, two heads; their query and key weights times ``sharpness``, whose square sharpens
    the attention (a random BERT attends almost uniformly, which leaves little to distill)."""
    teacher = tiny_bert(seed=1, **options)
    with torch.no_grad():
        for layer in teacher.encoder.encoder.layer:
            layer.attention.self.query.weight.mul_(sharpness)
            layer.attention.self.key.weight.mul_(sharpness)
    return teacher


def student_bert(**options) -> nn.Module:
    """One layer of width 8, one head: narrower, shallower and with fewer heads than the teacher."""
    return tiny_bert(seed=2, num_hidden_layers=1, hidden_size=8, num_attention_heads=1, intermediate_size=16, **options)


def first_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The first training batch a fit on the sample datamodule sees."""
    datamodule = sample_datamodule()
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def dict_loaders(shuffle_seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """The sample datamodule's training and validation batches, in the same order, as Hugging Face dicts."""
    datamodule = sample_datamodule(seed=shuffle_seed)
    datamodule.setup("fit")
    train, val = datamodule.train_dataloader(), datamodule.val_dataloader()
    return (
        DataLoader(train.dataset, batch_size=train.batch_size, sampler=train.sampler, collate_fn=dict_collate),
        DataLoader(val.dataset, batch_size=val.batch_size, collate_fn=dict_collate),
    )


def fit(module: L.LightningModule, tmp_path, max_epochs: int = 1, dicts: bool = False, **options) -> L.Trainer:
    L.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [], max_epochs=max_epochs, enable_checkpointing=False, **options)
    if dicts:
        train, val = dict_loaders()
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    else:
        trainer.fit(module, datamodule=sample_datamodule())
    return trainer


def encoded(model: nn.Module, ids: torch.Tensor):
    """The hidden states and attention maps of ``model``'s encoder on ``ids``, in eval mode (its mode restored)."""
    training = model.training
    with torch.no_grad():
        states = model.eval().encoder(
            input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True, output_attentions=True
        )
    model.train(training)
    return states


def test_the_layer_losses_are_the_mse_over_real_tokens_and_the_kl_of_each_querys_attention() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    real = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    by_hand = sum(((student[n, t] - teacher[n, t]) ** 2).mean() for n, t in real) / len(real)
    torch.testing.assert_close(hidden_state_loss(student, teacher, mask), by_hand)
    torch.testing.assert_close(hidden_state_loss(student, teacher), ((student - teacher) ** 2).mean())

    student_maps = torch.randn(2, 1, 4, 4).masked_fill(mask[:, None, None, :] == 0, -1e9).softmax(-1)
    teacher_maps = torch.randn(2, 2, 4, 4).masked_fill(mask[:, None, None, :] == 0, -1e9).softmax(-1)
    averaged = teacher_maps.mean(1)  # one student head against two: the teacher's averaged over heads
    by_hand = sum(
        sum(averaged[n, q, k] * (averaged[n, q, k] / student_maps[n, 0, q, k]).log() for k in range(4) if mask[n, k])
        for n, q in real
    ) / len(real)
    torch.testing.assert_close(attention_map_loss(student_maps, teacher_maps, mask), by_hand)
    assert attention_map_loss(teacher_maps, teacher_maps, mask).abs() < 1e-6

    dropped = student_maps.clone().requires_grad_(True)  # a weight dropped by attention dropout is left out
    loss = attention_map_loss(dropped * (torch.arange(4) != 1), teacher_maps, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(dropped.grad).all() and (dropped.grad[..., 1] == 0).all()
    with pytest.raises(ValueError, match=r"hidden states differ in shape: \(2, 4, 3\) and \(2, 4, 5\)"):
        hidden_state_loss(student, torch.zeros(2, 4, 5))


def test_the_logged_layer_losses_are_those_of_the_first_batch_by_hand(tmp_path) -> None:
    teacher, student = teacher_bert(sharpness=16.0, **NO_DROPOUT), student_bert(**NO_DROPOUT)
    module = DistillationModule(
        student, teacher, num_classes=CLASSES, layer_map={0: 0, 1: 2}, attention_weight=1.0, hint_weight=1.0
    )
    ids, _ = first_batch()
    mask = ids != 0
    ours, theirs = encoded(copy.deepcopy(student), ids), encoded(teacher, ids)
    hidden = 0.0
    for adapter, (s, t) in zip(module.layer_adapters, [(0, 0), (1, 2)], strict=True):
        squared = (adapter(ours.hidden_states[s]) - theirs.hidden_states[t]).pow(2).mean(-1)
        hidden += squared[mask].mean()
    student_maps, teacher_maps = ours.attentions[0][:, 0], theirs.attentions[1].mean(1)  # 1 head; 2 averaged
    per_query = (teacher_maps * (teacher_maps.clamp_min(1e-30).log() - student_maps.clamp_min(1e-30).log())).sum(-1)
    trainer = fit(module, tmp_path, limit_train_batches=1, limit_val_batches=0)
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["train/hidden"], hidden.detach())
    torch.testing.assert_close(metrics["train/attention"], per_query[mask].mean())
    assert student.encoder.config._attn_implementation == teacher.encoder.config._attn_implementation == "eager"


def test_a_one_layer_student_of_a_two_layer_teacher_moves_toward_it_and_its_checkpoint_loads_back(tmp_path) -> None:
    teacher = teacher_bert(sharpness=16.0)
    original = copy.deepcopy(teacher.state_dict())
    module = DistillationModule(
        student_bert(),
        teacher,
        num_classes=CLASSES,
        layer_map={0: 0, 1: 2},
        attention_weight=10.0,
        optimizer=lambda parameters: torch.optim.Adam(parameters, lr=3e-2),
    )
    ids, _ = first_batch()

    def layer_losses() -> tuple[float, float]:
        ours, theirs = encoded(module.student, ids), encoded(teacher, ids)
        hidden = hidden_state_loss(module.layer_adapters[1](ours.hidden_states[1]), theirs.hidden_states[2], ids != 0)
        return hidden.item(), attention_map_loss(ours.attentions[0], theirs.attentions[1], ids != 0).item()

    before = layer_losses()
    trainer = fit(module, tmp_path, max_epochs=2)
    after = layer_losses()
    assert after[0] < 0.5 * before[0] and after[1] < 0.8 * before[1], (before, after)  # measured: 0.37x, 0.74x
    assert {"train/hidden", "train/attention", "val/acc"} <= set(trainer.callback_metrics)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, original[name]), name

    trainer.save_checkpoint(tmp_path / "distilled.ckpt")
    assert torch.load(tmp_path / "distilled.ckpt", weights_only=True)["hyper_parameters"]["layer_map"] == {0: 0, 1: 2}
    restored = DistillationModule.load_from_checkpoint(
        tmp_path / "distilled.ckpt", student=student_bert(), teacher=teacher_bert(sharpness=16.0)
    )
    assert restored.layer_map == {0: 0, 1: 2} and restored.attention_weight == 10.0
    assert [type(adapter) for adapter in restored.layer_adapters] == [nn.Linear, nn.Linear]
    for name, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name  # the student and the layer adapters
    torch.testing.assert_close(restored.eval()(ids), module.eval()(ids))


def test_a_layer_map_naming_a_layer_that_does_not_exist_is_refused_when_the_module_is_made() -> None:
    teacher = teacher_bert()
    refused = {
        "layer_map={5: 2} names student layer 5, but the student has layers 0..1 "
        "(0: the embeddings' output, 1..1: its transformer layers)": {"layer_map": {5: 2}},
        "layer_map={0: 0, 1: 3} names teacher layer 3, but the teacher has layers 0..2": {"layer_map": {0: 0, 1: 3}},
        "layer_map={-1: 0} names student layer -1": {"layer_map": {-1: 0}},
        "layer_map={'1': 2} names student layer '1': layers are integers": {"layer_map": {"1": 2}},
        "attention_weight=1.0 compares attention maps, but layer_map={0: 0} pairs no transformer layers": {
            "layer_map": {0: 0},
            "attention_weight": 1.0,
        },
        "cache_teacher keeps the teacher's logits only; hints and layer_map need": {
            "layer_map": {1: 2},
            "cache_teacher": True,
        },
    }
    for message, options in refused.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            DistillationModule(student_bert(), teacher, num_classes=CLASSES, **{"attention_weight": 1.0, **options})
    assert teacher.encoder.config._attn_implementation == "sdpa"  # refused before anything was changed
    with pytest.raises(ValueError, match=r"but the student \(SmallCNN\) holds none: name the modules .* in hints="):
        DistillationModule(SmallCNN(num_classes=CLASSES, image_size=8), teacher, num_classes=CLASSES, layer_map={0: 0})


def test_dict_batches_train_the_same_student_as_tuple_batches(tmp_path) -> None:
    ids, labels = first_batch()
    batch = dict_collate(list(zip(ids, labels, strict=True)))
    assert model_inputs(batch).keys() == {"input_ids", "attention_mask"} and batch_targets(batch) is batch["labels"]
    with pytest.raises(ValueError, match=r"a dict batch needs 'labels' .*got the keys \['input_ids'\]"):
        batch_targets({"input_ids": ids})
    with pytest.raises(ValueError, match="a dict batch needs 'input_ids'"):
        model_inputs({"labels": labels})

    runs = {}
    for dicts in (False, True):
        classifier = ClassificationModule(student_bert(), CLASSES)
        fit(classifier, tmp_path, dicts=dicts)
        module = DistillationModule(
            student_bert(), teacher_bert(), num_classes=CLASSES, layer_map={0: 0, 1: 2}, attention_weight=1.0
        )
        trainer = fit(module, tmp_path, dicts=dicts)
        runs[dicts] = classifier, module, trainer.callback_metrics
    for tuples, dicts in zip(runs[False][:2], runs[True][:2], strict=True):
        for name, value in tuples.state_dict().items():
            torch.testing.assert_close(dicts.state_dict()[name], value, msg=name)
    for name in ("train/loss_epoch", "train/hidden", "train/attention", "val/loss"):
        torch.testing.assert_close(runs[True][2][name], runs[False][2][name], msg=name)


def test_the_teacher_cache_reads_dict_batches(tmp_path) -> None:
    runs = {}
    for cache in (False, True):
        module = DistillationModule(student_bert(), teacher_bert(), num_classes=CLASSES, cache_teacher=cache)
        calls = []
        module.teacher.register_forward_hook(
            lambda m, args, kwargs, out, calls=calls: calls.append(kwargs), with_kwargs=True
        )
        fit(module, tmp_path, max_epochs=2, dicts=True)
        runs[cache] = module, calls
    (plain, plain_calls), (cached, cached_calls) = runs[False], runs[True]
    for name, value in plain.student.state_dict().items():
        torch.testing.assert_close(cached.student.state_dict()[name], value, msg=name)
    seen = sum(len(call["input_ids"]) for call in cached_calls)
    assert seen == len(dict_loaders()[0].dataset) == sum(len(call["input_ids"]) for call in plain_calls) // 2
    assert all(call.keys() == {"input_ids", "attention_mask"} for call in cached_calls)


def test_a_student_from_the_teachers_layers_computes_what_they_compute() -> None:
    teacher = teacher_bert(**NO_DROPOUT).eval()
    ids, _ = first_batch()
    whole = student_from_teacher(teacher, layers=[1, 2]).eval()
    torch.testing.assert_close(whole(ids), teacher(ids))
    lower = student_from_teacher(teacher, layers=[1])
    assert lower.encoder.config.num_hidden_layers == 1 and teacher.encoder.config.num_hidden_layers == 2
    ours, theirs = encoded(lower, ids), encoded(teacher, ids)
    for layer in (0, 1):  # the embeddings and the first layer, copied
        torch.testing.assert_close(ours.hidden_states[layer], theirs.hidden_states[layer])
    torch.testing.assert_close(lower.head.weight, teacher.head.weight)
    with torch.no_grad():
        lower.head.weight.add_(1.0)
    assert not torch.equal(lower.head.weight, teacher.head.weight)  # copies, not shared

    module = DistillationModule(
        student_from_teacher(teacher, every=2), teacher, num_classes=CLASSES, layer_map={0: 0, 1: 2}
    )
    assert [type(adapter) for adapter in module.layer_adapters] == [nn.Identity, nn.Identity]  # the same width
    upper = student_from_teacher(teacher, every=2)  # from a teacher frozen by distillation, a student that trains
    assert all(parameter.requires_grad for parameter in upper.parameters())
    torch.testing.assert_close(
        upper.encoder.encoder.layer[0].output.dense.weight, teacher.encoder.encoder.layer[1].output.dense.weight
    )

    refused = {
        "layers=[0] names teacher layer 0, but the teacher's transformer layers are 1..2": {"layers": [0]},
        "layers=[1, 3] names teacher layer 3": {"layers": [1, 3]},
        "layers=[2, 1] must name one or more teacher layers, each once, in increasing order": {"layers": [2, 1]},
        "every=3 must be in 1..2": {"every": 3},
        "takes layers= (the teacher layers to keep) or every=, one of the two": {"layers": [1], "every": 1},
    }
    for message, options in refused.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            student_from_teacher(teacher, **options)
    with pytest.raises(ValueError, match=r"the teacher \(SmallCNN\) holds none"):
        student_from_teacher(SmallCNN(num_classes=10, image_size=8), every=1)

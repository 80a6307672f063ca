"""Models as users have them: a Hugging Face classifier as it comes (a ModelOutput, dict batches), torch's own
attention (nn.MultiheadAttention) without a manual step, structured pruning of a module fit on plain dataloaders."""

from __future__ import annotations

from functools import partial

import onnxruntime
import pytest
import torch
from digits import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import VisionTransformer
from transformers import BertConfig, BertForSequenceClassification

from lightning_compress import (
    ClassificationModule,
    CompressionReport,
    DistillationModule,
    OneShotPruning,
    PostTrainingQuantization,
    Pruning,
    QuantizationAwareTraining,
    export,
)
from lightning_compress.analysis import count_macs, evaluate_accuracy, measure_latency
from lightning_compress.batches import model_inputs
from lightning_compress.deploy import OnnxRuntimeModel
from lightning_compress.models import SmallCNN
from lightning_compress.models.attention import ExplicitMultiheadAttention
from lightning_compress.pruning import Pruner, PruningConfig
from lightning_compress.quantization.layers import quantized_layers

LENGTH = 8


def hugging_face_classifier(seed: int = 0) -> BertForSequenceClassification:
    """A tiny random-weight ``BertForSequenceClassification`` of 3 classes, as ``from_pretrained`` would give one."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def token_ids(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids and an attention mask whose every other sample ends in three padding tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[::2, length - 3 :] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def dict_batches(samples: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Batches in Hugging Face's convention: ``input_ids``, ``attention_mask`` and ``labels``."""
    inputs = token_ids(samples, LENGTH, seed)
    labels = torch.arange(samples) % 3
    rows = [
        {**{key: value[index] for key, value in inputs.items()}, "labels": labels[index]} for index in range(samples)
    ]
    return DataLoader(rows, batch_size=batch_size)


def test_a_hugging_face_classifier_is_distilled_as_it_comes(tmp_path) -> None:
    teacher, student = hugging_face_classifier(seed=0), hugging_face_classifier(seed=1)
    # input_shape: the outputs of student and teacher are compared at construction
    module = DistillationModule(student, teacher, num_classes=3, input_shape=[LENGTH], input_dtype="int64")
    trainer = quiet_trainer(tmp_path, [], max_epochs=1, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=dict_batches())
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss"])
    inputs = model_inputs(next(iter(dict_batches())))
    student.eval()
    with torch.no_grad():
        assert torch.equal(module(**inputs), student(**inputs).logits)
        assert torch.equal(module.teacher_output(inputs), teacher(**inputs).logits)


def test_a_hugging_face_classifier_is_calibrated_and_tested_as_it_comes(tmp_path) -> None:
    module = ClassificationModule(hugging_face_classifier(), num_classes=3)
    trainer = quiet_trainer(tmp_path, [PostTrainingQuantization(calibration_batches=2)], enable_checkpointing=False)
    trainer.validate(module, dict_batches())
    layers = quantized_layers(module)
    assert len(layers) == 6 * 2 + 2  # Q, K, V, attention output, MLP in and out per layer; pooler, classifier
    assert all(bool(layer.input_quantizer.enabled) for layer in layers.values())
    trainer.test(module, dict_batches())
    assert float(trainer.callback_metrics["test/acc"]) == evaluate_accuracy(module, dict_batches())


def test_a_hugging_face_classifier_is_pruned_in_one_shot_as_it_comes(tmp_path) -> None:
    pruning = OneShotPruning(method="wanda", amount=0.5, calibration_batches=2, progress=False)
    module = ClassificationModule(hugging_face_classifier(), num_classes=3)
    quiet_trainer(tmp_path, [pruning], enable_checkpointing=False).validate(module, dict_batches())
    assert len(pruning.masks) == 6 * 2 + 2
    assert {name: float(mask.float().mean()) for name, mask in pruning.masks.items()} == dict.fromkeys(
        pruning.masks, 0.5
    )


def test_the_report_measures_a_hugging_face_classifier_on_its_first_training_batch(tmp_path) -> None:
    report = CompressionReport(
        tmp_path / "report",
        latency_batch_sizes=(2,),
        latency_warmup=0,
        latency_repeats=1,
        latency_rounds=1,
        compressed_size=False,
        verbose=False,
    )
    module = ClassificationModule(hugging_face_classifier(), num_classes=3)  # no example_input_array
    trainer = quiet_trainer(tmp_path, [report], max_epochs=1, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=dict_batches(), val_dataloaders=dict_batches())
    first = {key: value[:1] for key, value in model_inputs(next(iter(dict_batches()))).items()}
    assert report.report.metadata["input_shape"] == {"input_ids": [LENGTH], "attention_mask": [LENGTH]}
    assert report.report.entry("before").profile.macs == count_macs(hugging_face_classifier(), first)
    assert report.report.entry("after").profile.latency[2].batch_size == 2
    assert report.report.entry("after").val_accuracy == float(trainer.callback_metrics["val/acc"])


def test_a_hugging_face_classifier_exports_with_its_inputs_by_name_and_dynamic_batch_and_length(tmp_path) -> None:
    model = hugging_face_classifier().eval()
    path = export(model, tmp_path / "model.onnx", token_ids(1, LENGTH))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(value.name, value.shape) for value in session.get_inputs()] == [
        ("input_ids", ["batch", "sequence"]),
        ("attention_mask", ["batch", "sequence"]),
    ]
    for batch, length in ((3, 5), (2, 11)):
        masked = token_ids(batch, length, seed=batch)
        unmasked = {**masked, "attention_mask": torch.ones_like(masked["attention_mask"])}
        with torch.no_grad():
            expected = [model(**inputs).logits for inputs in (masked, unmasked)]
        ran = [torch.from_numpy(session.run(None, {k: v.numpy() for k, v in x.items()})[0]) for x in (masked, unmasked)]
        for runtime_logits, torch_logits in zip(ran, expected, strict=True):
            torch.testing.assert_close(runtime_logits, torch_logits, atol=1e-6, rtol=1e-4)
        assert (expected[0] - expected[1]).abs().max() > 1e-5  # the padding's mask changes the logits: it is read
    runtime = OnnxRuntimeModel(path.read_bytes(), num_threads=1)
    inputs = token_ids(4, 6, seed=4)
    torch.testing.assert_close(runtime(**inputs), runtime(inputs["input_ids"], inputs["attention_mask"]))
    assert measure_latency(runtime, inputs, warmup=0, repeats=1).batch_size == 4
    with pytest.raises(ValueError, match=r"takes the inputs \['input_ids', 'attention_mask'\], positionally or by"):
        runtime(input_ids=inputs["input_ids"])


def test_a_tuple_of_inputs_exports_named_after_the_forward_and_anything_else_is_refused(tmp_path) -> None:
    model = nn.Bilinear(3, 2, 4)
    first, second = torch.randn(5, 3), torch.randn(5, 2)
    runtime = OnnxRuntimeModel.from_module(model, (first[:1], second[:1]), num_threads=1)
    assert runtime.input_names == ["input1", "input2"]
    with torch.no_grad():
        torch.testing.assert_close(runtime(first, second), model(first, second), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="a tuple of tensors .* or a dict of tensors .*; got list of Tensor$"):
        export(model, tmp_path / "model.onnx", [first, second])
    with pytest.raises(ValueError, match="got dict of str$"):
        export(model, tmp_path / "model.onnx", {"input1": "text"})
    assert list(tmp_path.iterdir()) == []


class TokenEncoder(nn.Module):
    """Token ids through an embedding, torch's ``nn.TransformerEncoder`` and a linear head on the mean."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(ids)).mean(dim=1))


def test_head_pruning_makes_nn_transformer_encoder_attention_explicit_itself(tmp_path) -> None:
    ids = torch.randint(0, 50, (16, 6), generator=torch.Generator().manual_seed(0))
    original = TokenEncoder().eval()
    saved = {name: value.clone() for name, value in original.state_dict().items()}
    with torch.no_grad():
        expected = original(ids)  # nn.TransformerEncoder's fused fast path, in eval mode
    swapped = TokenEncoder()
    with pytest.warns(
        UserWarning, match=r"Pruning made the 2 nn.MultiheadAttention layers \(encoder.layers.0.self_attn"
    ):
        Pruner(swapped, PruningConfig(amount=0.5, granularity="head", scope="layer"), ids[:2])
    assert isinstance(swapped.encoder.layers[1].self_attn, ExplicitMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(swapped.eval()(ids), expected, atol=1e-5, rtol=1e-5)
    assert str(swapped.load_state_dict(saved)) == "<All keys matched successfully>"  # in_proj_weight split on load

    # In a fit on plain dataloaders: no example_input_array, no explicit_attention
    module = ClassificationModule(TokenEncoder(), num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.0))
    pruning = Pruning(amount=0.5, granularity="head", scope="layer", schedule="oneshot", remove_channels=True)
    trainer = quiet_trainer(tmp_path, [pruning], max_epochs=1, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(ids, torch.arange(16) % 3), batch_size=4))
    assert [layer.self_attn.num_heads for layer in module.model.encoder.layers] == [2, 2]
    assert module.model.encoder.layers[0].self_attn.q_proj.out_features == 8


def test_quantization_aware_training_makes_torchvisions_vit_attention_explicit_itself(tmp_path) -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    )
    images = torch.randn(8, 3, 8, 8)
    saved = {name: value.clone() for name, value in vit.state_dict().items()}
    with torch.no_grad():
        expected = vit.eval()(images)
    vit.train()
    # fake quantization from epoch 1 and a learning rate of 0: the fit leaves the computation as it was
    module = ClassificationModule(vit, num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.0))
    trainer = quiet_trainer(
        tmp_path, [QuantizationAwareTraining(start_epoch=1)], max_epochs=1, enable_checkpointing=False
    )
    with pytest.warns(UserWarning, match=r"Quantization made the 2 nn.MultiheadAttention layers .* explicit"):
        trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(images, torch.arange(8) % 3), batch_size=4))
    attention = "model.encoder.layers.encoder_layer_1.self_attention"
    assert {f"{attention}.{name}" for name in ("q_proj", "k_proj", "v_proj", "out_proj")} <= set(
        quantized_layers(module)
    )
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(images), expected, atol=1e-5, rtol=1e-5)
    loaded = vit.load_state_dict(saved, strict=False)
    assert loaded.unexpected_keys == [] and all("quantizer" in key for key in loaded.missing_keys)


def test_channel_pruning_of_a_module_fit_on_plain_dataloaders_traces_their_first_batch(tmp_path) -> None:
    module = ClassificationModule(SmallCNN(num_classes=10, image_size=8), num_classes=10)  # no example_input_array
    pruning = Pruning(
        amount=0.25, granularity="channel", criterion="l1", scope="layer", schedule="oneshot", start_epoch=0
    )
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    trainer = quiet_trainer(tmp_path, [pruning], max_epochs=1, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(images, torch.arange(16) % 10), batch_size=8))
    assert {name: int((~keep).sum()) for name, keep in pruning.channel_keep.items()} == {
        "model.features.0": 8,
        "model.features.4": 16,
        "model.classifier.1": 32,
    }


def test_head_pruning_of_a_hugging_face_classifier_traces_its_first_dict_batch(tmp_path) -> None:
    module = ClassificationModule(hugging_face_classifier(), num_classes=3)
    pruning = Pruning(amount=0.5, granularity="head", scope="layer", schedule="oneshot", remove_channels=True)
    trainer = quiet_trainer(tmp_path, [pruning], max_epochs=1, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=dict_batches())
    attentions = [layer.attention.self for layer in module.model.bert.encoder.layer]
    assert [attention.num_attention_heads for attention in attentions] == [1, 1]
    inputs = token_ids(3, 5)
    with torch.no_grad():
        assert module.eval()(**inputs).shape == (3, 3)

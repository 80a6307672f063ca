"""Transformers pruned: attention heads and MLP neurons whole and removed (a tiny BERT and a tiny ViT keep their
outputs), and every linear layer unstructured and 2:4."""

from __future__ import annotations

import warnings

import pytest
import torch
from digits import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_attention import BiasedKeys
from text_models import TINY_BERT, TINY_BERT_LINEAR_LAYERS, fit_text, sample_datamodule, text_module
from torch import nn
from torchvision.models import VisionTransformer

from lightning_compress import ClassificationModule, Pruning
from lightning_compress.models import SmallCNN
from lightning_compress.models.attention import explicit_attention
from lightning_compress.pruning import Pruner, PruningConfig

HEAD_DIM = TINY_BERT["hidden_size"] // TINY_BERT["num_attention_heads"]


def prune_and_remove(model: nn.Module, config: PruningConfig, inputs: torch.Tensor) -> Pruner:
    """Prune ``model`` once, remove what was pruned, and check that the smaller model computes the masked one's outputs."""
    pruner = Pruner(model, config, example_input=inputs[:1])
    pruner.prune()
    with torch.no_grad():
        masked = model(inputs)
        pruner.remove_channels(model)
        torch.testing.assert_close(model(inputs), masked, rtol=0, atol=1e-5)
    return pruner


def tiny_vit(num_layers: int = 2) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=28, patch_size=7, num_layers=num_layers, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    explicit_attention(model)
    return model.eval()


@pytest.mark.parametrize("transformer", ["bert", "vit"])
def test_unstructured_and_2_to_4_pruning_reach_every_linear_layer_of_a_transformer(transformer) -> None:
    model = text_module().model if transformer == "bert" else tiny_vit()
    linear = {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linear) == (TINY_BERT_LINEAR_LAYERS if transformer == "bert" else 2 * 6 + 1)
    pruner = Pruner(model, PruningConfig(amount=0.5))
    pruner.prune()
    assert set(linear) <= set(pruner.parameters)  # and the ViT's patch embedding, a convolution
    total = sum(weight.numel() for weight in pruner.parameters.values())
    # counted in the masks: the ViT's head is zero-initialised, so the weight each of its rows keeps is zero too
    assert sum(int((~mask).sum()) for mask in pruner.masks.values()) == round(0.5 * total)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ViT's patch embedding reads 3 * 7 * 7 inputs, no multiple of 4
        Pruner(model, PruningConfig(granularity="2:4")).prune()
    for name, weight in linear.items():
        assert bool(((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all()), name


def test_heads_of_a_bert_are_masked_whole_then_removed_with_the_same_outputs() -> None:
    model = text_module().model.eval()
    ids = torch.randint(5, 60, (4, 16))
    pruner = Pruner(model, PruningConfig(amount=0.5, granularity="head", scope="layer"), example_input=ids[:1])
    assert pruner.groups.units == {f"encoder.encoder.layer.{i}.attention.self.value": 2 for i in range(2)}
    pruner.prune()
    for index, layer in enumerate(model.encoder.encoder.layer):
        kept = pruner.channel_keep[f"encoder.encoder.layer.{index}.attention.self.value"]
        assert kept.tolist().count(True) == 1  # one of the two heads of each layer
        pruned = slice(HEAD_DIM * int((~kept).nonzero()), HEAD_DIM * (int((~kept).nonzero()) + 1))
        attention = layer.attention
        for projection in (attention.self.query, attention.self.key, attention.self.value):
            assert torch.all(projection.weight[pruned] == 0) and torch.all(projection.bias[pruned] == 0)
            assert int((projection.weight != 0).sum()) == HEAD_DIM * TINY_BERT["hidden_size"]
        assert torch.all(attention.output.dense.weight[:, pruned] == 0)
    with torch.no_grad():
        masked = model(ids)
        pruner.remove_channels(model)
        removed = model(ids)
    torch.testing.assert_close(removed, masked, rtol=0, atol=1e-6)
    attention = model.encoder.encoder.layer[0].attention
    assert (attention.self.num_attention_heads, attention.self.all_head_size) == (1, HEAD_DIM)
    assert (attention.self.query.out_features, attention.output.dense.in_features) == (HEAD_DIM, HEAD_DIM)
    assert attention.output.dense.out_features == TINY_BERT["hidden_size"]  # the residual width is kept


def test_heads_are_ranked_globally_by_their_norms_and_each_attention_keeps_one() -> None:
    model = text_module().model.eval()
    with torch.no_grad():  # layer 0's second head and layer 1's first are the weakest
        for layer, weak in zip(model.encoder.encoder.layer, (1, 0)):
            for projection in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                projection.weight[HEAD_DIM * weak : HEAD_DIM * (weak + 1)] *= 0.01
    ids = torch.ones(1, 16, dtype=torch.long)
    pruner = Pruner(model, PruningConfig(amount=0.5, granularity="head", criterion="l1"), example_input=ids)
    pruner.prune()
    assert [keep.tolist() for keep in pruner.channel_keep.values()] == [[True, False], [False, True]]
    with pytest.raises(
        ValueError, match="2 of the 4 entries ranked together stay and they can be pruned to at most 0.5000"
    ):
        pruner.prune(0.99)  # never the last head of an attention, and never fewer pruned than asked
    assert [int(keep.sum()) for keep in pruner.channel_keep.values()] == [1, 1]


def test_heads_of_a_vision_transformer_are_removed_with_the_same_outputs() -> None:
    model = tiny_vit()
    images = torch.randn(3, 3, 28, 28)
    prune_and_remove(model, PruningConfig(amount=0.5, granularity="head", scope="layer"), images)
    for block in model.encoder.layers:
        attention = block.self_attention
        assert (attention.num_heads, attention.q_proj.out_features, attention.out_proj.in_features) == (2, 16, 16)


def test_mlp_neurons_of_a_bert_are_pruned_as_channels_and_removed_with_the_same_outputs() -> None:
    model = text_module().model.eval()
    ids = torch.randint(5, 60, (4, 16))
    config = PruningConfig(amount=0.5, granularity="channel", scope="layer", targets=["*.intermediate.dense"])
    prune_and_remove(model, config, ids)
    layer = model.encoder.encoder.layer[1]
    assert (layer.intermediate.dense.out_features, layer.output.dense.in_features) == (16, 16)


def test_mlp_neurons_of_a_vision_transformer_are_removed_and_its_residual_width_is_never_cut() -> None:
    images = torch.randn(3, 3, 28, 28)
    with pytest.raises(ValueError, match=r"would break VisionTransformer .*'encoder.layers.encoder_layer_0.mlp.3'\]"):
        Pruner(tiny_vit(num_layers=1), PruningConfig(amount=0.5, granularity="channel"), example_input=images[:1])
    model = tiny_vit()
    prune_and_remove(
        model, PruningConfig(amount=0.5, granularity="channel", scope="layer", targets=["*.mlp.0"]), images
    )
    assert [block.mlp[0].out_features for block in model.encoder.layers] == [32, 32]
    assert model.encoder.layers[0].mlp[3].out_features == 32  # the residual width, 32, is the hidden size


def test_channel_pruning_of_a_bert_names_the_heads_and_the_residual_width_it_would_break() -> None:
    ids = torch.ones(1, 16, dtype=torch.long)
    culprits = (
        r"\['encoder.encoder.layer.0.attention.self.value', 'encoder.encoder.layer.1.attention.self.value', "
        r"'encoder.encoder.layer.1.output.dense'\]"
    )
    with pytest.raises(ValueError, match=rf"outputs differ from the masked model's .*units of {culprits}"):
        Pruner(text_module().model, PruningConfig(amount=0.5, granularity="channel"), example_input=ids)


def test_head_granularity_on_a_model_without_known_attention_is_refused() -> None:
    with pytest.raises(ValueError, match="granularity='head' prunes attention heads, but SmallCNN has no attention"):
        Pruner(SmallCNN(10, image_size=8), PruningConfig(amount=0.5, granularity="head"), torch.zeros(1, 1, 8, 8))
    with pytest.raises(
        ValueError,
        match=r"nn.MultiheadAttention \(\['attention'\]\).*does not compute what it has \(attention: add_bias_kv\)",
    ):
        Pruner(BiasedKeys(), PruningConfig(amount=0.5, granularity="head"), torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match="a callable criterion scores each weight; head granularity ranks heads"):
        PruningConfig(amount=0.5, granularity="head", criterion=lambda layer: layer.weight)


def test_heads_and_neurons_pruned_by_two_callbacks_in_one_fit_are_removed_and_old_checkpoints_load(tmp_path) -> None:
    heads = Pruning(amount=0.5, granularity="head", scope="layer", schedule="oneshot", remove_channels=True)
    neurons = Pruning(
        amount=0.5,
        granularity="channel",
        scope="layer",
        schedule="oneshot",
        targets=["*.intermediate.dense"],
        remove_channels=True,
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = text_module()
    trainer = quiet_trainer(tmp_path, [heads, neurons, checkpoint], max_epochs=1)
    datamodule = sample_datamodule()
    trainer.fit(module, datamodule=datamodule)
    layer = module.model.encoder.encoder.layer[0]
    assert (layer.attention.self.num_attention_heads, layer.intermediate.dense.out_features) == (1, 16)
    hidden, width = TINY_BERT["hidden_size"], TINY_BERT["intermediate_size"]
    encoder_layer = 3 * (hidden * HEAD_DIM + HEAD_DIM) + HEAD_DIM * hidden + hidden  # q, k, v, output: one head
    encoder_layer += hidden * width // 2 + width // 2 + width // 2 * hidden + hidden + 4 * hidden  # MLP, 2 LayerNorms
    assert sum(p.numel() for p in layer.parameters()) == encoder_layer
    full_size = ClassificationModule.load_from_checkpoint(checkpoint.last_model_path, model=text_module().model)
    assert full_size.model.encoder.encoder.layer[0].attention.self.num_attention_heads == 2
    module.load_state_dict(torch.load(checkpoint.last_model_path, weights_only=True)["state_dict"])  # cut on load
    ids = next(iter(datamodule.test_dataloader()))[0]
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(ids), full_size.eval()(ids), rtol=0, atol=1e-5)


def test_head_pruning_in_a_fit_keeps_the_masked_heads_at_zero(tmp_path) -> None:
    pruning = Pruning(amount=0.5, granularity="head", criterion="taylor", schedule="oneshot", taylor_steps=2)
    module = text_module()
    fit_text(tmp_path, module, [pruning])
    kept = list(pruning.channel_keep.values())
    assert sum(int((~keep).sum()) for keep in kept) == 2  # half of the 4 heads, globally
    query = module.model.encoder.encoder.layer[0].attention.self.query.weight
    rows = pruning.channel_keep["model.encoder.encoder.layer.0.attention.self.value"].repeat_interleave(HEAD_DIM)
    assert torch.all(query[~rows] == 0) and torch.all(query[rows] != 0)

"""Attention heads as pruning units: each head's channels of the query, key and value projections, pruned together.

A head is ``head_dim`` consecutive output channels of an attention's query, key and value projections and
the same input columns of its output projection. Torch-Pruning's dependency graph couples exactly these (the
channels meet in the attention product and leave through the output projection), so the heads of an
attention are units of one :class:`~lightning_compress.pruning.structured.ChannelGroups` group, scored and
masked a head at a time; removal cuts the channels and lowers the module's head count. A masked head adds
nothing to the output (its values are zero), so the masked and the removed model compute the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_compress.batches import ModelInputs
from lightning_compress.models.attention import ExplicitMultiheadAttention, fused_attention, not_explicit_because
from lightning_compress.pruning.structured import ChannelGroups


@dataclass(frozen=True)
class Attention:
    """One attention module whose heads can be pruned: its query, key and value projections, each head's
    width and the attribute that holds the number of heads.

    Example:
        >>> attention = ExplicitMultiheadAttention(embed_dim=8, num_heads=2, head_dim=4)
        >>> found = Attention.of(attention)
        >>> found.num_heads, found.head_dim, found.count_attribute
        (2, 4, 'num_heads')
    """

    module: nn.Module
    projections: tuple[nn.Linear, nn.Linear, nn.Linear]
    head_dim: int
    count_attribute: str

    @classmethod
    def of(cls, module: nn.Module) -> Attention | None:
        """The attention ``module`` is, for this project's :class:`ExplicitMultiheadAttention` and Hugging
        Face's BERT-style self-attention (``query``, ``key``, ``value``, ``num_attention_heads``,
        ``attention_head_size``: BERT, RoBERTa, MiniLM, HF's ViT); ``None`` for any other module."""
        if isinstance(module, ExplicitMultiheadAttention):
            return cls(module, (module.q_proj, module.k_proj, module.v_proj), module.head_dim, "num_heads")
        projections = tuple(getattr(module, name, None) for name in ("query", "key", "value"))
        head_dim = getattr(module, "attention_head_size", None)
        if all(isinstance(p, nn.Linear) for p in projections) and isinstance(head_dim, int):
            if isinstance(getattr(module, "num_attention_heads", None), int):
                return cls(module, projections, head_dim, "num_attention_heads")
        return None

    @property
    def num_heads(self) -> int:
        return getattr(self.module, self.count_attribute)

    def set_num_heads(self, count: int) -> None:
        """Record that ``count`` heads are left (and Hugging Face's ``all_head_size``, where the module has one)."""
        setattr(self.module, self.count_attribute, count)
        if hasattr(self.module, "all_head_size"):
            self.module.all_head_size = count * self.head_dim


class AttentionHeadGroups:
    """The prunable heads of ``model``'s attention modules whose three projections are all in ``layers``,
    one group per attention named by its root projection (as Torch-Pruning's graph roots the group).

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        >>> from lightning_compress.models.attention import explicit_attention
        >>> _ = explicit_attention(layer)
        >>> layers = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        >>> heads = AttentionHeadGroups(layer, torch.randn(1, 3, 8), layers)
        >>> heads.units
        {'self_attn.v_proj': 2}
        >>> heads.remove({"self_attn.v_proj": torch.tensor([False, True])})
        >>> layer.self_attn.num_heads, layer.self_attn.q_proj.out_features, layer.self_attn.out_proj.in_features
        (1, 4, 4)
    """

    def __init__(self, model: nn.Module, example_input: ModelInputs, layers: dict[str, nn.Module]) -> None:
        targeted = set(layers.values())
        attentions = [found for module in model.modules() if (found := Attention.of(module)) is not None]
        attentions = [found for found in attentions if targeted.issuperset(found.projections)]
        if not attentions:
            raise ValueError(_no_attention_message(model))
        names = {module: name for name, module in model.named_modules()}
        projections = {names[p]: p for found in attentions for p in found.projections}
        self.channel_groups = ChannelGroups(model, example_input, projections)
        owner = {p: found for found in attentions for p in found.projections}
        self._attentions = {name: owner[layers[name]] for name in self.channel_groups.units}
        for name, found in self._attentions.items():
            channels = self.channel_groups.units[name]
            if channels != found.num_heads * found.head_dim:
                raise ValueError(
                    f"the heads of {names[found.module]!r} cannot be pruned alone: its projections' {channels} "
                    f"channels are coupled with others than its {found.num_heads} heads of {found.head_dim}"
                )

    @property
    def units(self) -> dict[str, int]:
        """The number of heads of each attention, by the name of its group's root projection."""
        return {name: found.num_heads for name, found in self._attentions.items()}

    def scores(
        self, criterion: str, taylor: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Each head's importance: the summed scores of its channels (see ``ChannelGroups.scores``)."""
        channel_scores = self.channel_groups.scores(criterion, taylor, generator)
        return {
            name: channel_scores[name].reshape(found.num_heads, found.head_dim).sum(dim=1)
            for name, found in self._attentions.items()
        }

    def _channels(self, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Kept heads as kept channels: each head's ``head_dim`` channels."""
        return {name: kept.repeat_interleave(self._attentions[name].head_dim) for name, kept in keep.items()}

    def masks(self, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Boolean masks, by parameter name, over every parameter of the heads that ``keep`` marks ``False``."""
        return self.channel_groups.masks(self._channels(keep))

    def remove(self, keep: dict[str, torch.Tensor]) -> None:
        """Remove the heads that ``keep`` marks ``False``: narrower projections, fewer heads, the same outputs
        (state dicts saved before load into the smaller model, see ``ChannelGroups.remove``)."""
        self.channel_groups.remove(self._channels(keep))
        for name, kept in keep.items():
            self._attentions[name].set_num_heads(int(kept.sum()))


def _no_attention_message(model: nn.Module) -> str:
    fused = fused_attention(model)
    if fused:
        reasons = {name: not_explicit_because(attention) for name, attention in fused.items()}
        refused = "; ".join(f"{name}: {why}" for name, why in reasons.items() if why)
        remedy = (
            f"and ExplicitMultiheadAttention, whose heads can be pruned, does not compute what it has ({refused})"
            if refused
            else "make it explicit first with lightning_compress.models.explicit_attention(model), the same outputs "
            "(Pruning and Pruner do it themselves)"
        )
        return (
            f"granularity='head' prunes attention heads, but the attention of {type(model).__name__} is "
            f"nn.MultiheadAttention ({list(fused)}), whose fused in_proj_weight no pruning reaches, {remedy}"
        )
    return (
        f"granularity='head' prunes attention heads, but {type(model).__name__} has no attention whose query, key "
        "and value projections are all targeted (known: ExplicitMultiheadAttention, Hugging Face BERT-style "
        "self-attention); prune its layers with granularity='channel' or 'unstructured'"
    )

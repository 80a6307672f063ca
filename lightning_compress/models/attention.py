"""Multi-head attention with its projections as ``nn.Linear`` layers, so that they can be quantized and pruned.

``nn.MultiheadAttention`` computes with a fused ``in_proj_weight`` (the query, key and value projections as
one ``3·embed_dim × embed_dim`` parameter) and reads ``out_proj.weight`` directly, never calling any
``nn.Linear``: a fake-quantized layer or a pruning mask put on those would be bypassed.
:class:`ExplicitMultiheadAttention` computes the same attention with four plain ``nn.Linear`` layers, and
:func:`explicit_attention` swaps it in for every ``nn.MultiheadAttention`` of a model; a state dict saved with the
fused projections (``in_proj_weight``) loads into it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ExplicitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s computation and call signature with ``q_proj``, ``k_proj``, ``v_proj`` and
    ``out_proj`` as ``nn.Linear`` layers (made from one by :meth:`from_fused`).

    It takes the masks ``nn.MultiheadAttention`` takes (``key_padding_mask``, ``attn_mask``, boolean with
    True where attention is not allowed, or additive floats; ``is_causal``) and returns ``(output,
    weights)``, the weights averaged over the heads when ``average_attn_weights``, ``None`` unless
    ``need_weights``. The number of heads is ``num_heads``; a head is ``head_dim`` columns of the three input
    projections and the same columns of ``out_proj``'s input.

    Example:
        >>> fused = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> explicit = ExplicitMultiheadAttention.from_fused(fused).eval()
        >>> x = torch.randn(3, 5, 8)
        >>> torch.allclose(explicit(x, x, x)[0], fused(x, x, x)[0], atol=1e-6)
        True
        >>> explicit.load_state_dict(torch.nn.MultiheadAttention(8, 2, batch_first=True).state_dict())
        <All keys matched successfully>
    """

    # What the fast paths of nn.TransformerEncoder(Layer) check before they read a fused projection: with
    # these they take the module's own forward.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        width = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.q_proj = nn.Linear(embed_dim, width, bias=bias)
        self.k_proj = nn.Linear(embed_dim, width, bias=bias)
        self.v_proj = nn.Linear(embed_dim, width, bias=bias)
        self.out_proj = nn.Linear(width, embed_dim, bias=bias)

    @classmethod
    @torch.no_grad()
    def from_fused(cls, attention: nn.MultiheadAttention) -> ExplicitMultiheadAttention:
        """The same attention as ``attention`` (its weights, dropout and mode copied); one with separate key and
        value sizes, key and value biases, or a zero attention column is refused (:func:`not_explicit_because`)."""
        unsupported = not_explicit_because(attention)
        if unsupported:
            raise ValueError(f"this nn.MultiheadAttention cannot be made explicit: it has {unsupported}")
        bias = attention.in_proj_bias is not None
        explicit = cls(
            attention.embed_dim,
            attention.num_heads,
            attention.head_dim,
            bias=bias,
            batch_first=attention.batch_first,
            dropout=attention.dropout,
        )
        explicit = explicit.to(device=attention.in_proj_weight.device, dtype=attention.in_proj_weight.dtype)
        for index, projection in enumerate((explicit.q_proj, explicit.k_proj, explicit.v_proj)):
            rows = slice(index * attention.embed_dim, (index + 1) * attention.embed_dim)
            projection.weight.copy_(attention.in_proj_weight[rows])
            if bias:
                projection.bias.copy_(attention.in_proj_bias[rows])
        explicit.out_proj.weight.copy_(attention.out_proj.weight)
        if attention.out_proj.bias is not None:
            explicit.out_proj.bias.copy_(attention.out_proj.bias)
        explicit.train(attention.training)
        return explicit

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Load ``nn.MultiheadAttention``'s fused ``in_proj_weight`` / ``in_proj_bias`` as the three projections'
        (rows of the query, the key, the value), before the projections read their keys."""
        for kind in ("weight", "bias"):
            fused = state_dict.pop(f"{prefix}in_proj_{kind}", None)
            if fused is not None:
                for name, rows in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3), strict=True):
                    state_dict[f"{prefix}{name}.{kind}"] = rows
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2  # (length, embed_dim), whatever batch_first says
        if unbatched:
            query, key, value = (tensor.unsqueeze(0) for tensor in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
        q, k, v = (self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value)))
        mask = _additive_mask(attn_mask, key_padding_mask, q, k.shape[-2], is_causal)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            weights = F.dropout(torch.softmax(scores if mask is None else scores + mask, dim=-1), dropout)
            context = weights @ v  # the weights returned after dropout, as nn.MultiheadAttention returns them
        else:
            weights, context = None, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        batch, _, length, _ = context.shape
        output = self.out_proj(context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            return output.squeeze(0), None if weights is None else weights.squeeze(0)
        return (output if self.batch_first else output.transpose(0, 1)), weights

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, length, heads · head_dim)`` to ``(batch, heads, length, head_dim)``."""
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    q: torch.Tensor,
    key_length: int,
    is_causal: bool,
) -> torch.Tensor | None:
    """One float mask added to the attention scores, ``-inf`` where attention is not allowed, broadcastable to
    ``(batch, heads, query length, key length)``; ``None`` without any mask."""
    query_length = q.shape[-2]
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(query_length, key_length, dtype=torch.bool, device=q.device).triu(1)
    total = None
    for mask, shape in ((attn_mask, None), (key_padding_mask, (q.shape[0], 1, 1, key_length))):
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
        else:
            additive = mask.to(q.dtype)
        if shape is not None:
            additive = additive.reshape(shape)
        elif additive.dim() == 3:  # (batch · heads, L, S)
            additive = additive.reshape(q.shape[0], -1, query_length, key_length)
        total = additive if total is None else total + additive
    return total


def not_explicit_because(attention: nn.MultiheadAttention) -> str:
    """What ``attention`` has that :class:`ExplicitMultiheadAttention` does not compute, ``""`` when nothing.

    Example:
        >>> not_explicit_because(torch.nn.MultiheadAttention(8, 2, kdim=4, add_bias_kv=True))
        'kdim or vdim other than embed_dim, add_bias_kv'
    """
    return ", ".join(
        why
        for why, present in (
            ("kdim or vdim other than embed_dim", not attention._qkv_same_embed_dim),
            ("add_bias_kv", attention.bias_k is not None),
            ("add_zero_attn", attention.add_zero_attn),
        )
        if present
    )


def fused_attention(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """The ``nn.MultiheadAttention`` layers of ``model``, by module name.

    Example:
        >>> list(fused_attention(torch.nn.TransformerEncoderLayer(8, 2, 16)))
        ['self_attn']
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}


def explicit_attention(model: nn.Module, names: Collection[str] | None = None) -> int:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (those of ``names``, module names, where given) by its
    :class:`ExplicitMultiheadAttention`, in place, so that quantization and pruning reach its projections; returns
    how many were replaced. The outputs are the same. Call it before the optimizer is built: the parameters are new
    (``in_proj_weight`` becomes ``q_proj.weight``, ``k_proj.weight``, ``v_proj.weight``); state dicts saved before
    it load after it, and state dicts saved after it load into a model made explicit the same way.

    Example:
        >>> encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2)
        >>> saved = encoder.state_dict()
        >>> explicit_attention(encoder), type(encoder.layers[0].self_attn).__name__
        (2, 'ExplicitMultiheadAttention')
        >>> encoder.load_state_dict(saved)
        <All keys matched successfully>
    """
    chosen = fused_attention(model) if names is None else {name: model.get_submodule(name) for name in names}
    explicit = {id(fused): ExplicitMultiheadAttention.from_fused(fused) for fused in chosen.values()}
    replaced = set()
    for parent in list(model.modules()):
        for attribute, child in list(parent.named_children()):
            if id(child) in explicit:  # an attention shared by several parents stays shared
                setattr(parent, attribute, explicit[id(child)])
                replaced.add(id(child))
    return len(replaced)

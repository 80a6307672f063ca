"""Size and sparsity of a model, in plain PyTorch: parameters, non-zeros, bytes on disk, MACs.

Every function here works on any ``nn.Module`` without a Trainer::

    >>> import torch.nn as nn
    >>> layer = nn.Linear(4, 2)
    >>> count_parameters(layer)
    10
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_compress.batches import ModelInputs, call_model
from lightning_compress.modules import WEIGHT_LAYER_TYPES, eval_mode, weight_layers


@dataclass(frozen=True)
class SparsityStats:
    """Zeros among a number of weights.

    Example:
        >>> SparsityStats(zeros=3, total=4).sparsity
        0.75
    """

    zeros: int
    total: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> int:
    """Number of parameters; a parameter shared by several modules counts once."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    """Number of parameter elements that are not exactly zero; shared parameters count once."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def layer_sparsity(
    model: nn.Module, layer_types: tuple[type[nn.Module], ...] = WEIGHT_LAYER_TYPES
) -> dict[str, SparsityStats]:
    """Zeros in the weight of each layer of ``layer_types`` (Conv and Linear by default), by module name."""
    return {
        name: SparsityStats(zeros=int((module.weight == 0).sum()), total=module.weight.numel())
        for name, module in weight_layers(model, layer_types)
    }


def global_sparsity(model: nn.Module, layer_types: tuple[type[nn.Module], ...] = WEIGHT_LAYER_TYPES) -> SparsityStats:
    """Zeros over all weights of ``layer_types`` together, each weight tensor counted once."""
    per_layer = layer_sparsity(model, layer_types).values()
    return SparsityStats(zeros=sum(s.zeros for s in per_layer), total=sum(s.total for s in per_layer))


def size_on_disk(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` written to a file: what a checkpoint of the weights costs."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "state_dict.pt")
        torch.save(model.state_dict(), path)
        return os.path.getsize(path)


def _attention_flops(
    query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *_: Any, **__: Any
) -> int:
    """FLOPs of ``softmax(Q K^T) V`` on ``(batch, heads, length, dim)`` shapes: the two batched matrix products."""
    batch, heads, query_length, dim = query_shape
    key_length, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * query_length * key_length * (dim + value_dim)


def _multi_head_attention_flops(
    query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], embed_dim: int, *_: Any, **__: Any
) -> int:
    """FLOPs of ``nn.MultiheadAttention``'s fused fast path: the input projections, attention, the output projection."""
    batch, query_length, _ = query_shape
    key_length = key_shape[1]
    projections = 2 * batch * embed_dim * embed_dim * (2 * query_length + 2 * key_length)  # q, out; k, v
    return projections + 2 * batch * query_length * key_length * 2 * embed_dim


def _encoder_layer_flops(src_shape: Sequence[int], embed_dim: int, num_heads: int, *args: Any, **__: Any) -> int:
    """FLOPs of ``nn.TransformerEncoderLayer``'s fused fast path: its attention and its two feed-forward layers."""
    ffn_weight_1 = args[11]  # after qkv and projection weights and biases, use_gelu, norm_first, eps, two norms
    batch, length, _ = src_shape
    feed_forward = 2 * batch * length * 2 * embed_dim * ffn_weight_1[0]
    return _multi_head_attention_flops(src_shape, src_shape, src_shape, embed_dim) + feed_forward


def _recurrent_layer_flops(
    input_shape: Sequence[int], input_weight: Sequence[int], hidden_weight: Sequence[int], *_: Any, **__: Any
) -> int:
    """FLOPs of one direction of one layer of the CPU's fused ``nn.LSTM`` (oneDNN's ``mkldnn_rnn_layer``): at
    each time step of each sequence, the gates' products with the input and with the hidden state."""
    steps = math.prod(input_shape[:-1])  # time steps times sequences, in whichever order
    return 2 * steps * (math.prod(input_weight) + math.prod(hidden_weight))


#: Fused kernels torch's flop counter does not know: the CPU's attention (it knows the GPU's), the fast
#: paths ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take in eval mode, and the CPU's LSTM.
_FUSED_KERNELS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._native_multi_head_attention: _multi_head_attention_flops,
    torch.ops.aten._transformer_encoder_layer_fwd: _encoder_layer_flops,
    torch.ops.aten.mkldnn_rnn_layer: _recurrent_layer_flops,
}


@torch.no_grad()
def count_macs(model: nn.Module, example_input: ModelInputs) -> int:
    """Multiply-accumulates of one forward pass on ``example_input`` (the whole batch it holds: one tensor, a tuple
    of them, or tensors by keyword, see :func:`~lightning_compress.batches.call_model`).

    Counted by torch's own ``FlopCounterMode`` (matrix products, convolutions and attention, one MAC = two
    FLOPs), with the fused kernels it does not know counted by their matrix products: the CPU's attention,
    the eval-mode fast paths of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``, and the CPU's
    LSTM (GRU and plain RNN run as matrix products it counts). The model
    runs once in eval mode and every submodule is put back in the mode it had.
    """
    with eval_mode(model), FlopCounterMode(display=False, custom_mapping=_FUSED_KERNELS) as counter:
        call_model(model, example_input)
    return counter.get_total_flops() // 2

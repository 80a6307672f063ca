"""The packaged Hydra configs, shared by the tests of the config groups and of the experiments."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONFIG_DIR = Path(str(files("lightning_compress.configs")))


def options(group: str) -> list[str]:
    """The option names of a config group (its YAML files), sorted."""
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))

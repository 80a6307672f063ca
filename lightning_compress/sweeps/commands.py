"""``lightning-compress-summary <sweep folder>``, and the Hydra callback that runs it when a sweep ends."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lightning_compress.sweeps.summary import write_summary


def summarize(sweep_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the sweep's summary files and print its Markdown table and where the files are."""
    paths = write_summary(sweep_dir)
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(path) for path in paths.values()))
    return paths


class SummarizeSweep(Callback):
    """Hydra callback: the sweep folder's summary is rewritten as each job ends (failed or not), and printed
    when the sweep ends, so a sweep that stops at a failed job still leaves it.

    Example (``configs/hydra/default.yaml`` lists it)::

        hydra:
          callbacks:
            sweep_summary:
              _target_: lightning_compress.sweeps.commands.SummarizeSweep
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_config = HydraConfig.get()
        if hydra_config.mode == RunMode.MULTIRUN:
            write_summary(hydra_config.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize(config.hydra.sweep.dir)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``lightning-compress-summary`` command."""
    parser = argparse.ArgumentParser(
        prog="lightning-compress-summary",
        description="Collect the report of every job of a `lightning-compress -m ...` sweep into summary.csv, summary.md "
        "and pareto.png (accuracy against deployed bytes and against latency) in the sweep folder.",
    )
    parser.add_argument("sweep_dir", help="the sweep folder, e.g. outputs/multirun/2026-11-29_10-00-00")
    args = parser.parse_args(argv)
    try:
        summarize(args.sweep_dir)
    except FileNotFoundError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()

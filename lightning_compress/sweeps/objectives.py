"""What an optimizing sweeper (Optuna) gets from a job: its ``optimized_metrics``, checked before anything trains,
and their values on the job's final model.

A search selects on validation accuracy, never on test accuracy: the trials a search keeps for their test
score did well on the test set partly by chance, so their test score, reported as the result, is optimistic.
The test set stays for reporting the chosen models (the sweep summary shows each job's test accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lightning_compress.analysis import Report
from lightning_compress.sweeps.summary import SELECTION_ACCURACY, check_metrics, stage_metrics


def check_optimized_metrics(cfg: DictConfig) -> None:
    """Raise ``ValueError`` when the job's ``optimized_metrics`` are unknown, select on test accuracy, or cannot be
    measured (they are read from the report of ``callbacks.compression_report``).

    Example:
        >>> from omegaconf import OmegaConf
        >>> check_optimized_metrics(OmegaConf.create({"optimized_metrics": ["test_accuracy", "deployed_bytes"]}))
        Traceback (most recent call last):
        ...
        ValueError: optimized_metrics=[test_accuracy, deployed_bytes]: a search that selects on test_accuracy reports an optimistic test score (the trials it keeps did well on the test set partly by chance); optimize val_accuracy, the accuracy on the validation split: optimized_metrics=[val_accuracy, deployed_bytes]. The sweep summary still shows every job's test accuracy
    """
    names = list(cfg.get("optimized_metrics") or [])
    check_metrics(names)
    if "test_accuracy" in names:
        instead = [SELECTION_ACCURACY if name == "test_accuracy" else name for name in names]
        raise ValueError(
            f"optimized_metrics={_listed(names)}: a search that selects on test_accuracy reports an optimistic test "
            "score (the trials it keeps did well on the test set partly by chance); optimize "
            f"{SELECTION_ACCURACY}, the accuracy on the validation split: optimized_metrics={_listed(instead)}. "
            "The sweep summary still shows every job's test accuracy"
        )
    if names and (cfg.get("callbacks") or {}).get("compression_report") is None:
        raise ValueError(
            f"optimized_metrics {names} are read from the report: keep callbacks.compression_report (callbacks=default)"
        )


def _listed(names: Sequence[str]) -> str:
    """``names`` as written on the command line: ``[a, b]``."""
    return "[" + ", ".join(names) + "]"


class CheckOptimizedMetrics(Callback):
    """Hydra callback: a sweep's ``optimized_metrics`` are checked (:func:`check_optimized_metrics`) before its
    first job starts, so a search that would select on test accuracy stops at once instead of failing every
    trial. It exits (``SystemExit``, status 1): Hydra turns any other exception of a callback into a warning.

    Example (``configs/hydra/default.yaml`` lists it, so every sweep of the app is checked)::

        hydra:
          callbacks:
            optimized_metrics:
              _target_: lightning_compress.sweeps.objectives.CheckOptimizedMetrics
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_optimized_metrics(config)
        except ValueError as error:
            raise SystemExit(str(error)) from None


def objectives(cfg: DictConfig, report: Report | None) -> float | list[float] | None:
    """The ``optimized_metrics`` of the run's final stage, for a sweeper that optimizes them (Optuna):
    one value as a float, several as a list; ``None`` without ``optimized_metrics`` or off rank zero.

    Example:
        >>> import torch
        >>> from omegaconf import OmegaConf
        >>> from lightning_compress.analysis import ReportEntry, profile_model
        >>> profile = profile_model(torch.nn.Linear(4, 2), (4,), latency_batch_sizes=())
        >>> report = Report(entries=[ReportEntry("after", profile, val_accuracy=0.75, test_accuracy=0.5)])
        >>> objectives(OmegaConf.create({"optimized_metrics": ["val_accuracy", "parameters"]}), report)
        [0.75, 10.0]
    """
    names = cfg.get("optimized_metrics")
    if not names or report is None:
        return None
    values = stage_metrics(report.final_trained(), list(names))
    return values[0] if len(values) == 1 else values

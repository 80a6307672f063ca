"""The ``lightning-compress`` command: a Hydra application over ``configs/train.yaml``.

Run it with no arguments to train the default model on the bundled digits dense, pruned, quantized, and
pruned and quantized, with the same epochs and seed, and print the four side by side; override anything
Hydra-style, e.g. ``lightning-compress data=fashion_mnist compression/pruning=taylor_channel50 trainer.max_epochs=8``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write
from torch import nn

from lightning_compress.analysis import Report, ReportEntry
from lightning_compress.callbacks import CompressionReport
from lightning_compress.deploy import FILE_SUFFIXES, check_export_format, export
from lightning_compress.files import write_atomically
from lightning_compress.models import ClassificationModule
from lightning_compress.preflight import (
    check_resume_checkpoint,
    check_settings,
    check_writable,
    local_checkpoint,
    quiet,
)
from lightning_compress.run_folder import RunFolderError, claim_run_folder
from lightning_compress.sweeps.summary import check_metrics, stage_metrics

#: The runs a job with compression recipes can make (the ``runs`` key): the dense reference, each recipe
#: alone, all recipes together.
RUN_KINDS = ("dense", "each", "combined")
#: What ``teacher_run`` may change in the teacher's run (the rest of the job's config is shared).
TEACHER_RUN_KEYS = ("trainer", "data", "seed")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a config node with plain Python lists and dicts as arguments, not OmegaConf containers."""
    return instantiate(node, _convert_="all", **kwargs)


@dataclasses.dataclass
class Run:
    """A finished run: the fitted module, and its ``CompressionReport`` on the global-zero process
    (``None`` elsewhere, since other ranks measure nothing, or when the configuration has no report)."""

    module: L.LightningModule
    reporter: CompressionReport | None

    @property
    def report(self) -> Report | None:
        return self.reporter.report if self.reporter is not None else None


def fit_and_test(
    cfg: DictConfig,
    compression: list[L.Callback],
    wrap: Callable[[ClassificationModule], L.LightningModule] | None = None,
) -> Run:
    """One run: build data, model (passed through ``wrap``), callbacks (``compression`` first), loggers and
    trainer; fit, test, export. With ``export`` set, the final model is written to
    ``output_dir/model.<format>`` (int8 layers where it is quantized).
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = build(cfg.data)
    module: L.LightningModule = build(cfg.model)
    if wrap is not None:
        module = wrap(module)
    callbacks: list[L.Callback] = [*compression, *(build(c) for c in (cfg.get("callbacks") or {}).values())]
    loggers = [build(logger) for logger in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
    )  # no code runs from a checkpoint
    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule)
    if cfg.get("export") and trainer.is_global_zero:
        export(
            module.cpu(),
            Path(cfg.output_dir) / f"model.{FILE_SUFFIXES[cfg.export]}",
            module.example_input_array,
            format=cfg.export,
        )
    reporter = next((callback for callback in callbacks if isinstance(callback, CompressionReport)), None)
    return Run(module, reporter if reporter is not None and trainer.is_global_zero else None)


def train(cfg: DictConfig) -> Report | None:
    """The main job. Without compression: one run, reported before and after fit. With compression recipes:
    the ``runs`` (a subset of :data:`RUN_KINDS`) with the same epochs and seed, each in its own folder
    under ``output_dir``: ``dense``, ``each`` recipe alone, and all recipes ``combined``, named like
    ``pruning+quantization``; one report with a row for each, and the dense model in ``half_precision`` too. A distillation recipe first
    trains the ``teacher`` (in ``output_dir/teacher``, a row of the report) and wraps the model in its
    ``DistillationModule`` (``teacher_run`` changes the teacher's trainer, data or seed, e.g. a teacher
    trained longer on all training images); pruning and quantization recipes are callbacks. ``ckpt_path`` resumes the
    last run; the others, seeded and deterministic in their data order, are trained again.

    Every setting is checked before the first run trains (:mod:`lightning_compress.preflight`): the
    trainer's and the seed, each recipe set up on the model, and ``ckpt_path`` against the last run's model.
    The job holds ``output_dir`` while it runs (:func:`~lightning_compress.run_folder.claim_run_folder`): a
    folder that another live run holds, or that holds a finished run (unless resuming or ``overwrite``), is refused.
    """
    if cfg.get("export"):
        check_export_format(cfg.export)
    _check_optimized_metrics(cfg)
    check_settings(cfg)
    recipes = {name: node for name, node in (cfg.get("compression") or {}).items() if node is not None}
    for node in recipes.values():
        build(node)  # each recipe checks its settings now, before the first run trains; each run builds its own
    if "distillation" in recipes and cfg.get("teacher") is None:
        raise ValueError(
            "compression/distillation needs a teacher: choose one with model/teacher=<name> (e.g. small_cnn_wide)"
        )
    teacher_cfg = _teacher_config(cfg) if "distillation" in recipes else None
    if teacher_cfg is not None:
        check_settings(teacher_cfg, key_prefix="teacher_run.")
    phases = _phases(list(RUN_KINDS if cfg.get("runs") is None else cfg.runs), list(recipes)) if recipes else {"": []}
    final_module = _check_phases_on_model(cfg, recipes, phases)
    resuming = cfg.get("ckpt_path") is not None
    check_writable(cfg.output_dir, "output_dir")
    with claim_run_folder(cfg.output_dir, resuming=resuming, overwrite=bool(cfg.get("overwrite"))):
        if resuming:
            cfg.ckpt_path = local_checkpoint(str(cfg.ckpt_path), Path(cfg.output_dir))
            if not cfg.trainer.get("fast_dev_run"):
                check_resume_checkpoint(cfg.ckpt_path, final_module, cfg.trainer.max_epochs)
        return _run_phases(cfg, recipes, phases, teacher_cfg)


def _run_phases(
    cfg: DictConfig, recipes: dict[str, DictConfig], phases: dict[str, list[str]], teacher_cfg: DictConfig | None
) -> Report | None:
    """Train the teacher (with distillation), then each run of ``phases``; one report of them all."""
    if not recipes:
        report = fit_and_test(cfg, []).report
        if report is not None:
            report.print()
        return report
    runs = {}
    if teacher_cfg is not None:
        runs["teacher"] = _phase(teacher_cfg, "teacher", [], resume=False)
    for index, (name, names) in enumerate(phases.items()):
        callbacks = [build(recipes[recipe]) for recipe in names if recipe != "distillation"]
        wrap = (
            partial(_distill, recipes["distillation"], runs["teacher"].module.model)
            if "distillation" in names
            else None
        )
        runs[name] = _phase(cfg, name, callbacks, resume=index == len(phases) - 1, wrap=wrap, dense=not names)
    if any(run.report is None for run in runs.values()):
        return None
    stages = {name: (run.report.entry("after"), run.reporter.models.get("after")) for name, run in runs.items()}
    if "dense" in runs:
        dense = runs["dense"].reporter
        half = {
            f"dense {entry.name}": (entry, dense.models.get(entry.name))
            for entry in dense.report.entries
            if entry.name not in ("before", "after")
        }
        stages = {"dense": stages.pop("dense"), **half, **stages}  # dense first: the reference of the ratios
    else:  # the untrained model is the reference of the ratios: the dense model's size, MACs and latency
        first = runs[next(iter(phases))].reporter
        stages = {"before": (first.report.entry("before"), first.models.get("before")), **stages}
    entries = [dataclasses.replace(entry, name=name) for name, (entry, _) in stages.items()]
    _time_together(entries, {name: model for name, (_, model) in stages.items()}, list(runs.values())[-1].reporter)
    report = Report(entries=entries, metadata=list(runs.values())[-1].report.metadata)
    report.write(cfg.output_dir)
    report.print()
    return report


def _time_together(
    entries: list[ReportEntry], models: dict[str, nn.Module | None], reporter: CompressionReport
) -> None:
    """Give each entry the latency of its model timed with all the others, in ``reporter``'s interleaved
    rounds, each in the runtime and on the device it was measured on: runs timed one after another saw
    different noise. An entry without its model, or whose model has moved (``export`` moves it to the
    CPU), keeps its run's timing."""
    timed = {}
    for entry in entries:
        model, measured = models[entry.name], next(iter(entry.profile.latency.values()), None)
        if model is not None and measured is not None and str(next(model.parameters()).device) == measured.device:
            timed[entry.name] = (model, measured.runtime)
    if len(timed) < 2:
        return
    results = reporter.time_stages(
        {name: model for name, (model, _) in timed.items()}, {name: runtime for name, (_, runtime) in timed.items()}
    )
    for entry in entries:
        if entry.name in results:
            entry.profile = dataclasses.replace(entry.profile, latency=results[entry.name].latency)


def _check_phases_on_model(
    cfg: DictConfig, recipes: dict[str, DictConfig], phases: dict[str, list[str]]
) -> L.LightningModule:
    """Set every run's compression callbacks up on a model and a Trainer of its own, as the run will (targets,
    N:M shapes, channel groups, distillation hints, the order of pruning and clustering), before any run
    trains; return the last run's model, set up."""
    with quiet():
        teacher = build(cfg.teacher).model if "distillation" in recipes else None
        for names in phases.values():
            module: L.LightningModule = build(cfg.model)
            if "distillation" in names:
                with _named_recipe("distillation"):
                    module = _distill(recipes["distillation"], teacher, module)
            callbacks = {name: build(recipes[name]) for name in names if name != "distillation"}
            trainer: L.Trainer = build(cfg.trainer, callbacks=list(callbacks.values()), logger=False)
            for name, callback in callbacks.items():
                with _named_recipe(name):
                    callback.setup(trainer, module, "fit")
            for (
                name,
                callback,
            ) in callbacks.items():  # the checks that need every callback set up (clustering after pruning)
                with _named_recipe(name):
                    callback.on_fit_start(trainer, module)
    return module


@contextlib.contextmanager
def _named_recipe(name: str) -> Iterator[None]:
    """A recipe's ``ValueError`` with the recipe's config group in front: ``compression/<name>: ...``."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"compression/{name}: {error}") from error


def _teacher_config(cfg: DictConfig) -> DictConfig:
    """The teacher's run: the job's ``cfg`` with the ``teacher`` as its model and ``teacher_run``'s changes."""
    changes = cfg.get("teacher_run") or {}
    unknown = [key for key in changes if key not in TEACHER_RUN_KEYS]
    if unknown:
        raise ValueError(
            f"teacher_run: unknown key(s) {unknown}; it changes the teacher's {', '.join(TEACHER_RUN_KEYS)}"
        )
    teacher_cfg = OmegaConf.merge(cfg, changes)
    teacher_cfg.model = cfg.teacher
    return teacher_cfg


def _check_optimized_metrics(cfg: DictConfig) -> None:
    """The ``optimized_metrics`` are known and the run will measure them: a report, and a test for test accuracy."""
    names = list(cfg.get("optimized_metrics") or [])
    check_metrics(names)
    if names and (cfg.get("callbacks") or {}).get("compression_report") is None:
        raise ValueError(
            f"optimized_metrics {names} are read from the report: keep callbacks.compression_report (callbacks=default)"
        )
    if "test_accuracy" in names and not cfg.get("test"):
        raise ValueError(
            "optimized_metrics has test_accuracy, but test=false skips the test; use val_accuracy or test=true"
        )


def _phases(kinds: list[str], recipes: list[str]) -> dict[str, list[str]]:
    """The runs of a job with compression ``recipes``, by folder name, each with the recipes it applies."""
    unknown = [kind for kind in kinds if kind not in RUN_KINDS]
    if unknown or not kinds:
        problem = f"unknown kind(s) {unknown}" if unknown else "no run named"
        raise ValueError(f"runs: {problem}; choose from {', '.join(RUN_KINDS)}")
    phases: dict[str, list[str]] = {"dense": []} if "dense" in kinds else {}
    if "each" in kinds:
        phases.update({name: [name] for name in recipes})
    if "combined" in kinds:
        phases["+".join(recipes)] = list(recipes)
    return phases


def _distill(recipe: DictConfig, teacher: nn.Module, module: ClassificationModule) -> L.LightningModule:
    """The student ``module``'s network, data settings and optimizer in the recipe's ``DistillationModule``."""
    return build(recipe)(
        student=module.model,
        teacher=teacher,
        num_classes=module.hparams.num_classes,
        input_shape=module.hparams.input_shape,
        label_smoothing=module.hparams.label_smoothing,
        optimizer=module.optimizer_factory,
        scheduler=module.scheduler_factory,
    )


def _phase(
    cfg: DictConfig,
    name: str,
    compression: list[L.Callback],
    resume: bool,
    wrap: Callable[[ClassificationModule], L.LightningModule] | None = None,
    dense: bool = False,
) -> Run:
    """Run ``cfg`` with its outputs in ``output_dir/name``, resuming from ``ckpt_path`` only when ``resume``;
    the ``dense`` run's report adds the model in ``half_precision``."""
    phase = cfg.copy()
    phase.output_dir = str(Path(cfg.output_dir) / name)
    report = (phase.get("callbacks") or {}).get("compression_report")
    if report is not None and dense:
        report.half_precision = cfg.get("half_precision")
    if not resume:
        phase.ckpt_path = None
    return fit_and_test(phase, compression, wrap)


def objectives(cfg: DictConfig, report: Report | None) -> float | list[float] | None:
    """The ``optimized_metrics`` of the run's final stage, for a sweeper that optimizes them (Optuna):
    one value as a float, several as a list; ``None`` without ``optimized_metrics`` or off rank zero."""
    names = cfg.get("optimized_metrics")
    if not names or report is None:
        return None
    values = stage_metrics(report.entries[-1], list(names))
    return values[0] if len(values) == 1 else values


def _record_failure(output_dir: str, error: BaseException) -> None:
    """Write ``failure.json`` (type, message, traceback) into the run folder, where a sweep summary finds it."""
    failure = {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
    path = Path(output_dir) / "failure.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(failure, indent=2) + "\n"))


@contextlib.contextmanager
def _one_job_of_a_sweep() -> Iterator[None]:
    """In a sweep, let this job train with DDP as a run would, and leave the process clean for the next job.

    Lightning's DDP launcher starts each further rank with this process's command line plus
    ``hydra.run.dir``: in a sweep that command line is the whole sweep (``-m`` and every value), so each
    rank would run every job (Optuna's would even sample values of their own) in a folder of its own.
    Here the command line becomes this job's own overrides and the run folder this job's folder. When the
    job ends, the process group and the launcher's environment variables go, so that the next job in
    this process starts its own processes instead of waiting for the last job's.
    """
    hydra_config = HydraConfig.get()
    if hydra_config.mode != RunMode.MULTIRUN:
        yield
        return
    argv, environment = sys.argv, dict(os.environ)
    sys.argv = [sys.argv[0], *hydra_config.overrides.task, "hydra.mode=RUN"]  # an hparams_search config sets MULTIRUN
    with read_write(hydra_config):
        hydra_config.run.dir = hydra_config.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)


@hydra.main(version_base="1.3", config_path="pkg://lightning_compress.configs", config_name="train")
def main(cfg: DictConfig) -> float | list[float] | None:
    for exporter in ("onnx_ir", "onnxscript"):  # the ONNX exporter reports each pass at INFO
        logging.getLogger(exporter).setLevel(logging.WARNING)
    with _one_job_of_a_sweep():
        try:
            return objectives(cfg, train(cfg))
        except RunFolderError:
            raise  # the folder is another run's: write nothing into it
        except Exception as error:
            _record_failure(cfg.output_dir, error)
            raise


if __name__ == "__main__":
    main()

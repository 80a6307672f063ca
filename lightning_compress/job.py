"""The main job: every setting checked, its runs planned (dense, each recipe alone, all combined, the teacher
first), each trained in its own folder, and their reports merged into one, timed together."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_compress.analysis import Report, ReportEntry
from lightning_compress.auto import AutoCompression
from lightning_compress.auto.search_report import search_summary, write_search
from lightning_compress.callbacks import CompressionReport
from lightning_compress.deploy import check_export_format
from lightning_compress.distributed import job_processes
from lightning_compress.models import ClassificationModule
from lightning_compress.preflight import (
    check_resume_checkpoint,
    check_settings,
    check_writable,
    local_checkpoint,
    quiet,
)
from lightning_compress.run import Run, build, fit_and_test, run_in_folder
from lightning_compress.run_folder import claim_run_folder
from lightning_compress.sweeps.objectives import check_optimized_metrics

#: What the ``runs`` key of a job with compression recipes may list: the dense reference, a run of ``each``
#: recipe alone, and the run of all recipes ``combined``.
RUNS = ("dense", "each", "combined")
#: What ``teacher_run`` may change in the teacher's run (the rest of the job's config is shared).
TEACHER_RUN_KEYS = ("trainer", "data", "seed")


def train(cfg: DictConfig, continue_interrupted: bool = False) -> Report | None:
    """The main job. Without compression: one run, reported before and after fit. With compression recipes:
    the ``runs`` (a subset of :data:`RUNS`) with the same epochs and seed, each in its own folder
    under ``output_dir``: ``dense``, ``each`` recipe alone, and all recipes ``combined``, named like
    ``pruning+quantization``; one report with a row for each, and the dense model in ``half_precision`` too.
    A distillation recipe first trains the ``teacher`` (in ``output_dir/teacher``, a row of the report) and
    wraps the model in its ``DistillationModule`` (``teacher_run`` changes the teacher's trainer, data or
    seed, e.g. a teacher trained longer on all training images); pruning and quantization recipes are
    callbacks. ``compression=auto`` (alone) runs ``AutoCompression`` from the dense run's trained weights and
    writes its levels and plan beside the report (``auto_compression.md`` and ``.png``). ``ckpt_path`` resumes the last run; the others, seeded and deterministic in their data
    order, are trained again.

    Every setting is checked before the first run trains (:mod:`lightning_compress.preflight`): the
    trainer's and the seed, each recipe set up on the model, ``ckpt_path`` against the last run's model, and the
    ``optimized_metrics`` a search selects on (:func:`~lightning_compress.sweeps.objectives.check_optimized_metrics`:
    never test accuracy).
    The job holds ``output_dir`` while it runs (:func:`~lightning_compress.run_folder.claim_run_folder`), claimed
    before anything slow: a folder that another live run holds, or that holds a finished run (unless resuming or
    ``overwrite``), is refused. ``continue_interrupted`` (a sweep job run again) resumes the job's last run from its
    ``last.ckpt`` where it has one, and otherwise starts the job over in its folder.
    """
    if cfg.get("export"):
        check_export_format(cfg.export)
    check_optimized_metrics(cfg)
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
    runs = plan_runs(list(RUNS if cfg.get("runs") is None else cfg.runs), list(recipes)) if recipes else {"": []}
    if "auto" in recipes:
        _check_auto(list(recipes), runs)
    resuming = cfg.get("ckpt_path") is not None
    if continue_interrupted and not resuming:
        last = Path(cfg.output_dir) / list(runs)[-1] / "checkpoints" / "last.ckpt"
        resuming = last.is_file()
        cfg.ckpt_path = str(last) if resuming else None
    created = not Path(cfg.output_dir).exists()
    check_writable(cfg.output_dir, "output_dir")
    try:
        # claimed before anything slow (the models the checks build): a folder another run holds fails at once
        with claim_run_folder(
            cfg.output_dir, resuming=resuming, overwrite=bool(cfg.get("overwrite")) or continue_interrupted
        ):
            final_module = _check_runs_on_model(cfg, recipes, runs)
            if resuming:
                cfg.ckpt_path = local_checkpoint(str(cfg.ckpt_path), Path(cfg.output_dir))
                if not cfg.trainer.get("fast_dev_run"):
                    check_resume_checkpoint(cfg.ckpt_path, final_module, cfg.trainer.max_epochs)
            return _train_runs(cfg, recipes, runs, teacher_cfg)
    except BaseException:
        if created:  # a job refused before it wrote anything leaves no folder behind
            with contextlib.suppress(OSError):
                Path(cfg.output_dir).rmdir()
        raise


def plan_runs(selected: list[str], recipes: list[str]) -> dict[str, list[str]]:
    """The runs of a job with compression ``recipes`` that the ``selected`` values of :data:`RUNS` name, by
    folder name, each with the recipes it applies.

    Example:
        >>> plan_runs(["dense", "each", "combined"], ["pruning", "quantization"])
        {'dense': [], 'pruning': ['pruning'], 'quantization': ['quantization'], 'pruning+quantization': ['pruning', 'quantization']}
    """
    unknown = [value for value in selected if value not in RUNS]
    if unknown or not selected:
        problem = f"unknown run(s) {unknown}" if unknown else "no run named"
        raise ValueError(f"runs: {problem}; choose from {', '.join(RUNS)}")
    runs: dict[str, list[str]] = {"dense": []} if "dense" in selected else {}
    if "each" in selected:
        runs.update({name: [name] for name in recipes})
    if "combined" in selected:
        runs["+".join(recipes)] = list(recipes)
    return runs


def _train_runs(
    cfg: DictConfig, recipes: dict[str, DictConfig], runs: dict[str, list[str]], teacher_cfg: DictConfig | None
) -> Report | None:
    """Train the teacher (with distillation), then each of the planned ``runs``, and end the job's process
    group; one report of them all."""
    finished: dict[str, Run] = {}
    searches: dict[str, AutoCompression] = {}  # by run name, the AutoCompression whose search it ran
    with job_processes() as launched:

        def record(name: str, run: Run) -> None:
            finished[name] = run
            launched.extend(run.launched)

        if not recipes:
            record("", fit_and_test(cfg, []))
        if teacher_cfg is not None:
            record("teacher", run_in_folder(teacher_cfg, "teacher", [], resume=False))
        for index, (name, names) in enumerate(runs.items() if recipes else ()):
            callbacks = [build(recipes[recipe]) for recipe in names if recipe != "distillation"]
            wrap = None
            if "distillation" in names:
                wrap = partial(_distill, recipes["distillation"], finished["teacher"].module.model)
            elif "auto" in names:
                wrap = partial(_from_weights, finished["dense"].module)
            resume = index == len(runs) - 1
            record(name, run_in_folder(cfg, name, callbacks, resume=resume, wrap=wrap, dense=not names))
            searches.update({name: callback for callback in callbacks if isinstance(callback, AutoCompression)})
    report = merged_report(finished, first_planned=next(iter(runs))) if recipes else finished[""].report
    if report is not None:
        for name, auto in searches.items():
            report.entry(name).note = f"{search_summary(auto)}; its levels and plan in auto_compression.md"
            write_search(auto, cfg.output_dir)
        if recipes:
            report.write(cfg.output_dir)
        report.print()
    return report


def merged_report(finished: dict[str, Run], first_planned: str) -> Report | None:
    """One report of the ``finished`` runs, a row for each run's final model, every model timed together;
    ``None`` off the global-zero process. Its reference, first, is the dense run with its half-precision
    rows, or without one the untrained model of the ``first_planned`` run."""
    if any(run.report is None for run in finished.values()):
        return None
    stages = {name: (run.report.entry("after"), run.reporter.models.get("after")) for name, run in finished.items()}
    if "dense" in finished:
        dense = finished["dense"].reporter
        half = {
            f"dense {entry.name}": (dataclasses.replace(entry, derived_from="dense"), dense.models.get(entry.name))
            for entry in dense.report.entries
            if entry.name not in ("before", "after")
        }
        stages = {"dense": stages.pop("dense"), **half, **stages}  # dense first: the reference of the ratios
    else:  # the untrained model is the reference of the ratios: the dense model's size, MACs and latency
        first = finished[first_planned].reporter
        stages = {"before": (first.report.entry("before"), first.models.get("before")), **stages}
    entries = [dataclasses.replace(entry, name=name) for name, (entry, _) in stages.items()]
    last = list(finished.values())[-1]
    _time_together(entries, {name: model for name, (_, model) in stages.items()}, last.reporter)
    return Report(entries=entries, metadata=last.report.metadata)


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


def _check_runs_on_model(
    cfg: DictConfig, recipes: dict[str, DictConfig], runs: dict[str, list[str]]
) -> L.LightningModule:
    """Set every run's compression callbacks up on a model and a Trainer of its own, as the run will (targets,
    N:M shapes, channel groups, distillation hints, the order of pruning and clustering), before any run
    trains; return the last run's model, set up."""
    with quiet():
        teacher = build(cfg.teacher).model if "distillation" in recipes else None
        for names in runs.values():
            module: L.LightningModule = build(cfg.model)
            if "distillation" in names:
                with _named_recipe("distillation"):
                    module = _distill(recipes["distillation"], teacher, module)
            callbacks = {name: build(recipes[name]) for name in names if name != "distillation"}
            trainer: L.Trainer = build(cfg.trainer, callbacks=list(callbacks.values()), logger=False)
            for name, callback in callbacks.items():
                with _named_recipe(name):
                    callback.setup(trainer, module, "fit")
            for name, callback in callbacks.items():  # the checks that need every callback set up
                with _named_recipe(name):
                    callback.on_fit_start(trainer, module)
    return module


def _check_auto(recipes: list[str], runs: dict[str, list[str]]) -> None:
    """``compression=auto`` chooses its own plan from the dense run's weights: alone, after a ``dense`` run."""
    others = [name for name in recipes if name != "auto"]
    if others:
        raise ValueError(
            f"compression/auto chooses every layer's pruning and shared values itself: leave out {others} "
            f"({' '.join(f'~compression/{name}' for name in others)})"
        )
    if "dense" not in runs:
        raise ValueError(
            f"compression/auto starts from the dense run's trained weights: keep dense in runs, got {list(runs)}"
        )


def _from_weights(trained: L.LightningModule, module: L.LightningModule) -> L.LightningModule:
    """``module`` with ``trained``'s weights: AutoCompression starts from the dense run's model."""
    module.load_state_dict(trained.state_dict())
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


def _distill(recipe: DictConfig, teacher: nn.Module, module: ClassificationModule) -> L.LightningModule:
    """The student ``module``'s network, data settings and optimizer in the recipe's ``DistillationModule``."""
    return build(recipe)(
        student=module.model,
        teacher=teacher,
        num_classes=module.hparams.num_classes,
        input_shape=module.hparams.input_shape,
        input_dtype=module.hparams.input_dtype,
        label_smoothing=module.hparams.label_smoothing,
        optimizer=module.optimizer_factory,
        scheduler=module.scheduler_factory,
    )

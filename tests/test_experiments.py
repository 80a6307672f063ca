from __future__ import annotations

import csv

import pytest
import yaml
from commands import QUICK_REPORT, run_command
from config_groups import CONFIG_DIR, options, sample_text_overrides

from lightning_compress.job import train

# One batch of everything; a report without latency and compressed size (ONNX export, timing and xz of dense
# float weights dominate for ResNets); no ONNX file.
FAST = [
    "trainer.fast_dev_run=true",
    "callbacks.compression_report.latency_batch_sizes=[]",
    "callbacks.compression_report.compressed_size=false",
    "callbacks.compression_report.latency_runtime=torch",
    "logger=none",
    "export=null",
]


def test_the_groups_hold_the_experiments_and_searches() -> None:
    assert options("experiment") == [
        "deep_compression",
        "digits_resnet18",
        "distill_fashion_mnist",
        "fashion_mnist_cnn",
        "fashion_mnist_pruning",
        "fashion_mnist_quantization",
        "minilm_compress",
        "minilm_distill",
        "minilm_int8",
        "minilm_prune_heads",
        "resnet_pipeline",
        "vit_fashion_mnist",
    ]
    assert options("hparams_search") == ["prune_quantize", "prune_quantize_distill"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs_with_fast_dev_run(compose_config, fake_fashion_idx, tmp_path, experiment: str) -> None:
    overrides = [
        f"experiment={experiment}",
        *FAST,
        "runs=[combined]",
        f"output_dir={tmp_path / 'run'}",
    ]  # all recipes in one run
    composed = compose_config(*overrides)
    data = composed.data._target_
    if data.endswith("WordNetSupersensesDataModule"):  # the bundled glosses, the tiny BERT for MiniLM
        overrides += [*sample_text_overrides(tmp_path), "model=bert_tiny", "model/teacher=bert_tiny"]
        if (composed.compression.get("distillation") or {}).get("layer_map") is not None:  # 2 layers, not 3 of 6
            overrides += ["~compression.distillation.layer_map", "+compression.distillation.layer_map={0:0,1:1,2:2}"]
    if data.endswith("FashionMNISTDataModule"):
        idx_dir, _ = fake_fashion_idx(
            False
        )  # 24 made-up images in Fashion-MNIST's files, so no download or package is needed
        overrides += [
            f"data.idx_dir={idx_dir}",
            f"data.root={tmp_path / 'data'}",
            "data.batch_size=8",
            "data.train_samples=null",
        ]
    cfg = compose_config(*overrides)
    report = train(cfg)
    recipes = [name for name, node in (cfg.get("compression") or {}).items() if node is not None]
    expected = (
        ["before", *(["teacher"] if "distillation" in recipes else []), "+".join(recipes)]
        if recipes
        else ["before", "after"]
    )
    assert [entry.name for entry in report.entries] == expected
    assert all(entry.test_accuracy is not None for entry in report.entries[1:])


def test_the_pipeline_is_teacher_resnet50_student_resnet18_taylor_int8_and_kd(compose_config, tmp_path) -> None:
    cfg = compose_config("experiment=resnet_pipeline", f"output_dir={tmp_path}")
    assert (cfg.teacher.model.arch, cfg.model.model.arch, cfg.model.model.small_input) == ("resnet50", "resnet18", True)
    assert (
        cfg.compression.pruning.criterion,
        cfg.compression.pruning.amount,
        cfg.compression.pruning.remove_channels,
    ) == ("taylor", 0.5, True)
    assert (cfg.compression.quantization.weight_bits, cfg.compression.quantization.activation_bits) == (8, 8)
    assert (cfg.compression.distillation.ce_weight, cfg.compression.distillation.kd_weight) == (0.5, 0.5)
    assert cfg.data._target_.endswith("DigitsDataModule") and list(cfg.runs) == ["dense", "each", "combined"]


@pytest.mark.parametrize("search", options("hparams_search"))
def test_every_search_runs_two_optuna_trials_and_summarizes_them(tmp_path, search: str) -> None:
    sweep = tmp_path / "sweep"
    done = run_command(
        "lightning-compress",
        f"hparams_search={search}",
        "hydra/launcher=joblib",  # the two trials in parallel
        "hydra.sweeper.n_jobs=2",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.population_size=2",
        "trainer.fast_dev_run=true",
        "export=null",
        *QUICK_REPORT,
        "callbacks.compression_report.latency_runtime=torch",  # no ONNX export: deployed bytes are the state dict's
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    with (sweep / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["job"], row["status"]) for row in rows] == [("0", "completed"), ("1", "completed")]
    assert {row["stage"] for row in rows} == {"pruning+quantization" + ("+distillation" if "distill" in search else "")}
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    metrics = yaml.safe_load((CONFIG_DIR / "hparams_search" / f"{search}.yaml").read_text())["optimized_metrics"]
    front = {tuple(solution["values"]) for solution in results["solutions"]}
    trials = {tuple(float(row[name]) for name in metrics) for row in rows}
    assert front and front <= trials  # Optuna's front holds the values the jobs returned
    assert {
        tuple(float(row[name]) for name in metrics)
        for row in rows
        if row["pareto_bytes" if "bytes" in metrics[1] else "pareto_latency"] == "True"
    } == front
    assert "Number of Pareto solutions" in done.stdout + done.stderr
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr

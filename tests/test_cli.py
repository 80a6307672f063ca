from __future__ import annotations

import csv
import json
import sys

import onnx
import pytest
import torch
from commands import EAGER_QUICK_REPORT, run_command
from hydra import compose
from hydra.utils import instantiate
from onnx import numpy_helper

from lightning_compress import load_compressed
from lightning_compress.job import train
from lightning_compress.quantization.layers import QuantizedLayer


def test_default_app_runs_with_fast_dev_run_and_writes_the_report(compose_config, tmp_path, timed_together) -> None:
    # latency in eager torch: no ONNX export inside the report (each run still writes its model.onnx)
    cfg = compose_config(
        "trainer.fast_dev_run=true",
        f"output_dir={tmp_path}",
        *EAGER_QUICK_REPORT,
    )
    report = train(cfg)
    assert [entry.name for entry in report.entries] == [
        "dense",
        "dense bfloat16",
        "pruning",
        "quantization",
        "pruning+quantization",
    ]
    # each run times its stages together at its end, and the job all of its stages together at its end
    names = [names for names, _ in timed_together]
    assert names[-1] == [entry.name for entry in report.entries]
    assert ["before", "after", "bfloat16"] in names and names.count(["before", "after"]) == 3
    assert [entry.test_accuracy is not None for entry in report.entries] == [True, False, True, True, True]
    assert all(entry.profile.compressed_bytes > 0 for entry in report.entries)  # every stage's compressed file
    stages = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert [stage["test_accuracy"] for stage in stages] == [entry.test_accuracy for entry in report.entries]
    assert (tmp_path / "report.md").read_text() == report.to_markdown()
    assert (tmp_path / "report.png").stat().st_size > 0
    expected = {
        "dense": ["before", "after", "bfloat16"],
        **{phase: ["before", "after"] for phase in ("pruning", "quantization", "pruning+quantization")},
    }
    for phase, names in expected.items():  # each run keeps its own report, and its model for deployment
        assert [s["name"] for s in json.loads((tmp_path / phase / "report.json").read_text())["stages"]] == names
        assert (tmp_path / phase / "model.onnx").stat().st_size > 0


def test_without_compression_the_app_reports_before_and_after_one_fit(compose_config, tmp_path) -> None:
    cfg = compose_config(
        "~compression/pruning",
        "~compression/quantization",
        "trainer.fast_dev_run=true",
        "export=null",
        f"output_dir={tmp_path}",
        *EAGER_QUICK_REPORT,
    )
    report = train(cfg)
    assert [entry.name for entry in report.entries] == ["before", "after"]
    assert not (tmp_path / "dense").exists()


def test_default_pruning_recipe_reaches_its_sparsity(compose_config, tmp_path) -> None:
    cfg = compose_config(
        "trainer.max_epochs=3",
        "~compression/quantization",
        "runs=[each]",
        "export=null",
        f"output_dir={tmp_path}",
        *EAGER_QUICK_REPORT,
    )
    before, pruned = train(cfg).entries  # without a dense run, the untrained model is the reference
    assert (before.name, pruned.name) == ("before", "pruning")
    assert before.profile.weight_sparsity.zeros == 0
    stats = pruned.profile.weight_sparsity
    assert stats.zeros >= round(0.9 * stats.total)  # agp90: 90% of the Conv/Linear weights, each counted once
    assert pruned.test_accuracy > 0.8
    checkpoints = {
        path.name: torch.load(path, weights_only=True)["epoch"]
        for path in (tmp_path / "pruning" / "checkpoints").iterdir()
    }
    assert checkpoints.pop("last.ckpt") == 2  # the last epoch
    assert [epoch >= 1 for epoch in checkpoints.values()] == [
        True
    ]  # the best, among the epochs after the last pruning step (1)


def test_channel_recipe_shrinks_the_model(compose_config, tmp_path) -> None:
    cfg = compose_config(
        "compression/pruning=taylor_channel50",
        "~compression/quantization",
        "runs=[each]",
        "trainer.max_epochs=3",
        f"output_dir={tmp_path}",
        *EAGER_QUICK_REPORT,  # the shrunk model's one ONNX export: its model.onnx
    )
    dense, pruned = train(cfg).entries  # the untrained dense model ("before") is the reference
    assert pruned.name == "pruning"
    assert pruned.profile.parameters < 0.3 * dense.profile.parameters
    assert pruned.profile.macs < 0.3 * dense.profile.macs


def test_pruned_and_quantized_together_keep_zeros_in_the_int8_artifact(compose_config, tmp_path) -> None:
    cfg = compose_config(
        "half_precision=null",
        "trainer.max_epochs=3",
        "compression.quantization.start_epoch=1",
        "compression.quantization.freeze_observers_epoch=2",
        "compression.quantization.freeze_bn_epoch=2",
        f"output_dir={tmp_path}",
        "callbacks.compression_report.latency_batch_sizes=[1]",
        "callbacks.compression_report.latency_repeats=2",
    )
    dense, pruned, quantized, both = train(cfg).entries
    assert [entry.name for entry in (pruned, quantized, both)] == ["pruning", "quantization", "pruning+quantization"]
    assert quantized.profile.onnx_bytes < 0.4 * dense.profile.onnx_bytes  # int8 weights in the ONNX graph
    assert (
        both.profile.weight_sparsity.zeros == pruned.profile.weight_sparsity.zeros
    )  # masks enforced under fake quantization
    assert quantized.test_accuracy > dense.test_accuracy - 0.05
    assert both.test_accuracy > 0.7  # 90% pruned at once and quantized at once, two epochs to recover
    graph = onnx.load(tmp_path / "pruning+quantization" / "model.onnx")
    integers = [numpy_helper.to_array(t) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    zeros = sum(int((array == 0).sum()) for array in integers)
    assert zeros >= both.profile.weight_sparsity.zeros  # every pruned weight is an int8 zero


def test_distillation_trains_the_teacher_then_the_student_in_one_command(compose_config, tmp_path) -> None:
    cfg = compose_config(
        "+compression/distillation=kd",
        "~compression/pruning",
        "~compression/quantization",
        "half_precision=null",
        "trainer.max_epochs=2",
        "data.train_samples=640",
        "teacher_run={trainer: {max_epochs: 3}, data: {train_samples: null}}",  # longer, on all 1,294 training images
        f"output_dir={tmp_path}",
        *EAGER_QUICK_REPORT,  # each run's one ONNX export: its model.onnx
    )
    dense, teacher, distilled = train(cfg).entries
    assert [dense.name, teacher.name, distilled.name] == ["dense", "teacher", "distillation"]
    assert teacher.profile.parameters > 3 * dense.profile.parameters == 3 * distilled.profile.parameters
    assert distilled.test_accuracy > 0.7  # two epochs of 640 images
    steps = {
        run: torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        for run in ("teacher", "distillation")
    }
    assert steps == {
        "teacher": 3 * 21,
        "distillation": 2 * 10,
    }  # batches of 64: 21 per epoch of 1,294 images, 10 of 640
    checkpoint = torch.load(tmp_path / "distillation" / "checkpoints" / "last.ckpt", weights_only=True)
    assert {key.split(".")[0] for key in checkpoint["state_dict"]} == {"model"}  # the student only
    with pytest.raises(ValueError, match="compression/distillation needs a teacher"):
        train(compose_config("+compression/distillation=kd", "~model/teacher", f"output_dir={tmp_path}"))
    with pytest.raises(
        ValueError, match=r"teacher_run: unknown key\(s\) \['model'\]; it changes the teacher's trainer, data, seed"
    ):
        train(
            compose_config(
                "+compression/distillation=kd",
                "teacher_run={model: {num_classes: 3}}",
                f"output_dir={tmp_path / 'refused'}",
            )
        )
    assert not (tmp_path / "refused").exists()


def test_an_unknown_export_format_stops_before_training(compose_config, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown export format 'tflite'; use one of onnx, torch"):
        train(compose_config("export=tflite", f"output_dir={tmp_path}"))
    assert not (tmp_path / "dense").exists()


def test_a_resumed_run_continues_from_its_last_checkpoint(compose_config, tmp_path) -> None:
    common = [
        "~compression/pruning",
        "~compression/quantization",
        "export=null",
        f"output_dir={tmp_path}",
        *EAGER_QUICK_REPORT,
        "test=false",
    ]
    first = train(compose_config("trainer.max_epochs=1", *common))
    resumed = train(compose_config("trainer.max_epochs=2", f"ckpt_path={tmp_path}/checkpoints/last.ckpt", *common))
    before, first_before = resumed.entry("before"), first.entry("before")
    # the same stage; its latency is the one timed when the first fit started (its model is gone), and it says so
    assert before.val_accuracy == first_before.val_accuracy and before.profile.to_dict() | {
        "latency": None
    } == first_before.profile.to_dict() | {"latency": None}
    assert before.note.endswith("the run resumed")
    with open(tmp_path / "csv" / "version_1" / "metrics.csv") as handle:
        epochs = {row["epoch"] for row in csv.DictReader(handle) if row["train/loss_epoch"]}
    assert epochs == {"1"}  # the resumed run trained epoch 1 only


def test_console_script_prints_the_report(tmp_path) -> None:
    done = run_command(
        "lightning-compress",
        "trainer.fast_dev_run=true",
        "runs=[combined]",  # one run of the default recipes (the default runs are tested in-process above)
        *EAGER_QUICK_REPORT,  # the run's model.onnx is the one ONNX export
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "Compression report" in done.stdout and "pruning" in done.stdout and "quantization" in done.stdout
    assert (tmp_path / "run" / "report.json").is_file()
    assert "onnx_ir" not in done.stdout + done.stderr  # the exporter's pass-by-pass log stays quiet


def test_python_dash_m_reports_a_typo_as_hydras_error(tmp_path) -> None:
    done = run_command(sys.executable, "-m", "lightning_compress", "trainer.max_epoch=3", cwd=tmp_path)
    assert done.returncode == 1
    assert "Could not override 'trainer.max_epoch'" in done.stderr
    assert "Traceback" not in done.stderr


def test_ddp_distills_without_find_unused_parameters(tmp_path) -> None:
    done = run_command(
        "lightning-compress",
        "trainer=ddp",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "+compression/distillation=fitnets",
        "~compression/pruning",
        "~compression/quantization",
        "runs=[combined]",  # the teacher, then the student distilled
        "export=null",
        *EAGER_QUICK_REPORT,
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr  # DDP raises on parameters without gradients; the teacher has none
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in done.stdout + done.stderr
    stages = json.loads((tmp_path / "run" / "report.json").read_text())["stages"]
    assert [stage["name"] for stage in stages] == ["before", "teacher", "distillation"]


def test_runs_choose_the_runs_of_a_job_and_bad_names_fail_before_training(compose_config, tmp_path) -> None:
    cfg = compose_config(
        "runs=[combined]", "trainer.fast_dev_run=true", "export=null", f"output_dir={tmp_path}", *EAGER_QUICK_REPORT
    )
    before, combined = train(cfg).entries
    assert (before.name, combined.name) == (
        "before",
        "pruning+quantization",
    )  # the untrained model: the reference of the ratios
    assert before.profile.parameters == combined.profile.parameters
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == ["pruning+quantization"]
    bad_runs = compose_config("runs=[dense,both]", f"output_dir={tmp_path / 'bad'}")
    with pytest.raises(ValueError, match=r"runs: unknown run\(s\) \['both'\]; choose from dense, each, combined"):
        train(bad_runs)
    bad_metric = compose_config("optimized_metrics=[test_accuracy,bytes]", f"output_dir={tmp_path / 'bad'}")
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['bytes'\]; choose from test_accuracy, val_accuracy"):
        train(bad_metric)
    assert not (tmp_path / "bad").exists()  # nothing trained


def test_export_compressed_writes_the_file_the_report_measured_and_it_loads(compose_config, tmp_path) -> None:
    cfg = compose_config(
        "runs=[combined]",
        "trainer.fast_dev_run=true",
        "export=compressed",
        f"output_dir={tmp_path}",
        *EAGER_QUICK_REPORT,
    )
    _, combined = train(cfg).entries
    path = tmp_path / "pruning+quantization" / "model.lcz"
    assert path.stat().st_size == combined.profile.compressed_bytes
    fresh = instantiate(cfg.model)  # float: load_compressed quantizes it with the file's settings
    load_compressed(fresh, path)
    assert any(isinstance(module, QuantizedLayer) for module in fresh.modules())


def test_a_search_that_selects_on_test_accuracy_is_refused_before_anything_trains(compose_config, tmp_path) -> None:
    overrides = [
        "hparams_search=prune_quantize",
        "optimized_metrics=[test_accuracy,deployed_bytes]",
        f"output_dir={tmp_path / 'run'}",
        "trainer.fast_dev_run=true",  # quick, should it train
        "export=null",
        *EAGER_QUICK_REPORT,
    ]
    why = (
        r"^optimized_metrics=\[test_accuracy, deployed_bytes\]: a search that selects on test_accuracy reports an "
        r"optimistic test score .*; optimize val_accuracy, the accuracy on the validation split: "
        r"optimized_metrics=\[val_accuracy, deployed_bytes\]\. The sweep summary still shows every job's test accuracy$"
    )
    with pytest.raises(ValueError, match=why):  # each job of a sweep
        train(compose_config(*overrides))
    assert not (tmp_path / "run").exists()  # nothing trained
    search = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with pytest.raises(SystemExit, match=why):  # the whole search, before its first trial
        instantiate(search.hydra.callbacks.optimized_metrics).on_multirun_start(config=search)

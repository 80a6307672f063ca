from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch
from digits import fit_digits
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_compress import ClassificationModule, CompressionReport, QuantizationAwareTraining, compressed_bytes
from lightning_compress.analysis import (
    ModelProfile,
    Report,
    count_nonzero_parameters,
    count_parameters,
    profile_model,
    size_on_disk,
)
from lightning_compress.analysis.cpu import cpu_flags
from lightning_compress.analysis.latency import LatencyResult
from lightning_compress.analysis.measure import SparsityStats
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import SmallCNN


def half_zero_model() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0]] * 4))
    return model


def test_report_rows_show_ratios_to_the_first_stage() -> None:
    report = Report()
    report.add(
        "before",
        profile_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 4, bias=False)), (4,), latency_batch_sizes=()),
        0.5,
    )
    report.add("after", profile_model(half_zero_model(), (4,), latency_batch_sizes=()), 0.75)
    before, after = report.rows()
    assert before["non-zeros"] == "16" and after["non-zeros"] == "8 (0.50x)"
    assert after["weight sparsity"] == "50.0%"
    assert after["val acc"] == "75.00%" and after["test acc"] == "–"
    assert "| after | 75.00% |" in report.to_markdown()
    report.add("after", profile_model(half_zero_model(), (4,), latency_batch_sizes=()), 0.8)
    assert [entry.name for entry in report.entries] == ["before", "after"]


def test_a_stage_timed_in_another_runtime_names_it_and_has_no_latency_ratio() -> None:
    linear = nn.Linear(4, 2)
    report = Report()
    report.add(
        "dense", profile_model(linear, (4,), latency_batch_sizes=(1,), latency_repeats=2, latency_runtime="onnxruntime")
    )
    note = "latency in eager PyTorch: ONNX Runtime's CPU kernels lack bfloat16, so it has no ratio"
    report.add("bfloat16", profile_model(linear, (4,), latency_batch_sizes=(1,), latency_repeats=2), note=note)
    dense, half = report.rows()
    milliseconds = report.entries[1].profile.latency[1].median_ms
    assert (
        half["latency b1 (ms)"] == f"{milliseconds:.3f} (eager PyTorch)"
    )  # no "(12.27x)" beside the ONNX Runtime rows
    assert half["size (KiB)"].endswith("(1.00x)")  # the other columns keep their ratios
    assert report.notes() == [f"bfloat16: {note}"]
    assert f"\n- bfloat16: {note}\n" in report.to_markdown()
    assert Report.from_dict(report.to_dict()).entries[1].note == note


def test_the_compressed_row_is_the_compressed_file_against_the_first_stages_state_dict() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Flatten(), nn.Linear(256, 64))
    sparse = nn.Sequential(nn.Flatten(), nn.Linear(256, 64))
    with torch.no_grad():
        sparse[1].weight.mul_(torch.rand(64, 256) < 0.1)
    report = Report()
    report.add("dense", profile_model(dense, (256,), latency_batch_sizes=()))
    report.add("pruned", profile_model(sparse, (256,), latency_batch_sizes=()))
    assert [entry.profile.compressed_bytes for entry in report.entries] == [
        len(compressed_bytes(dense)),
        len(compressed_bytes(sparse)),
    ]
    reference = report.entries[0].profile.size_bytes
    cells = [row["compressed (KiB)"] for row in report.rows()]
    assert cells == [
        f"{size / 1024:,.1f} ({size / reference:.3f}x)"
        for size in (entry.profile.compressed_bytes for entry in report.entries)
    ]
    assert report.entries[1].profile.compressed_bytes < 0.2 * reference  # 90% zeros pay in the file
    assert profile_model(dense, (256,), latency_batch_sizes=(), compressed_size=False).compressed_bytes is None


def timed_profile(
    median_ms: float,
    low_ms: float,
    high_ms: float,
    macs: int = 8,
    quantized_layers: int = 0,
    batch: int = 1,
    runtime: str = "onnxruntime",
) -> ModelProfile:
    timing = LatencyResult(batch, median_ms, low_ms, high_ms, 10, 2, 1, "cpu", runtime)
    return ModelProfile(10, 10, SparsityStats(0, 8), {}, 100, macs, {batch: timing}, quantized_layers=quantized_layers)


@pytest.mark.parametrize(
    ("stage", "reason"),
    [
        (
            timed_profile(0.021, 0.019, 0.030),
            "slower than the first stage at batch 1 (1.05x), within the spread of repeated timings (its fastest run",
        ),
        (
            timed_profile(0.030, 0.028, 0.035),
            "slower than the first stage at batch 1 (1.50x): it does the first stage's MACs (unstructured zeros are multiplied like any weight), so the difference is the machine's timing noise",
        ),
        (timed_profile(0.010, 0.009, 0.011), None),
    ],
    ids=["spread", "unstructured", "faster"],
)
def test_a_stage_slower_than_the_first_says_why_in_one_line(stage: ModelProfile, reason: str | None) -> None:
    report = Report()
    report.add("dense", timed_profile(0.020, 0.019, 0.022))
    report.add("compressed", stage)
    notes = report.notes()
    if reason is None:
        assert notes == []
    else:
        (note,) = notes
        assert note.startswith("compressed: ") and reason in note
        assert Report.from_dict(report.to_dict()).notes() == notes  # quantized_layers round-trips


VNNI = {"model": "AMD EPYC", "avx2": True, "avx512_vnni": True, "avx_vnni": False, "vnni": True}
AVX2 = {"model": "AMD EPYC", "avx2": True, "avx512_vnni": False, "avx_vnni": False, "vnni": False}


@pytest.mark.parametrize(
    ("cpu", "uint8_layers", "batch", "runtime", "cause"),
    [
        (VNNI, 2, 256, "onnxruntime", "its full 8-bit weights are stored as uint8 for CPUs without VNNI"),
        (VNNI, 0, 1, "onnxruntime", "at batch 1 on a VNNI CPU, ONNX Runtime's profile of SmallCNN on 8x8 inputs"),
        (VNNI, 0, 256, "onnxruntime", "the cause is not known: on a VNNI CPU, integer graphs with int8 weights"),
        (AVX2, 2, 1, "onnxruntime", "the cause is not known: it was not measured on a CPU without VNNI, like this one"),
        (None, 0, 1, "onnxruntime", "the cause is not known: the report does not say whether this CPU has VNNI"),
        (VNNI, 0, 1, "torch", "timed in eager PyTorch, where fake quantization rounds in float"),
    ],
    ids=["vnni-uint8-weights", "vnni-batch-1", "vnni-int8-weights-large-batch", "avx2", "unknown-cpu", "eager"],
)
def test_an_integer_stage_slower_than_float_names_the_cause_measured_on_its_kind_of_cpu(
    cpu: dict | None, uint8_layers: int, batch: int, runtime: str, cause: str
) -> None:
    """The note's cause is the one measured on a CPU of the report's kind (with or without VNNI), or it says it
    does not know; uint8 weights are blamed only where the stage has them and the CPU has VNNI."""
    report = Report(metadata={} if cpu is None else {"cpu": cpu})
    report.add("dense", timed_profile(0.020, 0.019, 0.022, batch=batch, runtime=runtime))
    stage = timed_profile(0.030, 0.028, 0.035, quantized_layers=4, batch=batch, runtime=runtime)
    report.add("int8", stage, uint8_weight_layers=uint8_layers)
    (note,) = report.notes()
    assert note == f"int8: slower than the first stage at batch {batch} (1.50x): " + note.split(": ", 2)[2]
    assert note.split(": ", 2)[2].startswith(cause), note
    assert "fixed cost per call" not in note
    assert Report.from_dict(report.to_dict()).notes() == [note]  # the CPU and the uint8 layers are kept in JSON


def test_report_files_are_written_and_round_trip(tmp_path) -> None:
    report = Report(metadata={"model": "linear"})
    report.add("before", profile_model(half_zero_model(), (4,), latency_batch_sizes=(1,), latency_repeats=2))
    paths = report.write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "report.png"]
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")
    assert Report.from_dict(json.loads(paths["json"].read_text())) == report
    assert paths["markdown"].read_text() == report.to_markdown()


def test_callback_measures_before_and_after_and_logs(tmp_path) -> None:
    callback = CompressionReport(
        output_dir=tmp_path / "report", latency_batch_sizes=(1, 8), latency_repeats=2, verbose=False
    )
    trainer, module, datamodule = fit_digits(tmp_path, [callback], logger=CSVLogger(tmp_path, name="csv"))
    val_accuracy = float(trainer.callback_metrics["val/acc"])
    test_accuracy = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]

    stages = json.loads((tmp_path / "report" / "report.json").read_text())["stages"]
    before, after = stages
    assert (before["name"], after["name"]) == ("before", "after")
    assert before["parameters"] == after["parameters"] == count_parameters(module)
    assert after["nonzero_parameters"] == count_nonzero_parameters(module)
    assert after["size_bytes"] == size_on_disk(module)
    assert after["macs"] == 347_392
    assert sorted(after["latency"]) == ["1", "8"]
    assert after["val_accuracy"] == pytest.approx(val_accuracy)
    assert after["test_accuracy"] == pytest.approx(test_accuracy)
    assert 0.0 <= before["val_accuracy"] < 0.5 < after["val_accuracy"]  # untrained, then trained
    assert callback.report.metadata["cpu"] == cpu_flags()  # the kind of CPU the latencies were measured on

    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("report/after/parameters")]
    assert float(logged[-1]["report/after/parameters"]) == count_parameters(module)


@pytest.mark.parametrize(("settings", "uint8_layers"), [({}, 0), ({"reduce_range": False}, 4)], ids=["7-bit", "8-bit"])
def test_the_fitted_stage_counts_the_layers_whose_weights_the_export_stores_as_uint8(
    tmp_path, settings: dict, uint8_layers: int
) -> None:
    callback = CompressionReport(
        output_dir=tmp_path, latency_batch_sizes=(), compressed_size=False, evaluate_before=False, verbose=False
    )
    fit_digits(tmp_path, [QuantizationAwareTraining(start_epoch=0, **settings), callback])
    assert callback.report.entry("after").uint8_weight_layers == uint8_layers
    assert callback.report.entry("before").uint8_weight_layers == 0


def test_callback_needs_an_input_shape_before_training(tmp_path) -> None:
    module = ClassificationModule(SmallCNN(num_classes=10, image_size=8), num_classes=10)  # no input_shape
    weights = {key: value.clone() for key, value in module.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, callbacks=[CompressionReport()], default_root_dir=tmp_path
    )
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    loaders = {"digits": datamodule.train_dataloader(), "again": datamodule.train_dataloader()}  # a batch of each
    with pytest.raises(ValueError, match="input_shape=\\(C, H, W\\).*ClassificationModule, or fit it with one"):
        trainer.fit(module, train_dataloaders=loaders)
    assert trainer.global_step == 0
    assert all(torch.equal(weights[key], value) for key, value in module.state_dict().items())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"latency_batch_sizes": (1, 0)}, "latency batch sizes must be positive integers, got \\[1, 0\\]"),
        ({"latency_repeats": 0}, "latency needs warmup >= 0 and repeats >= 1"),
        ({"num_threads": 0}, "num_threads must be a positive integer or None, got 0"),
    ],
)
def test_callback_rejects_bad_arguments(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompressionReport(**options)


def test_resumed_run_keeps_the_before_stage(tmp_path) -> None:
    options = {"latency_batch_sizes": (1,), "latency_repeats": 2, "verbose": False}
    first = CompressionReport(output_dir=tmp_path / "first", **options)
    fit_digits(tmp_path, [first, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs=1)
    resumed = CompressionReport(output_dir=tmp_path / "resumed", **options)
    trainer, _, _ = fit_digits(
        tmp_path,
        [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        max_epochs=2,
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )
    assert trainer.current_epoch == 2
    before, first_before = resumed.report.entry("before"), first.report.entry("before")
    assert before.val_accuracy == first_before.val_accuracy and before.profile.to_dict() | {
        "latency": None
    } == first_before.profile.to_dict() | {"latency": None}
    # its model is gone, so it keeps the latency timed at the first fit's start, and says so
    assert before.note == "latency measured at the start of the first fit, not with the other stages: the run resumed"
    assert [entry.name for entry in resumed.report.entries] == ["before", "after"]
    assert list(first.models) == ["before", "after"] and list(resumed.models) == ["after"]


def test_every_stage_is_timed_with_the_others_at_the_end_of_fit(tmp_path, timed_together) -> None:
    callback = CompressionReport(
        output_dir=tmp_path,
        latency_batch_sizes=(1, 4),
        latency_repeats=4,
        latency_rounds=2,
        half_precision="bfloat16",
        verbose=False,
    )
    _, module, _ = fit_digits(tmp_path, [callback], max_epochs=1)
    # "before" alone at the start of fit; then, per batch size, every stage in the same rounds
    assert [names for names, _ in timed_together] == [
        ["model"],
        ["model"],
        ["before", "after", "bfloat16"],
        ["before", "after", "bfloat16"],
    ]
    assert timed_together[-1][1] == {"warmup": 5, "repeats": 4, "rounds": 2, "num_threads": None}
    assert callback.models["after"] is module and callback.models["before"] is not module
    assert [callback.report.entry(name).profile.latency[4].repeats for name in ("before", "after", "bfloat16")] == [
        4,
        4,
        4,
    ]
    assert callback.report.entry("bfloat16").profile.latency[1].runtime == "torch"


def test_fit_twice_keeps_before_and_remeasures_after(tmp_path) -> None:
    callback = CompressionReport(output_dir=tmp_path, latency_batch_sizes=(1,), latency_repeats=2, verbose=False)
    trainer, module, datamodule = fit_digits(tmp_path, [callback], max_epochs=1)
    before, first_after = callback.report.entry("before"), callback.report.entry("after")
    with torch.no_grad():
        module.model.classifier[1].weight[:10] = 0.0  # change the model between the two fits
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module, datamodule=datamodule)
    assert callback.report.entry("before") is before
    assert [entry.name for entry in callback.report.entries] == ["before", "after"]
    assert callback.report.entry("after").val_accuracy is not None
    assert callback.report.entry("after") is not first_after


def test_test_accuracy_of_another_checkpoint_is_not_put_on_the_fitted_model(tmp_path) -> None:
    callback = CompressionReport(output_dir=tmp_path, latency_batch_sizes=(1,), latency_repeats=2, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer, module, datamodule = fit_digits(tmp_path, [callback, checkpoint], max_epochs=1)
    with pytest.warns(UserWarning, match="not on the fitted model"):
        trainer.test(module, datamodule=datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    assert callback.report.entry("after").test_accuracy is None
    trainer.test(module, datamodule=datamodule, verbose=False)
    assert callback.report.entry("after").test_accuracy == pytest.approx(float(trainer.callback_metrics["test/acc"]))


def test_a_misspelt_metric_name_warns_with_the_logged_names(tmp_path) -> None:
    callback = CompressionReport(
        output_dir=tmp_path, latency_batch_sizes=(1,), latency_repeats=2, verbose=False, test_metric="test/accuracy"
    )
    trainer, module, datamodule = fit_digits(tmp_path, [callback], max_epochs=1)
    with pytest.warns(UserWarning, match="no metric 'test/accuracy'.*'test/acc'"):
        trainer.test(module, datamodule=datamodule, verbose=False)


def test_validate_and_test_alone_need_no_input_shape(tmp_path) -> None:
    module = ClassificationModule(SmallCNN(num_classes=10, image_size=8), num_classes=10)
    callback = CompressionReport()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False, default_root_dir=tmp_path
    )
    assert 0.0 <= trainer.validate(module, datamodule=DigitsDataModule(), verbose=False)[0]["val/acc"] <= 1.0
    assert 0.0 <= trainer.test(module, datamodule=DigitsDataModule(), verbose=False)[0]["test/acc"] <= 1.0
    assert callback.report.entries == [] and not list(tmp_path.glob("**/report.json"))  # nothing measured outside fit


def test_the_printed_table_keeps_every_cell_whole_in_a_narrow_terminal(capsys) -> None:
    report = Report()
    for name in ("dense", "pruning+quantization+clustering", "pruning+quantization+distillation"):
        report.add(name, profile_model(half_zero_model(), (4,), latency_batch_sizes=()))
    report.print()  # pytest's captured output is 80 columns wide
    printed = capsys.readouterr().out
    assert "…" not in printed and "pruning+quantization+distillation" in printed
    assert max(len(line) for line in printed.splitlines()) > 80

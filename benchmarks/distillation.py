"""Distillation on real Fashion-MNIST: a student trained alone against the same student distilled, in one process.

The students learn from a limited labelled set, where distillation is meant to help: a seeded random
subset of ``--train-samples`` training images (5,000 by default). The teacher is what a user distills
from: a stronger model, trained beforehand on the whole training split (``--teacher-train-samples 0``)
for ``--teacher-epochs`` (12). For each seed: the teacher (SmallCNN, channels 32/64, hidden 128, dropout
0.5) trains first; then the student (SmallCNN, channels 8/16, hidden 48: about a tenth of the teacher's
parameters) trains for ``--epochs`` five ways, with the same seed and data order (Adam 1e-3, cosine schedule):
- alone (cross-entropy);
- KD (``ce_weight=0.5, kd_weight=0.5, temperature=4``), with the teacher's logits cached after the
  first epoch (the data is not augmented) and, for timing, without the cache;
- FitNets (cross-entropy + hint loss between the second convolution blocks, learned 1x1 adapter);
- DKD (decoupled KD, alpha 1, beta 8, T 4, ``ce_weight=1``).
Records test accuracy (the full 10,000 test images) and the median wall time of the epochs after the
first (where the cache acts). Writes ``results/distillation.json`` and ``results/distillation.md``.

    apt-get install dataset-fashion-mnist
    python benchmarks/distillation.py --epochs 40 --teacher-epochs 12 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import lightning as L
import torch
from common import EpochTimer, cpu_trainer, write_results

from lightning_compress import ClassificationModule, DistillationModule
from lightning_compress.analysis import count_parameters, evaluate_accuracy
from lightning_compress.data import FashionMNISTDataModule
from lightning_compress.models import SmallCNN

INPUT_SHAPE = (1, 28, 28)
STUDENTS = ("alone", "kd_cached", "kd", "fitnets", "dkd")


def teacher_net() -> SmallCNN:
    return SmallCNN(num_classes=10, image_size=28, dropout=0.5)


def student_net() -> SmallCNN:
    return SmallCNN(num_classes=10, image_size=28, channels=(8, 16), hidden=48)


def fit(
    module: L.LightningModule, seed: int, epochs: int, datamodule: FashionMNISTDataModule, limit_batches: int | None
) -> list[float]:
    L.seed_everything(seed)
    timer = EpochTimer()
    # the epoch time is training alone; nothing here reads validation
    trainer = cpu_trainer(epochs, [timer], limit_train_batches=limit_batches, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return timer.seconds


def cosine(epochs: int) -> partial:
    return partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)


def student(method: str, seed: int, teacher: torch.nn.Module, epochs: int) -> L.LightningModule:
    torch.manual_seed(seed)
    net = student_net()
    if method == "alone":
        return ClassificationModule(net, num_classes=10, input_shape=INPUT_SHAPE, scheduler=cosine(epochs))
    settings = {
        "kd_cached": {"cache_teacher": True},
        "kd": {},
        "fitnets": {"ce_weight": 1.0, "kd_weight": 0.0, "hints": [("features.4", "features.4")], "hint_weight": 1.0},
        "dkd": {"ce_weight": 1.0, "kd_weight": 1.0, "logit_loss": "dkd"},
    }[method]
    return DistillationModule(
        net, teacher, num_classes=10, temperature=4.0, input_shape=INPUT_SHAPE, scheduler=cosine(epochs), **settings
    )


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    def data(train_samples: int) -> FashionMNISTDataModule:
        return FashionMNISTDataModule(
            root=args.data_root, batch_size=128, seed=seed, train_samples=train_samples or None
        )

    datamodule = data(args.train_samples)
    datamodule.setup("test")
    test = list(datamodule.test_dataloader())
    torch.manual_seed(seed)
    teacher = ClassificationModule(
        teacher_net(), num_classes=10, input_shape=INPUT_SHAPE, scheduler=cosine(args.teacher_epochs)
    )
    fit(teacher, seed, args.teacher_epochs, data(args.teacher_train_samples), args.limit_batches)
    result = {
        "seed": seed,
        "teacher_test_accuracy": evaluate_accuracy(teacher, test),
        "teacher_parameters": count_parameters(teacher.model),
    }
    rotation = seed % len(STUDENTS)
    for method in STUDENTS[rotation:] + STUDENTS[:rotation]:
        module = student(method, seed, teacher.model, args.epochs)
        seconds = fit(module, seed, args.epochs, datamodule, args.limit_batches)
        result[f"{method}_test_accuracy"] = evaluate_accuracy(module.model, test)
        result[f"{method}_epoch_s"] = statistics.median(seconds[1:])
    result["student_parameters"] = count_parameters(student_net())
    return result


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def summary(runs: list[dict]) -> dict:
    alone = median(runs, "alone_test_accuracy")
    return {
        "teacher_test_accuracy": median(runs, "teacher_test_accuracy"),
        "parameters_ratio": median(runs, "student_parameters") / median(runs, "teacher_parameters"),
        "test_accuracy": {method: median(runs, f"{method}_test_accuracy") for method in STUDENTS},
        "gain_points_vs_alone": {
            m: 100 * (median(runs, f"{m}_test_accuracy") - alone) for m in STUDENTS if m != "alone"
        },
        "gain_points_paired_median": {
            m: 100 * statistics.median(run[f"{m}_test_accuracy"] - run["alone_test_accuracy"] for run in runs)
            for m in STUDENTS
            if m != "alone"
        },
        "epoch_s": {method: median(runs, f"{method}_epoch_s") for method in STUDENTS},
        "epoch_time_ratio_to_alone": {
            m: median(runs, f"{m}_epoch_s") / median(runs, "alone_epoch_s") for m in STUDENTS if m != "alone"
        },
    }


def markdown(result: dict, args: argparse.Namespace) -> str:
    accuracy, gain, paired, ratio = (
        result[k]
        for k in ("test_accuracy", "gain_points_vs_alone", "gain_points_paired_median", "epoch_time_ratio_to_alone")
    )
    names = {
        "alone": "student alone",
        "kd_cached": "KD, teacher cached",
        "kd": "KD",
        "fitnets": "FitNets (hint on features.4)",
        "dkd": "DKD",
    }
    lines = [
        f"Fashion-MNIST; the students learn from {args.train_samples or 'all'} training images for {args.epochs} epochs; "
        f"Adam 1e-3 with a cosine schedule, batch 128, seeds {args.seeds}; test accuracy on the 10,000 test images; medians over seeds. "
        f"Teacher: SmallCNN 32/64/128 with dropout 0.5, trained beforehand on {args.teacher_train_samples or 'all'} training images "
        f"for {args.teacher_epochs} epochs, test accuracy {100 * result['teacher_test_accuracy']:.2f}%; student: SmallCNN 8/16/48, "
        f"{result['parameters_ratio']:.3f}x the teacher's parameters.",
        "",
        "| student | test acc | vs alone (points, median of medians) | vs alone (points, median of per-seed gains) | epoch time vs alone (epochs 2+) |",
        "|---|---|---|---|---|",
        f"| {names['alone']} | {100 * accuracy['alone']:.2f}% | – | – | 1.000x ({result['epoch_s']['alone']:.1f} s) |",
    ]
    for method in STUDENTS[1:]:
        lines.append(
            f"| {names[method]} | {100 * accuracy[method]:.2f}% | {gain[method]:+.2f} | {paired[method]:+.2f} | {ratio[method]:.3f}x |"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--train-samples", type=int, default=5000, help="the students' training images (a seeded subset); 0 for all"
    )
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument(
        "--teacher-train-samples", type=int, default=0, help="the teacher's training images; 0 (default) for all"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-root", default="data")
    parser.add_argument(
        "--limit-batches", type=int, default=None, help="training batches per epoch (a quick check of the script)"
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the cache acts from the second epoch")
    torch.set_num_threads(2)
    runs = [run_seed(seed, args) for seed in args.seeds]
    result = summary(runs)
    settings = {key: value for key, value in vars(args).items() if key not in ("data_root", "limit_batches")}
    write_results("distillation", settings, {"summary": result, "runs": runs}, markdown(result, args))


if __name__ == "__main__":
    main()

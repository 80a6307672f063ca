"""Text: WordNet supersense glosses, a BERT classifier over token ids, and token inputs through measurement,
calibration and the report."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from debian_data import needs_debian_package
from text_models import SAMPLE, TINY_BERT, fit_text, sample_datamodule, sample_tokenizer, text_module
from torch import nn

from lightning_compress import ClassificationModule, CompressionReport
from lightning_compress.analysis import profile_model
from lightning_compress.batches import UNLABELED
from lightning_compress.data.wordnet import (
    DEBIAN_DATA_NOUN,
    SUPERSENSES,
    WordNetSupersensesDataModule,
    read_glosses,
    split_of,
)
from lightning_compress.models import SmallCNN
from lightning_compress.pruning import Pruner, PruningConfig
from lightning_compress.quantization import QuantConfig, calibrate, quantize_model


@pytest.fixture(scope="module")
def tokenizer():
    return sample_tokenizer()


def test_the_sample_holds_every_supersense_and_its_glosses() -> None:
    glosses = read_glosses(SAMPLE)
    assert len(glosses) == 156 and len({gloss.offset for gloss in glosses}) == 156
    assert sorted(Counter(gloss.label for gloss in glosses)) == list(range(26))
    recombinant = next(gloss for gloss in glosses if gloss.offset == 1313888)  # lexicographer file 05
    assert (SUPERSENSES[recombinant.label], recombinant.text) == (
        "animal",
        "a cell or organism in which genetic recombination has occurred",
    )


@needs_debian_package(DEBIAN_DATA_NOUN, "wordnet-base")
def test_real_wordnet_holds_every_noun_synset_in_its_26_supersenses() -> None:
    glosses = read_glosses(DEBIAN_DATA_NOUN)
    assert len(glosses) == 82_115  # WordNet 3.0's noun synsets
    counts = Counter(gloss.label for gloss in glosses)
    assert sorted(counts) == list(range(26)) and min(counts.values()) == 42 and max(counts.values()) == 11_587
    assert all(gloss.text for gloss in glosses)


def test_splits_are_a_seeded_hash_of_the_offset(tokenizer) -> None:
    offsets = [gloss.offset for gloss in read_glosses(SAMPLE)]
    first = [split_of(offset, 0, 0.2, 0.2) for offset in offsets]
    assert first == [split_of(offset, 0, 0.2, 0.2) for offset in reversed(offsets)][::-1]  # order-free
    assert first != [split_of(offset, 1, 0.2, 0.2) for offset in offsets]
    datamodule = WordNetSupersensesDataModule(
        tokenizer, str(SAMPLE), max_length=16, val_fraction=0.2, test_fraction=0.2
    )
    datamodule.setup()
    sizes = {split: len(datamodule.splits[split]) for split in ("train", "val", "test")}
    assert sizes == {split: first.count(split) for split in sizes} and sum(sizes.values()) == 156
    inputs, labels = next(iter(datamodule.test_dataloader()))
    assert inputs.dtype == torch.int64 and inputs.shape[1] == 16 and labels.dtype == torch.int64
    assert datamodule.input_shape == (16,) and datamodule.num_classes == 26
    assert inputs[0, 0] == tokenizer.cls_token_id and (inputs == tokenizer.pad_token_id).any()


def test_missing_wordnet_names_the_package_and_bad_fractions_fail_at_once(tokenizer, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        WordNetSupersensesDataModule(tokenizer, str(tmp_path / "data.noun")).setup()
    with pytest.raises(ValueError, match=r"val_fraction \(0.6\) and test_fraction \(0.5\)"):
        WordNetSupersensesDataModule(tokenizer, str(SAMPLE), val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        WordNetSupersensesDataModule(tokenizer, str(SAMPLE), max_length=1)


def test_unlabeled_glosses_come_from_the_rest_of_the_training_split(tokenizer) -> None:
    def training_split(**options) -> tuple[torch.Tensor, torch.Tensor]:
        datamodule = WordNetSupersensesDataModule(tokenizer, str(SAMPLE), max_length=16, **options)
        datamodule.setup()
        return datamodule.splits["train"].tensors

    every_id, every_label = training_split()
    ids, labels = training_split(train_samples=40, unlabeled_samples=50)
    assert torch.equal(ids[:40], training_split(train_samples=40)[0])  # the same labelled subset as without
    assert (labels[:40] >= 0).all() and (labels[40:] == UNLABELED).all() and len(labels) == 90
    rows = {tuple(row): label for row, label in zip(every_id.tolist(), every_label.tolist(), strict=True)}
    assert len({tuple(row) for row in ids.tolist()}) == 90  # no gloss twice
    assert all(rows[tuple(row)] == label for row, label in zip(ids[:40].tolist(), labels[:40].tolist(), strict=True))
    assert all(tuple(row) in rows for row in ids[40:].tolist())  # from the training split, not val or test
    with pytest.raises(
        ValueError, match=f"ask for {len(every_id) + 1} glosses; the training split has {len(every_id)}"
    ):
        training_split(train_samples=40, unlabeled_samples=len(every_id) - 39)
    with pytest.raises(ValueError, match="unlabeled_samples=10: .* needs train_samples"):
        WordNetSupersensesDataModule(tokenizer, str(SAMPLE), unlabeled_samples=10)


def test_padding_changes_nothing_and_floats_are_refused() -> None:
    module = text_module().eval()
    ids = torch.tensor([[2, 17, 40, 3]])
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(module(ids), module(padded))
    with pytest.raises(TypeError, match="takes token ids"):
        module(ids.float())
    assert module.example_input_array.dtype == torch.int64 and module.example_input_array.shape == (1, 16)
    with pytest.raises(ValueError, match="input_dtype must name a torch dtype"):
        ClassificationModule(module.model, 26, input_shape=[16], input_dtype="int65")


def test_token_inputs_are_measured_on_the_example_and_calibrated_as_integers() -> None:
    module = text_module()
    example = module.example_input_array
    profile = profile_model(module.model, example, latency_batch_sizes=(1, 2), latency_repeats=2)
    # per layer: Q, K, V and output projections (4 d^2 L), QK^T and AV (2 L^2 d), the MLP (2 d f L); the head d c
    d, f, length, layers = TINY_BERT["hidden_size"], TINY_BERT["intermediate_size"], 16, TINY_BERT["num_hidden_layers"]
    assert profile.macs == layers * (4 * d * d * length + 2 * length * length * d + 2 * d * f * length) + d * 26
    assert sorted(profile.latency) == [1, 2]
    quantize_model(module.model, QuantConfig())
    datamodule = sample_datamodule(batch_size=8)
    datamodule.setup()
    assert calibrate(module.model, datamodule.train_dataloader(), num_batches=2) == 2


def test_the_report_of_a_text_model_runs_on_token_ids(tmp_path) -> None:
    module = text_module()
    report = CompressionReport(latency_batch_sizes=[1], latency_repeats=2, latency_rounds=2, verbose=False)
    fit_text(tmp_path, module, [report])
    assert report.report.metadata["input_shape"] == [16] and report.report.metadata["input_dtype"] == "int64"
    before, after = report.report.entry("before").profile, report.report.entry("after").profile
    assert before.macs == after.macs > 0 and after.parameters == sum(p.numel() for p in module.parameters())


class LSTMClassifier(nn.Module):
    """Token ids through an embedding and an LSTM; only the head is a Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(1000, 32)
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.head = nn.Linear(64, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embedding(ids))[0][:, -1])


def test_compressing_a_small_share_of_a_model_warns_where_the_rest_is() -> None:
    rest = (
        r"targets 320 of the model's 57,413 parameters \(0.6%\).* The rest is in Embedding \(32,000\), LSTM \(25,088\)"
    )
    with pytest.warns(UserWarning, match=f"Pruning {rest}"):
        Pruner(LSTMClassifier(), PruningConfig(amount=0.5))
    with pytest.warns(UserWarning, match=f"Quantization {rest}"):
        quantize_model(LSTMClassifier(), QuantConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CNN's weights are nearly all of it
        Pruner(SmallCNN(num_classes=10, image_size=8), PruningConfig(amount=0.5))


def test_structured_pruning_of_an_lstm_classifier_is_refused_at_setup() -> None:
    ids = torch.ones(1, 7, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the share targeted, said above
        with pytest.raises(ValueError, match="no output channel of the targeted layers can be pruned"):
            Pruner(LSTMClassifier(), PruningConfig(amount=0.5, granularity="channel"), example_input=ids)
        with pytest.raises(ValueError, match="granularity='head' prunes attention heads, but LSTMClassifier"):
            Pruner(LSTMClassifier(), PruningConfig(amount=0.5, granularity="head"), example_input=ids)


def test_a_pretrained_encoder_and_a_student_of_a_frozen_teacher_come_in_training_mode(tmp_path) -> None:
    from lightning_compress.models import minilm, student_from_teacher

    text_module().model.encoder.save_pretrained(tmp_path / "encoder")  # from_pretrained returns it in eval mode
    pretrained = minilm(num_classes=26, path=str(tmp_path / "encoder"))
    assert all(module.training for module in pretrained.modules())  # dropout on: Lightning keeps the modes
    teacher = pretrained.eval().requires_grad_(False)
    student = student_from_teacher(teacher, every=2)
    assert all(module.training for module in student.modules())
    assert all(parameter.requires_grad for parameter in student.parameters())
    assert not teacher.training

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from digits import digits_module, fit_digits, straight_and_resumed
from hydra.utils import instantiate

from lightning_compress import Pruning, QuantizationAwareTraining
from lightning_compress.callbacks.checkpoint import CompressionStage
from lightning_compress.clustering import KEPT_ZERO, SharedWeights, WeightClustering, kmeans_labels
from lightning_compress.data import DigitsDataModule
from lightning_compress.quantization.layers import quantized_layers

TARGETS = [
    "model.features.0.weight",
    "model.features.4.weight",
    "model.classifier.1.weight",
    "model.classifier.4.weight",
]


class CaptureClustered(L.Callback):
    """Listed after WeightClustering: the weights right after clustering, at the start of ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.weights = {name: pl_module.state_dict()[name].clone() for name in TARGETS}


def distinct(weight: torch.Tensor, per_channel: bool = False) -> list[int]:
    """The number of distinct values of the tensor, or of each output channel."""
    rows = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    return [torch.unique(row).numel() for row in rows]


# --- the plain-PyTorch core ------------------------------------------------------------------------


def test_kmeans_labels_number_clusters_by_centroid_and_keep_zeros_out() -> None:
    weight = torch.tensor([[0.0, -1.0, -0.9, 0.5, 0.55, 2.0], [0.0, 0.0, 3.0, 3.1, -2.0, 0.1]])
    assert kmeans_labels(weight, clusters=3, init="linear").tolist() == [[-1, 0, 0, 1, 1, 2], [-1, -1, 2, 2, 0, 1]]
    assert kmeans_labels(weight, clusters=2, init="linear", per_channel=True).tolist() == [
        [-1, 0, 0, 1, 1, 1],
        [-1, -1, 1, 1, 0, 0],
    ]
    assert kmeans_labels(weight, clusters=3, init="linear", preserve_zeros=False).tolist() == [
        [1, 0, 0, 1, 1, 2],
        [1, 1, 2, 2, 0, 1],
    ]
    # fewer distinct values than clusters: one cluster for each value; a row of zeros only: all kept
    few = torch.tensor([[0.2, -0.1, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert kmeans_labels(few, clusters=8, per_channel=True).tolist() == [[1, 0, 1, -1], [-1, -1, -1, -1]]
    assert kmeans_labels(few, clusters=8).dtype == torch.int16 and KEPT_ZERO == -1


def test_kmeans_labels_are_seeded_and_each_init_counts() -> None:
    weight = torch.cat(
        [torch.randn(900, generator=torch.Generator().manual_seed(0)) * 0.05, torch.linspace(1.0, 4.0, 100)]
    )
    labels = {init: kmeans_labels(weight, clusters=8, init=init, seed=1) for init in ("kmeans++", "linear", "density")}
    assert torch.equal(labels["kmeans++"], kmeans_labels(weight, clusters=8, init="kmeans++", seed=1))
    assert all(int(label.max()) == 7 and int(label.min()) == 0 for label in labels.values())
    # from evenly spaced centroids k-means spends more clusters on the long tail than from the quantiles
    in_tail = {init: torch.unique(label[900:]).numel() for init, label in labels.items()}
    assert in_tail["linear"] > in_tail["density"]
    with pytest.raises(ValueError, match="init must be one of kmeans\\+\\+, linear, density; got 'uniform'"):
        kmeans_labels(weight, clusters=8, init="uniform")


def test_the_shared_update_is_the_centroid_gradient_and_ties_per_element_optimizer_state() -> None:
    labels = torch.tensor([[0, 1, -1, 1], [1, 0, 0, -1]], dtype=torch.int16)
    weight = torch.nn.Parameter(torch.tensor([[1.0, 4.0, 0.0, 5.0], [3.0, 2.0, 3.0, 0.0]]))
    shared = SharedWeights(labels, clusters=2)
    shared.tie(weight)
    assert weight.tolist() == [[2.0, 4.0, 0.0, 4.0], [4.0, 2.0, 2.0, 0.0]]
    weight.grad = torch.tensor([[0.5, 1.0, 7.0, 2.0], [3.0, -1.0, 0.25, 7.0]])
    shared.share_gradient(weight.grad)
    assert weight.grad.tolist() == [[-0.25, 6.0, 0.0, 6.0], [6.0, -0.25, -0.25, 0.0]]  # the sums; kept zeros get none
    torch.optim.SGD([weight], lr=0.5).step()  # the centroids take the step of a parameter c with dL/dc = sum dL/dw
    assert weight.tolist() == [[2.125, 1.0, 0.0, 1.0], [1.0, 2.125, 2.125, 0.0]]
    per_channel = SharedWeights(labels, clusters=2, per_channel=True)
    weight.data = torch.tensor([[1.0, 4.0, 9.0, 5.0], [3.0, 2.0, 3.0, 9.0]])
    per_channel.tie(weight)
    assert weight.tolist() == [[1.0, 4.5, 0.0, 4.5], [3.0, 2.5, 2.5, 0.0]]


# --- the callback ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer",
    [
        partial(torch.optim.SGD, lr=1e-4, momentum=0.9, weight_decay=1e-2),
        partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
    ],
    ids=["sgd-momentum-wd", "adamw"],
)
def test_every_tensor_ends_with_exactly_the_clusters_and_they_trained(tmp_path, optimizer) -> None:
    """Clustered after an epoch of training: AdamW's moments then differ within a cluster, the tie keeps it one value."""
    clustering, capture = WeightClustering(clusters=16, start_epoch=1), CaptureClustered(epoch=1)
    _, module, _ = fit_digits(tmp_path, [clustering, capture], max_epochs=3, optimizer=optimizer)
    state = module.state_dict()
    assert list(state) == list(digits_module().state_dict())
    assert list(clustering.labels) == TARGETS
    for name in TARGETS:
        weight, labels, initial = state[name], clustering.labels[name], capture.weights[name]
        assert distinct(weight) == distinct(initial) == [16], name
        for label in range(16):  # one value for each cluster, the same clusters as at the start, each moved
            value = weight[labels == label]
            assert torch.all(value == value[0]) and torch.all(initial[labels == label] == initial[labels == label][0])
            assert value[0] != initial[labels == label][0], (name, label)


def test_per_channel_clusters_each_output_channel_and_state_goes_to_a_fresh_callback(tmp_path) -> None:
    clustering = WeightClustering(
        clusters=4, init="density", start_epoch=1, per_channel=True, exclude=["model.classifier.4"]
    )
    _, module, _ = fit_digits(tmp_path, [clustering], max_epochs=2)
    state = module.state_dict()
    assert list(clustering.labels) == TARGETS[:3]
    for name in TARGETS[:3]:
        channels = state[name].shape[0]
        assert distinct(state[name], per_channel=True) == [4] * channels and distinct(state[name])[0] > 4, name
    assert distinct(state[TARGETS[3]])[0] > 1000  # excluded: not clustered
    fresh = WeightClustering(clusters=4, init="density", start_epoch=1, per_channel=True)
    fresh.load_state_dict(clustering.state_dict())
    assert fresh.clustered and all(torch.equal(fresh.labels[name], clustering.labels[name]) for name in TARGETS[:3])
    assert fresh.final_epoch() == 1 and isinstance(fresh, CompressionStage) and not WeightClustering().clustered


def test_after_pruning_the_zeros_stay_and_the_non_zeros_take_the_clusters(tmp_path) -> None:
    pruning = Pruning(amount=0.5, schedule="oneshot", start_epoch=0)
    clustering, capture = WeightClustering(clusters=16, start_epoch=1), CaptureClustered(epoch=1)
    _, module, _ = fit_digits(tmp_path, [pruning, clustering, capture], max_epochs=3)
    state = module.state_dict()
    total = sum(state[name].numel() for name in TARGETS)
    assert sum(int((state[name] == 0).sum()) for name in TARGETS) == round(0.5 * total)
    for name in TARGETS:
        zeros = state[name] == 0
        assert torch.equal(zeros, capture.weights[name] == 0) and torch.equal(zeros, ~pruning.masks[name]), name
        assert torch.equal(zeros, clustering.labels[name] == KEPT_ZERO)
        assert distinct(state[name][~zeros]) == [16], name


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel-scales", "per-tensor-scale"])
def test_with_quantization_aware_training_the_integer_codes_take_at_most_the_clusters(
    tmp_path, per_channel: bool
) -> None:
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, per_channel=per_channel, start_epoch=0)
    clustering = WeightClustering(clusters=8, start_epoch=1)
    _, module, _ = fit_digits(tmp_path, [qat, clustering], max_epochs=2)
    layers = quantized_layers(module.eval())
    assert [f"{name}.weight" for name in layers] == TARGETS
    for name, layer in layers.items():
        quantizer = layer.weight_quantizer
        scale = quantizer.scale.reshape(-1, *[1] * (layer.weight.dim() - 1)) if per_channel else quantizer.scale
        codes = (quantizer(layer.weight) / scale).round()
        assert torch.all(codes.abs() <= 127) and torch.all(quantizer.zero_point == 0)
        assert all(1 <= count <= 8 for count in distinct(codes, per_channel=per_channel)), (
            name
        )  # each channel's / the tensor's
        assert distinct(layer.weight.detach()) == [8], name  # the float centroids: 8 for the whole tensor


RESUMABLE = {
    "kmeans++": {"clusters": 16, "start_epoch": 1},
    "per_channel_linear": {"clusters": 4, "init": "linear", "start_epoch": 1, "per_channel": True},
}


@pytest.mark.parametrize("options", RESUMABLE.values(), ids=RESUMABLE.keys())
def test_a_resumed_run_ends_with_the_same_clusters_and_weights(tmp_path, options: dict) -> None:
    """Stopped after epoch 1 (clustered at its start, Adam's moments in flight) and resumed for epoch 2."""
    (straight, whole), (resumed, continued) = straight_and_resumed(
        tmp_path, lambda: WeightClustering(**options), max_epochs=3
    )
    assert straight.labels.keys() == resumed.labels.keys() == set(TARGETS)
    assert all(torch.equal(straight.labels[name], resumed.labels[name]) for name in TARGETS)
    for (name, value), other in zip(whole.state_dict().items(), continued.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=0, atol=1e-6, msg=name)
    for name in TARGETS:
        assert distinct(continued.state_dict()[name], options.get("per_channel", False)) == distinct(
            whole.state_dict()[name], options.get("per_channel", False)
        )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"clusters": 1}, "clusters must be an int in \\[2, 256\\]; got 1 \\(int\\)"),
        ({"clusters": 257}, "clusters must be an int in \\[2, 256\\]; got 257 \\(int\\)"),
        ({"clusters": 16.0}, "clusters must be an int in \\[2, 256\\]; got 16.0 \\(float\\)"),
        ({"clusters": True}, "clusters must be an int in \\[2, 256\\]; got True \\(bool\\)"),
        ({"init": "random"}, "init must be one of kmeans\\+\\+, linear, density; got 'random' \\(str\\)"),
        ({"start_epoch": -1}, "start_epoch must be an int >= 0; got -1 \\(int\\)"),
        ({"start_epoch": "5"}, "start_epoch must be an int >= 0; got '5' \\(str\\)"),
        ({"preserve_sparsity": "yes"}, "preserve_sparsity must be True or False; got 'yes' \\(str\\)"),
        ({"per_channel": 1}, "per_channel must be True or False; got 1 \\(int\\)"),
        ({"seed": -1}, "seed must be an int in \\[0, 2\\*\\*32\\); got -1 \\(int\\)"),
    ],
)
def test_bad_arguments_fail_in_init(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        WeightClustering(**options)


@pytest.mark.parametrize(
    "callbacks, message",
    [
        (
            [WeightClustering(start_epoch=2)],
            "start_epoch must be < max_epochs=2, so that this fit clusters the weights; got 2",
        ),
        ([WeightClustering(targets=["model.feature.*"])], "'model.feature.\\*' matches no layer.*model.features"),
        (
            [Pruning(amount=0.5, start_epoch=0, end_epoch=1), WeightClustering(start_epoch=1)],
            "start_epoch must be after Pruning's last step \\(epoch 1\\), as the clusters fix which weights are zero; got 1",
        ),
        (
            [WeightClustering(start_epoch=1, preserve_sparsity=False), Pruning(amount=0.5, schedule="oneshot")],
            "preserve_sparsity=False would cluster the zeros",
        ),
    ],
    ids=["start_epoch-past-training", "pattern", "pruning-not-done", "pruning-without-preserve_sparsity"],
)
def test_settings_that_cannot_work_fail_before_a_training_step(
    tmp_path, callbacks: list[L.Callback], message: str
) -> None:
    module = digits_module()
    before = {name: value.clone() for name, value in module.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.global_step == 0
    assert all(torch.equal(before[name], value) for name, value in module.state_dict().items())


@pytest.mark.parametrize("recipe, clusters", [("k16", 16), ("k32", 32)])
def test_the_recipes_cluster_after_the_default_pruning(compose_config, tmp_path, recipe: str, clusters: int) -> None:
    cfg = compose_config(f"+compression/clustering={recipe}", f"output_dir={tmp_path}")
    clustering = instantiate(cfg.compression.clustering)
    pruning = instantiate(cfg.compression.pruning, _convert_="all")
    trainer = L.Trainer(accelerator="cpu", max_epochs=cfg.trainer.max_epochs, logger=False)
    module = digits_module()
    pruning.setup(trainer, module, "fit")
    clustering.setup(trainer, module, "fit")
    assert (type(clustering), clustering.clusters, clustering.preserve_sparsity) == (WeightClustering, clusters, True)
    assert pruning.final_epoch() == 9 < clustering.final_epoch() == 10 < cfg.trainer.max_epochs == 20

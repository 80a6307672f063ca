"""What :class:`~lightning_compress.AutoCompression` minimizes, and with which methods: each objective names the
layers it compresses, the settings each may take next, how a setting is measured (its damage and what it costs),
and how a plan is applied and kept through training.

The costs of one measurement add up: a plan's cost is predicted as ``fixed`` plus the summed costs of its layers'
candidates, which is exact for the compressed file's bytes (each layer's weight is stored alone) and first order
for the channel objectives (each group's candidates are measured with the other groups where they stand; two
groups in a row save less together than the sum of what each saves alone), whose :meth:`Objective.predicted`
therefore measures a whole plan at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from lightning_compress.analysis.latency import measure_latencies
from lightning_compress.auto.allocation import plan_cost
from lightning_compress.auto.channels import (
    ChannelMasks,
    channel_settings,
    layer_macs,
    measure_channel_candidates,
    pruned_macs,
)
from lightning_compress.auto.integer import Int8Layers
from lightning_compress.auto.realization import CompressedWeights
from lightning_compress.auto.sensitivity import Candidate, PredictionDamage, measure_candidates
from lightning_compress.auto.settings import LayerSetting, next_settings
from lightning_compress.batches import ModelInputs, map_inputs
from lightning_compress.deploy.compressed import compressed_bytes, tensor_bytes
from lightning_compress.deploy.onnx import OnnxRuntimeModel, onnx_bytes
from lightning_compress.modules import eval_mode, model_copy
from lightning_compress.pruning.structured import ChannelGroups
from lightning_compress.quantization.calibration import calibrate
from lightning_compress.quantization.layers import set_quantization

#: The methods each objective may use, in the order it applies them (its default ``methods``).
OBJECTIVE_METHODS = {
    "compressed_bytes": ("pruning", "clustering"),
    "onnx_bytes": ("channels", "int8"),
    "macs": ("channels",),
    "latency": ("channels", "int8"),
}
OBJECTIVES = tuple(OBJECTIVE_METHODS)
#: What each objective's figures count, for people.
UNITS = {
    "compressed_bytes": "bytes compressed",
    "onnx_bytes": "bytes of ONNX",
    "macs": "MACs",
    "latency": "microseconds (ONNX Runtime)",
}


class Objective(Protocol):
    """An objective's layers, settings, measurements and realization (see the module's docstring)."""

    #: The layers it compresses, by name (for channels: each group's root layer).
    layers: dict[str, nn.Module]

    def settings(self, method: str, current: LayerSetting, layer: str) -> list[LayerSetting]:
        """``current`` and the settings ``method`` may take ``layer`` to next."""

    def measure(
        self, model: nn.Module, settings: Mapping[str, Sequence[LayerSetting]], batches: Sequence[ModelInputs]
    ) -> tuple[dict[str, list[Candidate]], int]:
        """Each layer at each of its ``settings``, alone, on ``batches``: the candidates by layer, and ``fixed``."""

    def predicted(self, plan: Mapping[str, Candidate]) -> int:
        """The model's cost with every layer as ``plan`` says."""

    def total(self, model: nn.Module) -> int:
        """The model's cost as it stands (its compressed file, graph, MACs or time)."""

    def layer_cost(self, layer: str) -> int:
        """``layer``'s own part of the cost as it stands (its weight's bytes, or its MACs)."""

    def layer_prediction(self, candidate: Candidate) -> int:
        """The own part of the cost predicted for ``candidate``, just applied to its layer."""

    def apply(self, plan: Mapping[str, LayerSetting], batches: Sequence[ModelInputs]) -> None:
        """Compress each named layer to its setting, from where it stands (``batches`` calibrate what needs it)."""

    def keep(self) -> None:
        """Put what the plan compressed back as it says (after each optimizer step)."""

    def share_gradients(self) -> None:
        """Shape the gradients to the plan (before each optimizer step)."""

    def finish(self) -> None:
        """Leave the model as the objective counts it, at the end of fit."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the realization: plain tensors."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The realization back from :meth:`state_dict`, beside the model's weights."""


class Realized:
    """What an objective does to the model, done by its ``realization`` (:class:`CompressedWeights` or
    :class:`~lightning_compress.auto.channels.ChannelMasks`), which has the same five methods."""

    realization: CompressedWeights | ChannelMasks

    def apply(self, plan: Mapping[str, LayerSetting], batches: Sequence[ModelInputs]) -> None:
        self.realization.apply(plan)

    def keep(self) -> None:
        self.realization.keep()

    def share_gradients(self) -> None:
        self.realization.share_gradients()

    def state_dict(self) -> dict[str, Any]:
        return self.realization.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.realization.load_state_dict(state)


class CompressedBytes(Realized):
    """``compressed_bytes``: the bytes of ``export(..., format="compressed")``, cut by unstructured pruning and
    shared values; a layer's cost is its weight's bytes in that format, ``fixed`` the bytes of everything else.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> objective = CompressedBytes(model, {"0": model[0]})
        >>> options, fixed = objective.measure(model, {"0": [LayerSetting(), LayerSetting(0.5)]}, [torch.randn(4, 8)])
        >>> fixed, [candidate.cost for candidate in options["0"]]
        (336, [512, 272])
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module], seed: int = 0) -> None:
        self.layers, self.seed = dict(layers), seed
        self.realization = CompressedWeights({name: layer.weight for name, layer in self.layers.items()}, seed)
        targeted = {id(layer.weight) for layer in self.layers.values()}
        self._fixed = sum(tensor_bytes(t) for t in model.state_dict(keep_vars=True).values() if id(t) not in targeted)

    def settings(self, method: str, current: LayerSetting, layer: str) -> list[LayerSetting]:
        return next_settings(method, current, self.layers[layer].weight.shape)

    def measure(
        self, model: nn.Module, settings: Mapping[str, Sequence[LayerSetting]], batches: Sequence[ModelInputs]
    ) -> tuple[dict[str, list[Candidate]], int]:
        return measure_candidates(model, self.layers, settings, batches, self.seed), self._fixed

    def predicted(self, plan: Mapping[str, Candidate]) -> int:
        """The bytes of the model with every layer as ``plan`` says (each weight is stored alone: exact)."""
        return self._fixed + plan_cost(plan)

    def total(self, model: nn.Module) -> int:
        return len(compressed_bytes(model))

    def layer_cost(self, layer: str) -> int:
        return tensor_bytes(self.layers[layer].weight)

    def layer_prediction(self, candidate: Candidate) -> int:
        """The weight's bytes as measured with its shared values estimated (before recovery)."""
        return candidate.cost

    def finish(self) -> None:
        """Nothing: the compressed format stores the kept zeros and shared values as they are."""


class ChannelMACs(Realized):
    """``macs``: the multiply-accumulates of one forward pass on ``example_input``, cut by removing whole channels.
    The layers are channel groups named by their root layer; a candidate's cost is what its group's channels
    change of the model's MACs (the others where they stand), ``fixed`` the model's MACs as it stands; at the
    end of fit the pruned channels are removed.

    Example:
        >>> import torch
        >>> from lightning_compress.models import SmallCNN
        >>> model = SmallCNN(num_classes=10, image_size=8)
        >>> objective = ChannelMACs(model, {"features.0": model.features[0]}, torch.zeros(1, 1, 8, 8))
        >>> options, fixed = objective.measure(
        ...     model, {"features.0": [LayerSetting(), LayerSetting(channels=0.5)]}, [torch.randn(4, 1, 8, 8)]
        ... )
        >>> fixed, [candidate.cost for candidate in options["features.0"]]
        (347392, [0, -156672])
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module], example_input: ModelInputs) -> None:
        self.channels = self.realization = ChannelMasks(model, example_input, layers)
        modules = dict(model.named_modules())
        self.layers = {name: modules[name] for name in self.channels.units}
        self.macs = layer_macs(model, example_input)

    def settings(self, method: str, current: LayerSetting, layer: str) -> list[LayerSetting]:
        return channel_settings(current, self.channels.units[layer])

    def costs(self, kept: Sequence[Mapping[str, torch.Tensor]], int8: bool = False) -> list[int]:
        """The model's MACs with each of ``kept`` (the kept channels of every group) removed (8 bits or not)."""
        return [pruned_macs(*self.macs, self.channels.groups.masks(dict(channels))) for channels in kept]

    def measure(
        self, model: nn.Module, settings: Mapping[str, Sequence[LayerSetting]], batches: Sequence[ModelInputs]
    ) -> tuple[dict[str, list[Candidate]], int]:
        with eval_mode(model):
            table = measure_channel_candidates(self.channels, settings, PredictionDamage(model, batches))
        rows = [(group, setting, damage, kept) for group, found in table.items() for setting, damage, kept in found[1:]]
        base, *costs = self.costs([self.channels.kept, *(kept for *_, kept in rows)], int8=self.int8_on)
        options = {group: [Candidate(group, found[0][0], 0.0, 0)] for group, found in table.items()}
        for (group, setting, damage, _), cost in zip(rows, costs):
            options[group].append(Candidate(group, setting, damage, cost - base))
        return options, base

    def predicted(self, plan: Mapping[str, Candidate]) -> int:
        """The model's cost with every group as ``plan`` says, all at once (unlike the summed costs)."""
        kept = {group: self.channels.kept_channels(group, c.setting) for group, c in plan.items()}
        return self.costs([{**self.channels.kept, **kept}], int8=any(c.setting.bits == 8 for c in plan.values()))[0]

    def total(self, model: nn.Module) -> int:
        return self.costs([self.channels.kept], int8=self.int8_on)[0]

    @property
    def int8_on(self) -> bool:
        """Whether the model computes in 8 bits (never, for MACs)."""
        return False

    def layer_cost(self, layer: str) -> int:
        return pruned_macs({layer: self.macs[0][layer]}, 0, self.channels.masks)

    def layer_prediction(self, candidate: Candidate) -> int:
        """The layer's MACs with the channels the plan keeps: exact, counted from the masks."""
        return self.layer_cost(candidate.layer)

    def finish(self) -> None:
        """Remove the pruned channels: the model gets smaller layers and the same outputs."""
        self.channels.remove()


class RemovedChannels(ChannelMACs):
    """The channel objectives measured on the model with the channels removed for real: a copy on the CPU, cut by
    Torch-Pruning (:meth:`removed`), in 8 bits where asked; what :meth:`measured` measures of it is the subclass's.
    With ``int8`` the targeted layers may go to 8 bits (the ``int8`` method, see :class:`Int8Layers`). Each
    model's cost is measured once (the same channels and bits cost the same)."""

    def __init__(
        self, model: nn.Module, layers: Mapping[str, nn.Module], example_input: ModelInputs, int8: bool = False
    ) -> None:
        self.int8 = Int8Layers(model, layers) if int8 else None  # before the channel groups trace the layers
        super().__init__(model, layers, example_input)
        self.model, self.layer_names = model, list(layers)
        self.example = map_inputs(example_input, lambda tensor: tensor.cpu())
        self._known: dict[tuple[Any, ...], int] = {}

    @property
    def int8_on(self) -> bool:
        return self.int8 is not None and self.int8.on

    def removed(self, kept: Mapping[str, torch.Tensor], int8: bool = False) -> nn.Module:
        """A copy of the model on the CPU with the channels ``kept`` leaves out removed, in 8 bits if ``int8`` (ranges
        the model has not calibrated yet observed on the traced input: what is timed and stored does not depend on
        them)."""
        with torch.inference_mode(False), torch.enable_grad():  # Torch-Pruning traces with autograd
            smaller = model_copy(self.model).cpu().float()
            modules = dict(smaller.named_modules())
            if kept:
                layers = {name: modules[name] for name in self.layer_names}
                ChannelGroups(smaller, self.example, layers).remove(dict(kept))
        if int8 and not self.int8_on:
            calibrate(smaller, [(self.example,)])
        elif not int8 and self.int8_on:
            set_quantization(smaller, enabled=False)
        return smaller

    def costs(self, kept: Sequence[Mapping[str, torch.Tensor]], int8: bool = False) -> list[int]:
        """The model's cost with each of ``kept`` removed, in 8 bits if ``int8``: measured where not known yet."""
        keys = [(int8, *sorted((group, channels.numpy().tobytes()) for group, channels in k.items())) for k in kept]
        missing = {key: channels for key, channels in zip(keys, kept) if key not in self._known}
        if missing:
            found = self.measured([self.removed(channels, int8) for channels in missing.values()])
            self._known |= dict(zip(missing, found))
        return [self._known[key] for key in keys]

    def measured(self, models: Sequence[nn.Module]) -> list[int]:
        """What the objective counts of each of ``models``."""
        raise NotImplementedError

    def apply(self, plan: Mapping[str, LayerSetting], batches: Sequence[ModelInputs]) -> None:
        """Prune each named group to its setting's channels; switch 8 bits on (calibrated on ``batches``) where the
        plan first asks for them."""
        super().apply(plan, batches)
        if any(setting.bits == 8 for setting in plan.values()) and not self.int8_on:
            self.int8.switch_on(batches)

    def finish(self) -> None:
        """Remove the pruned channels; a model that never kept 8 bits gets its float layers back."""
        super().finish()
        if self.int8 is not None and not self.int8.on:
            self.int8.to_float()


class ChannelONNXBytes(RemovedChannels):
    """``onnx_bytes``: the bytes of the model's ONNX graph (what a runtime loads: ``export(..., format="onnx")``),
    cut by removing whole channels. Each cost is the graph of the model with those channels removed, exported.
    A layer's own part is its MACs.

    Example:
        >>> import torch
        >>> from lightning_compress.models import SmallCNN
        >>> model = SmallCNN(num_classes=10, image_size=8)
        >>> objective = ChannelONNXBytes(model, {"features.0": model.features[0]}, torch.zeros(1, 1, 8, 8))
        >>> dense, smaller = objective.costs([{}, {"features.0": torch.arange(32) % 2 == 0}])
        >>> dense - smaller > 4 * 16 * 64 * 9  # half of the second convolution's weights, at least
        True
    """

    def measured(self, models: Sequence[nn.Module]) -> list[int]:
        """The bytes of each model's ONNX graph."""
        return [len(onnx_bytes(model, self.example)) for model in models]


class ChannelLatency(RemovedChannels):
    """``latency``: the time of one forward pass of ``batch_size`` samples in ONNX Runtime on this machine (one
    thread), cut by removing whole channels, in microseconds. Each cost is the model with those channels removed,
    exported and timed in the same interleaved, shuffled rounds as the dense model (see ``measure_latencies``),
    as the dense model's time measured at the start times their ratio, so that figures measured at different
    times compare. A layer's own part is its MACs (a time is the whole model's).

    Example:
        >>> import torch
        >>> from lightning_compress.models import SmallCNN
        >>> model = SmallCNN(num_classes=10, image_size=8)
        >>> objective = ChannelLatency(model, {"features.0": model.features[0]}, torch.zeros(1, 1, 8, 8), batch_size=4)
        >>> half = {"features.0": torch.arange(32) % 2 == 0}
        >>> dense, smaller = objective.costs([{}, half])
        >>> dense > 0 and smaller > 0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        example_input: ModelInputs,
        batch_size: int = 256,
        repeats: int = 20,
        int8: bool = False,
    ) -> None:
        super().__init__(model, layers, example_input, int8)
        self.repeats = repeats
        self.example = map_inputs(self.example, lambda tensor: tensor[torch.arange(batch_size) % len(tensor)])
        self.dense = self._runtime(self.removed({}, int8=False))
        self.dense_microseconds = self._timed({"dense": self.dense})["dense"]

    def _runtime(self, model: nn.Module) -> OnnxRuntimeModel:
        """``model`` in an ONNX Runtime session of one thread."""
        return OnnxRuntimeModel.from_module(model, self.example, num_threads=1)

    def _timed(self, runtimes: Mapping[str, OnnxRuntimeModel]) -> dict[str, float]:
        results = measure_latencies(
            {name: (runtime, self.example) for name, runtime in runtimes.items()}, warmup=2, repeats=self.repeats
        )
        return {name: 1000.0 * result.median_ms for name, result in results.items()}

    def measured(self, models: Sequence[nn.Module]) -> list[int]:
        """Each model's microseconds: timed beside the dense model, scaled to its first time."""
        runtimes = {str(index): self._runtime(model) for index, model in enumerate(models)}
        timed = self._timed({"dense": self.dense, **runtimes})
        scale = self.dense_microseconds / timed["dense"]
        return [round(timed[str(index)] * scale) for index in range(len(models))]


def objective_for(
    name: str,
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    example_input: ModelInputs | None,
    seed: int = 0,
    latency_batch_size: int = 256,
    int8: bool = False,
) -> Objective:
    """The objective ``name`` of :data:`OBJECTIVES` for ``model``'s ``layers``: the channel objectives trace the model
    on ``example_input`` (a training batch); ``seed`` is k-means' and ``latency_batch_size`` the timed batch;
    ``int8``: the layers may go to 8 bits (the ``int8`` method of ``latency`` and ``onnx_bytes``).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> type(objective_for("compressed_bytes", model, {"0": model[0]}, None)).__name__
        'CompressedBytes'
    """
    if name == "compressed_bytes":
        return CompressedBytes(model, layers, seed)
    if name == "latency":
        return ChannelLatency(model, layers, example_input, latency_batch_size, int8=int8)
    if name == "onnx_bytes":
        return ChannelONNXBytes(model, layers, example_input, int8)
    return ChannelMACs(model, layers, example_input)

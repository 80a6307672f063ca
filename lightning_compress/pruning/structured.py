"""Channel pruning over coupled layers: Torch-Pruning's dependency graph finds what a channel touches.

Removing output channel ``c`` of a convolution also removes ``c`` from its BatchNorm, from the input of
every layer that reads it, and, through residual additions, from every layer coupled to it. Torch-Pruning's
``DependencyGraph`` (DepGraph, Fang et al. 2023) finds these groups. :class:`ChannelGroups` scores each
group's channels with this project's criteria, turns pruned channels into masks over every parameter they
touch (so the masked model computes what the smaller one will), and finally removes them for real.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch_pruning as tp
from torch import nn

from lightning_compress.batches import ModelInputs, call_model, output_logits
from lightning_compress.modules import WEIGHT_LAYER_TYPES, eval_mode, model_copy
from lightning_compress.protocols import HasOutputChannelState
from lightning_compress.pruning.criteria import channel_scores


def _grouped_across_channels(conv: nn.modules.conv._ConvNd) -> bool:
    """A grouped convolution whose groups each read several input channels (not depthwise: one channel a group)."""
    return conv.groups > 1 and conv.in_channels != conv.groups


class ChannelGroups:
    """The prunable channel groups of ``model``, one per targeted root layer.

    A group whose channels no other layer reads (the output layer's classes) is never prunable.

    Example:
        >>> import torch
        >>> from lightning_compress.models import SmallCNN
        >>> model = SmallCNN(num_classes=10, image_size=8)
        >>> layers = {"features.0": model.features[0], "features.4": model.features[4], "classifier.1": model.classifier[1]}
        >>> groups = ChannelGroups(model, torch.zeros(1, 1, 8, 8), layers)
        >>> groups.units
        {'features.0': 32, 'features.4': 64, 'classifier.1': 128}
        >>> keep = {name: torch.arange(n) % 2 == 0 for name, n in groups.units.items()}
        >>> groups.remove(keep)
        >>> model.features[0].out_channels, model.classifier[1].in_features, model.classifier[1].out_features
        (16, 128, 64)
    """

    def __init__(self, model: nn.Module, example_input: ModelInputs, layers: dict[str, nn.Module]) -> None:
        self._names = {module: name for name, module in model.named_modules()}
        self._parameter_names = {parameter: name for name, parameter in model.named_parameters()}
        ignored = [m for m in model.modules() if isinstance(m, WEIGHT_LAYER_TYPES) and m not in layers.values()]
        for name, module in layers.items():
            if isinstance(module, nn.modules.conv._ConvNd) and (module.transposed or _grouped_across_channels(module)):
                raise ValueError(
                    f"channel pruning handles plain and depthwise convolutions; {name!r} is "
                    + ("transposed" if module.transposed else f"grouped ({module.groups} groups of several channels)")
                )
        with eval_mode(model):
            self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        roots = {
            group[0].dep.target.module: group[0].dep.handler
            for group in self.graph.get_all_groups(ignored_layers=ignored, root_module_types=WEIGHT_LAYER_TYPES)
            if self._has_readers(group)
        }
        self._roots = {name: (module, roots[module]) for name, module in model.named_modules() if module in roots}
        if not self._roots:
            raise ValueError("no output channel of the targeted layers can be pruned (the output layer never is)")

    def _has_readers(self, group: tp.Group) -> bool:
        """Whether some weight layer reads the group's channels as its inputs (else they are model outputs)."""
        return any(
            isinstance(item.dep.target.module, WEIGHT_LAYER_TYPES)
            and self.graph.is_in_channel_pruning_fn(item.dep.handler)
            for item in group
        )

    @property
    def units(self) -> dict[str, int]:
        """The prunable units of each group: its root layer's output channels."""
        return {name: self.graph.get_out_channels(root) for name, (root, _) in self._roots.items()}

    def _group(self, name: str, channels: list[int]) -> tp.Group:
        root, handler = self._roots[name]
        return self.graph.get_pruning_group(root, handler, idxs=channels)

    def scores(
        self, criterion: str, taylor: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-channel importance of each group: the sum over the group's layers whose outputs it prunes."""
        taylor = taylor or {}
        result = {}
        for name, count in self.units.items():
            total = torch.zeros(count)
            for item in self._group(name, list(range(count))):
                module, handler = item.dep.target.module, item.dep.handler
                if isinstance(module, WEIGHT_LAYER_TYPES) and self.graph.is_out_channel_pruning_fn(handler):
                    layer_taylor = taylor.get(f"{self._names[module]}.weight")
                    per_channel = channel_scores(module.weight, criterion, layer_taylor, generator).cpu().float()
                    # root_idxs map this layer's channels onto the root's (they differ across concat/split)
                    total.index_add_(0, torch.tensor(item.root_idxs), per_channel[list(item.idxs)])
            result[name] = total
        return result

    def masks(self, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Boolean masks, by parameter name, over every parameter that the pruned channels touch."""
        masks: dict[str, torch.Tensor] = {}
        for name, kept in keep.items():
            pruned = (~kept).nonzero().flatten().tolist()
            if not pruned:
                continue
            for item in self._group(name, pruned):
                holder, touched = self._cut_tensors(item.dep.target.module, item.dep.handler)
                for tensor_name, tensor, dim in touched:
                    if isinstance(tensor, nn.Parameter):
                        key = ".".join(filter(None, (self._names[holder], tensor_name)))
                        mask = masks.setdefault(key, torch.ones_like(tensor, dtype=torch.bool))
                        mask.index_fill_(dim, torch.tensor(list(item.idxs), device=mask.device), False)
        return masks

    def _cut_tensors(
        self, module: nn.Module | nn.Parameter, handler: object
    ) -> tuple[nn.Module, list[tuple[str, torch.Tensor, int]]]:
        """The module holding what a pruned channel of ``module`` cuts, and ``(name in it, tensor, dimension)``
        of each such tensor. A parameter outside any layer (a ViT's class token and position embedding, which
        Torch-Pruning cuts along their last dimension) is held by the module it is an attribute of."""
        if isinstance(module, nn.Parameter):
            owner, _, attribute = self._parameter_names[module].rpartition(".")
            holder = next(m for m, name in self._names.items() if name == owner)
            return holder, [(attribute, module, self.graph.module2node[module].pruning_dim)]
        return module, self._touched(module, handler)

    def _touched(self, module: nn.Module, handler: object) -> list[tuple[str, torch.Tensor, int]]:
        """``(name, tensor, dimension)`` of each parameter and buffer of ``module`` that a pruned channel cuts."""
        group_size = getattr(getattr(module, "weight_quantizer", None), "group_size", None)
        if group_size is not None:
            raise ValueError(
                f"{type(module).__name__} has a weight scale per group of {group_size} input columns, which "
                "channel removal would cut across: remove channels first, then quantize"
            )
        if isinstance(module, WEIGHT_LAYER_TYPES):
            depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1  # a channel is a row
            if self.graph.is_out_channel_pruning_fn(handler) or depthwise:
                return [(n, p, 0) for n, p in module.named_parameters(recurse=False)]
            return [("weight", module.weight, 1)]
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        return [(n, t, 0) for n, t in tensors if t.dim() == 1]  # BatchNorm's affine parameters and statistics

    def _extra_output_channel_state(self, module: nn.Module, handler: object) -> list[tuple[str, torch.Tensor, int]]:
        """Per-output-channel tensors a layer keeps besides weight and bias, if it says so
        (:class:`~lightning_compress.protocols.HasOutputChannelState`: a quantized layer's weight scales and ranges)."""
        if not isinstance(module, HasOutputChannelState) or not self.graph.is_out_channel_pruning_fn(handler):
            return []
        return [(name, tensor, 0) for name, tensor in module.output_channel_state().items()]

    def remove(self, keep: dict[str, torch.Tensor]) -> None:
        """Physically remove the channels that ``keep`` marks ``False``: the model becomes smaller and dense.

        A layer's own per-output-channel state (``output_channel_state()``: the weight quantizer's scales
        and observed ranges of a quantized layer) is cut with its weight's rows, so a quantized model can
        lose channels too. Each cut module gets a ``load_state_dict`` pre-hook that cuts full-size tensors the same way, so
        state dicts saved before the removal (the checkpoints written during training) load into it.
        """
        cutters: dict[nn.Module, _CutOnLoad] = {}
        for name, kept in keep.items():
            pruned = (~kept).nonzero().flatten().tolist()
            if not pruned:
                continue
            group = self._group(name, pruned)
            extra_cuts = []
            for item in group:
                module, removed = item.dep.target.module, set(item.idxs)
                holder, touched = self._cut_tensors(module, item.dep.handler)
                cutter = cutters.setdefault(holder, _CutOnLoad())
                cut_by_torch_pruning = [(*cut, False) for cut in touched]
                cut_here = [(*extra, True) for extra in self._extra_output_channel_state(module, item.dep.handler)]
                for tensor_name, tensor, dim, ours in cut_by_torch_pruning + cut_here:
                    full_shape, kept_indices = cutter.cuts.setdefault(tensor_name, (tensor.shape, {}))
                    kept_indices[dim] = torch.tensor([i for i in range(full_shape[dim]) if i not in removed])
                    if ours:
                        extra_cuts.append((module, tensor_name, tensor, kept_indices[dim]))
            group.prune()  # Torch-Pruning cuts weights, biases and BatchNorm; the extra per-channel state is ours
            for module, tensor_name, tensor, kept_indices in extra_cuts:
                _replace_tensor(module, tensor_name, tensor.detach().index_select(0, kept_indices.to(tensor.device)))
        for module, cutter in cutters.items():
            module.register_load_state_dict_pre_hook(cutter)


def _replace_tensor(module: nn.Module, dotted_name: str, value: torch.Tensor) -> None:
    """Set the parameter or buffer ``dotted_name`` of ``module`` (e.g. ``weight_quantizer.scale``) to ``value``."""
    owner_name, _, attribute = dotted_name.rpartition(".")
    owner = module.get_submodule(owner_name)
    old = getattr(owner, attribute)
    setattr(
        owner,
        attribute,
        nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value,
    )


class _CutOnLoad:
    """A ``load_state_dict`` pre-hook: tensors of a module's former full shape are cut to what removal kept."""

    def __init__(self) -> None:
        self.cuts: dict[str, tuple[torch.Size, dict[int, torch.Tensor]]] = {}

    def __call__(self, module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
        for name, (full_shape, kept_indices) in self.cuts.items():
            tensor = state_dict.get(prefix + name)
            if tensor is not None and tensor.shape == full_shape:
                for dim, indices in kept_indices.items():
                    tensor = tensor.index_select(dim, indices.to(tensor.device))
                state_dict[prefix + name] = tensor


class PrunableGroups(Protocol):
    """Units of a model pruned and removed together: :class:`ChannelGroups` (channels) or heads of attention."""

    def __init__(self, model: nn.Module, example_input: ModelInputs, layers: dict[str, nn.Module]) -> None: ...

    @property
    def units(self) -> dict[str, int]: ...

    def scores(
        self, criterion: str, taylor: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]: ...

    def masks(self, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def remove(self, keep: dict[str, torch.Tensor]) -> None: ...


def check_removal(
    model: nn.Module,
    example_input: ModelInputs,
    layers: dict[str, nn.Module],
    groups: type[PrunableGroups] = ChannelGroups,
) -> None:
    """Refuse, naming the layers, a model that removing ``groups``' units would break.

    Every other unit of each group (channel, or head) is masked in a copy of ``model``, then removed:
    the smaller copy must run on ``example_input`` and compute what the masked one did. A model that
    reshapes a layer's output channels (the heads of an attention), or normalizes over a width the pruning
    cuts (a transformer's residual stream under LayerNorm), fails here rather than after training. The
    layers whose removal alone breaks it are named, to be left out with ``exclude``.
    """
    problem = _removal_problem(model, example_input, layers, groups, None)
    if problem is None:
        return
    copy = model_copy(model)
    roots = list(groups(copy, example_input, _same_layers(copy, layers)).units)
    culprits = [name for name in roots if _removal_problem(model, example_input, layers, groups, name) is not None]
    raise ValueError(
        f"removing pruned units would break {type(model).__name__} ({problem}): removing the units of "
        f"{culprits or roots} breaks it; leave those layers out with exclude=[...] (their channels "
        "are an attention's heads, which granularity='head' prunes whole, or a width a normalization reads whole)"
    )


@torch.no_grad()
def _randomize(model: nn.Module) -> None:
    """Fill every parameter of ``model`` with seeded normal values scaled by ``1 / sqrt(fan-in)``."""
    generator = torch.Generator().manual_seed(0)
    for parameter in model.parameters():
        fan_in = parameter[0].numel() if parameter.dim() > 1 else 1
        values = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) / fan_in**0.5
        parameter.copy_(values.to(parameter.device))


def _same_layers(copy: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    modules = dict(copy.named_modules())
    return {name: modules[name] for name in layers}


def _removal_problem(
    model: nn.Module,
    example_input: ModelInputs,
    layers: dict[str, nn.Module],
    groups: type[PrunableGroups],
    only: str | None,
) -> str | None:
    """Why a copy of ``model`` with every other unit of each group (or of group ``only``) removed does not
    compute on ``example_input`` what the masked copy does; ``None`` when it does.

    The copy gets random weights of unit gain first: the check is of the model's structure, and the small
    weights of a freshly initialized transformer make its attention nearly uniform, which would hide heads
    mixed up by a removal.
    """
    trial = model_copy(model)
    _randomize(trial)
    trial_groups = groups(trial, example_input, _same_layers(trial, layers))
    keep = {name: torch.arange(count) % 2 == 0 for name, count in trial_groups.units.items() if only in (None, name)}
    parameters = dict(trial.named_parameters())
    with torch.no_grad(), eval_mode(trial):
        for name, mask in trial_groups.masks(keep).items():
            parameters[name].mul_(mask)
        masked = output_logits(call_model(trial, example_input))
    trial_groups.remove(keep)
    try:
        with torch.no_grad(), eval_mode(trial):
            removed = output_logits(call_model(trial, example_input))
    except Exception as error:  # whatever the model raises, it is the reason to refuse it
        return f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')}"
    if removed.shape != masked.shape:
        return f"outputs of shape {list(removed.shape)} instead of {list(masked.shape)}"
    difference = float((removed - masked).abs().max())
    scale = max(float(masked.abs().max()), 1.0)
    return None if difference <= 1e-4 * scale else f"outputs differ from the masked model's by up to {difference:.3g}"

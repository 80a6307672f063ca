"""Channel pruning over coupled layers: Torch-Pruning's dependency graph finds what a channel touches.

Removing output channel ``c`` of a convolution also removes ``c`` from its BatchNorm, from the input of
every layer that reads it, and, through residual additions, from every layer coupled to it. Torch-Pruning's
``DependencyGraph`` (DepGraph, Fang et al. 2023) finds these groups. :class:`ChannelGroups` scores each
group's channels with this project's criteria, turns pruned channels into masks over every parameter they
touch (so the masked model computes what the smaller one will), and finally removes them for real.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from lightning_compress.analysis.measure import eval_mode
from lightning_compress.pruning.criteria import channel_scores

_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


class ChannelGroups:
    """The prunable channel groups of ``model``, one per targeted root layer.

    Example:
        >>> import torch
        >>> from lightning_compress.models import SmallCNN
        >>> model = SmallCNN(num_classes=10, image_size=8)
        >>> layers = {"features.0": model.features[0], "features.4": model.features[4], "classifier.1": model.classifier[1]}
        >>> groups = ChannelGroups(model, torch.zeros(1, 1, 8, 8), layers)
        >>> groups.channels
        {'features.0': 32, 'features.4': 64, 'classifier.1': 128}
        >>> keep = {name: torch.arange(n) % 2 == 0 for name, n in groups.channels.items()}
        >>> groups.remove(keep)
        >>> model.features[0].out_channels, model.classifier[1].in_features, model.classifier[1].out_features
        (16, 128, 64)
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, layers: dict[str, nn.Module]) -> None:
        self.model = model
        self._names = {module: name for name, module in model.named_modules()}
        outputs = _output_layers(model, example_input)
        ignored = [m for m in model.modules() if isinstance(m, _WEIGHT_LAYERS) and (m in outputs or m not in layers.values())]
        for name, module in layers.items():
            if isinstance(module, nn.modules.conv._ConvNd) and (module.groups > 1 or module.transposed):
                raise ValueError(f"channel pruning handles plain convolutions; {name!r} is grouped or transposed")
        with eval_mode(model):
            self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        roots = {
            group[0].dep.target.module: group[0].dep.handler
            for group in self.graph.get_all_groups(ignored_layers=ignored, root_module_types=_WEIGHT_LAYERS)
        }
        self._roots = {name: (module, roots[module]) for name, module in model.named_modules() if module in roots}
        if not self._roots:
            raise ValueError("no output channel of the targeted layers can be pruned (the output layer never is)")

    @property
    def channels(self) -> dict[str, int]:
        """Number of output channels of each group's root layer."""
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
        for name, count in self.channels.items():
            total = torch.zeros(count)
            for item in self._group(name, list(range(count))):
                module, handler = item.dep.target.module, item.dep.handler
                if isinstance(module, _WEIGHT_LAYERS) and self.graph.is_out_channel_pruning_fn(handler):
                    layer_taylor = taylor.get(f"{self._names[module]}.weight")
                    per_channel = channel_scores(module.weight, criterion, layer_taylor, generator).cpu()
                    total += per_channel[list(item.idxs)]
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
                module, idxs = item.dep.target.module, list(item.idxs)
                for param_name, param, dim in self._touched(module, item.dep.handler):
                    mask = masks.setdefault(f"{self._names[module]}.{param_name}", torch.ones_like(param, dtype=torch.bool))
                    mask.index_fill_(dim, torch.tensor(idxs, device=mask.device), False)
        return masks

    def _touched(self, module: nn.Module, handler: object) -> list[tuple[str, torch.Tensor, int]]:
        """``(parameter name, parameter, dimension)`` that a pruned channel zeroes in ``module``."""
        if isinstance(module, _WEIGHT_LAYERS):
            if self.graph.is_out_channel_pruning_fn(handler):
                return [(n, p, 0) for n, p in module.named_parameters(recurse=False)]
            return [("weight", module.weight, 1)]
        return [(n, p, 0) for n, p in module.named_parameters(recurse=False) if p.dim() == 1]

    def remove(self, keep: dict[str, torch.Tensor]) -> None:
        """Physically remove the channels that ``keep`` marks ``False``: the model becomes smaller and dense."""
        for name, kept in keep.items():
            pruned = (~kept).nonzero().flatten().tolist()
            if pruned:
                self._group(name, pruned).prune()


def _output_layers(model: nn.Module, example_input: torch.Tensor) -> set[nn.Module]:
    """The weight layers whose output tensor is the model's output (their output channels are the classes)."""
    produced: dict[int, nn.Module] = {}
    hooks = [
        module.register_forward_hook(lambda module, args, output: produced.__setitem__(id(output), module))
        for module in model.modules()
        if isinstance(module, _WEIGHT_LAYERS)
    ]
    try:
        with eval_mode(model), torch.no_grad():
            output = model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    outputs = output if isinstance(output, (tuple, list)) else [output]
    return {produced[id(tensor)] for tensor in outputs if id(tensor) in produced}

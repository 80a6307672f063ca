"""Pruning in plain PyTorch: masks from importance scores, applied to the weights and kept at zero after each step."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_compress.batches import ModelInputs, placed_like
from lightning_compress.finiteness import require_finite
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.criteria import element_scores, lamp_scores, normalize_per_layer
from lightning_compress.pruning.heads import AttentionHeadGroups
from lightning_compress.pruning.masks import check_row_floor, forget_pruned, n_of_m_masks, rank_masks, threshold_masks
from lightning_compress.pruning.structured import ChannelGroups, PrunableGroups, check_removal
from lightning_compress.targets import explicit_fused_attention, select_layers, warn_if_few_targeted

#: What a :class:`Pruner` hands its new masks to before using them (DDP: rank zero's, broadcast to all).
Share = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class Pruner:
    """Prunes the targeted Conv and Linear weights of ``model`` to a sparsity and keeps the pruned ones at zero.

    :meth:`prune` ranks the weights (or the output channels, with channel granularity, or the attention
    heads, with head granularity, together with everything each one touches) by the config's criterion and
    writes the masks into the weights; masks only grow, so a pruned weight is never revived. A global ranking
    compares layers of different scales by each score's standing in its own layer: weights by their LAMP
    scores (:func:`~lightning_compress.pruning.criteria.lamp_scores`, for magnitude and Taylor; random and
    your own scores are ranked as they are), channels and heads by their score over their layer's mean. Every
    output unit keeps at least one weight (with channel or head granularity every layer keeps one channel or
    head), so no layer is ever emptied; an amount that cannot leave that much is refused here, before any
    pruning, and a layer whose scores are all zero (zero-initialised) is named in a warning. :meth:`attach`
    keeps the zeros after every step of an optimizer. Channel granularity traces ``model`` on
    ``example_input``. No Lightning needed: the :class:`~lightning_compress.Pruning` callback decides *when*
    and calls this.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> pruner = Pruner(model, PruningConfig(amount=0.75))
        >>> pruner.prune()
        >>> pruner.sparsity()["pruning/sparsity"]
        0.75
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> handle = pruner.attach(optimizer)  # pruned weights stay zero after optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        config: PruningConfig,
        example_input: ModelInputs | None = None,
        warn: Callable[[str], Any] = warnings.warn,
    ) -> None:
        self.config = config
        self.warn = warn
        explicit_fused_attention(model, "Pruning", warn)
        layers = select_layers(model, config.layers, config.exclude)
        warn_if_few_targeted(model, layers, "Pruning", warn)
        self.layers = {f"{name}.weight": module for name, module in layers.items()}
        self.parameters = {name: module.weight for name, module in self.layers.items()}
        self.all_parameters = dict(model.named_parameters())
        self.masks: dict[str, torch.Tensor] = {}
        #: Channel and head granularity: the kept units (channels, or heads) of each group, by its root layer.
        self.channel_keep: dict[str, torch.Tensor] = {}
        self.groups: PrunableGroups | None = None
        if config.n_of_m:
            self._drop_layers_without_n_of_m_groups(warn)
        if config.structured:
            if example_input is None:
                raise ValueError(f"{config.granularity} pruning traces the model on one input: give example_input")
            first = next(model.parameters())
            example_input = placed_like(example_input, first.device, first.dtype)
            groups = AttentionHeadGroups if config.granularity == "head" else ChannelGroups
            check_removal(model, example_input, layers, groups)
            self.groups = groups(model, example_input, layers)
        if config.layer_amounts is not None:
            prunable = self.groups.units if self.groups is not None else layers
            left_out = [layer for layer in config.layer_amounts if layer not in prunable]
            if left_out:
                raise ValueError(
                    f"amount per layer names {left_out}, which this pruning would leave as they are (excluded, or not the "
                    f"root of a group of channels or heads: the output layer never is); it can prune {list(prunable)}"
                )
        self._check_row_floor()

    def _drop_layers_without_n_of_m_groups(self, warn: Callable[[str], Any]) -> None:
        """Skip (default targets, with a warning) or refuse (explicit targets) weights whose input dimension is
        not a multiple of M."""
        n, m = self.config.n_of_m
        unfit = [name for name, weight in self.parameters.items() if weight.dim() < 2 or weight.shape[1] % m]
        if unfit and self.config.targets is not None:
            shapes = {name: tuple(self.parameters[name].shape) for name in unfit}
            raise ValueError(
                f"{n}:{m} sparsity needs the input dimension of each target divisible by {m}; these are not: {shapes}"
            )
        if len(unfit) == len(self.parameters):
            raise ValueError(f"{n}:{m} sparsity needs input dimensions divisible by {m}; no targeted layer has one")
        if unfit:
            warn(f"Pruning {n}:{m}: leaving {unfit} dense, their input dimension is not a multiple of {m}")
        self.parameters = {name: weight for name, weight in self.parameters.items() if name not in unfit}

    def _check_row_floor(self) -> None:
        """Refuse a final amount that would have to empty an output unit (see :func:`check_row_floor`)."""
        config = self.config
        if config.threshold is not None or config.n_of_m or config.final_amount is None:
            return
        if self.groups is not None:
            shapes, suffix = {name: torch.Size([count]) for name, count in self.groups.units.items()}, ""
        else:
            shapes, suffix = {name: weight.shape for name, weight in self.parameters.items()}, ".weight"
        check_row_floor(shapes, *self._target(config.final_amount)(suffix))

    @torch.no_grad()
    def prune(
        self,
        sparsity: float | None = None,
        *,
        taylor: dict[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        share: Share | None = None,
    ) -> None:
        """Mask the weights to ``sparsity`` (the config's amount by default; with amounts per layer, the
        same fraction of each layer's amount), never reviving a pruned weight, and zero them.

        ``taylor`` holds the summed ``|w * dL/dw|`` of each weight for ``criterion="taylor"``; ``generator``
        seeds the random criterion (by default from the config's seed); ``share`` passes the new masks
        (or kept channels) through, e.g. to broadcast rank zero's to every DDP rank.
        """
        config = self.config
        share = share or (lambda tensors: tensors)
        generator = generator or torch.Generator().manual_seed(config.seed)
        if config.criterion == "taylor" and not taylor:
            raise ValueError("criterion='taylor' needs the summed |w * dL/dw| of each weight: pass taylor=")
        target = self._target(config.final_amount if sparsity is None else sparsity)
        weights = {name: weight.detach() for name, weight in self.parameters.items()}
        require_finite(weights, "Pruning ranks the weights it prunes")
        if config.threshold is not None:
            masks = threshold_masks(weights, config.threshold)
        elif self.groups is not None:
            scores = normalize_per_layer(
                self._warn_if_blank(self.groups.scores(config.criterion, taylor or {}, generator))
            )
            keep = rank_masks(forget_pruned(scores, self.channel_keep), *target(""))
            keep = {name: kept & self.channel_keep.get(name, kept) for name, kept in keep.items()}
            self.channel_keep = share(keep)
            masks = self.groups.masks(self.channel_keep)
        else:
            scores = self._warn_if_blank(self._element_scores(weights, taylor or {}, generator))
            if config.n_of_m:
                masks = n_of_m_masks(forget_pruned(scores, self.masks), *config.n_of_m)
            else:
                sparsity, scope = target(".weight")
                if scope == "global" and config.criterion in ("magnitude", "taylor"):
                    scores = lamp_scores(scores)  # layers of different scales compare
                masks = rank_masks(forget_pruned(scores, self.masks), sparsity, scope)
        masks = {name: mask & self.masks[name] if name in self.masks else mask for name, mask in masks.items()}
        shared = share({name: mask.cpu() for name, mask in masks.items()})
        self.masks = {name: mask.to(self.all_parameters[name].device) for name, mask in shared.items()}
        self.apply()

    def _warn_if_blank(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``scores``, after a warning naming the layers whose scores are all zero: which of their weights
        survive (at least one per output unit) is arbitrary."""
        blank = [name for name, score in scores.items() if not score.any()]
        if blank:
            self.warn(
                f"Pruning: every importance score of {blank} is zero (zero-initialised, or reached by no gradient), "
                "so which of their weights survive is arbitrary (each output unit keeps one): exclude them, or "
                "start pruning after some training (start_epoch >= 1)"
            )
        return scores

    def _element_scores(
        self, weights: dict[str, torch.Tensor], taylor: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Each weight's importance: the named criterion's, or the callable's, checked for the weight's shape."""
        criterion = self.config.criterion
        if not callable(criterion):
            return {
                name: element_scores(weight, criterion, taylor.get(name), generator) for name, weight in weights.items()
            }
        scores = {name: criterion(self.layers[name]).detach() for name in weights}
        for name, score in scores.items():
            if not isinstance(score, torch.Tensor) or score.shape != weights[name].shape:
                shape = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
                raise ValueError(
                    f"the criterion's score for {name!r} has shape {shape}; it must be the weight's, {tuple(weights[name].shape)}"
                )
        require_finite(scores, "Pruning ranks the criterion's scores")
        return scores

    def _target(self, sparsity: float) -> Callable[[str], tuple[float | dict[str, float], str]]:
        """Sparsity and scope of the masks, given the suffix the mask names add to layer names (".weight" or
        ""): with amounts per layer each layer gets ``sparsity / final amount`` of its own, ranked alone."""
        amounts, final = self.config.layer_amounts, self.config.final_amount
        if amounts is None:
            return lambda suffix: (sparsity, self.config.scope)
        progress = sparsity / final if final else 0.0
        return lambda suffix: ({f"{layer}{suffix}": amount * progress for layer, amount in amounts.items()}, "layer")

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight (one fused multiply over all masked tensors)."""
        if self.masks:
            names = list(self.masks)
            torch._foreach_mul_([self.all_parameters[name] for name in names], [self.masks[name] for name in names])

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.utils.hooks.RemovableHandle:
        """Re-apply the masks after every ``optimizer.step()``; remove the returned handle to stop."""
        return optimizer.register_step_post_hook(lambda *_: self.apply())

    def sparsity(self) -> dict[str, float]:
        """``{"pruning/sparsity": global, "pruning/sparsity/<weight>": per layer}``: the targeted weights' fraction of exact zeros.

        The zeros are counted in the weights themselves (each tensor once), not in the masks: a NaN weight
        stays NaN under a mask of 0, and is not counted as pruned.
        """
        pruned = {name: int((weight.detach() == 0).sum()) for name, weight in self.parameters.items()}
        sizes = {name: weight.numel() for name, weight in self.parameters.items()}
        metrics = {"pruning/sparsity": sum(pruned.values()) / sum(sizes.values())}
        metrics.update({f"pruning/sparsity/{name}": pruned[name] / sizes[name] for name in self.parameters})
        return metrics

    def remove_channels(self, model: nn.Module) -> None:
        """Cut the pruned channels (or heads) out of ``model``: smaller layers, the same outputs."""
        if self.groups is None or not self.channel_keep:
            return
        self.groups.remove(self.channel_keep)
        self.masks, self.channel_keep = {}, {}
        self.parameters = {name: p for name, p in model.named_parameters() if name in self.parameters}
        self.all_parameters = dict(model.named_parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks, "channel_keep": self.channel_keep}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Masks and kept channels, moved beside the weights they mask."""
        self.masks = {name: mask.to(self.all_parameters[name].device) for name, mask in state_dict["masks"].items()}
        self.channel_keep = dict(state_dict["channel_keep"])


def prune_(
    model: nn.Module,
    amount: float | dict[str, float] | None = None,
    *,
    example_input: torch.Tensor | None = None,
    **settings: Any,
) -> Pruner:
    """Prune ``model`` in place, once, to ``amount`` (settings as :class:`PruningConfig`); returns its :class:`Pruner`.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> pruner = prune_(model, 0.5, scope="layer")
        >>> int((model[0].weight == 0).sum()), int((model[2].weight == 0).sum())
        (32, 8)
    """
    pruner = Pruner(model, PruningConfig(amount=amount, **settings), example_input)
    pruner.prune()
    return pruner

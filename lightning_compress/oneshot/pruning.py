"""One-shot pruning in plain PyTorch: Wanda, SparseGPT or magnitude, from the inputs each linear layer sees on
a few calibration batches, into the masks of a :class:`~lightning_compress.pruning.Pruner`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_compress.arguments import check_argument, is_int, is_number
from lightning_compress.finiteness import require_finite
from lightning_compress.oneshot.hessian import BLOCK_SIZE, DAMPING, InputGram, inverse_hessian_factor
from lightning_compress.oneshot.layer_inputs import calibration_inputs, compress_layer_by_layer
from lightning_compress.oneshot.reconstruction import RECONSTRUCTION_DAMPING, reconstruct_surviving_weights
from lightning_compress.oneshot.rollback import restored_on_error
from lightning_compress.oneshot.sparsegpt import sparsegpt_prune
from lightning_compress.oneshot.wanda import row_masks, wanda_scores
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.masks import n_of_m_masks, rank_masks
from lightning_compress.pruning.pruner import Pruner
from lightning_compress.targets import TargetSpec

METHODS = ("wanda", "sparsegpt", "magnitude")
#: The sparsity of unstructured one-shot pruning unless ``amount`` says otherwise (N:M patterns imply theirs).
DEFAULT_AMOUNT = 0.5


@dataclass(frozen=True)
class OneShotPruningConfig:
    """How :func:`one_shot_prune` prunes: the method, the sparsity (``amount``, 0.5 unless given; an N:M
    ``granularity`` implies its own), which linear layers, SparseGPT's damping and block size, and whether the
    surviving weights are solved again; checked when made, before any model is touched.

    ``"magnitude"`` ranks ``|W|`` within each layer and needs no calibration; ``"wanda"`` ranks
    ``|W_ij| · ||X_j||`` within each output row; ``"sparsegpt"`` prunes by the optimal brain surgeon cost and
    updates the surviving weights. With ``granularity="2:4"`` (any N:M) each group of M consecutive input
    weights keeps N, for every method. ``amount`` may also name each layer's own sparsity (``{"encoder.0.fc1":
    0.6, ...}``; those layers are then the targets).

    With ``reconstruct=True`` each layer's surviving weights, once its mask is chosen, are solved exactly for the
    outputs the model before pruning computes on the calibration batches, from the inputs the layers pruned before
    it compute (:func:`~lightning_compress.oneshot.reconstruction.reconstruct_surviving_weights`, a ridge of
    ``reconstruction_damping`` towards the weights before pruning; a copy of the targeted weights is held meanwhile); every
    method then learns from calibration batches, magnitude too.

    Example:
        >>> OneShotPruningConfig(method="wanda", granularity="2:4").amount
        0.5
        >>> OneShotPruningConfig(method="obs")
        Traceback (most recent call last):
        ...
        ValueError: method must be one of wanda, sparsegpt, magnitude; got 'obs' (str)
    """

    method: str = "sparsegpt"
    amount: float | None = None
    granularity: str = "unstructured"
    targets: TargetSpec = None
    exclude: TargetSpec = None
    damping: float = DAMPING
    block_size: int = BLOCK_SIZE
    reconstruct: bool = False
    reconstruction_damping: float = RECONSTRUCTION_DAMPING

    def __post_init__(self) -> None:
        check_argument("method", self.method, self.method in METHODS, f"one of {', '.join(METHODS)}")
        check_argument(
            "granularity",
            self.granularity,
            self.granularity not in ("channel", "head"),
            "'unstructured' or an N:M pattern such as '2:4' (one-shot methods rank single weights)",
        )
        check_argument(
            "amount",
            self.amount,
            self.amount is None or is_number(self.amount) or isinstance(self.amount, Mapping),
            "a number in [0, 1) (the sparsity), or a dict of layer name -> sparsity",
        )
        check_argument("damping", self.damping, is_number(self.damping) and self.damping >= 0, "a number >= 0")
        check_argument(
            "reconstruction_damping",
            self.reconstruction_damping,
            is_number(self.reconstruction_damping) and self.reconstruction_damping > 0,
            "a number > 0",
        )
        check_argument("block_size", self.block_size, is_int(self.block_size) and self.block_size >= 1, "an int >= 1")
        check_argument("reconstruct", self.reconstruct, isinstance(self.reconstruct, bool), "True or False")
        amount = DEFAULT_AMOUNT if self.amount is None and self.granularity == "unstructured" else self.amount
        pruning = PruningConfig(amount=amount, granularity=self.granularity, targets=self.targets, exclude=self.exclude)
        object.__setattr__(self, "amount", pruning.amount)

    @property
    def pruning(self) -> PruningConfig:
        """The :class:`PruningConfig` of the :class:`Pruner` that holds the result: the same sparsity, on the
        targeted layers (every ``nn.Linear`` by default, or the layers ``amount`` names)."""
        targets = [nn.Linear] if self.targets is None and not isinstance(self.amount, Mapping) else self.targets
        return PruningConfig(  # each layer pruned on its own: the Pruner refuses an amount that empties a row of one
            amount=self.amount, granularity=self.granularity, scope="layer", targets=targets, exclude=self.exclude
        )

    def layer_amount(self, layer: str) -> float:
        """The sparsity of the layer named ``layer``."""
        return self.amount[layer] if isinstance(self.amount, Mapping) else self.amount

    @property
    def calibrated(self) -> bool:
        """Whether the pruning learns from calibration batches (every method but plain magnitude)."""
        return self.method != "magnitude" or self.reconstruct


#: What hands rank zero's result to every rank (DDP); by default the result as it is.
Share = Callable[[dict[str, dict[str, torch.Tensor]]], dict[str, dict[str, torch.Tensor]]]


@torch.no_grad()
def one_shot_prune(
    model: nn.Module,
    batches: Iterable[Any] | None,
    config: OneShotPruningConfig,
    calibration_batches: int | None = None,
    *,
    progress: bool = True,
    share: Share | None = None,
    warn: Callable[[str], Any] = warnings.warn,
) -> Pruner:
    """Prune the linear layers of ``model`` once, in place, from the first ``calibration_batches`` of ``batches``
    (every batch with ``None``; ``"magnitude"`` needs none); returns the :class:`Pruner` holding the masks.

    Wanda and SparseGPT visit the layers in forward order, each from its inputs as the layers pruned before it
    compute them (:func:`~lightning_compress.oneshot.layer_inputs.compress_layer_by_layer`). The result is an
    ordinary masked model: ``pruner.attach(optimizer)`` keeps the zeros while a recovery training runs.
    ``share`` passes the masks and the pruned weights through (DDP: rank zero's to every rank).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> batches = [torch.randn(32, 8) for _ in range(4)]
        >>> pruner = one_shot_prune(model, batches, OneShotPruningConfig(method="wanda", amount=0.5), progress=False)
        >>> pruner.sparsity()["pruning/sparsity"], int((model[0].weight == 0).sum())
        (0.5, 64)
    """
    require_finite(dict(model.named_parameters()), f"One-shot pruning ({config.method}) ranks and runs the parameters")
    with restored_on_error(model):  # a failure leaves the model as it was
        pruner = linear_pruner(model, config, warn)
        layers = {name.removesuffix(".weight"): pruner.layers[name] for name in pruner.parameters}
        masks: dict[str, torch.Tensor] = {}
        dense = {name: layer.weight.detach().clone() for name, layer in layers.items()} if config.reconstruct else None

        def prune_group(group: Mapping[str, nn.Linear], gram: InputGram | None) -> None:
            factor = None
            if config.method == "sparsegpt":
                factor = inverse_hessian_factor(gram.matrix, config.damping, next(iter(group)))
            for name, layer in group.items():
                keep = _prune_layer(name, layer, config, gram, factor)
                if dense is not None:
                    solved = reconstruct_surviving_weights(
                        dense[name], keep, gram.matrix, config.reconstruction_damping, gram.cross
                    )
                    layer.weight.copy_(solved)
                masks[f"{name}.weight"] = keep

        if not config.calibrated:
            for name, layer in layers.items():
                prune_group({name: layer}, None)
        else:
            if batches is None:
                what = "reconstruct=True" if config.method == "magnitude" else f"method={config.method!r}"
                raise ValueError(f"{what} learns from calibration batches: give some")
            weight = next(iter(layers.values())).weight
            inputs = calibration_inputs(batches, calibration_batches, weight.device, weight.dtype)
            compress_layer_by_layer(model, layers, inputs, prune_group, progress, reference_weights=dense)
        if share is not None:
            shared = share({"masks": masks, "weights": {name: layer.weight.detach() for name, layer in layers.items()}})
            masks = shared["masks"]
            for name, layer in layers.items():
                layer.weight.copy_(shared["weights"][name])
        pruner.load_state_dict({"masks": masks, "channel_keep": {}})
        pruner.apply()
    return pruner


def linear_pruner(model: nn.Module, config: OneShotPruningConfig, warn: Callable[[str], Any] = warnings.warn) -> Pruner:
    """The :class:`Pruner` of the linear layers ``config`` targets in ``model``, no mask yet; a model without
    a linear layer, or targets naming another kind of layer, raise ``ValueError``."""
    if config.targets is None and not any(isinstance(module, nn.Linear) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer, and one-shot pruning prunes linear layers")
    pruner = Pruner(model, config.pruning, warn=warn)
    not_linear = {
        name.removesuffix(".weight"): type(layer).__name__
        for name, layer in pruner.layers.items()
        if not isinstance(layer, nn.Linear)
    }
    if not_linear:
        raise ValueError(f"one-shot pruning prunes nn.Linear layers; the targets also name {not_linear}")
    return pruner


def _prune_layer(
    name: str, layer: nn.Linear, config: OneShotPruningConfig, gram: InputGram | None, factor: torch.Tensor | None
) -> torch.Tensor:
    """Prune the weight of ``layer`` (named ``name``) in place by ``config.method``; returns its mask (``True``
    where a weight survives)."""
    weight = layer.weight
    n_of_m = config.pruning.n_of_m
    amount = config.layer_amount(name)
    if config.method == "sparsegpt":
        pruned, keep = sparsegpt_prune(weight, factor, amount, n_of_m, config.block_size)
        weight.copy_(pruned)
        return keep
    if config.method == "wanda":
        scores = wanda_scores(weight, gram.feature_norms())
    else:
        scores = weight.detach().abs()
    if n_of_m is not None:
        keep = n_of_m_masks({"weight": scores}, *n_of_m)["weight"]
    elif config.method == "wanda":
        keep = row_masks(scores, amount)
    else:
        keep = rank_masks({"weight": scores}, amount, scope="layer")["weight"]
    weight.mul_(keep)
    return keep

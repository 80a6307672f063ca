"""Which layers a compression method (pruning, quantization) acts on: module types and module-name patterns."""

from __future__ import annotations

import difflib
import fnmatch
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from lightning_compress.models.attention import explicit_attention, fused_attention, not_explicit_because
from lightning_compress.modules import WEIGHT_LAYER_TYPES, weight_layers
from lightning_compress.protocols import ExcludesFromCompression

TargetSpec = Sequence[type[nn.Module] | str] | type[nn.Module] | str | None
#: Below this share of a model's parameters the targeted weights say little about the model, and a warning says so.
SMALL_TARGETED_SHARE = 0.25


def _as_list(spec: TargetSpec) -> list[type[nn.Module] | str]:
    if spec is None:
        return []
    if isinstance(spec, (str, type)):
        return [spec]
    return list(spec)


def _matches(name: str, module: nn.Module, selector: type[nn.Module] | str) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    return fnmatch.fnmatchcase(name, selector)


def select_layers(model: nn.Module, targets: TargetSpec = None, exclude: TargetSpec = None) -> dict[str, nn.Module]:
    """The layers whose ``weight`` to compress, by module name, each weight once.

    The candidates are the ``Conv*d`` and ``Linear`` layers plus layers of any type named in
    ``targets``. ``targets`` and ``exclude`` take module types (``nn.Linear``) and shell-style
    patterns on module names (``"features.*"``, ``"classifier.4"``); a candidate is selected when it
    matches any target (every candidate when ``targets`` is None) and no exclusion. A pattern that
    matches no candidate raises ``ValueError`` listing the closest names, so a typo never silently
    compresses nothing. A model may name layers that exist only for training (a distillation adapter)
    in a ``compression_exclude`` attribute of patterns (:class:`~lightning_compress.protocols.ExcludesFromCompression`):
    they are never selected.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> list(select_layers(model, exclude=["2"]))
        ['0']
    """
    include, skip = _as_list(targets), _as_list(exclude)
    candidates = dict(weight_layers(model, (*WEIGHT_LAYER_TYPES, *(s for s in include if isinstance(s, type)))))
    _check_patterns(candidates, [s for s in [*include, *skip] if isinstance(s, str)])
    if isinstance(model, ExcludesFromCompression):
        skip += list(model.compression_exclude)
    selected = {
        name: module
        for name, module in candidates.items()
        if (not include or any(_matches(name, module, s) for s in include))
        and not any(_matches(name, module, s) for s in skip)
    }
    if not selected:
        raise ValueError(
            f"targets={include or 'Conv/Linear'} with exclude={skip} leave no layer to compress in {type(model).__name__}"
        )
    return selected


def _check_patterns(candidates: dict[str, nn.Module], patterns: Iterable[str]) -> None:
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            near = difflib.get_close_matches(pattern, list(candidates), n=5, cutoff=0.3) or list(candidates)[:5]
            raise ValueError(f"the pattern {pattern!r} matches no layer with a weight; near names: {near}")


def warn_if_few_targeted(
    model: nn.Module, layers: Mapping[str, nn.Module], method: str, warn: Callable[[str], Any]
) -> None:
    """Warn when the weights of the targeted ``layers`` are under :data:`SMALL_TARGETED_SHARE` of ``model``'s
    parameters (an LSTM or embedding model whose head alone is a Linear layer), naming where the rest is.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(1000, 16), nn.Linear(16, 2))
        >>> warn_if_few_targeted(model, {"1": model[1]}, "Pruning", print)
        Pruning targets 32 of the model's 16,034 parameters (0.2%): a sparsity or a bit width of these says little about the model. The rest is in Embedding (16,000); name their types in targets where the method supports them
    """
    total = sum(parameter.numel() for parameter in model.parameters())
    targeted = sum(layer.weight.numel() for layer in layers.values())
    if total == 0 or targeted / total >= SMALL_TARGETED_SHARE:
        return
    chosen = {id(layer) for layer in layers.values()}
    elsewhere: Counter[str] = Counter()
    for module in model.modules():
        held = sum(parameter.numel() for parameter in module.parameters(recurse=False))
        if held and id(module) not in chosen:
            elsewhere[type(module).__name__] += held
    largest = ", ".join(f"{name} ({count:,})" for name, count in elsewhere.most_common(3))
    warn(
        f"{method} targets {targeted:,} of the model's {total:,} parameters ({targeted / total:.1%}): a sparsity or "
        f"a bit width of these says little about the model. The rest is in {largest}; name their types in targets "
        "where the method supports them"
    )


def explicit_fused_attention(model: nn.Module, method: str, warn: Callable[[str], Any]) -> None:
    """Swap each ``nn.MultiheadAttention`` of ``model`` for the :class:`~lightning_compress.models.ExplicitMultiheadAttention`
    that computes the same outputs with ``nn.Linear`` projections, which ``method`` then reaches, and say so with
    ``warn`` (the parameters are new: build the optimizer after it; state dicts with ``in_proj_weight`` still load).
    One that cannot be made explicit (separate key and value sizes...) is left as it is, in float and unpruned,
    which ``warn`` says too: it computes with a fused ``in_proj_weight`` and reads ``out_proj.weight`` directly.

    Example:
        >>> layer = nn.TransformerEncoderLayer(8, 2, 16)
        >>> explicit_fused_attention(layer, "Quantization", print)
        Quantization made the 1 nn.MultiheadAttention layer (self_attn) explicit: ExplicitMultiheadAttention computes the same outputs with its q_proj, k_proj, v_proj and out_proj as nn.Linear layers, which Quantization reaches. Its parameters are new (build an optimizer after this); state dicts with in_proj_weight still load
        >>> type(layer.self_attn).__name__
        'ExplicitMultiheadAttention'
    """
    fused = fused_attention(model)
    refused = {name: why for name, attention in fused.items() if (why := not_explicit_because(attention))}
    made_explicit = [name for name in fused if name not in refused and name]
    if made_explicit:
        explicit_attention(model, made_explicit)
        warn(
            f"{method} made {_layers(made_explicit)} explicit: ExplicitMultiheadAttention computes the same outputs "
            f"with its q_proj, k_proj, v_proj and out_proj as nn.Linear layers, which {method} reaches. Its "
            "parameters are new (build an optimizer after this); state dicts with in_proj_weight still load"
        )
    if refused:
        warn(
            f"{method} leaves {_layers(list(refused))} in float, unpruned: it computes with a fused in_proj_weight and "
            "reads out_proj.weight without calling it, and has what ExplicitMultiheadAttention does not compute ("
            + "; ".join(f"{name}: {why}" for name, why in refused.items())
            + ")"
        )


def _layers(names: list[str]) -> str:
    """``the 2 nn.MultiheadAttention layers (a, b)``, the first three names shown."""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"the {len(names)} nn.MultiheadAttention layer{'s' if len(names) > 1 else ''} ({shown})"

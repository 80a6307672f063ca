"""``export``: the deployable artifact of a (compressed) model, and ``load_quantized`` to read the torch format back."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.batches import ModelInputs
from lightning_compress.files import write_atomically
from lightning_compress.modules import model_copy
from lightning_compress.quantization.config import QuantConfig
from lightning_compress.quantization.layers import quantize_layer, quantize_model, quantized_layers
from lightning_compress.safe_loading import load_weights

# format -> the modules it needs and the pip install that brings them
EXPORT_FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "onnx": (("onnx", "onnxscript", "onnxruntime"), "pip install onnx onnxscript onnxruntime"),
    "torch": ((), ""),
    "compressed": ((), ""),
}
#: format -> the file name suffix the app gives it (``model.<suffix>``)
FILE_SUFFIXES = {"onnx": "onnx", "torch": "pt", "compressed": "lcz"}
_TORCH_FORMAT = "lightning_compress.fake_quant/1"


def check_export_format(format: str) -> None:
    """Fail with what to do when ``format`` is unknown or its libraries are not installed."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    modules, install = EXPORT_FORMATS[format]
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"export format {format!r} needs {', '.join(missing)}, which is not installed: {install}")


def export(model: nn.Module, path: str | os.PathLike, example_input: ModelInputs, format: str = "onnx") -> Path:
    """Write ``model`` as a deployable artifact at ``path`` and return the path.

    - ``"onnx"``: the graph for ONNX Runtime (or any ONNX runtime), dynamic in the batch dimension.
      Layers with fake quantization on are integer layers in the QDQ format: int8 weights (uint8 when
      asymmetric; INT4/UINT4 at opset 21 when their range fits in 4 bits), int32 biases, and the
      activation grids the model trained or calibrated. Pruned
      weights are exact zeros there too. A float model gives the float graph.
    - ``"torch"``: the state dict with the quantizers' settings, which :func:`load_quantized` loads back
      into a fresh fake-quantized model.
    - ``"compressed"``: the same, each quantized layer's weight as its fake-quantized value, each tensor
      in its fewest exact bytes (pruned zeros left out, marked by a bitmask or gaps; quantized weights
      as integer codes at their bit width; shared weights as a codebook; then xz), and no pickle:
      :func:`~lightning_compress.deploy.compressed.load_compressed` loads it back.

    ``example_input`` is a batch of model inputs (its batch size does not matter): one tensor, a tuple of
    tensors (positional inputs) or a dict of tensors (keyword inputs: a Hugging Face model's ``input_ids`` and
    ``attention_mask``), which name the graph's inputs; the batch is dynamic, and so is the sequence length of
    integer inputs where the model allows (see :func:`~lightning_compress.deploy.onnx.onnx_bytes`). For
    ``"onnx"`` the model runs on it once first, so an input it cannot take fails in one line, with the
    shape of the model's ``example_input_array`` where it has one. Missing folders of ``path`` are
    created. The file is written atomically: a reader never sees half of it.

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> path = export(model, tempfile.mkdtemp() + "/model.onnx", torch.zeros(1, 4))
        >>> path.suffix, path.stat().st_size > 0
        ('.onnx', True)
    """
    check_export_format(format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        from lightning_compress.deploy.onnx import (
            onnx_bytes,  # imports onnx, checked above
        )

        graph = onnx_bytes(model, example_input)
        write_atomically(path, lambda temporary: temporary.write_bytes(graph))
    elif format == "compressed":
        from lightning_compress.deploy.compressed import (
            compressed_bytes,  # it imports this module
        )

        data = compressed_bytes(model)
        write_atomically(path, lambda temporary: temporary.write_bytes(data))
    else:
        saved = {
            "format": _TORCH_FORMAT,
            "quantized_layers": quantizer_settings(model),
            "state_dict": model.state_dict(),
        }
        write_atomically(path, lambda temporary: torch.save(saved, temporary))
    return path


def quantizer_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The settings of each quantized layer of ``model``, by name, as the exported files record them.

    Example:
        >>> from lightning_compress.quantization import QuantConfig, quantize_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> _ = quantize_model(model, QuantConfig(weight_bits=4))
        >>> quantizer_settings(model)["0"]["weight_bits"]
        4
    """
    return {name: dataclasses.asdict(layer.quant_config) for name, layer in quantized_layers(model).items()}


def quantize_as_saved(model: nn.Module, settings: dict[str, dict[str, Any]]) -> None:
    """Quantize the layers of ``model`` that ``settings`` (from :func:`quantizer_settings`) names, with those settings, in place.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> quantize_as_saved(model, {"0": {"weight_bits": 4}})
        >>> type(model[0]).__name__, model[0].quant_config.weight_bits
        ('QuantizedLinear', 4)
    """
    modules = dict(model.named_modules())
    for name, layer_settings in settings.items():
        config = QuantConfig(**layer_settings)
        if isinstance(modules.get(name), nn.Embedding):  # a table, which a name pattern alone does not select
            quantize_layer(modules[name], config)
        else:  # one layer of many: no share of the model to warn about
            quantize_model(model, config, targets=[name], warn=lambda message: None)


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an ``export(..., format="torch")`` file into ``model`` (the same architecture, in float), in place.

    The layers quantized at export are quantized again with their settings, then the state dict (weights,
    scales, zero points, observer ranges and switches) is loaded strictly. This is tried on a copy of
    ``model`` first: a file that does not fit it (another architecture) raises ``ValueError`` and leaves
    ``model`` as it was.

    Example:
        >>> import tempfile, torch
        >>> from lightning_compress.quantization import QuantConfig, quantize_model
        >>> trained = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> _ = quantize_model(trained, QuantConfig(weight_bits=4))
        >>> path = export(trained, tempfile.mkdtemp() + "/model.pt", torch.zeros(1, 4), format="torch")
        >>> fresh = load_quantized(torch.nn.Sequential(torch.nn.Linear(4, 2)), path)
        >>> type(fresh[0]).__name__, fresh[0].quant_config.weight_bits
        ('QuantizedLinear', 4)
    """
    saved = load_weights(path, f"{path} is not a file written by export(..., format='torch')")
    if not isinstance(saved, dict) or saved.get("format") != _TORCH_FORMAT:
        raise ValueError(f"{path} is not a file written by export(..., format='torch')")
    trial = model_copy(model)
    try:
        _load(trial, saved)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: {_misfit(trial, saved['state_dict'], error)}"
        ) from error
    return _load(model, saved)


def _load(model: nn.Module, saved: dict[str, Any]) -> nn.Module:
    """Quantize the layers ``saved`` names with their settings and load its state dict strictly."""
    quantize_as_saved(model, saved["quantized_layers"])
    model.load_state_dict(saved["state_dict"], strict=True)
    return model


def _misfit(trial: nn.Module, state_dict: dict[str, torch.Tensor], error: Exception) -> str:
    """Briefly, why ``state_dict`` did not load into ``trial``: keys missing or unexpected, shapes that differ.

    When quantizing the file's layers failed already (``trial`` lacks one of them), or no key or shape
    differs, it is the first line of ``error``.
    """
    first_line = next(iter(str(error).strip().splitlines()), type(error).__name__)
    if not isinstance(error, RuntimeError):
        return f"its quantized layers are not the model's: {first_line}"
    ours = trial.state_dict()
    missing = [key for key in ours if key not in state_dict]
    unexpected = [key for key in state_dict if key not in ours]
    shapes = [
        f"{key} {list(state_dict[key].shape)} vs {list(ours[key].shape)}"
        for key in ours
        if key in state_dict and state_dict[key].shape != ours[key].shape
    ]
    problems = (("missing keys", missing), ("unexpected keys", unexpected), ("shapes (file vs model)", shapes))
    return "; ".join(f"{what}: {_first(items)}" for what, items in problems if items) or first_line


def _first(items: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``items``, and how many more there are."""
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")

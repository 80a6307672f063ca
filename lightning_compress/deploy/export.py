"""``export``: the deployable artifact of a (compressed) model, and ``load_quantized`` to read the torch format back."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from lightning_compress.files import write_atomically
from lightning_compress.quantization.config import QuantConfig
from lightning_compress.quantization.layers import quantize_model, quantized_layers

# format -> the modules it needs and the pip install that brings them
EXPORT_FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "onnx": (("onnx", "onnxscript", "onnxruntime"), "pip install onnx onnxscript onnxruntime"),
    "torch": ((), ""),
}
_TORCH_FORMAT = "lightning_compress.fake_quant/1"


def check_export_format(format: str) -> None:
    """Fail with what to do when ``format`` is unknown or its libraries are not installed."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    modules, install = EXPORT_FORMATS[format]
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"export format {format!r} needs {', '.join(missing)}, which is not installed: {install}")


def export(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor, format: str = "onnx") -> Path:
    """Write ``model`` as a deployable artifact at ``path`` and return the path.

    - ``"onnx"``: the graph for ONNX Runtime (or any ONNX runtime), dynamic in the batch dimension.
      Layers with fake quantization on are integer layers in the QDQ format: int8 weights (uint8 when
      asymmetric), int32 biases, and the activation grids the model trained or calibrated. Pruned
      weights are exact zeros there too. A float model gives the float graph.
    - ``"torch"``: the state dict with the quantizers' settings, which :func:`load_quantized` loads back
      into a fresh fake-quantized model.

    ``example_input`` is a batch of model inputs (its batch size does not matter). The file is written
    atomically: a reader never sees half of it.

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
    else:
        layers = {name: dataclasses.asdict(layer.quant_config) for name, layer in quantized_layers(model).items()}
        saved = {"format": _TORCH_FORMAT, "quantized_layers": layers, "state_dict": model.state_dict()}
        write_atomically(path, lambda temporary: torch.save(saved, temporary))
    return path


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an ``export(..., format="torch")`` file into ``model`` (the same architecture, in float), in place.

    The layers quantized at export are quantized again with their settings, then the state dict (weights,
    scales, zero points, observer ranges and switches) is loaded strictly.

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
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise ValueError(f"{path} is not a file written by export(..., format='torch'): {error}") from error
    if not isinstance(saved, dict) or saved.get("format") != _TORCH_FORMAT:
        raise ValueError(f"{path} is not a file written by export(..., format='torch')")
    for name, settings in saved["quantized_layers"].items():
        quantize_model(model, QuantConfig(**settings), targets=[name])
    model.load_state_dict(saved["state_dict"], strict=True)
    return model

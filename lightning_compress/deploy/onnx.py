"""ONNX export through torch's own exporter, and ONNX Runtime sessions that run the exported graph."""

from __future__ import annotations

import numpy as np
import onnxruntime
import torch
from torch import nn

from lightning_compress.analysis.measure import eval_mode
from lightning_compress.deploy.qdq import split_quantization, to_qdq


def onnx_bytes(model: nn.Module, example_input: torch.Tensor) -> bytes:
    """The ONNX graph of ``model`` in eval mode, with a dynamic batch dimension, serialized.

    Uses ``torch.onnx.export(..., dynamo=True)``, torch's maintained exporter. A batch of one is repeated
    to two for tracing, since the exporter would otherwise specialize the batch dimension to 1. Layers
    with fake quantization on are written as integer layers in the QDQ format (see :mod:`.qdq`).

    Example:
        >>> import onnx, torch
        >>> graph = onnx.load_from_string(onnx_bytes(torch.nn.Linear(4, 2), torch.zeros(1, 4)))
        >>> [node.op_type for node in graph.graph.node]
        ['Gemm']
    """
    example = example_input.detach()
    if example.shape[0] == 1:
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch")
    float_model, integer_layers = split_quantization(model, prefix="model.")
    wrapped = _OneInput(float_model)
    with eval_mode(wrapped), torch.no_grad():
        program = torch.onnx.export(wrapped, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    graph = program.model_proto
    if integer_layers:
        graph = to_qdq(graph, integer_layers)
    return graph.SerializeToString()


class _OneInput(nn.Module):
    """``model`` behind a ``forward(x)``, so models whose forward takes ``*args`` (a LightningModule) export too.

    Parameters keep their names under the prefix ``model.``, which the graph's initializers carry.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class OnnxRuntimeModel:
    """An ONNX graph in an ONNX Runtime CPU session, called like a module on torch tensors.

    Example:
        >>> import torch
        >>> linear = torch.nn.Linear(4, 2)
        >>> runtime = OnnxRuntimeModel.from_module(linear, torch.zeros(1, 4), num_threads=1)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(runtime(x), linear(x), atol=1e-6)
        True
    """

    runtime = "onnxruntime"

    def __init__(self, graph: bytes, num_threads: int | None = None) -> None:
        options = onnxruntime.SessionOptions()
        # Threads as torch would use them, so latencies of both runtimes compare like for like.
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.num_threads = options.intra_op_num_threads
        self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self._input_name = self.session.get_inputs()[0].name

    @classmethod
    def from_module(cls, model: nn.Module, example_input: torch.Tensor, num_threads: int | None = None) -> OnnxRuntimeModel:
        """Export ``model`` (see :func:`onnx_bytes`) and open a session on it."""
        return cls(onnx_bytes(model, example_input.cpu()), num_threads)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        (outputs, *_) = self.session.run(None, {self._input_name: np.ascontiguousarray(inputs.detach().cpu().numpy())})
        return torch.from_numpy(outputs)

"""ONNX export through torch's own exporter, and ONNX Runtime sessions that run the exported graph.

onnx and onnxruntime are imported when a graph is first made or run, not with this module, so a
missing one is reported by :func:`~lightning_compress.deploy.export.check_export_format` with the
``pip install`` that fixes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from lightning_compress.deploy.integer_layers import split_quantization
from lightning_compress.modules import eval_mode

if TYPE_CHECKING:
    import onnx


def onnx_bytes(model: nn.Module, example_input: torch.Tensor) -> bytes:
    """The ONNX graph of ``model`` in eval mode, with a dynamic batch dimension, serialized.

    Uses ``torch.onnx.export(..., dynamo=True)``, torch's maintained exporter. A batch of one is repeated
    to two for tracing, since the exporter would otherwise specialize the batch dimension to 1. Layers
    with fake quantization on are written as integer layers in the QDQ format (see :mod:`.qdq`). Residual
    sums before a layer norm are written as ``Sum``, which ONNX Runtime does not fuse into its slower
    ``SkipLayerNormalization`` (see :func:`_unfused_residual_sums`). The exporter's debugging records
    (each node's stack trace, with this machine's paths) are left out.
    ``example_input`` must be one tensor the model runs on, which :func:`check_example_input` checks
    first, so a wrong one fails in one line rather than in the exporter's log.

    Example:
        >>> import onnx, torch
        >>> graph = onnx.load_from_string(onnx_bytes(torch.nn.Linear(4, 2), torch.zeros(1, 4)))
        >>> [node.op_type for node in graph.graph.node]
        ['Gemm']
    """
    from lightning_compress.deploy.qdq import to_qdq  # imports onnx

    check_example_input(model, example_input)
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
    _unfused_residual_sums(graph)
    _drop_exporter_records(graph)
    return graph.SerializeToString()


def _unfused_residual_sums(graph: onnx.ModelProto) -> None:
    """Write each residual ``Add`` that feeds a ``LayerNormalization`` (both of its inputs computed, not
    constants) as ``Sum``, the same sum, which ONNX Runtime leaves as it is.

    ONNX Runtime fuses ``Add`` + ``LayerNormalization`` into its ``SkipLayerNormalization``, whose CPU kernel
    is a scalar loop with a division per element: 4x slower than the two ops it replaces at one sequence of
    32 tokens of width 384, 7x at 32 sequences (measured with ONNX Runtime 1.32).
    """
    constants = {tensor.name for tensor in graph.graph.initializer}
    producers = {output: node for node in graph.graph.node for output in node.output}
    for node in graph.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        residual = producers.get(node.input[0])
        if residual is not None and residual.op_type == "Add" and not constants.intersection(residual.input):
            residual.op_type = "Sum"


def _drop_exporter_records(graph: onnx.ModelProto) -> None:
    """Remove what torch's exporter records for debugging: each node's Python stack trace (with this machine's
    file paths), FX node and module names, and the exported program's signature. They are no part of the
    computation, and a third of a small transformer's file."""
    for nodes in (graph.graph.node, *(function.node for function in graph.functions)):
        for node in nodes:
            del node.metadata_props[:]
    del graph.graph.metadata_props[:]


def check_example_input(model: nn.Module, example_input: object) -> None:
    """Fail in one line unless ``example_input`` is a tensor that ``model`` runs on.

    The model runs once on it, in eval mode and without gradients; each submodule keeps its mode. Its
    error's first line, and the shape of its ``example_input_array`` where it has one (a LightningModule
    may), go into the ``ValueError``.

    Example:
        >>> import torch
        >>> check_example_input(torch.nn.Linear(4, 2), torch.zeros(1, 3))
        Traceback (most recent call last):
        ...
        ValueError: example_input of shape (1, 3) does not fit Linear: RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 4x2)
    """
    example = _one_tensor(example_input)
    with eval_mode(model), torch.no_grad():
        try:
            model(example)
        except Exception as error:
            lines = str(error).strip().splitlines()
            expected = getattr(model, "example_input_array", None)
            raise ValueError(
                f"example_input of shape {tuple(example.shape)} does not fit {type(model).__name__}: "
                + (f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)
                + (
                    f"; its example_input_array has shape {tuple(expected.shape)}"
                    if isinstance(expected, torch.Tensor)
                    else ""
                )
            ) from error


def _one_tensor(example_input: object) -> torch.Tensor:
    """``example_input``, which must be a tensor: the exported graph has one input."""
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(
            f"export takes one input tensor as example_input (the model is called as model(example_input)); got {type(example_input).__name__}"
        )
    return example_input


class _OneInput(nn.Module):
    """``model`` behind a ``forward(x)``, so models whose forward takes ``*args`` (a LightningModule) export too.

    Parameters keep their names under the prefix ``model.``, which the graph's initializers carry.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


#: ONNX Runtime's session setting that stops the session's threads spinning when a call returns. Each session has
#: its own threads, which spin for more work after a call; models timed (or served) side by side in one process
#: then take each other's cores: on two cores, with six MiniLM graphs at two threads, each call took 1.4x to
#: 3.2x as long as with the setting, and the ratios between models moved with the order they ran in.
STOP_SPINNING = "session.force_spinning_stop"


class OnnxRuntimeModel:
    """An ONNX graph in an ONNX Runtime CPU session, called like a module on torch tensors.

    The session's threads stop spinning when a call returns (:data:`STOP_SPINNING`), so that sessions side
    by side leave each other's cores alone.

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
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # Threads as torch would use them, so latencies of both runtimes compare like for like.
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry(STOP_SPINNING, "1")
        self.num_threads = options.intra_op_num_threads
        self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self._input_name = self.session.get_inputs()[0].name

    @classmethod
    def from_module(
        cls, model: nn.Module, example_input: torch.Tensor, num_threads: int | None = None
    ) -> OnnxRuntimeModel:
        """Export ``model`` (see :func:`onnx_bytes`) and open a session on it."""
        return cls(onnx_bytes(model, _one_tensor(example_input).cpu()), num_threads)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        (outputs, *_) = self.session.run(None, {self._input_name: np.ascontiguousarray(inputs.detach().cpu().numpy())})
        return torch.from_numpy(outputs)

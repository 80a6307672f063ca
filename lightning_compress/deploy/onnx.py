"""ONNX export through torch's own exporter, and ONNX Runtime sessions that run the exported graph.

onnx and onnxruntime are imported when a graph is first made or run, not with this module, so a
missing one is reported by :func:`~lightning_compress.deploy.export.check_export_format` with the
``pip install`` that fixes it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from lightning_compress.batches import (
    ModelInputs,
    call_model,
    describe_inputs,
    input_tensors,
    map_inputs,
    output_logits,
)
from lightning_compress.deploy.integer_layers import split_quantization
from lightning_compress.modules import eval_mode, model_copy

if TYPE_CHECKING:
    import onnx


def onnx_bytes(model: nn.Module, example_input: ModelInputs) -> bytes:
    """The ONNX graph of ``model`` in eval mode, with a dynamic batch dimension, serialized.

    ``example_input`` is what the model is called with (:func:`~lightning_compress.batches.call_model`): one
    tensor (the graph's input ``x``), a tuple of tensors (positional inputs, named after the parameters of the
    model's ``forward``) or a dict of tensors (keyword inputs, named by their keys: a Hugging Face model's
    ``input_ids`` and ``attention_mask``). The graph's output is the model's logits (a ``ModelOutput``'s too). Every
    input's first dimension is the dynamic ``batch``. Of a tuple's or a dict's integer inputs (token ids, attention
    masks) the second is the dynamic ``sequence`` where the model allows one (it stays as in the example where the
    model fixes it); one tensor keeps its other dimensions, so that the exporter folds what they fix into constants
    (a BERT's position embeddings).
    Uses ``torch.onnx.export(..., dynamo=True)``, torch's maintained exporter. A batch of one is repeated
    to two for tracing, since the exporter would otherwise specialize the batch dimension to 1. Layers
    with fake quantization on are written as integer layers in the QDQ format (see :mod:`.qdq`). Residual
    sums before a layer norm are written as ``Sum``, which ONNX Runtime does not fuse into its slower
    ``SkipLayerNormalization`` (see :func:`_unfused_residual_sums`). The exporter's debugging records
    (each node's stack trace, with this machine's paths) are left out. A model in bfloat16 (Lightning's
    ``precision="bf16-true"``) is written in float32, which ONNX Runtime's CPU kernels compute (they have no
    bfloat16 convolution): the same weights, and the same integers where it is quantized (see :func:`in_float32`).
    :func:`check_example_input` checks ``example_input`` first, so a wrong one fails in one line rather than in
    the exporter's log.

    Example:
        >>> import onnx, torch
        >>> graph = onnx.load_from_string(onnx_bytes(torch.nn.Linear(4, 2), torch.zeros(1, 4)))
        >>> [node.op_type for node in graph.graph.node]
        ['Gemm']
    """
    from lightning_compress.deploy.qdq import to_qdq  # imports onnx

    model, example_input = in_float32(model, example_input)
    check_example_input(model, example_input)
    examples = tuple(_batch_of_two(tensor.detach()) for tensor in input_tensors(example_input))
    sequences = [] if isinstance(example_input, torch.Tensor) else [i for i, x in enumerate(examples) if _tokens(x)]
    batch = torch.export.Dim("batch")
    dynamic = tuple(
        {0: batch, 1: torch.export.Dim.AUTO} if i in sequences else {0: batch} for i in range(len(examples))
    )
    float_model, integer_layers = split_quantization(model, prefix="model.")
    keywords = tuple(example_input) if isinstance(example_input, Mapping) else None
    wrapped = _Logits(float_model, keywords)
    with eval_mode(wrapped), torch.no_grad(), warnings.catch_warnings():
        # the inputs share the one batch dimension, which the exporter says of each but the first
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
        program = torch.onnx.export(
            wrapped,
            examples,
            dynamo=True,
            input_names=graph_input_names(model, example_input),
            dynamic_shapes=(dynamic,),
            verbose=False,
        )
    graph = program.model_proto
    _name_sequence_dimension(graph, sequences)
    if integer_layers:
        graph = to_qdq(graph, integer_layers)
    _unfused_residual_sums(graph)
    _drop_exporter_records(graph)
    return graph.SerializeToString()


def in_float32(model: nn.Module, example_input: ModelInputs) -> tuple[nn.Module, ModelInputs]:
    """``model`` and ``example_input`` as they are, or a float32 copy of a model that holds bfloat16 tensors and its
    floating inputs in float32. Every bfloat16 value is exact in float32, and quantizers round in float32 whatever
    the model's dtype, so the copy's quantized layers hold the same integers.

    Example:
        >>> import torch
        >>> model, inputs = in_float32(torch.nn.Linear(4, 2).bfloat16(), torch.zeros(1, 4, dtype=torch.bfloat16))
        >>> model.weight.dtype, inputs.dtype
        (torch.float32, torch.float32)
    """
    if all(tensor.dtype != torch.bfloat16 for tensor in [*model.parameters(), *model.buffers()]):
        return model, example_input
    return model_copy(model).float(), map_inputs(example_input, _float32_if_bfloat16)


def _float32_if_bfloat16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype == torch.bfloat16 else tensor


def graph_input_names(model: nn.Module, example_input: ModelInputs) -> list[str]:
    """The names of the exported graph's inputs for ``example_input``: ``x`` for one tensor, the dict's keys for
    inputs by keyword, and for a tuple the names of ``model.forward``'s first parameters (``input_0``,
    ``input_1``... where it takes ``*args``).

    Example:
        >>> graph_input_names(torch.nn.Bilinear(2, 3, 1), (torch.zeros(1, 2), torch.zeros(1, 3)))
        ['input1', 'input2']
        >>> graph_input_names(torch.nn.Linear(2, 1), {"input_ids": torch.zeros(1, 2)})
        ['input_ids']
    """
    if isinstance(example_input, Mapping):
        return list(example_input)
    if not isinstance(example_input, tuple):
        return ["x"]
    positional = [
        parameter.name
        for parameter in inspect.signature(model.forward).parameters.values()
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) >= len(example_input):
        return positional[: len(example_input)]
    return [f"input_{index}" for index in range(len(example_input))]


def _batch_of_two(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, its one sample repeated to two (the exporter specializes a dimension of size 1)."""
    return tensor.expand(2, *tensor.shape[1:]).contiguous() if tensor.shape[0] == 1 else tensor


def _tokens(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s second dimension is a sequence's length: integer inputs (token ids, attention masks)."""
    return tensor.dim() >= 2 and not tensor.is_floating_point()


def _name_sequence_dimension(graph: onnx.ModelProto, inputs: list[int]) -> None:
    """Name ``sequence`` the one symbol the exporter gave the second dimension of the graph's ``inputs`` (by index),
    wherever the graph's inputs, outputs and value information carry it; a dimension the model fixed stays fixed."""
    symbols = {
        dimension.dim_param
        for index in inputs
        if (dimension := graph.graph.input[index].type.tensor_type.shape.dim[1]).dim_param
    }
    if len(symbols) != 1:  # none, or lengths the model does not tie together: the exporter's names stay
        return
    for value in (*graph.graph.input, *graph.graph.output, *graph.graph.value_info):
        for dimension in value.type.tensor_type.shape.dim:
            if dimension.dim_param in symbols:
                dimension.dim_param = "sequence"


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
    """Fail in one line unless ``example_input`` is a tensor, a tuple of tensors or a dict of tensors that ``model``
    runs on (:func:`~lightning_compress.batches.call_model`).

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
    _check_form(example_input)
    with eval_mode(model), torch.no_grad():
        try:
            call_model(model, example_input)
        except Exception as error:
            lines = str(error).strip().splitlines()
            expected = getattr(model, "example_input_array", None)
            raise ValueError(
                f"example_input of shape {describe_inputs(example_input)} does not fit {type(model).__name__}: "
                + (f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)
                + (f"; its example_input_array has shape {describe_inputs(expected)}" if expected is not None else "")
            ) from error


def _check_form(example_input: object) -> None:
    """Refuse an ``example_input`` that is not one tensor, a tuple of tensors or a dict of tensors by name."""
    if isinstance(example_input, torch.Tensor):
        return
    items = []
    if isinstance(example_input, Mapping):
        items = list(example_input.values())
    elif isinstance(example_input, (tuple, list)):
        items = list(example_input)
    if isinstance(example_input, (tuple, Mapping)) and items and all(isinstance(item, torch.Tensor) for item in items):
        return
    contents = f" of {', '.join(sorted({type(item).__name__ for item in items}))}" if items else ""
    raise ValueError(
        "export takes example_input as one tensor, a tuple of tensors (the model's positional inputs) or a dict of "
        f"tensors (its keyword inputs, such as input_ids and attention_mask); got {type(example_input).__name__}"
        + contents
    )


class _Logits(nn.Module):
    """``model`` behind a ``forward(*inputs)`` that returns its logits (see
    :func:`~lightning_compress.batches.output_logits`), called with ``inputs`` by the names ``keywords`` where given,
    else positionally: models whose forward takes ``*args`` (a LightningModule) or keywords (Hugging Face's) export.

    Parameters keep their names under the prefix ``model.``, which the graph's initializers carry.
    """

    def __init__(self, model: nn.Module, keywords: tuple[str, ...] | None) -> None:
        super().__init__()
        self.model = model
        self.keywords = keywords

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.keywords is None:
            return output_logits(self.model(*inputs))
        return output_logits(self.model(**dict(zip(self.keywords, inputs, strict=True))))


#: ONNX Runtime's session setting that stops the session's threads spinning when a call returns. Each session has
#: its own threads, which spin for more work after a call; models timed (or served) side by side in one process
#: then take each other's cores: on two cores, with six MiniLM graphs at two threads, each call took 1.4x to
#: 3.2x as long as with the setting, and the ratios between models moved with the order they ran in.
STOP_SPINNING = "session.force_spinning_stop"


class OnnxRuntimeModel:
    """An ONNX graph in an ONNX Runtime CPU session, called like a module on torch tensors: positionally in the
    order of the graph's ``input_names``, or by those names (``runtime(input_ids=..., attention_mask=...)``).

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
        self.input_names = [value.name for value in self.session.get_inputs()]

    @classmethod
    def from_module(
        cls, model: nn.Module, example_input: ModelInputs, num_threads: int | None = None
    ) -> OnnxRuntimeModel:
        """Export ``model`` (see :func:`onnx_bytes`: ``example_input`` one tensor, a tuple, or a dict by keyword) and
        open a session on it."""
        _check_form(example_input)
        return cls(onnx_bytes(model, map_inputs(example_input, lambda tensor: tensor.cpu())), num_threads)

    def __call__(self, *inputs: torch.Tensor, **keyword_inputs: torch.Tensor) -> torch.Tensor:
        """The graph's first output for ``inputs`` in the order of its inputs, or ``keyword_inputs`` by their names."""
        if keyword_inputs and not inputs and set(keyword_inputs) == set(self.input_names):
            feed = keyword_inputs
        elif inputs and not keyword_inputs and len(inputs) == len(self.input_names):
            feed = dict(zip(self.input_names, inputs, strict=True))
        else:
            raise ValueError(
                f"this graph takes the inputs {self.input_names}, positionally or by name; got {len(inputs)} "
                f"positional and the keywords {sorted(keyword_inputs)}"
            )
        # a bfloat16 model's inputs, for its float32 graph (see in_float32): numpy has no bfloat16
        arrays = {
            name: np.ascontiguousarray(_float32_if_bfloat16(value.detach().cpu()).numpy())
            for name, value in feed.items()
        }
        (outputs, *_) = self.session.run(None, arrays)
        return torch.from_numpy(outputs)

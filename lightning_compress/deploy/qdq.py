"""Integer ONNX graphs in the QDQ format, made from the integer form of a model's fake-quantized layers (:mod:`.integer_layers`).

The float graph that torch exports (its optimizer folds BatchNorm into the convolutions) is rewritten
the way ONNX Runtime's own quantization tool writes int8 models, but with the scales the model trained
or calibrated: each quantized layer's weight becomes an integer initializer behind a
``DequantizeLinear`` (one scale per output channel, which also absorbs a folded BatchNorm exactly), its
bias an int32 initializer on the accumulator grid (input scale x weight scale), and its input passes a
``QuantizeLinear`` / ``DequantizeLinear`` pair. Where a layer's output reaches the next quantized layer
only through operators that commute with rounding (ReLU, max-pooling, reshapes), the next layer's grid
is applied after the layer and after each of them: the numbers do not change, and ONNX Runtime fuses the
chain into integer kernels (``QLinearConv``, ``QGemm``, 8-bit ``MaxPool``). A linear layer on inputs of more
than two dimensions (a transformer's) is exported as ``MatMul`` + ``Add`` with its weight transposed into an
unnamed initializer, found by its value; ONNX Runtime runs it in ``MatMulIntegerToFloat``. Behind a ReLU that grid is
uint8 from zero (a symmetric activation quantizer turns unsigned on non-negative inputs, see
:class:`~lightning_compress.quantization.FakeQuantizer`), so ONNX Runtime drops the ReLU, which
clipping at zero already does, and the tensor stays uint8 from one layer to the next.

Weights whose range fits in four bits (``weight_bits=4``: ``[-7, 7]``, or ``[0, 15]`` when asymmetric)
are stored as ``INT4`` / ``UINT4`` initializers, two integers a byte, and widened by a ``Cast`` to the
8-bit type the ``DequantizeLinear`` reads (both need opset 21, to which such a graph is converted).
ONNX Runtime folds the ``Cast`` of a constant when it loads the graph and runs the same integer kernels
as for 8-bit weights; a ``DequantizeLinear`` reading the 4-bit integers directly would run too, but
unpack them on every call (ten times slower on SmallCNN). Activations stay 8-bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lightning_compress.deploy.graph_editor import GraphEditor
from lightning_compress.deploy.integer_layers import IntegerLayer

# Operators f with round(f(x) / s) = f(round(x / s)) for a scale s > 0 and a grid holding zero.
ROUNDING_COMMUTES = frozenset(
    {"Relu", "MaxPool", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Transpose"}
)
_LAYER_OPS = ("Conv", "Gemm")  # and MatMul, for linear layers on inputs of more than two dimensions
# 4-bit ONNX element types and the integers they hold; Cast reads them from opset 21 and IR version 10 on
_FOUR_BIT_TYPES = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}
FOUR_BIT_OPSET = 21


def _storage_type(quant_range: tuple[int, int]) -> type[np.integer]:
    low, high = quant_range
    return np.int8 if low >= -128 and high <= 127 else np.uint8


def weight_storage(quant_range: tuple[int, int]) -> np.dtype:
    """The type a weight's integers are stored in: INT4 or UINT4 where ``quant_range`` fits, else int8 or uint8.

    A folded BatchNorm with a negative scale mirrors the integers inside the range (``low + high - q``),
    so they fit the same type.

    Example:
        >>> from lightning_compress.quantization import QuantConfig
        >>> [str(weight_storage(QuantConfig(weight_bits=4, symmetric=symmetric).weight_range)) for symmetric in (True, False)]
        ['int4', 'uint4']
        >>> weight_storage(QuantConfig(weight_bits=8).weight_range)
        dtype('int8')
    """
    low, high = quant_range
    for element_type, (smallest, largest) in _FOUR_BIT_TYPES.items():
        if smallest <= low and high <= largest:
            return np.dtype(helper.tensor_dtype_to_np_dtype(element_type))
    return np.dtype(_storage_type(quant_range))


def _is_four_bit(quant_range: tuple[int, int]) -> bool:
    return helper.np_dtype_to_tensor_dtype(weight_storage(quant_range)) in _FOUR_BIT_TYPES


@dataclass(frozen=True)
class _ActivationGrid:
    """Names of a grid's scale and zero point initializers."""

    scale: str
    zero_point: str


def to_qdq(model: onnx.ModelProto, layers: Mapping[str, IntegerLayer]) -> onnx.ModelProto:
    """Rewrite a float graph into the QDQ format; ``layers`` maps each quantized layer's weight initializer name to it.

    When a weight is stored in four bits (see :func:`weight_storage`), the graph is first converted to
    opset :data:`FOUR_BIT_OPSET` if it is older, which reading 4-bit integers needs.
    """
    if any(_is_four_bit(layer.weight_range) for layer in layers.values()):
        result = _at_least_opset(model, FOUR_BIT_OPSET)
    else:
        result = onnx.ModelProto()
        result.CopyFrom(model)
    editor = GraphEditor(result)
    users = editor.consumers()
    input_grids: dict[str, _ActivationGrid] = {}  # output of the QuantizeLinear before a layer -> its grid
    layer_outputs = []
    for weight_name, layer in layers.items():
        if layer.input_range is None:  # an embedding table: no input grid
            _quantize_embedding(editor, users, weight_name, layer)
            continue
        found = _layer_node(weight_name, layer, users, editor)
        node = found.node
        layer_outputs.append(_layer_output(found, users))
        _quantize_weight_and_bias(editor, users, found, layer)
        grid = _activation_grid(editor, layer, node.input[0])
        added = _quantize_pair(editor, node.input[0], grid, _clip_range(layer))
        input_grids[added[-2].output[0]] = grid
        editor.before[node.output[0]] += added
        node.input[0] = added[-1].output[0]
    editor.commit()
    users = editor.consumers()
    graph_outputs = {output.name for output in result.graph.output}
    producers = {output: node for node in result.graph.node for output in node.output}
    for output in layer_outputs:
        tensors, grid = _path_to_next_quantizer(output, users, input_grids, graph_outputs)
        for tensor in tensors:
            added = _quantize_pair(editor, tensor, grid)
            for user in users[tensor]:
                user.input[:] = [added[-1].output[0] if name == tensor else name for name in user.input]
            editor.after[producers[tensor].output[0]] += added
    editor.commit()
    return result


def _layer_output(found: _LayerNode, users: dict[str, list[onnx.NodeProto]]) -> str:
    """The tensor a layer computes: its node's output, or the ``Add`` of its bias after a ``MatMul``."""
    output = found.node.output[0]
    if found.transposed and len(users[output]) == 1 and users[output][0].op_type == "Add":
        return users[output][0].output[0]
    return output


def _at_least_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """A copy of ``model`` that imports the default operator set at ``version`` or later, and IR version 10 or later.

    Converted by onnxscript's version converter (which torch's exporter uses for its ``opset_version``):
    operators whose meaning changed between the versions are rewritten, the nodes' metadata is kept.
    """
    from onnxscript import ir  # the ONNX export needs onnxscript (EXPORT_FORMATS); importing this module does not
    from onnxscript.version_converter import convert_version

    converted = ir.from_proto(model)
    if converted.opset_imports.get("", 1) < version:
        convert_version(converted, version)
    result = ir.to_proto(converted)
    result.ir_version = max(result.ir_version, onnx.IR_VERSION_2024_3_25)  # IR version 10 brought INT4 and UINT4
    return result


@dataclass(frozen=True)
class _LayerNode:
    """A quantized layer's node in the graph, the initializer holding its weight, and whether that initializer
    is the weight transposed (a ``MatMul``'s ``(in, out)`` operand), not ``(out, in, ...)`` as the layer holds it."""

    node: onnx.NodeProto
    weight: str
    transposed: bool


def _layer_node(
    weight_name: str, layer: IntegerLayer, users: dict[str, list[onnx.NodeProto]], editor: GraphEditor
) -> _LayerNode:
    """The node that computes the layer whose weight the model calls ``weight_name``.

    A ``Conv`` or ``Gemm`` reads the weight under that name. A linear layer on inputs of more than two
    dimensions is exported as ``MatMul`` + ``Add``, and the exporter folds the weight's transpose into a new,
    unnamed initializer; that one is found by its value, the layer's dequantized weight transposed.
    """
    if weight_name not in editor.initializers:
        return _matmul_of(weight_name, layer, users, editor)
    nodes = users[weight_name]
    if len(nodes) != 1 or nodes[0].op_type not in _LAYER_OPS or list(nodes[0].input).index(weight_name) != 1:
        found = [node.op_type for node in nodes]
        raise RuntimeError(
            f"{weight_name!r} should be the weight of one {' or '.join(_LAYER_OPS)} node in the exported graph, found {found}"
        )
    node = nodes[0]
    if node.op_type == "Gemm":
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        if attributes.get("transB", 0) != 1 or attributes.get("transA", 0) != 0:
            raise RuntimeError(f"the Gemm reading {weight_name!r} is not x @ W^T (transA=0, transB=1): {attributes}")
    return _LayerNode(node, weight_name, transposed=False)


def _matmul_of(
    weight_name: str, layer: IntegerLayer, users: dict[str, list[onnx.NodeProto]], editor: GraphEditor
) -> _LayerNode:
    """The one ``MatMul`` whose second operand is an initializer equal to the layer's dequantized weight, transposed."""
    expected = layer.dequantized_weight().numpy()
    if expected.ndim != 2:
        raise RuntimeError(
            f"the exported graph holds no initializer {weight_name!r}; found {sorted(editor.initializers)[:10]}"
        )
    matches = [
        (node, name)
        for name, tensor in editor.initializers.items()
        if tuple(tensor.dims) == expected.T.shape
        for node in users[name]
        if node.op_type == "MatMul"
        and list(node.input).index(name) == 1
        and np.array_equal(numpy_helper.to_array(tensor), expected.T)
    ]
    if len(matches) != 1:
        problem = "no MatMul reads" if not matches else f"{len(matches)} MatMul nodes read"
        raise RuntimeError(
            f"the exported graph holds no initializer {weight_name!r}, and {problem} its transposed value"
            + (
                ""
                if not matches
                else ": layers with equal weights (nn.TransformerEncoder clones its layer) cannot be told apart"
            )
        )
    node, name = matches[0]
    return _LayerNode(node, name, transposed=True)


def _quantize_weight_and_bias(
    editor: GraphEditor, users: dict[str, list[onnx.NodeProto]], found: _LayerNode, layer: IntegerLayer
) -> None:
    node, weight_name = found.node, found.weight
    exported = editor.replace_initializer(weight_name)
    integers, scale, zero_point = layer.fit_to(exported.T if found.transposed else exported, weight_name)
    storage = _storage_type(layer.weight_range)  # the type DequantizeLinear reads, as ONNX Runtime's integer kernels do
    stored_integers = integers.T if found.transposed else integers
    stored = editor.constant(f"{weight_name}_int", stored_integers.astype(weight_storage(layer.weight_range)))
    if _is_four_bit(layer.weight_range):
        widened = editor.name(f"{weight_name}_widened")
        editor.before[node.output[0]].append(
            helper.make_node("Cast", [stored], [widened], to=helper.np_dtype_to_tensor_dtype(np.dtype(storage)))
        )
        stored = widened
    editor.before[node.output[0]].append(
        helper.make_node(
            "DequantizeLinear",
            [
                stored,
                editor.constant(f"{weight_name}_scale", scale),
                editor.constant(f"{weight_name}_zero_point", zero_point.astype(storage)),
            ],
            [weight_name],
            axis=1 if found.transposed else 0,  # the output channels
        )
    )
    bias_name = _bias_of(found, users, editor)
    if bias_name is None:
        return
    bias = editor.replace_initializer(bias_name).astype(np.float64)
    bias_scale = (np.float32(layer.input_scale) * scale).astype(np.float32)
    low, high = layer.bias_range
    integers = np.clip(np.round(bias / bias_scale), low, high).astype(np.int32)
    if found.transposed:  # the Add after a MatMul takes the bias on its grid as floats, as the layer adds it
        editor.constant_named(bias_name, (integers * bias_scale).astype(np.float32))
        return
    editor.before[node.output[0]].append(
        helper.make_node(
            "DequantizeLinear",
            [
                editor.constant(f"{bias_name}_int", integers),
                editor.constant(f"{bias_name}_scale", bias_scale),
                editor.constant(f"{bias_name}_zero_point", np.zeros_like(integers)),
            ],
            [bias_name],
            axis=0,
        )
    )


def _quantize_embedding(
    editor: GraphEditor, users: dict[str, list[onnx.NodeProto]], weight_name: str, layer: IntegerLayer
) -> None:
    """An embedding table as integers: each ``Gather`` of its rows gathers the integer rows and their scales
    (one a row) and multiplies them, so the table is stored in 8 (or 4) bits and only the looked-up rows
    are ever widened. A lookup at constant positions (BERT's position embeddings) the exporter has already
    folded into a constant of the dequantized rows: that one stays float, and means the same."""
    if weight_name not in editor.initializers:
        return
    gathers = users[weight_name]
    attributes = [{a.name: helper.get_attribute_value(a) for a in node.attribute} for node in gathers]
    if not gathers or any(
        node.op_type != "Gather" or list(node.input).index(weight_name) != 0 or attribute.get("axis", 0) != 0
        for node, attribute in zip(gathers, attributes)
    ):
        raise RuntimeError(
            f"{weight_name!r} should be the table of Gather nodes (axis 0) in the exported graph, found "
            f"{[node.op_type for node in gathers]}"
        )
    integers, scale, zero_point = layer.fit_to(editor.replace_initializer(weight_name), weight_name)
    table = editor.constant(f"{weight_name}_int", integers.astype(weight_storage(layer.weight_range)))
    scales = editor.constant(f"{weight_name}_scale", scale.reshape(-1, 1))
    zero_points = (
        editor.constant(f"{weight_name}_zero_point", zero_point.astype(np.float32).reshape(-1, 1))
        if np.any(zero_point != 0)
        else None
    )
    for node in gathers:
        output, ids = node.output[0], node.input[1]
        rows, widened = editor.name(f"{output}_int"), editor.name(f"{output}_float")
        node.output[0] = rows
        if _is_four_bit(layer.weight_range):  # Gather reads 8-bit integers; ONNX Runtime folds the Cast at load
            eight_bit = editor.name(f"{weight_name}_int8")
            to = helper.np_dtype_to_tensor_dtype(np.dtype(_storage_type(layer.weight_range)))
            editor.before[rows].append(helper.make_node("Cast", [table], [eight_bit], to=to))
            node.input[0] = eight_bit
        else:
            node.input[0] = table
        added = [helper.make_node("Cast", [rows], [widened], to=TensorProto.FLOAT)]
        if zero_points is not None:
            centered = editor.name(f"{output}_centered")
            row_zero_points = editor.name(f"{output}_zero_point")
            added += [
                helper.make_node("Gather", [zero_points, ids], [row_zero_points]),
                helper.make_node("Sub", [widened, row_zero_points], [centered]),
            ]
            widened = centered
        row_scales = editor.name(f"{output}_scale")
        added += [
            helper.make_node("Gather", [scales, ids], [row_scales]),
            helper.make_node("Mul", [widened, row_scales], [output]),
        ]
        editor.after[rows] += added


def _bias_of(found: _LayerNode, users: dict[str, list[onnx.NodeProto]], editor: GraphEditor) -> str | None:
    """The bias initializer of a layer's node: a ``Conv``'s or ``Gemm``'s third input, or the initializer the
    one ``Add`` after a ``MatMul`` adds (``None`` without a bias)."""
    node = found.node
    if not found.transposed:
        return node.input[2] if len(node.input) >= 3 and node.input[2] in editor.initializers else None
    (add, *others) = users[node.output[0]] or [None]
    if add is None or others or add.op_type != "Add":
        return None
    return next((name for name in add.input if name != node.output[0] and name in editor.initializers), None)


def _activation_grid(editor: GraphEditor, layer: IntegerLayer, tensor: str) -> _ActivationGrid:
    storage = _storage_type(layer.input_range)
    return _ActivationGrid(
        scale=editor.constant(f"{tensor}_scale", np.array(layer.input_scale, dtype=np.float32)),
        zero_point=editor.constant(f"{tensor}_zero_point", np.array(layer.input_zero_point, dtype=storage)),
    )


def _clip_range(layer: IntegerLayer) -> tuple[float, float] | None:
    """The float range of a layer's input grid when it is narrower than its storage type (activations under 8 bits)."""
    if layer.input_range == _full_range(_storage_type(layer.input_range)):
        return None
    low, high = ((bound - layer.input_zero_point) * np.float32(layer.input_scale) for bound in layer.input_range)
    return float(low), float(high)


def _quantize_pair(
    editor: GraphEditor, tensor: str, grid: _ActivationGrid, clip_range: tuple[float, float] | None = None
) -> list[onnx.NodeProto]:
    """Nodes that put ``tensor`` on ``grid``: ``QuantizeLinear`` then ``DequantizeLinear``, whose output is the result.

    With ``clip_range`` the tensor is clipped first, in float, since ``QuantizeLinear`` saturates only at
    its storage type's limits.
    """
    nodes = []
    source = tensor
    if clip_range is not None:
        source = editor.name(f"{tensor}_clipped")
        low, high = (editor.constant("clip", np.array(bound, np.float32)) for bound in clip_range)
        nodes.append(helper.make_node("Clip", [tensor, low, high], [source]))
    quantized, dequantized = editor.name(f"{tensor}_int"), editor.name(f"{tensor}_dequantized")
    nodes.append(helper.make_node("QuantizeLinear", [source, grid.scale, grid.zero_point], [quantized]))
    nodes.append(helper.make_node("DequantizeLinear", [quantized, grid.scale, grid.zero_point], [dequantized]))
    return nodes


def _full_range(storage: type[np.integer]) -> tuple[int, int]:
    info = np.iinfo(storage)
    return int(info.min), int(info.max)


def _path_to_next_quantizer(
    tensor: str,
    users: dict[str, list[onnx.NodeProto]],
    input_grids: dict[str, _ActivationGrid],
    graph_outputs: set[str],
) -> tuple[list[str], _ActivationGrid | None]:
    """The tensors from ``tensor`` through rounding-commuting operators to the next layer's quantizer, and its grid.

    Empty when the path branches, leaves the graph or meets any other operator: the output then stays float.
    """
    path = []
    while tensor not in graph_outputs and len(users[tensor]) == 1:
        (user,) = users[tensor]
        if user.op_type == "QuantizeLinear" and user.output[0] in input_grids:
            return path, input_grids[user.output[0]]
        if user.op_type not in ROUNDING_COMMUTES or user.input[0] != tensor:
            break
        path.append(tensor)
        tensor = user.output[0]
    return [], None

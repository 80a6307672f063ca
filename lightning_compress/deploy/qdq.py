"""Integer ONNX graphs in the QDQ format, made from the integer form of a model's fake-quantized layers (:mod:`.integer_layers`).

The float graph that torch exports (its optimizer folds BatchNorm into the convolutions) is rewritten
the way ONNX Runtime's own quantization tool writes int8 models, but with the scales the model trained
or calibrated: each quantized layer's weight becomes an integer initializer behind a
``DequantizeLinear`` (one scale per output channel, which also absorbs a folded BatchNorm exactly), its
bias an int32 initializer on the accumulator grid (input scale x weight scale), and its input passes a
``QuantizeLinear`` / ``DequantizeLinear`` pair. Where a layer's output reaches the next quantized layer
only through operators that commute with rounding (ReLU, max-pooling, reshapes), the next layer's grid
is applied after the layer and after each of them: the numbers do not change, and ONNX Runtime fuses the
chain into integer kernels (``QLinearConv``, ``QGemm``, 8-bit ``MaxPool``). Behind a ReLU that grid is
uint8 from zero (a symmetric activation quantizer turns unsigned on non-negative inputs, see
:class:`~lightning_compress.quantization.FakeQuantizer`), so ONNX Runtime drops the ReLU, which
clipping at zero already does, and the tensor stays uint8 from one layer to the next.

A linear layer on inputs of more than two dimensions (a transformer's) is exported as ``MatMul`` + ``Add``
with its weight transposed into an unnamed initializer, found by its value. It becomes ONNX's integer
matrix product, as ONNX Runtime's ``quantize_dynamic`` writes it before its fusions but on the layer's
static input grid: ``QuantizeLinear`` -> ``MatMulInteger`` -> ``Cast`` -> ``Mul`` by the accumulator's steps
(input step x weight scale, one a column) -> ``Add`` of the bias on that grid. ONNX Runtime fuses the chain,
bias included, into one ``MatMulIntegerToFloat`` (from the QDQ form it would add the bias in a kernel of
its own, fused with a following GELU into its slower ``BiasGelu``). The fusion looks for the steps as a
``Mul`` of two factors, but ONNX Runtime folds every product of constants before it fuses: so the steps
are multiplied by :data:`UNIT`, a graph input whose initializer is its default, 1. A caller may override
such an input, so no runtime folds it (ONNX Runtime warns once that it will not), and the outputs are the
same bits as with the steps alone.
Layers that read one tensor on one grid (a transformer's query, key and value) share its ``QuantizeLinear``.

Inputs reach integer kernels as uint8, and weights as int8 where no product can overflow on the layer's
``QuantConfig.target_cpu`` (:func:`kernel_weight_type`): x86 CPUs without VNNI (AVX2, AVX-512BW) add two uint8 x int8
products into a saturating 16-bit sum, which weights up to 64 in magnitude never exceed (7-bit weights, the default
for ``target_cpu="avx2"``, and 4-bit ones); VNNI CPUs sum them in 32 bits. Full 8-bit weights for ``"avx2"`` are
stored as uint8, 128 higher with their zero points, the same grid, so ONNX Runtime multiplies uint8 by uint8 and
sums in 32 bits: exact on every CPU (on a VNNI-less AVX2 CPU the int8 form of a BERT layer was off by up to 0.5),
but slow (on an AVX-512 VNNI CPU SmallCNN's uint8 weights took 1.4x-1.8x the time of int8 ones). For ``"vnni"`` they
stay int8: exact and fast on CPUs with ``avx512_vnni`` or ``avx_vnni``, not exact on those without.

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
from torch import nn

from lightning_compress.deploy.graph_editor import GraphEditor
from lightning_compress.deploy.integer_layers import IntegerLayer
from lightning_compress.quantization.layers import quantized_layers

# Operators f with round(f(x) / s) = f(round(x / s)) for a scale s > 0 and a grid holding zero.
ROUNDING_COMMUTES = frozenset(
    {"Relu", "MaxPool", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Transpose"}
)
_LAYER_OPS = ("Conv", "Gemm")  # and MatMul, for linear layers on inputs of more than two dimensions
# 4-bit ONNX element types and the integers they hold; Cast reads them from opset 21 and IR version 10 on
_FOUR_BIT_TYPES = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}
FOUR_BIT_OPSET = 21
#: The graph input (default 1) by which integer matrix products' accumulator steps are multiplied, see above
UNIT = "integer_product_unit"
#: The largest signed 8-bit weight integer (in magnitude) whose products with any uint8 input cannot overflow the
#: 16-bit sum of two products that x86 CPUs without VNNI compute (VPMADDUBSW): 2 x 255 x 64 = 32,640 <= 32,767
LARGEST_SIGNED_WEIGHT = 64


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


def stored_bits(quant_range: tuple[int, int]) -> int:
    """The bits each of a weight's integers on ``quant_range`` takes in the exported file: 4 where they are stored
    as INT4 or UINT4 (two a byte, see :func:`weight_storage`), else 8.

    Example:
        >>> stored_bits((-7, 7)), stored_bits((0, 15)), stored_bits((-127, 127))
        (4, 4, 8)
    """
    return 4 if _is_four_bit(quant_range) else 8


def kernel_weight_type(quant_range: tuple[int, int], target_cpu: str) -> np.dtype:
    """The 8-bit type in which ONNX Runtime's integer kernels read a weight on ``quant_range`` for ``target_cpu``
    (``QuantConfig.target_cpu``): int8, unless the range holds integers beyond :data:`LARGEST_SIGNED_WEIGHT` in
    magnitude that a CPU without VNNI could not multiply exactly (``"avx2"``), or integers beyond int8: then uint8.

    Example:
        >>> from lightning_compress.quantization import QuantConfig
        >>> [str(kernel_weight_type(config.weight_range, config.target_cpu)) for config in (
        ...     QuantConfig(), QuantConfig(reduce_range=False), QuantConfig(target_cpu="vnni"))]
        ['int8', 'uint8', 'int8']
    """
    low, high = quant_range
    if _storage_type(quant_range) is np.uint8 or (target_cpu == "avx2" and max(-low, high) > LARGEST_SIGNED_WEIGHT):
        return np.dtype(np.uint8)
    return np.dtype(np.int8)


def uint8_weight_layers(model: nn.Module) -> list[str]:
    """The fake-quantized layers of ``model`` whose integer kernels the ONNX export makes read 8-bit weights as uint8
    (:func:`kernel_weight_type`), which ONNX Runtime multiplies by uint8 inputs in its uint8 x uint8 kernels.

    Example:
        >>> import torch
        >>> from lightning_compress.quantization import QuantConfig, quantize_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> _ = quantize_model(model, QuantConfig(reduce_range=False), targets=["0"])
        >>> _ = quantize_model(model, QuantConfig(), targets=["1"])
        >>> uint8_weight_layers(model)
        ['0']
    """
    return [
        name
        for name, layer in quantized_layers(model).items()
        if layer.input_quantizer is not None  # embeddings and weight-only layers have no integer products
        and layer.weight_quantizer.group_size is None
        and kernel_weight_type(layer.weight_quantizer.quant_range, layer.quant_config.target_cpu) == np.uint8
    ]


@dataclass(frozen=True)
class _ActivationGrid:
    """Names of a grid's scale and zero point initializers."""

    scale: str
    zero_point: str


def to_qdq(model: onnx.ModelProto, layers: Mapping[str, IntegerLayer]) -> onnx.ModelProto:
    """Rewrite a float graph into the QDQ format; ``layers`` maps each quantized layer's weight initializer name to it.

    When a weight is stored in four bits (see :func:`weight_storage`) or has scales per group of input columns,
    the graph is first converted to opset :data:`FOUR_BIT_OPSET` if it is older, which reading 4-bit integers
    and block-wise ``DequantizeLinear`` need.
    """
    if any(_is_four_bit(layer.weight_range) or layer.group_size is not None for layer in layers.values()):
        result = _at_least_opset(model, FOUR_BIT_OPSET)
    else:
        result = onnx.ModelProto()
        result.CopyFrom(model)
    editor = GraphEditor(result)
    users = editor.consumers()
    input_grids: dict[str, _ActivationGrid] = {}  # output of the QuantizeLinear before a layer -> its grid
    integer_inputs: dict[tuple, _IntegerInput] = {}  # see _integer_input
    layer_outputs = []
    for weight_name, layer in layers.items():
        if layer.group_size is not None:  # a weight quantized alone, in groups of input columns
            _blockwise_weight(editor, users, weight_name, layer)
            continue
        if layer.input_range is None:  # an embedding table: no input grid
            _quantize_embedding(editor, users, weight_name, layer)
            continue
        found = _layer_node(weight_name, layer, users, editor)
        if found.transposed:
            if UNIT not in editor.initializers:
                editor.default_input(UNIT, np.array(1, dtype=np.float32))
            integer_input = _integer_input(editor, users, found.node.input[0], layer, integer_inputs)
            input_grids[integer_input.integers] = integer_input.grid
            _integer_matmul(editor, users, found, layer, integer_input)
            continue
        node = found.node
        layer_outputs.append(node.output[0])
        _quantize_weight_and_bias(editor, found, layer)
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


def _quantize_weight_and_bias(editor: GraphEditor, found: _LayerNode, layer: IntegerLayer) -> None:
    """A ``Conv``'s or ``Gemm``'s weight and bias as integers behind ``DequantizeLinear`` nodes."""
    node, weight_name = found.node, found.weight
    integers, scale, zero_point = layer.fit_to(editor.replace_initializer(weight_name), weight_name)
    weight = _weight_integers(editor, weight_name, integers, zero_point, layer)
    editor.before[node.output[0]] += [
        *weight.widening,
        helper.make_node(
            "DequantizeLinear",
            [
                weight.integers,
                editor.constant(f"{weight_name}_scale", scale),
                editor.constant(f"{weight_name}_zero_point", weight.zero_point),
            ],
            [weight_name],
            axis=0,  # the output channels
        ),
    ]
    if len(node.input) < 3 or node.input[2] not in editor.initializers:
        return
    bias_name = node.input[2]
    bias_scale = _accumulator_steps(layer, scale)
    integers = _bias_integers(editor.replace_initializer(bias_name), bias_scale, layer)
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


def _blockwise_weight(
    editor: GraphEditor, users: dict[str, list[onnx.NodeProto]], weight_name: str, layer: IntegerLayer
) -> None:
    """A linear layer's weight quantized alone with a scale per output channel and group of input columns: its
    integers (in four bits where they fit) behind a block-wise ``DequantizeLinear`` (``block_size`` the group)
    whose float output the layer's ``MatMul`` reads, as ONNX Runtime fuses it into ``MatMulNBits``. The
    ``Gemm`` of a layer on 2-D inputs becomes that ``MatMul`` and an ``Add`` of its bias: the fusion reads
    ``MatMul`` only."""
    found = _layer_node(weight_name, layer, users, editor)
    node, name = found.node, found.weight
    exported = editor.replace_initializer(name)  # (in, out) for a MatMul, (out, in) for a Gemm
    integers, scale, zero_point = layer.fit_to(exported.T if found.transposed else exported, name)
    storage = weight_storage(layer.weight_range)
    operands = [
        editor.constant(f"{name}_int", np.ascontiguousarray(integers.T).astype(storage)),  # (in, out), as MatMul reads
        editor.constant(f"{name}_scale", np.ascontiguousarray(scale.T)),  # (groups, out)
    ]
    if np.any(zero_point != 0):
        operands.append(editor.constant(f"{name}_zero_point", np.ascontiguousarray(zero_point.T).astype(storage)))
    dequantized = name if found.transposed else editor.name(f"{name}_dequantized")
    nodes = [helper.make_node("DequantizeLinear", operands, [dequantized], axis=0, block_size=layer.group_size)]
    if found.transposed:
        editor.before[node.output[0]] += nodes
        return
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    if attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
        raise RuntimeError(f"the Gemm reading {weight_name!r} scales its terms (alpha, beta): {attributes}")
    (output,) = node.output
    product = editor.name(f"{output}_product") if len(node.input) > 2 else output
    nodes.append(helper.make_node("MatMul", [node.input[0], dequantized], [product]))
    if len(node.input) > 2:
        nodes.append(helper.make_node("Add", [product, node.input[2]], [output]))
    editor.replacements[output] = nodes


def _integer_matmul(
    editor: GraphEditor,
    users: dict[str, list[onnx.NodeProto]],
    found: _LayerNode,
    layer: IntegerLayer,
    integer_input: _IntegerInput,
) -> None:
    """Replace the ``MatMul`` of a linear layer on (..., features) by ONNX's integer matrix product of its input's
    integers and the weight's, back in floats by the accumulator's steps (input step x weight scales, times
    :data:`UNIT`); the ``Add`` after it adds the bias on that grid."""
    node, weight_name = found.node, found.weight
    integers, scale, zero_point = layer.fit_to(editor.replace_initializer(weight_name).T, weight_name)
    weight = _weight_integers(editor, weight_name, integers.T, zero_point, layer)  # as MatMul reads it: (in, out)
    operands = [integer_input.integers, weight.integers, integer_input.grid.zero_point]
    if np.any(weight.zero_point != 0):  # one a column, or one for all, ONNX Runtime's faster path; none if zero
        shared = np.all(weight.zero_point == weight.zero_point.flat[0])
        operands.append(
            editor.constant(
                f"{weight_name}_zero_point", weight.zero_point[:1].reshape(()) if shared else weight.zero_point
            )
        )
    accumulator_steps = _accumulator_steps(layer, scale)
    product, widened, steps = (editor.name(f"{weight_name}_{part}") for part in ("product", "float", "steps"))
    editor.replacements[node.output[0]] = [
        *weight.widening,
        helper.make_node("MatMulInteger", operands, [product]),
        helper.make_node("Cast", [product], [widened], to=TensorProto.FLOAT),
        helper.make_node(
            "Mul", [UNIT, editor.constant(f"{weight_name}_accumulator_steps", accumulator_steps)], [steps]
        ),
        helper.make_node("Mul", [widened, steps], [node.output[0]]),
    ]
    bias = _bias_add(node.output[0], users, editor)
    if bias is None:
        return
    add, bias_name = bias
    add.input[:] = [node.output[0], bias_name]  # the bias second, where ONNX Runtime's fusion looks for it
    integers = _bias_integers(editor.replace_initializer(bias_name), accumulator_steps, layer)
    editor.constant_named(bias_name, (integers * accumulator_steps).astype(np.float32))  # the integers, as floats


@dataclass(frozen=True)
class _StoredWeight:
    """A weight's integers in the graph: the name of their 8-bit form (``integers``), the nodes that make it from the
    stored initializer (``widening``), and the zero points, one an output channel, in that 8-bit type."""

    integers: str
    widening: list[onnx.NodeProto]
    zero_point: np.ndarray


def _weight_integers(
    editor: GraphEditor, weight_name: str, integers: np.ndarray, zero_point: np.ndarray, layer: IntegerLayer
) -> _StoredWeight:
    """A weight's ``integers`` as an initializer in their storage type, widened to eight bits where they are stored in
    four (a ``Cast``, which ONNX Runtime folds when it loads the graph), and their ``zero_point``.

    Signed integers that the layer's target CPU reads as uint8 (:func:`kernel_weight_type`) are stored 128 higher,
    with their zero points: the same grid, on which ONNX Runtime multiplies uint8 by uint8 and sums in 32 bits.
    """
    eight_bit = kernel_weight_type(
        layer.weight_range, layer.target_cpu
    )  # the type DequantizeLinear and MatMulInteger read
    if eight_bit == np.uint8 and _storage_type(layer.weight_range) is np.int8:
        integers, zero_point = integers + 128, zero_point + 128
    if not _is_four_bit(layer.weight_range):
        stored = editor.constant(f"{weight_name}_int", integers.astype(eight_bit))
        return _StoredWeight(stored, [], zero_point.astype(eight_bit))
    stored = editor.constant(f"{weight_name}_int", integers.astype(weight_storage(layer.weight_range)))
    widened = editor.name(f"{weight_name}_widened")
    cast = helper.make_node("Cast", [stored], [widened], to=helper.np_dtype_to_tensor_dtype(eight_bit))
    return _StoredWeight(widened, [cast], zero_point.astype(eight_bit))


def _accumulator_steps(layer: IntegerLayer, weight_scale: np.ndarray) -> np.ndarray:
    """The steps of a layer's accumulator grid, the bias's scale, one an output channel: input scale x weight scale."""
    return (np.float32(layer.input_scale) * weight_scale).astype(np.float32)


def _bias_integers(bias: np.ndarray, bias_scale: np.ndarray, layer: IntegerLayer) -> np.ndarray:
    """A bias rounded onto the accumulator grid and clipped to the layer's bias range, as int32."""
    low, high = layer.bias_range
    return np.clip(np.round(bias.astype(np.float64) / bias_scale), low, high).astype(np.int32)


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


def _bias_add(
    output: str, users: dict[str, list[onnx.NodeProto]], editor: GraphEditor
) -> tuple[onnx.NodeProto, str] | None:
    """The one ``Add`` reading ``output`` (a ``MatMul``'s) if it adds an initializer, the layer's bias, and that
    initializer's name; ``None`` without a bias."""
    (add, *others) = users[output] or [None]
    if add is None or others or add.op_type != "Add":
        return None
    bias = next((name for name in add.input if name != output and name in editor.initializers), None)
    return None if bias is None else (add, bias)


@dataclass(frozen=True)
class _IntegerInput:
    """The integers of a tensor on a layer's input grid, and the grid."""

    integers: str
    grid: _ActivationGrid


def _integer_input(
    editor: GraphEditor,
    users: dict[str, list[onnx.NodeProto]],
    tensor: str,
    layer: IntegerLayer,
    made: dict[tuple, _IntegerInput],
) -> _IntegerInput:
    """``tensor`` on ``layer``'s input grid, for integer matrix products: made once for each tensor and grid (and
    kept in ``made``), before the tensor's first reader, and shared by every layer that reads it there."""
    key = (tensor, layer.input_scale, layer.input_zero_point, layer.input_range)
    if key not in made:
        grid = _activation_grid(editor, layer, tensor, unsigned=True)
        nodes = _quantizer(editor, tensor, grid, _clip_range(layer))
        editor.before[users[tensor][0].output[0]] += nodes
        made[key] = _IntegerInput(nodes[-1].output[0], grid)
    return made[key]


def _activation_grid(editor: GraphEditor, layer: IntegerLayer, tensor: str, unsigned: bool = False) -> _ActivationGrid:
    """The initializers of ``layer``'s input grid for ``tensor``. With ``unsigned``, a signed grid is stored as uint8
    with its zero point 128 higher: the same grid, every integer shifted by 128, so an integer matrix product
    of it and int8 weights runs in the u8 x s8 kernels of x86 CPUs (VNNI's; ONNX Runtime's s8 x s8 product is
    three times slower than float at a ViT's width 64)."""
    storage, zero_point = _storage_type(layer.input_range), layer.input_zero_point
    if unsigned and storage is np.int8:
        storage, zero_point = np.uint8, zero_point + 128
    return _ActivationGrid(
        scale=editor.constant(f"{tensor}_scale", np.array(layer.input_scale, dtype=np.float32)),
        zero_point=editor.constant(f"{tensor}_zero_point", np.array(zero_point, dtype=storage)),
    )


def _clip_range(layer: IntegerLayer) -> tuple[float, float] | None:
    """The float range of a layer's input grid when it is narrower than its storage type (activations under 8 bits)."""
    if layer.input_range == _full_range(_storage_type(layer.input_range)):
        return None
    low, high = ((bound - layer.input_zero_point) * np.float32(layer.input_scale) for bound in layer.input_range)
    return float(low), float(high)


def _quantizer(
    editor: GraphEditor, tensor: str, grid: _ActivationGrid, clip_range: tuple[float, float] | None = None
) -> list[onnx.NodeProto]:
    """Nodes that put ``tensor`` on ``grid``'s integers: a ``QuantizeLinear``, whose output is the result.

    With ``clip_range`` the tensor is clipped first, in float, since ``QuantizeLinear`` saturates only at
    its storage type's limits.
    """
    nodes = []
    source = tensor
    if clip_range is not None:
        source = editor.name(f"{tensor}_clipped")
        low, high = (editor.constant("clip", np.array(bound, np.float32)) for bound in clip_range)
        nodes.append(helper.make_node("Clip", [tensor, low, high], [source]))
    quantized = editor.name(f"{tensor}_int")
    nodes.append(helper.make_node("QuantizeLinear", [source, grid.scale, grid.zero_point], [quantized]))
    return nodes


def _quantize_pair(
    editor: GraphEditor, tensor: str, grid: _ActivationGrid, clip_range: tuple[float, float] | None = None
) -> list[onnx.NodeProto]:
    """Nodes that put ``tensor`` on ``grid``: :func:`_quantizer`'s, then ``DequantizeLinear``, whose output is the result."""
    nodes = _quantizer(editor, tensor, grid, clip_range)
    dequantized = editor.name(f"{tensor}_dequantized")
    nodes.append(
        helper.make_node("DequantizeLinear", [nodes[-1].output[0], grid.scale, grid.zero_point], [dequantized])
    )
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

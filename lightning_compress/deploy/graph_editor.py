"""A small editor of ONNX graphs: initializers added and removed, nodes placed before, after or instead of existing ones."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphEditor:
    """Adds initializers and nodes (placed before, after or instead of an existing node) to an ONNX graph, in
    topological order.

    Example:
        >>> from onnx import helper, TensorProto
        >>> graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        >>> editor = GraphEditor(helper.make_model(graph))
        >>> editor.after["y"].append(helper.make_node("Identity", ["y"], ["z"]))
        >>> editor.commit()
        >>> [node.op_type for node in editor.graph.node]
        ['Relu', 'Identity']
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        # nodes to add, keyed by the first output of the node they go before or after (protobuf
        # messages are copied into the graph, so object identities do not last)
        self.before: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.after: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        # nodes that take the place of an existing node (the last of them computes its output), keyed in the same way
        self.replacements: dict[str, list[onnx.NodeProto]] = {}
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_q{self._count}"

    def constant(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def default_input(self, name: str, value: np.ndarray) -> None:
        """Add the graph input ``name``, whose initializer holds its default ``value``: a caller may feed another
        value, so no runtime folds it as a constant."""
        self.constant_named(name, value)
        element_type = helper.np_dtype_to_tensor_dtype(value.dtype)
        self.graph.input.append(helper.make_tensor_value_info(name, element_type, list(value.shape)))

    def constant_named(self, name: str, value: np.ndarray) -> None:
        """Add the initializer ``name`` (one :meth:`replace_initializer` took out, say) holding ``value``."""
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor

    def replace_initializer(self, name: str) -> np.ndarray:
        """Remove the initializer ``name`` from the graph and return its value."""
        tensor = self.initializers.pop(name)
        self.graph.initializer.remove(tensor)
        return numpy_helper.to_array(tensor)

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes():
            for name in node.input:
                users[name].append(node)
        return users

    def nodes(self) -> list[onnx.NodeProto]:
        """Every node, the added ones in place and the replaced ones replaced: still in topological order."""
        ordered = []
        for node in self.graph.node:
            key = node.output[0]
            ordered += [*self.before.get(key, []), *self.replacements.get(key, [node]), *self.after.get(key, [])]
        return ordered

    def commit(self) -> None:
        ordered = self.nodes()
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        self.before.clear()
        self.after.clear()
        self.replacements.clear()

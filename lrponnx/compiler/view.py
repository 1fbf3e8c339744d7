"""A read-only view of a prepared ONNX graph: producers, consumers, shapes, constants.

"Dynamic" tensors are the ones that depend on a model input; everything else is a constant
whose value we can compute at convert time (initializers, Constant nodes, and nodes whose
inputs are all constant, evaluated with onnx's reference evaluator).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper

from lrponnx.compiler.load import tensor_array


class ModelView:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.graph = g
        self.initializers = {t.name: t for t in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.outputs = [o.name for o in g.output]
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
        self.types: dict[str, onnx.TypeProto] = {}
        for v in list(g.input) + list(g.value_info) + list(g.output):
            self.types[v.name] = v.type
        self.dynamic = self._dynamic_tensors()
        self._values: dict[str, np.ndarray] = {}
        #: ``ops.context.nonnegative``'s answers per tensor (the sign analysis walks shared producers)
        self.nonneg: dict[str, bool] = {}

    def _dynamic_tensors(self) -> set[str]:
        dyn = set(self.inputs)
        for node in self.graph.node:  # nodes are topologically sorted (the checker ensures it)
            if any(i in dyn for i in node.input if i):
                dyn.update(o for o in node.output if o)
        return dyn

    # -- constants -----------------------------------------------------------------------------
    def is_const(self, name: str) -> bool:
        return bool(name) and name not in self.dynamic

    def value(self, name: str) -> np.ndarray:
        """The value of a constant tensor (an initializer or a constant subgraph's output)."""
        if name in self._values:
            return self._values[name]
        if name in self.initializers:  # not cached: large weights are read when needed, then freed
            return tensor_array(self.initializers[name])
        if name in self.producer:
            arr = self._evaluate(self.producer[name], name)
        else:
            raise KeyError(f"tensor {name!r} is not a constant of this graph")
        self._values[name] = arr
        return arr

    def _evaluate(self, node: onnx.NodeProto, wanted: str) -> np.ndarray:
        from lrponnx.compiler.constants import evaluate_node

        inputs = {i: self.value(i) for i in node.input if i}
        outs = evaluate_node(node, inputs, self.model.opset_import)
        for o, v in zip([o for o in node.output if o], outs):
            self._values[o] = v
        return self._values[wanted]

    # -- shapes --------------------------------------------------------------------------------
    def shape(self, name: str) -> list[int | None] | None:
        """Static shape (None for unknown dims), or None when even the rank is unknown."""
        if name in self.initializers:
            return list(self.initializers[name].dims)
        t = self.types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            if self.is_const(name):
                return list(self.value(name).shape)
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]

    def elem_type(self, name: str) -> int:
        if name in self.initializers:
            return self.initializers[name].data_type
        t = self.types.get(name)
        if t is not None and t.HasField("tensor_type"):
            return t.tensor_type.elem_type
        return onnx.TensorProto.UNDEFINED

    def is_float(self, name: str) -> bool:
        return self.elem_type(name) in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                        onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The single node reading ``name``, when it is read once and is not a graph output."""
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.outputs:
            return users[0]
        return None


def attrs_of(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}

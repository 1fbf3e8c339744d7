"""Emitting the converted graph: the compiler's :class:`~lrponnx.compiler.builder.GraphBuilder`
with the converter's naming rules, and the context a layer's conversion sees.

Naming (``docs/caffe.md``, "Graph conventions"): a Caffe blob's final value is called by the
blob's name, a value that an in-place layer later overwrites ``<blob>@<layer>``, nodes are named
after layers (helper nodes ``<layer>#<tag>``), initializers ``<layer>.<role>``. So names are used
verbatim (no prefix, no character clean-up), a taken name gets ``_1``, ``_2``, ... counted per
name, blob names stay free for the blobs' final values, and constants are never shared between
layers (GraphBuilder shares small ones by value).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from lrponnx.compiler.builder import GraphBuilder

from lrponnx.converters.caffe.net import Layer, prod


class CaffeGraph(GraphBuilder):
    """A GraphBuilder that names tensors, nodes and initializers the Caffe converter's way."""

    def __init__(self, graph: onnx.GraphProto, fixed_batch: bool, reserved: set[str]):
        super().__init__(graph, prefix="")
        self.fixed_batch = fixed_batch
        self.reserved = set(reserved)  # Caffe blob names: kept for the blobs' final values
        self.needs_lrn_function = False

    def fresh(self, hint: str, allow_reserved: bool = False) -> str:
        name, k = hint, 1
        while name in self._taken or (not allow_reserved and name in self.reserved):
            name = f"{hint}_{k}"
            k += 1
        self._taken.add(name)
        return name

    def claim(self, name: str) -> str:
        """Use ``name`` exactly (a blob's final value, a graph input)."""
        self._taken.add(name)
        return name

    def const(self, value, hint: str = "const", dtype=np.float32) -> str:
        arr = np.ascontiguousarray(np.asarray(value, dtype=dtype))  # (0-d becomes [1], as it always was)
        name = self.fresh(hint)
        # written in place, one copy of the data (numpy_helper.from_array + append copy it twice more:
        # +1.7 s on AlexNet's 61 M parameters); the same bytes as from_array's
        t = self.graph.initializer.add()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.raw_data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        return name

    def tmp(self, layer: Layer, tag: str) -> str:
        """A fresh name for a helper tensor of ``layer``."""
        return self.fresh(f"{layer.name}#{tag}")

    def add(self, node: onnx.NodeProto) -> None:
        """Append a node built elsewhere (e.g. :func:`~lrponnx.compiler.lrn_ops.make_within_channel_lrn`)."""
        self.graph.node.append(node)


@dataclass
class LayerCtx:
    """What a layer's conversion sees (see :mod:`lrponnx.converters.caffe.layers.registry`)."""
    g: CaffeGraph
    layer: Layer
    xs: list[str]            # ONNX tensors of the bottoms
    shapes: list[list[int]]  # their Caffe shapes (batch placeholder in dim 0)
    outs: list[str]          # ONNX names for the tops
    blobs: list[np.ndarray]  # parameter blobs, already checked against the expected shapes
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.layer.name

    def op(self, op_type: str, *inputs: str, tag: str | None = None, output: str | list[str] | None = None,
           **attrs) -> str | list[str]:
        """One node of this layer. Without ``tag`` it is the layer's own node, named after the layer
        and writing the layer's top(s) (or ``output``); with a tag it is a helper node ``<layer>#<tag>``
        writing a fresh ``<layer>#<tag>`` tensor (or ``output``)."""
        if tag is None:
            return self.g.op(op_type, *inputs, output=self.outs[0] if output is None else output, name=self.name,
                             **attrs)
        out = self.g.tmp(self.layer, tag) if output is None else output
        return self.g.op(op_type, *inputs, output=out, name=f"{self.name}#{tag}", **attrs)

    def const(self, role: str, value, dtype=np.float32) -> str:
        """An initializer ``<layer>.<role>``."""
        return self.g.const(value, f"{self.name}.{role}", dtype)

    def ints(self, role: str, values) -> str:
        return self.g.const(np.asarray(values), f"{self.name}.{role}", np.int64)

    def reshape_target(self, in_shape: list[int], out_shape: list[int]) -> list[int]:
        """ONNX Reshape target for a Caffe reshape; keeps the batch axis symbolic when it can."""
        if self.g.fixed_batch:
            return list(out_shape)
        if out_shape and in_shape and out_shape[0] == in_shape[0] and prod(out_shape[1:]) == prod(in_shape[1:]):
            return [0] + list(out_shape[1:])
        raise self.layer.unsupported(
            f"reshapes {in_shape} to {out_shape} across the batch axis; give --input-shape with a fixed batch size")

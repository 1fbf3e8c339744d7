"""One graph builder for everything the compiler emits: unique names, initializers, nodes.

Every relevance subgraph is written through a :class:`GraphBuilder`, so no handler has to
invent tensor names or remember to register an initializer.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    """Appends nodes and initializers to an existing ``onnx.GraphProto``."""

    def __init__(self, graph: onnx.GraphProto, prefix: str = "lrp"):
        self.graph = graph
        self.prefix = prefix
        self._taken: set[str] = set()
        self._counter = 0
        self._scalars: dict[tuple, str] = {}
        self._declared = {v.name for v in graph.value_info}
        self._io = {v.name for v in list(graph.input) + list(graph.output)}
        #: relevance products made by ``ops.context.combine``: ``{R: (x, f)}`` for ``R = x * f``, so a
        #: rule that divides R by x again (eps = 0) takes f instead (``Ctx.stab_div``)
        self.factored: dict[str, tuple[str, str]] = {}
        #: forward nodes recomputed by a handler: ``{forward tensor: nodes}``, see :meth:`replace_forward`
        self.forward_replacements: dict[str, list] = {}
        self._take_existing_names()

    def _take_existing_names(self) -> None:
        g = self.graph
        for v in list(g.input) + list(g.output) + list(g.value_info):
            self._taken.add(v.name)
        for t in g.initializer:
            self._taken.add(t.name)
        for n in g.node:
            self._taken.update(n.input)
            self._taken.update(n.output)
            if n.name:
                self._taken.add(n.name)

    # -- names ---------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A tensor or node name not used anywhere in the graph, readable in a profiler."""
        base = f"{self.prefix}/{re.sub(r'[^A-Za-z0-9_./-]', '_', hint)}"
        name = base
        while name in self._taken:
            self._counter += 1
            name = f"{base}_{self._counter}"
        self._taken.add(name)
        return name

    # -- constants -----------------------------------------------------------------------------
    def const(self, value, hint: str = "const", dtype=np.float32) -> str:
        """An initializer holding ``value``. Scalars and tiny tensors are shared by value."""
        arr = np.asarray(value, dtype=dtype)
        key = None
        if arr.size <= 8:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._scalars:
                return self._scalars[key]
        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(arr, name))
        if key is not None:
            self._scalars[key] = name
        return name

    def ints(self, values: Iterable[int], hint: str = "ints") -> str:
        return self.const(list(values), hint, dtype=np.int64)

    # -- nodes ---------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, hint: str | None = None, outputs: int = 1,
           domain: str = "", output: str | list[str] | None = None, name: str | None = None,
           **attrs) -> str | list[str]:
        """Append one node; returns its output name (or names when ``outputs > 1`` or ``output``
        is a list). ``output``: write to exactly this (existing) name, or these names, for a node
        that replaces its producer. ``name``: the node's exact name (the Caffe converter names
        nodes after layers); by default a fresh one from the hint."""
        hint = hint or op_type.lower()
        if output is not None:
            outs = [output] if isinstance(output, str) else list(output)
        else:
            outs = [self.fresh(hint if outputs == 1 else f"{hint}_{i}") for i in range(outputs)]
        name = self.fresh(f"node/{hint}") if name is None else name
        node = helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None, **attrs)
        self.graph.node.append(node)
        return outs if outputs != 1 or isinstance(output, list) else outs[0]

    @contextmanager
    def detached(self) -> Iterator[list]:
        """Nodes appended inside the block are taken out of the graph again and collected in the
        yielded list, to be put in place of a forward node by :meth:`replace_nodes`."""
        start = len(self.graph.node)
        taken: list = []
        yield taken
        for n in self.graph.node[start:]:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            taken.append(copy)
        del self.graph.node[start:]

    def replace_forward(self, output: str, nodes: list) -> None:
        """Record that ``nodes`` (collected with :meth:`detached`) compute the forward tensor ``output``
        in place of the node that makes it now; :meth:`apply_forward_replacements` puts them there
        once, after emission (until then every handler reads the original forward graph)."""
        if output in self.forward_replacements:
            raise ValueError(f"forward tensor {output!r} is already replaced")
        self.forward_replacements[output] = nodes

    def apply_forward_replacements(self) -> list[str]:
        """Put every recorded replacement in place; returns the forward tensors now computed by
        other nodes (sorted), for the explainer's metadata."""
        self.replace_nodes(self.forward_replacements)
        return sorted(self.forward_replacements)

    def replace_nodes(self, replacements: dict[str, list]) -> None:
        """Put ``replacements[t]`` where the node producing tensor ``t`` stands (that node goes).
        The replacements must read only tensors available there (inputs, initializers, earlier
        forward tensors), so the graph stays topologically sorted."""
        if not replacements:
            return
        nodes = []
        for n in self.graph.node:
            new = replacements.get(n.output[0]) if n.output else None
            if new is None:
                new = [onnx.NodeProto()]
                new[0].CopyFrom(n)  # a copy: the originals go with the clear below
            nodes.extend(new)
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def declare(self, name: str, type_proto: onnx.TypeProto) -> None:
        """Record the type and shape of an emitted tensor as value_info.

        ONNX Runtime's layout optimiser keeps a chain of ops in its fast blocked (NCHWc) layout
        only where it can prove two inputs have the same shape; a symbolic batch dimension that
        inference loses on the way (e.g. through the target one-hot or a scatter) breaks that
        proof, and every elementwise op then pays a layout reorder."""
        if name in self._declared or name in self._io:
            return
        self._declared.add(name)
        vi = self.graph.value_info.add()
        vi.name = name
        vi.type.CopyFrom(type_proto)
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param.startswith("unk__"):  # onnx's placeholder for "unknown": not a real name
                d.ClearField("dim_param")

    def output(self, name: str, elem_type: int, shape) -> None:
        self.graph.output.append(helper.make_tensor_value_info(name, elem_type, shape))

    def identity(self, src: str, dst: str) -> None:
        """Expose ``src`` under the exact name ``dst`` (e.g. a graph output)."""
        self._taken.add(dst)
        self.graph.node.append(helper.make_node("Identity", [src], [dst], name=self.fresh(f"node/{dst}")))


#: Ops whose geometry WebGPU's provider (NHWC layout) reads from the node's own attributes: it
#: refuses a Conv without ``kernel_shape`` ("strides should be 2D"). Stating every attribute costs
#: nothing anywhere else.
SPATIAL_OPS = ("Conv", "ConvTranspose", "AveragePool", "MaxPool")


def state_spatial_attributes(model: onnx.ModelProto) -> None:
    """Give every Conv, ConvTranspose, AveragePool and MaxPool of the main graph explicit
    ``kernel_shape``, ``strides``, ``pads`` and ``dilations`` (and ``group`` for convolutions),
    filling in ONNX's defaults where the node leaves them out. The nodes compute the same.

    A convolution's kernel shape comes from its weight (an initializer or a tensor whose shape is
    known); a node whose weight shape is unknown, or that uses ``auto_pad`` SAME_*, keeps what it
    has for the attributes that would need it."""
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    shapes = {t.name: list(t.dims) for t in g.initializer}
    for v in list(g.input) + list(g.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape") and v.name not in shapes:
            dims = v.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                shapes[v.name] = [d.dim_value for d in dims]
    for node in g.node:
        if node.op_type not in SPATIAL_OPS or node.domain not in ("", "ai.onnx"):
            continue
        have = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = have.get("kernel_shape")
        if kernel is None and node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = shapes.get(node.input[1])
            kernel = w[2:] if w is not None and len(w) > 2 else None
        if not kernel:
            continue
        n = len(kernel)
        auto_pad = have.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        wanted = {"kernel_shape": list(kernel), "strides": [1] * n}
        if auto_pad in ("NOTSET", "") and "output_shape" not in have:  # else the runtime computes the pads
            wanted["pads"] = [0] * (2 * n)
        if node.op_type != "AveragePool" or opset >= 19:  # AveragePool has dilations from opset 19
            wanted["dilations"] = [1] * n
        if node.op_type in ("Conv", "ConvTranspose"):
            wanted["group"] = 1
        for name, value in wanted.items():
            if name not in have:
                node.attribute.append(helper.make_attribute(name, value))

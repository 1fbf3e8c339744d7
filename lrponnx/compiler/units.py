"""Grouping the nodes of a model into *units*: the things that receive one LRP rule each.

The forward graph is not changed by grouping (one exception at emission: an ONNX LRN node is
recomputed with the plain ops its rule shares, see ``ops/lrn.py``). A unit only says how to
read a piece of it:

- a linear layer: Conv / ConvTranspose / Gemm / MatMul with constant weights, together with a
  following Add of a constant bias and a following BatchNormalization, folded into one
  ``W, b`` (BatchNorm after a linear layer is folded, as the contract says);
- one LRN, whether it arrived as ONNX ``LRN``, our ``WithinChannelLRN`` function, or a
  decomposed chain exported by PyTorch (see :mod:`lrponnx.compiler.lrn_match`);
- any other node on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from lrponnx.compiler import lrn_ops
from lrponnx.compiler.view import ModelView, attrs_of

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class LinearParams:
    """``z = W x + b`` in the op's own weight layout.

    kind: "conv" (W [M, C/g, *k]), "convtranspose" (W [C, M/g, *k]), "gemm" (W [M, K]: out x in),
    "matmul" (W [K, M]). ``attrs`` holds explicit strides/pads/dilations/group (conv kinds).

    ``W`` is float32 and read from the model's initializer each time it is asked for, unless a
    folded BatchNorm changed it: large models are not held twice in memory. While ``source`` is
    set, the initializer of that name holds ``W`` unchanged (transposed if ``source_transposed``),
    so rules that need the plain weight reuse it instead of storing a copy.
    """

    def __init__(self, kind: str, b: np.ndarray, attrs: dict, x_shape, z_shape, *, view: ModelView | None = None,
                 source: str | None = None, source_transposed: bool = False, W: np.ndarray | None = None):
        self.kind, self.b, self.attrs, self.x_shape, self.z_shape = kind, b, attrs, x_shape, z_shape
        self._view, self.source, self.source_transposed = view, source, source_transposed
        self._W = None if W is None else np.asarray(W, dtype=np.float32)
        if W is not None:
            self.source = None

    @property
    def W(self) -> np.ndarray:
        if self._W is not None:
            return self._W
        W = self._view.value(self.source).astype(np.float32, copy=False)
        return W.T if self.source_transposed else W

    @W.setter
    def W(self, value: np.ndarray) -> None:
        self._W = np.asarray(value, dtype=np.float32)
        self.source = None

    @property
    def weight_shape(self) -> tuple:
        if self._W is not None:
            return self._W.shape
        shape = tuple(self._view.shape(self.source))
        return shape[::-1] if self.source_transposed else shape


@dataclass
class Unit:
    kind: str                 # key into the relevance handler table
    name: str                 # node name used in rules, errors and metadata
    op_type: str              # what users see ("Conv", "LRN", ...)
    nodes: list[onnx.NodeProto]
    inputs: list[str]         # data inputs (tensors that depend on a model input)
    output: str
    info: Any = None          # LinearParams, LrnSpec or the node's attributes
    rule: Any = None          # set by composites.assign_rules
    first: bool = False       # a first linear layer (reached from an input without another linear layer)
    index: int = 0            # position of its first node in the graph
    positions: list[int] = field(default_factory=list)  # positions of all its nodes, for "#N" overrides
    notes: list[str] = field(default_factory=list)


def build_units(view: ModelView) -> list[Unit]:
    """All units of the graph, in topological order."""
    from lrponnx.compiler import lrn_match  # decomposed LRN chains (import here: lrn_match uses Unit)

    claimed: dict[str, Unit] = {}  # node name -> unit that owns it
    units: list[Unit] = []

    for unit in lrn_match.find_decomposed_lrn(view):
        units.append(unit)
        for n in unit.nodes:
            claimed[n.name] = unit

    from lrponnx.ops.layernorm import find_decomposed_layernorm  # ReduceMean/Sub/Pow/.../Div chains

    for unit in find_decomposed_layernorm(view):
        if any(n.name in claimed for n in unit.nodes):
            continue
        units.append(unit)
        for n in unit.nodes:
            claimed[n.name] = unit

    for index, node in enumerate(view.graph.node):
        if node.name in claimed:
            continue
        data_inputs = [i for i in node.input if i and i in view.dynamic]
        if not data_inputs:
            continue  # a constant computation: folded by ModelView.value when needed
        # Integer/bool inputs computed from shapes (a Gather's indices, a Reshape's target, a Where's
        # condition) are not the data the unit explains: with a float data input they are left out,
        # so a path through them is not a path of values (e.g. for "first layer").
        values = [i for i in data_inputs if view.is_float(i) or view.elem_type(i) == onnx.TensorProto.UNDEFINED]
        unit = (_linear_unit(view, node) or _lrn_unit(view, node)
                or _plain_unit(view, node, values or data_inputs))
        unit.index = index
        units.append(unit)
        for n in unit.nodes:
            claimed[n.name] = unit

    order = {n.name: i for i, n in enumerate(view.graph.node)}
    units.sort(key=lambda u: max(order[n.name] for n in u.nodes))
    for u in units:
        u.positions = sorted(order[n.name] for n in u.nodes)
        u.index = u.positions[0]
    return units


def _plain_unit(view: ModelView, node: onnx.NodeProto, data_inputs: list[str]) -> Unit:
    return Unit(kind=node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}",
                name=node.name, op_type=node.op_type, nodes=[node], inputs=data_inputs,
                output=node.output[0], info=attrs_of(node))


def _lrn_unit(view: ModelView, node: onnx.NodeProto) -> Unit | None:
    spec = lrn_ops.spec_of_node(node)
    if spec is None:
        return None
    return Unit(kind="LRN", name=node.name, op_type=node.op_type, nodes=[node],
                inputs=[node.input[0]], output=node.output[0], info=spec)


# -- linear layers -----------------------------------------------------------------------------

def _linear_unit(view: ModelView, node: onnx.NodeProto) -> Unit | None:
    if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx"):
        return None
    params = _linear_params(view, node)
    if params is None:
        return None  # e.g. a weight computed at run time: the plain unit reports it
    nodes = [node]
    out = node.output[0]
    # Absorb a following bias Add and BatchNormalization into W, b.
    while True:
        nxt = view.only_consumer(out)
        if nxt is None:
            break
        if nxt.op_type == "Add" and _absorb_bias(view, params, nxt, out):
            pass
        elif nxt.op_type == "BatchNormalization" and _absorb_batchnorm(view, params, nxt):
            pass
        else:
            break
        nodes.append(nxt)
        out = nxt.output[0]
    params.z_shape = view.shape(out)
    x = node.input[0]
    return Unit(kind="Linear", name=node.name, op_type=node.op_type, nodes=nodes, inputs=[x],
                output=out, info=params,
                notes=[f"folded {n.op_type} {n.name!r}" for n in nodes[1:]])


def _linear_params(view: ModelView, node: onnx.NodeProto) -> LinearParams | None:
    ins = list(node.input) + [""] * 3
    a = attrs_of(node)
    if node.op_type == "MatMul":
        x, w = ins[0], ins[1]
        if not view.is_const(w) or x not in view.dynamic:
            return None
        shape = view.shape(w)
        if shape is None or len(shape) != 2:
            return None
        return LinearParams("matmul", np.zeros(shape[1]), {}, view.shape(x), None, view=view, source=w)
    if node.op_type == "Gemm":
        x, w, c = ins[0], ins[1], ins[2]
        if not view.is_const(w) or (c and not view.is_const(c)) or a.get("transA", 0):
            return None
        transposed = not a.get("transB", 0)  # W is kept as [out, in]
        params = LinearParams("gemm", None, {}, view.shape(x), None, view=view, source=w,
                              source_transposed=transposed)
        alpha = float(a.get("alpha", 1.0))
        if alpha != 1.0:
            params.W = params.W.astype(np.float64) * alpha
        M = params.weight_shape[0]
        b = np.zeros(M)
        if c:
            cv = view.value(c).astype(np.float64) * float(a.get("beta", 1.0))
            # C broadcasts against [N, M]: a scalar, [M], [1, M] or [1, 1] is a bias; [N, M] is not
            if cv.ndim > 2 or (cv.ndim == 2 and cv.shape[0] != 1) or cv.size not in (1, M):
                return None
            b = b + np.broadcast_to(cv.reshape(-1), (M,))
        params.b = b
        return params
    # Conv / ConvTranspose
    x, w, c = ins[0], ins[1], ins[2]
    if not view.is_const(w) or (c and not view.is_const(c)):
        return None
    w_shape = view.shape(w)
    if w_shape is None or len(w_shape) < 3:
        return None
    kind = "conv" if node.op_type == "Conv" else "convtranspose"
    group = int(a.get("group", 1))
    M = w_shape[0] if kind == "conv" else w_shape[1] * group
    b = view.value(c).astype(np.float64).reshape(M) if c else np.zeros(M)
    x_shape = view.shape(x)
    spatial = len(w_shape) - 2
    attrs = {
        "strides": list(a.get("strides", [1] * spatial)),
        "dilations": list(a.get("dilations", [1] * spatial)),
        "group": group,
        "pads": list(a.get("pads", [0] * (2 * spatial))),
    }
    if kind == "convtranspose":
        attrs["output_padding"] = list(a.get("output_padding", [0] * spatial))
        if "output_shape" in a:
            return None  # rare; the plain unit reports it as unsupported
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        if kind != "conv" or x_shape is None or any(d is None for d in x_shape[2:]):
            return None
        attrs["pads"] = _same_pads(x_shape[2:], list(w_shape[2:]), attrs, upper=auto_pad == "SAME_UPPER")
    return LinearParams(kind, b, attrs, x_shape, None, view=view, source=w)


def _same_pads(size, kernel, attrs, upper: bool) -> list[int]:
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, attrs["strides"], attrs["dilations"]):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begin.append(small if upper else big)
        end.append(big if upper else small)
    return begin + end


def _channel_vector(value: np.ndarray, M: int, params: LinearParams) -> np.ndarray | None:
    """A constant that only varies along the output channel axis, as a length-M vector."""
    v = np.asarray(value, dtype=np.float64)
    if v.size == 1:
        return np.full(M, float(v.reshape(())))
    if v.size != M:
        return None
    z_rank = len(params.x_shape) if params.x_shape is not None else None
    if params.kind in ("conv", "convtranspose"):
        # Broadcast against [N, M, *spatial]: the channel axis is at position -(rank-1).
        if z_rank is None:
            return None
        full = [1] * (z_rank - v.ndim) + list(v.shape)
        if full[1] != M:
            return None
    elif v.shape[-1] != M:
        return None
    return v.reshape(M)


def _absorb_bias(view: ModelView, params: LinearParams, add: onnx.NodeProto, z: str) -> bool:
    other = add.input[1] if add.input[0] == z else add.input[0]
    if not view.is_const(other):
        return False
    M = params.b.shape[0]
    vec = _channel_vector(view.value(other), M, params)
    if vec is None:
        return False
    params.b = params.b + vec
    return True


def _absorb_batchnorm(view: ModelView, params: LinearParams, bn: onnx.NodeProto) -> bool:
    if len([o for o in bn.output if o]) != 1 or not all(view.is_const(i) for i in bn.input[1:5]):
        return False
    if params.kind not in ("conv", "convtranspose", "gemm"):
        return False
    scale, bias, mean, var = (view.value(i).astype(np.float64) for i in bn.input[1:5])
    eps = float(attrs_of(bn).get("epsilon", 1e-5))
    s = scale / np.sqrt(var + eps)
    params.W = scale_output_channels(params, s)  # float64 product, stored as float32
    params.b = (params.b - mean) * s + bias
    return True


def scale_output_channels(params: LinearParams, s: np.ndarray) -> np.ndarray:
    W = params.W.astype(np.float64)
    if params.kind == "conv" or params.kind == "gemm":
        return W * s.reshape((-1,) + (1,) * (W.ndim - 1))
    if params.kind == "matmul":
        return W * s.reshape(1, -1)
    # convtranspose: W [C, M/g, *k]; output channel o = group * (M/g) + j
    g = params.attrs["group"]
    C, Mg = W.shape[0], W.shape[1]
    Wg = W.reshape((g, C // g, Mg) + W.shape[2:])
    Wg = Wg * s.reshape((g, 1, Mg) + (1,) * (W.ndim - 2))
    return Wg.reshape(W.shape)

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

import numpy as np
import onnx

from lrponnx.compiler import layernorm_match, lrn_match, lrn_ops
from lrponnx.compiler.linear_layers import LAYERS, LinearLayer
from lrponnx.compiler.unit import Unit  # noqa: F401  (re-exported: handlers import it from here)
from lrponnx.compiler.view import ModelView, attrs_of

LINEAR_OPS = tuple(LAYERS)  # Conv, ConvTranspose, Gemm, MatMul


def build_units(view: ModelView) -> list[Unit]:
    """All units of the graph, in topological order."""

    claimed: dict[str, Unit] = {}  # node name -> unit that owns it
    units: list[Unit] = []

    for unit in lrn_match.find_decomposed_lrn(view):
        units.append(unit)
        for n in unit.nodes:
            claimed[n.name] = unit

    for unit in layernorm_match.find_decomposed_layernorm(view):  # ReduceMean/Sub/Pow/.../Div chains
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
    layer = _linear_layer(view, node)
    if layer is None:
        return None  # e.g. a weight computed at run time: the plain unit reports it
    nodes = [node]
    out = node.output[0]
    # Absorb a following bias Add and BatchNormalization into W, b.
    while True:
        nxt = view.only_consumer(out)
        if nxt is None:
            break
        if nxt.op_type == "Add" and _absorb_bias(view, layer, nxt, out):
            pass
        elif nxt.op_type == "BatchNormalization" and _absorb_batchnorm(view, layer, nxt):
            pass
        else:
            break
        nodes.append(nxt)
        out = nxt.output[0]
    layer.z_shape = view.shape(out)
    x = node.input[0]
    return Unit(kind="Linear", name=node.name, op_type=node.op_type, nodes=nodes, inputs=[x],
                output=out, info=layer,
                notes=[f"folded {n.op_type} {n.name!r}" for n in nodes[1:]])


def _linear_layer(view: ModelView, node: onnx.NodeProto) -> LinearLayer | None:
    """The layer object of a Conv/ConvTranspose/Gemm/MatMul node with constant weights (None: the
    weight is computed at run time, or a form we do not read: the plain unit reports it)."""
    return LAYERS[node.op_type].from_node(view, node)


def _absorb_bias(view: ModelView, layer: LinearLayer, add: onnx.NodeProto, z: str) -> bool:
    other = add.input[1] if add.input[0] == z else add.input[0]
    if not view.is_const(other):
        return False
    vec = layer.channel_vector(view.value(other))
    if vec is None:
        return False
    layer.b = layer.b + vec
    return True


def _absorb_batchnorm(view: ModelView, layer: LinearLayer, bn: onnx.NodeProto) -> bool:
    if len([o for o in bn.output if o]) != 1 or not all(view.is_const(i) for i in bn.input[1:5]):
        return False
    if not layer.folds_batchnorm:
        return False
    scale, bias, mean, var = (view.value(i).astype(np.float64) for i in bn.input[1:5])
    eps = float(attrs_of(bn).get("epsilon", 1e-5))
    s = scale / np.sqrt(var + eps)
    layer.W = layer.scale_output_channels(s)  # float64 product, stored as float32
    layer.b = (layer.b - mean) * s + bias
    return True

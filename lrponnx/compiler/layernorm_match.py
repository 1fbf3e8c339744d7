"""Decomposed layer normalisation: the chain ``ReduceMean -> Sub -> Pow|Mul -> ReduceMean -> Add(eps)
-> Sqrt -> Div`` (or ``Mul(., Reciprocal)``), then optionally ``Mul(gamma)`` and ``Add(beta)`` by
constants, grouped into one ``LayerNorm`` unit (its relevance: :mod:`lrponnx.ops.layernorm`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrponnx.compiler.unit import Unit
from lrponnx.compiler.view import ModelView, attrs_of


@dataclass
class LayerNormSpec:
    x: str
    axes: list[int]              # normalised axes, non-negative
    eps: float
    gamma: np.ndarray | None     # broadcast against x (None: 1)
    beta: np.ndarray | None
    sigma: str | None = None     # the forward's own σ tensor (decomposed form), keepdims over axes


def _reduce_axes(view: ModelView, node, rank: int | None) -> list[int] | None:
    if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
        return None
    a = attrs_of(node)
    if not a.get("keepdims", 1):
        return None
    if len(node.input) > 1 and node.input[1]:
        if not view.is_const(node.input[1]):
            return None
        axes = [int(v) for v in np.asarray(view.value(node.input[1])).reshape(-1)]
    else:
        axes = [int(v) for v in a.get("axes", [])]
    if not axes or rank is None:
        return None
    return sorted({ax + rank if ax < 0 else ax for ax in axes})


def _other(node, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


def _scalar(view: ModelView, name: str) -> float | None:
    if not view.is_const(name):
        return None
    v = np.asarray(view.value(name))
    return float(v.reshape(-1)[0]) if v.size == 1 else None


def _users(view: ModelView, name: str) -> list:
    """The distinct nodes reading ``name`` (``Mul(d, d)`` reads it twice)."""
    return list({id(n): n for n in view.consumers.get(name, [])}.values())


def _match(view: ModelView, mean_node) -> tuple[list, LayerNormSpec, str] | None:
    """The chain that starts at ``mean_node`` (``ReduceMean(x)``): (nodes, spec, output)."""
    x = mean_node.input[0]
    if x not in view.dynamic:
        return None
    shape = view.shape(x)
    rank = None if shape is None else len(shape)
    axes = _reduce_axes(view, mean_node, rank)
    if axes is None or 0 in axes:
        return None
    mu = mean_node.output[0]
    subs = [n for n in _users(view, mu) if n.op_type == "Sub" and n.input[1] == mu and n.input[0] == x]
    if len(_users(view, mu)) != 1 or len(subs) != 1:
        return None
    sub = subs[0]
    d = sub.output[0]
    users = _users(view, d)
    sq = [n for n in users if (n.op_type == "Pow" and n.input[0] == d and _scalar(view, n.input[1]) == 2.0)
          or (n.op_type == "Mul" and n.input[0] == d and n.input[1] == d)]
    norm = [n for n in users if n not in sq]
    if len(sq) != 1 or len(norm) != 1 or d in view.outputs:
        return None
    sq, norm = sq[0], norm[0]
    var_users = _users(view, sq.output[0])
    if len(var_users) != 1 or _reduce_axes(view, var_users[0], rank) != axes:
        return None
    var = var_users[0]
    add_users = _users(view, var.output[0])
    if len(add_users) != 1 or add_users[0].op_type != "Add":
        return None
    add = add_users[0]
    eps = _scalar(view, _other(add, var.output[0]))
    sqrt_users = _users(view, add.output[0])
    if eps is None or eps < 0 or len(sqrt_users) != 1 or sqrt_users[0].op_type != "Sqrt":
        return None
    sqrt = sqrt_users[0]
    sigma = sqrt.output[0]
    nodes = [mean_node, sub, sq, var, add, sqrt]
    if norm.op_type == "Div" and norm.input[0] == d and norm.input[1] == sigma:
        if len(_users(view, sigma)) != 1:
            return None
    elif norm.op_type == "Mul":
        recip = view.producer.get(_other(norm, d))
        if recip is None or recip.op_type != "Reciprocal" or recip.input[0] != sigma or \
                len(_users(view, sigma)) != 1 or len(_users(view, recip.output[0])) != 1:
            return None
        nodes.append(recip)
    else:
        return None
    nodes.append(norm)
    out = norm.output[0]
    gamma = beta = None
    nxt = view.only_consumer(out)
    if nxt is not None and nxt.op_type == "Mul" and view.is_const(_other(nxt, out)):
        gamma = np.asarray(view.value(_other(nxt, out)), dtype=np.float32)
        nodes.append(nxt)
        out = nxt.output[0]
        nxt = view.only_consumer(out)
    if nxt is not None and nxt.op_type == "Add" and view.is_const(_other(nxt, out)):
        beta = np.asarray(view.value(_other(nxt, out)), dtype=np.float32)
        nodes.append(nxt)
        out = nxt.output[0]
    if any(n.domain not in ("", "ai.onnx") for n in nodes):
        return None
    # every intermediate tensor is read only inside the chain
    inner = {o for n in nodes for o in n.output if o} - {out}
    names = {id(n) for n in nodes}
    for t in inner:
        if t in view.outputs or any(id(u) not in names for u in _users(view, t)):
            return None
    return nodes, LayerNormSpec(x, axes, eps, gamma, beta, sigma=sigma), out


def find_decomposed_layernorm(view: ModelView) -> list[Unit]:
    """One ``LayerNorm`` unit per decomposed chain (see the module's docstring)."""
    units = []
    taken: set[str] = set()
    for node in view.graph.node:
        if node.op_type != "ReduceMean" or node.name in taken:
            continue
        found = _match(view, node)
        if found is None:
            continue
        nodes, spec, out = found
        if any(n.name in taken for n in nodes):
            continue
        taken.update(n.name for n in nodes)
        units.append(Unit(kind="LayerNorm", name=nodes[-1].name, op_type="LayerNorm (decomposed)", nodes=nodes,
                          inputs=[spec.x], output=out, info=spec,
                          notes=[f"LayerNorm over axes {spec.axes} from {len(nodes)} nodes, eps {spec.eps:g}"]))
    return units

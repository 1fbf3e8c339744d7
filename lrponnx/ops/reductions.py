"""Reductions over axes: ReduceMean and ReduceSum, the linear rule of average pooling (`norm`).

PyTorch's dynamo exporter writes ``adaptive_avg_pool2d(x, 1)`` (global average pooling) as
``ReduceMean(x, axes=[-1, -2], keepdims=1)``; ReduceSum appears in hand-written pooling and
attention heads. Both are the linear map ``P`` of a pooling layer with fixed weights (1/n for a
mean, 1 for a sum), so they take AveragePool's rule, ``x ⊙ Pᵀ(R / stab(P x))`` (Bach et al. 2015
for sum pooling; Zennit's ``Norm`` for average pools; see docs/rules.md). For a mean over ``n``
entries: ``R_x = x · q / n`` with ``q = R / stab(y)`` broadcast back over the reduced axes, the same
numbers as :func:`lrponnx.ops.pooling.average_pool` gives a GlobalAveragePool.

A reduction over the batch axis would mix samples, which an explainer of one sample's class cannot
do: it is refused. ReduceMean / ReduceSum with ``noop_with_empty_axes=1`` and no axes are identities.
"""
from __future__ import annotations

import numpy as np

from lrponnx.compiler.units import Unit
from lrponnx.ops.context import Ctx, Unsupported
from lrponnx.ops.registry import handler


def reduce_axes(ctx: Ctx, unit: Unit) -> list[int] | None:
    """The reduced axes, non-negative, or None for the identity (``noop_with_empty_axes``)."""
    node = unit.nodes[0]
    x = node.input[0]
    shape = ctx.view.shape(x)
    if shape is None:
        raise Unsupported("needs the input's rank")
    rank = len(shape)
    a = unit.info
    if len(node.input) > 1 and node.input[1]:  # opset >= 18 (ReduceSum >= 13): axes as an input
        if not ctx.view.is_const(node.input[1]):
            raise Unsupported("axes computed at run time")
        axes = [int(v) for v in np.asarray(ctx.view.value(node.input[1])).reshape(-1)]
    else:
        axes = [int(v) for v in a.get("axes", [])]
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return None
        axes = list(range(rank))
    axes = sorted({ax + rank if ax < 0 else ax for ax in axes})
    if any(ax < 0 or ax >= rank for ax in axes):
        raise Unsupported(f"axes {axes} out of range for a rank-{rank} input")
    if 0 in axes:
        raise Unsupported("reduces over the batch axis (would mix the samples of a batch)")
    return axes


@handler("ReduceMean", "ReduceSum", rules=("norm",))
def reduce_norm(ctx: Ctx, unit: Unit, R: str) -> dict:
    g = ctx.g
    x, y = unit.nodes[0].input[0], unit.output
    axes = reduce_axes(ctx, unit)
    if axes is None:
        return {x: R}
    eps = unit.rule.epsilon
    # an average or sum of x >= 0 is >= 0: the stabiliser needs no sign test
    q = ctx.stab_div(R, y, eps, hint="q_reduce", nonnegative=ctx.nonnegative(x))
    if not unit.info.get("keepdims", 1):
        q = g.op("Unsqueeze", q, g.ints(axes), hint="q_reduce_kept")
    if unit.op_type == "ReduceMean":
        shape = ctx.view.shape(x)
        sizes = [shape[ax] for ax in axes]
        if all(s is not None for s in sizes):
            inv = g.const(np.float32(1.0 / float(np.prod(sizes, dtype=np.float64))), hint="reduce_inv_n")
        else:  # symbolic sizes: n from the input's shape at run time
            n = g.op("ReduceProd", g.op("Gather", g.op("Shape", x), g.ints(axes), axis=0), keepdims=0,
                     hint="reduce_n")
            inv = g.op("Reciprocal", g.op("Cast", n, to=1), hint="reduce_inv_n")
        q = g.op("Mul", q, inv, hint="q_reduce_mean")
    return {x: g.op("Mul", x, q, hint="r_reduce")}

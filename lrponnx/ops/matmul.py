"""MatMul / Gemm of an activation by a constant that :mod:`lrponnx.compiler.units` does not read as a linear
layer: the constant on the *left* (``y = A x``, a token- or channel-mixing matrix, x of rank >= 3),
a constant of rank > 2 (``x [N, T, K] @ W [1, K, M]``), or a Gemm whose ``C`` is not a bias
(one row per sample of a fixed batch) or that has ``transA``.

Each is a linear map of its one activation input, so the epsilon rule applies as to any linear
layer (Bach et al. 2015; the contract's "MatMul with a constant weight"):
``s = R_y / stab(y)``, ``R_x = x ⊙ Jᵀ s`` with ``Jᵀ s`` the vector-Jacobian product of the map
(``Aᵀ s`` on the left, ``s Wᵀ`` on the right, summed back over broadcast batch dims), ``stab`` with
the composite's ``--epsilon``. A constant addend (Gemm's ``C``) keeps its share.
"""
from __future__ import annotations

import numpy as np

from lrponnx.compiler.units import Unit
from lrponnx.ops.context import Ctx, Unsupported
from lrponnx.ops.registry import handler


def _swap_last(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


@handler("MatMul", rules=("epsilon",))
def matmul_constant(ctx: Ctx, unit: Unit, R: str) -> dict:
    node = unit.nodes[0]
    a, b = node.input[0], node.input[1]
    view, g = ctx.view, ctx.g
    dyn = [t for t in (a, b) if t in view.dynamic]
    if len(dyn) != 1:
        raise Unsupported("MatMul of two activations has no rule in this composite (attention needs the "
                          "attnlrp composite)")
    x = dyn[0]
    const = b if x == a else a
    c = np.asarray(view.value(const), dtype=np.float32)
    x_shape = view.shape(x)
    if c.ndim < 2 or x_shape is None or len(x_shape) < 2:
        raise Unsupported("a MatMul with a 1-D operand")
    if x == b and len(x_shape) < 3:
        raise Unsupported("a constant times a 2-D activation mixes the samples of the batch (its rows)")
    s = ctx.stab_div(R, unit.output, unit.rule.epsilon, hint="q_matmul")
    if x == a:   # y = x W: d/dx = s Wᵀ
        v = g.op("MatMul", s, g.const(_swap_last(c), hint=f"{unit.name}/W_T"), hint="vjp_matmul")
    else:        # y = A x: d/dx = Aᵀ s
        v = g.op("MatMul", g.const(_swap_last(c), hint=f"{unit.name}/A_T"), s, hint="vjp_matmul")
    v = ctx.unbroadcast(v, x, _vjp_shape(view.shape(unit.output), c.shape, x_shape, x == a))
    return {x: g.op("Mul", x, v, hint="r_matmul")}


def _vjp_shape(y_shape, c_shape, x_shape, x_left: bool):
    """The shape of the VJP before it is summed back to ``x``: the batch dims of ``y`` with x's
    own last two dims."""
    if y_shape is None:
        return None
    return list(y_shape[:-2]) + list(x_shape[-2:])


@handler("Gemm", rules=("epsilon",))
def gemm_constant(ctx: Ctx, unit: Unit, R: str) -> dict:
    node = unit.nodes[0]
    view, g = ctx.view, ctx.g
    ins = list(node.input) + [""]
    A, B, C = ins[0], ins[1], ins[2]
    if C and not view.is_const(C):
        raise Unsupported("its bias C is computed at run time")
    dyn = [t for t in (A, B) if t in view.dynamic]
    if len(dyn) != 1:
        raise Unsupported("Gemm of two activations has no rule in this composite")
    a = unit.info
    alpha = float(a.get("alpha", 1.0))
    tA, tB = int(a.get("transA", 0)), int(a.get("transB", 0))
    s = ctx.stab_div(R, unit.output, unit.rule.epsilon, hint="q_gemm")
    if dyn[0] == B:
        raise Unsupported("a constant times a 2-D activation mixes the samples of the batch (its rows)")
    # y = alpha op(A) op(B) + beta C: d/d op(A) = alpha s op(B)ᵀ
    opB = np.asarray(view.value(B), np.float64)
    opB = opB.T if tB else opB
    v = g.op("MatMul", s, g.const((alpha * opB.T).astype(np.float32), hint=f"{unit.name}/B_T"), hint="vjp_gemm")
    if tA:
        v = g.op("Transpose", v, perm=[1, 0], hint="vjp_gemm_t")
    x = A
    return {x: g.op("Mul", x, v, hint="r_gemm")}

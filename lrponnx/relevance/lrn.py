"""THE LRN RULE (Binder et al., ICANN 2016): relevance through local response normalisation.

LRN is a product-type non-linearity, ``y_c = x_c * s_c^(-beta)`` with
``s_c = k + a * S_c`` and ``S_c = sum_{i in N(c)} x_i^2``. The paper's rule (``taylor``) is a
first-order Taylor expansion of ``y_c`` around the point where every neighbour of ``c`` is zero
(``x_c`` kept), with the gradient taken at the actual input. It gives one term per input::

    z_cc = x_c (k + a x_c^2)^(-beta)                      the centre's own term
    z_ic = -2 a beta x_c x_i^2 s_c^(-beta-1)              each neighbour i != c in N(c)
    D_c  = z_cc - 2 a beta x_c s_c^(-beta-1) (S_c - x_c^2)     (= sum_i z_ic)
    q_c  = R_c / stab(D_c)                                (denominator=output: y_c instead)
    R_i  = z_ii q_i - 2 a beta x_i^2 * sum_{c : i in N(c), c != i} x_c s_c^(-beta-1) q_c

With eps = 0, sum_i R_i = sum_c R_c exactly. The window sums cost O(n) per element: they are
average pools with count_include_pad (times n), never a dense C x C matrix. The sum over
``{c : i in N(c)}`` runs over the *mirrored* window, which differs from N(i) for even n.

``identity`` hands the relevance through unchanged (the paper's baseline).
"""
from __future__ import annotations

from ..lrn_ops import LrnSpec
from ..units import Unit
from . import Ctx, handler


def _window_sum(ctx: Ctx, t: str, spec: LrnSpec, rank: int, mirrored: bool) -> str:
    """Sum of ``t`` over each element's LRN window (or its mirror image), zero outside."""
    g = ctx.g
    lo, hi = (spec.hi, spec.lo) if mirrored else (spec.lo, spec.hi)
    spatial = rank - 2
    if spec.region == "within":
        pads = [lo] * spatial + [hi] * spatial
        avg = g.op("AveragePool", t, kernel_shape=[spec.size] * spatial, pads=pads, count_include_pad=1,
                   hint="lrn_window")
        return g.op("Mul", avg, g.const(float(spec.size ** spatial)), hint="lrn_sum")
    # Across channels: view [N, C, ...] as [N, 1, C, ...] and pool along the channel axis.
    t5 = g.op("Unsqueeze", t, g.ints([1]))
    pads = [lo] + [0] * spatial + [hi] + [0] * spatial
    avg = g.op("AveragePool", t5, kernel_shape=[spec.size] + [1] * spatial, pads=pads, count_include_pad=1,
               hint="lrn_window")
    return g.op("Mul", g.op("Squeeze", avg, g.ints([1])), g.const(float(spec.size)), hint="lrn_sum")


@handler("LRN", rules=("taylor", "identity"))
def lrn(ctx: Ctx, unit: Unit, R: str) -> dict:
    x = unit.inputs[0]
    if unit.rule.name == "identity":
        return {x: R}
    spec: LrnSpec = unit.info
    eps = float(unit.rule.params.get("epsilon", 1e-6))
    denominator = unit.rule.params.get("denominator", "sum")
    shape = ctx.view.shape(x)
    rank = len(shape) if shape is not None else 4
    g = ctx.g
    k, a, beta = g.const(spec.k), g.const(spec.a), g.const(spec.beta)
    two_a_beta = g.const(2.0 * spec.a * spec.beta)

    x2 = g.op("Mul", x, x, hint="lrn_x2")
    S = _window_sum(ctx, x2, spec, rank, mirrored=False)
    s = g.op("Add", k, g.op("Mul", a, S), hint="lrn_s")
    s_pow = g.op("Pow", s, g.op("Neg", g.op("Add", beta, g.const(1.0))), hint="lrn_s_pow")  # s^(-beta-1)
    # The centre's own term: x (k + a x^2)^(-beta)
    z_self = g.op("Mul", x, g.op("Pow", g.op("Add", k, g.op("Mul", a, x2)), g.op("Neg", beta)), hint="lrn_zcc")
    x_s = g.op("Mul", x, s_pow, hint="lrn_x_s")  # x_c s_c^(-beta-1)
    if denominator == "output":
        D = unit.output
    else:
        D = g.op("Sub", z_self, g.op("Mul", two_a_beta, g.op("Mul", x_s, g.op("Sub", S, x2))), hint="lrn_D")
    q = ctx.stab_div(R, D, eps, hint="lrn_q")
    u = g.op("Mul", x_s, q, hint="lrn_u")
    neighbours = g.op("Sub", _window_sum(ctx, u, spec, rank, mirrored=True), u, hint="lrn_T")
    r = g.op("Sub", g.op("Mul", z_self, q), g.op("Mul", two_a_beta, g.op("Mul", x2, neighbours)), hint="r_lrn")
    return {x: r}

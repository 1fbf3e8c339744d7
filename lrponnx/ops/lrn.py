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

How it is computed (the same quantities, fewer transcendental ops; Pow is ~70x a Mul in ORT):

    m_c   = mean of x^2 over the window (zero padded; n or n*n entries)   s_c = k + alpha m_c
    x_c s_c^(-beta-1) = y_c / s_c          (y, the forward output, is already there: no Pow)
    b_c   = k + a x_c^2,   a (S_c - x_c^2) = s_c - b_c
    z_cc  = x_c / b_c^beta                 (beta = 1/2, 3/4, 1 with Sqrt, else Exp/Log)
    D_c   = z_cc - 2 beta (y_c / s_c) (s_c - b_c)

``identity`` hands the relevance through unchanged (the paper's baseline).

The forward LRN itself is recomputed here from the same ``x^2`` and ``s``: ``y = x / s^beta``
replaces the model's ``LRN`` (or ``WithinChannelLRN``) node. ORT's LRN kernel costs about twice
these plain ops (GoogLeNet: 277 of its 600 ms forward at batch 32), and the rule needs ``s``
anyway. The predictions then match the model's to float rounding instead of bit for bit;
``exact_forward=True`` keeps the model's node.
"""
from __future__ import annotations

import numpy as np

from lrponnx.compiler.lrn_ops import LRPONNX_DOMAIN, WITHIN_CHANNEL_LRN, LrnSpec
from lrponnx.compiler.units import Unit
from lrponnx.ops.context import Ctx
from lrponnx.ops.registry import always, handler


def _window_mean(ctx: Ctx, t: str, spec: LrnSpec, rank: int, mirrored: bool, channels: int | None) -> str:
    """Mean of ``t`` over each element's LRN window (or its mirror image), zeros outside the
    tensor counted: times ``n`` (across) or ``n * n`` (within) it is the window sum."""
    g = ctx.g
    lo, hi = (spec.hi, spec.lo) if mirrored else (spec.lo, spec.hi)
    if spec.region == "within":
        spatial = rank - 2
        return g.op("AveragePool", t, kernel_shape=[spec.size] * spatial, strides=[1] * spatial,
                    pads=[lo] * spatial + [hi] * spatial, count_include_pad=1, hint="lrn_window")
    webgpu = ctx.webgpu
    if webgpu and channels is not None:
        return _banded_mean(ctx, t, channels, spec.size, lo, hi, rank)
    # Across channels: pool x viewed as [N, 1, C, *spatial] with a [size, 1, ...] kernel, i.e. along
    # the channel axis. ORT pools at most three spatial axes: a rank-5+ input is first viewed as
    # [N, C, D, rest]. (Viewing every input as [N, 1, C, L] for a 2-D pool instead measured up to
    # 5x slower once L = H*W is in the thousands, e.g. 55x55, and only ~0.4 ms faster below; WebGPU,
    # which pools two axes at most, takes that view when the channel count is not known.)
    if rank == 3 or (rank == 4 and not webgpu):
        t5 = g.op("Unsqueeze", t, g.ints([1]))
        spatial = rank - 2
    else:
        t5 = g.op("Unsqueeze", g.op("Reshape", t, g.ints([0, 0, -1] if webgpu else [0, 0, 0, -1]),
                                    hint="lrn_flat"), g.ints([1]))
        spatial = 1 if webgpu else 2
    zeros = [0] * spatial
    avg = g.op("AveragePool", t5, kernel_shape=[spec.size] + [1] * spatial, strides=[1] * (spatial + 1),
               pads=[lo] + zeros + [hi] + zeros, count_include_pad=1, hint="lrn_window")
    if rank == 3 or (rank == 4 and not webgpu):
        return g.op("Squeeze", avg, g.ints([1]), hint="lrn_mean")
    return g.op("Reshape", avg, g.op("Shape", t), hint="lrn_mean")


def _banded_mean(ctx: Ctx, t: str, C: int, size: int, lo: int, hi: int, rank: int) -> str:
    """The across-channel window mean as a 1x1 Conv with a banded C x C matrix of ones (the window
    sum), divided by ``size`` as the pool divides (ones and a Div, not entries 1/size: that rounds
    differently, and GoogLeNet's relevance then moved by 8e-6 instead of 1e-7). For WebGPU's
    provider, which pools at most two axes in its NHWC layout; on the CPU it costs more than the
    3-D AveragePool (``docs/webgpu.md``), so only there."""
    g = ctx.g
    rows = np.arange(C)[:, None]
    cols = np.arange(C)[None, :]
    band = ((cols >= rows - lo) & (cols <= rows + hi)).astype(np.float32)
    attrs = dict(kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
    W = g.const(band.reshape(C, C, 1, 1), hint="lrn_band")
    if rank == 4:
        total = g.op("Conv", t, W, hint="lrn_window", **attrs)
    else:
        flat = g.op("Reshape", t, g.ints([0, C, -1, 1]), hint="lrn_flat")  # any rank as [N, C, L, 1]
        total = g.op("Reshape", g.op("Conv", flat, W, hint="lrn_window", **attrs), g.op("Shape", t))
    return g.op("Div", total, g.const(float(size)), hint="lrn_mean")


def _pow(ctx: Ctx, b: str, beta: float) -> str:
    """``b ** beta`` (b > 0). ORT's Pow is slow; the usual exponents take square roots."""
    g = ctx.g
    if beta == 1.0:
        return b
    if beta == 0.5:
        return g.op("Sqrt", b, hint="lrn_pow")
    if beta == 0.75:
        r = g.op("Sqrt", b)
        return g.op("Mul", r, g.op("Sqrt", r), hint="lrn_pow")
    return g.op("Exp", g.op("Mul", g.op("Log", b), g.const(beta)), hint="lrn_pow")


def _entries(spec: LrnSpec, rank: int) -> int:
    """How many elements a window holds (zeros outside the tensor counted): a * entries = alpha."""
    return spec.size if spec.region == "across" else spec.size ** (rank - 2)


def _scale(ctx: Ctx, x: str, spec: LrnSpec, rank: int, channels: int | None) -> tuple[str, str]:
    """``x^2`` and ``s = k + a S`` (S the window sum of x^2)."""
    g = ctx.g
    x2 = g.op("Mul", x, x, hint="lrn_x2")
    mean = _window_mean(ctx, x2, spec, rank, mirrored=False, channels=channels)
    return x2, g.op("Add", g.const(spec.k), g.op("Mul", mean, g.const(spec.a * _entries(spec, rank))), hint="lrn_s")


def _replaces_forward(ctx: Ctx, unit: Unit) -> bool:
    """The unit is one ONNX LRN or WithinChannelLRN node (a decomposed chain is plain ops already)."""
    if ctx.exact_forward or len(unit.nodes) != 1:
        return False
    node = unit.nodes[0]
    return (node.domain in ("", "ai.onnx") and node.op_type == "LRN") or \
        (node.domain == LRPONNX_DOMAIN and node.op_type == WITHIN_CHANNEL_LRN)


def _denominator_nonnegative(ctx: Ctx, x: str, spec: LrnSpec, denominator: str) -> bool:
    """D_c >= 0 wherever x >= 0 (e.g. after a ReLU), so stab(D) = D + eps needs no sign test.

    With u = s_c - b_c >= 0 and t = u / b_c: D_c = z_cc - 2 beta x_c s_c^(-beta-1) u
    = z_cc (1 - 2 beta t / (1+t)^(1+beta)), and for beta <= 1 the subtracted fraction is at most
    1/2 (its maximum, at t = 1/beta, is 2 / (1 + 1/beta)^(1+beta)): D_c >= z_cc / 2 >= 0, far from
    any rounding. ``y`` (denominator=output) has the sign of x for any beta."""
    if not ctx.nonnegative(x) or spec.k <= 0 or spec.a < 0:
        return False
    return denominator == "output" or spec.beta <= 1.0


@handler("LRN", rules=("taylor", "identity"), supports=always)  # every LRN is explained
def lrn(ctx: Ctx, unit: Unit, R: str) -> dict:
    x, y = unit.inputs[0], unit.output
    spec: LrnSpec = unit.info
    shape = ctx.view.shape(x)
    rank = len(shape) if shape is not None else 4
    channels = shape[1] if shape is not None and len(shape) > 1 else None  # None: symbolic or unknown
    g = ctx.g
    if _replaces_forward(ctx, unit):
        # x^2 and s feed the model's next layer (through y) and the rule below: the nodes go where
        # the LRN node stands, ahead of every forward node that reads y.
        with g.detached() as nodes:
            x2, s = _scale(ctx, x, spec, rank, channels)
            g.op("Div", x, _pow(ctx, s, spec.beta), output=y)
        ctx.replace_forward(y, nodes)
    elif unit.rule.name == "taylor":
        x2, s = _scale(ctx, x, spec, rank, channels)
    if unit.rule.name == "identity":
        return {x: R}
    eps, denominator = unit.rule.epsilon, unit.rule.denominator  # the rule: lrponnx/rules/lrn.py
    entries = _entries(spec, rank)
    k = g.const(spec.k)

    x_s = g.op("Div", y, s, hint="lrn_x_s")                         # x_c s_c^(-beta-1) = y_c / s_c
    b = g.op("Add", k, g.op("Mul", x2, g.const(spec.a)), hint="lrn_b")  # k + a x_c^2
    z_self = g.op("Div", x, _pow(ctx, b, spec.beta), hint="lrn_zcc")
    if denominator == "output":
        D = y
    else:  # z_cc - 2 beta x_c s_c^(-beta-1) a (S_c - x_c^2), with a (S_c - x_c^2) = s_c - b_c
        D = g.op("Sub", z_self, g.op("Mul", g.op("Mul", x_s, g.op("Sub", s, b)), g.const(2.0 * spec.beta)),
                 hint="lrn_D")
    q = ctx.stab_div(R, D, eps, hint="lrn_q", nonnegative=_denominator_nonnegative(ctx, x, spec, denominator))
    u = g.op("Mul", x_s, q, hint="lrn_u")
    # sum over {c : i in N(c), c != i} of u_c: the mirrored window's sum minus the centre
    window = _window_mean(ctx, u, spec, rank, mirrored=True, channels=channels)
    T = g.op("Sub", g.op("Mul", window, g.const(float(entries))), u, hint="lrn_T")
    r = g.op("Sub", g.op("Mul", z_self, q),
             g.op("Mul", g.op("Mul", x2, T), g.const(2.0 * spec.a * spec.beta)), hint="r_lrn")
    return {x: r}

"""Rules for linear layers (Conv, ConvTranspose, Gemm, MatMul with constant weights), in Zennit's skeleton.

Every rule is the same few parts: modify the inputs (x+, x-, ones, bounds), modify the
weights (W+, W-, W + gamma W+, W^2, ones: computed here once, stored as initializers), a
stabilised divide, a vector-Jacobian product ``W^T q`` and a reduction. The layer's
:class:`~lrponnx.ops.linear.LinearOps` (``ops``) supplies the forward and the VJP for each
layer type; the rules never look at the op.

When the input is provably non-negative (after a ReLU) the x- terms are zero and skipped.
Rules that end in ``x * (W^T q)`` hand back a :class:`Product` of :class:`Vjp` terms: the
compiler multiplies once per ``x`` and merges VJPs with the same geometry into one convolution.

A new rule for linear layers is one class here (or in a plugin): a frozen dataclass with
``@register``, subclassing :class:`LinearRule`, its parameters as fields, and ``emit``.
See docs/extending.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lrponnx.compiler.units import Unit
from lrponnx.errors import RuleError
from lrponnx.ops.context import Ctx, Product, runtime_ones, sized_const_ok
from lrponnx.ops.conv_forms import negative_magnitude
from lrponnx.ops.linear import LinearOps, Vjp
from lrponnx.rules.base import Rule, fmt, number, param, register, short


@dataclass(frozen=True)
class LinearRule(Rule):
    """A rule for the ``Linear`` unit kind (ops/linear.py's handler calls :meth:`emit`)."""

    applies_to: ClassVar[tuple[str, ...]] = ("Linear",)

    def emit(self, ctx: Ctx, ops: LinearOps, x: str, z: str, R: str) -> str | Product:
        """The relevance of the layer's input ``x`` given the relevance ``R`` of its output ``z``."""
        raise NotImplementedError


def _pos(a):
    return np.maximum(a, 0)


def _neg(a):
    return np.minimum(a, 0)


@register
@dataclass(frozen=True)
class Epsilon(LinearRule):
    """R_x = x * W^T (R / stab(z)) (Bach et al. 2015)."""

    name: ClassVar[str] = "epsilon"
    summary: ClassVar[str] = "x W^T (R / (z + eps sign z)); also MatMul/Gemm by a constant and LayerNorm"
    applies_to: ClassVar[tuple[str, ...]] = ("Linear",)
    epsilon: float = number(1e-6, nonnegative=True, help="stabiliser")

    def emit(self, ctx, ops, x, z, R):
        q = ctx.stab_div(R, z, self.epsilon)
        return Product(x, (Vjp(ops, q, "w", None),))


@register
@dataclass(frozen=True)
class ZPlus(LinearRule):
    """alpha-beta with alpha = 1, beta = 0."""

    name: ClassVar[str] = "zplus"
    summary: ClassVar[str] = "positive contributions only (alpha-beta with alpha=1, beta=0)"
    epsilon: float = number(1e-6, nonnegative=True, help="stabiliser")

    def emit(self, ctx, ops, x, z, R):
        return alpha_beta(ctx, ops, x, z, R, alpha=1.0, beta=0.0, epsilon=self.epsilon)


@register
@dataclass(frozen=True)
class AlphaBeta(LinearRule):
    name: ClassVar[str] = "alpha-beta"
    summary: ClassVar[str] = "alpha times the positive share minus beta times the negative (alpha - beta = 1)"
    alpha: float = number(2.0, help="weight of the positive contributions")
    beta: float = number(1.0, help="weight of the negative contributions")
    epsilon: float = number(1e-6, nonnegative=True, help="stabiliser")

    def check(self):
        a, b = self.alpha, self.beta
        if a < 0 or b < 0 or abs(a - b - 1.0) > 1e-9:
            raise RuleError(f"alpha-beta needs alpha - beta = 1 and alpha, beta >= 0 (got alpha={a:g}, beta={b:g})")

    def emit(self, ctx, ops, x, z, R):
        return alpha_beta(ctx, ops, x, z, R, alpha=self.alpha, beta=self.beta, epsilon=self.epsilon)


def alpha_beta(ctx: Ctx, ops: LinearOps, x: str, z: str, R: str, alpha: float, beta: float,
               epsilon: float) -> str | Product:
    g, W, b = ctx.g, ops.p.W, ops.p.b
    Wp, Wn = _pos(W), _neg(W)
    sign_n = 1.0
    if ctx.nonnegative(x):
        xp, xn = x, None
    else:  # xn = x- / sign_n: -x- for a convolution (keeps ONNX Runtime's blocked layout; conv_forms)
        xp = ctx.positive_part(x)
        xn, sign_n = negative_magnitude(g, x, ops.p.x_shape[1] if ops.p.is_conv else None)

    def part(Wa, Wb, bias, key_a, key_b):
        """``x+ (Wa^T q) + x- (Wb^T q)`` with ``q = R / stab(Wa x+ + bias + Wb x-)``.
        (Not ``W- x + b- = z - p``: that difference cancels badly where it is the denominator.)"""
        if sign_n < 0:  # xn holds -x-: (-Wb)(-x-) = Wb x-
            Wb, key_b = -Wb, f"{key_b}_negated"
        if epsilon > 0:
            # The sign of d is known: W+ x+ + b+ + W- x- >= 0 ("pos") and W- x+ + b- + W+ x- <= 0
            # ("neg"), every term having that sign; so the stabiliser is a constant: it goes into the
            # bias and the divide reads the sum directly, no sign test. (Where d = 0 every term of the
            # sum is 0, so the sign of eps there changes nothing.)
            d = ops.forward(xp, key_a, Wa, bias + (epsilon if key_a == "pos" else -epsilon))
            if xn is not None:
                d = g.op("Add", d, ops.forward(xn, key_b, Wb, None))
            q = g.op("Div", R, d, hint="q")
        else:
            d = ops.forward(xp, key_a, Wa, bias)
            if xn is not None:
                d = g.op("Add", d, ops.forward(xn, key_b, Wb, None))
            q = ctx.stab_div(R, d, epsilon)
        if xn is None and alpha == 1.0 and beta == 0.0:
            return Product(xp, (Vjp(ops, q, key_a, Wa),))  # z+ after a ReLU: x (W+^T q)
        r = g.op("Mul", xp, ops.vjp(q, key_a, Wa))
        if xn is not None:
            r = g.op("Add", r, g.op("Mul", xn, ops.vjp(q, key_b, Wb)))
        return r

    r = part(Wp, Wn, _pos(b), "pos", "neg")
    if alpha != 1.0:
        r = g.op("Mul", r, g.const(float(alpha)))
    if beta != 0.0:
        r = g.op("Sub", r, g.op("Mul", part(Wn, Wp, _neg(b), "neg", "pos"), g.const(float(beta))), hint="r_ab")
    return r


#: Below this gamma, n = (2 + gamma) z - p loses too much precision: n gets its own convolution.
GAMMA_SHORTCUT = 0.1


@register
@dataclass(frozen=True)
class Gamma(LinearRule):
    name: ClassVar[str] = "gamma"
    summary: ClassVar[str] = "weights W + gamma W+ (Montavon et al. 2019)"
    gamma: float = number(0.25, nonnegative=True, help="share of the positive weights added")
    epsilon: float = number(1e-6, nonnegative=True, help="stabiliser")

    def emit(self, ctx, ops, x, z, R):
        return gamma_rule(ctx, ops, x, z, R, self.gamma, self.epsilon)


def gamma_rule(ctx: Ctx, ops: LinearOps, x: str, z: str, R: str, gamma: float, epsilon: float) -> str | Product:
    g, W, b = ctx.g, ops.p.W, ops.p.b
    Gp, Gn = W + gamma * _pos(W), W + gamma * _neg(W)
    cp, cn = b + gamma * _pos(b), b + gamma * _neg(b)
    zero = g.const(0.0)
    if ctx.nonnegative(x):
        # With x >= 0: p = G+ x + c+ >= z and n = G- x + c- <= z, so where z > 0 (the only place p
        # is used) p > 0 and stab(p) = p + eps, and where z < 0, stab(n) = n - eps: no sign tests.
        # p is one convolution with the modified weights, the stabiliser in its bias. Since
        # p + n = (2 + gamma) z, n - eps = (2 + gamma) z - (p + eps): two elementwise ops instead of
        # a second convolution. Rounding: where z < 0 the negative part outweighs the positive one,
        # so |n| >= gamma/2 of the sum of |terms| while z and p carry errors of eps_float times that
        # sum: relative error <= 2 (2 + gamma) / gamma eps_float (2e-6 at gamma = 0.25). Small
        # gammas take the second convolution instead.
        p = ops.forward(x, "gpos", Gp, cp + epsilon)
        if gamma >= GAMMA_SHORTCUT:
            n = g.op("Sub", g.op("Mul", z, g.const(2.0 + float(gamma))), p, hint="gamma_n")
        else:
            n = ops.forward(x, "gneg", Gn, cn - epsilon)
    else:
        xp, xn = ctx.positive_part(x), ctx.negative_part(x)
        p = g.op("Add", ops.forward(xp, "gpos", Gp, cp), ops.forward(xn, "gneg", Gn, None))
        n = g.op("Add", ops.forward(xp, "gneg", Gn, cn), ops.forward(xn, "gpos", Gp, None))
    if ctx.nonnegative(x):
        # Masks by Mul with a cast (ORT's Where is ~4x slower than a Mul: -5 % on GoogLeNet). The
        # denominators are first clamped away from zero (by eps, or the smallest normal float when
        # eps = 0) so that the quotients the masks drop are finite; the clamp changes nothing where
        # the masks keep them (there p + eps > eps and n - eps < -eps).
        eps = g.const(float(epsilon)) if epsilon > 0 else g.const(np.finfo(np.float32).tiny)
        neg_eps = g.const(-float(epsilon)) if epsilon > 0 else g.const(-np.finfo(np.float32).tiny)
        qp = g.op("Mul", g.op("Div", R, g.op("Max", p, eps)), g.op("Cast", g.op("Greater", z, zero), to=1),
                  hint="q_pos")
        qn = g.op("Mul", g.op("Div", R, g.op("Min", n, neg_eps)), g.op("Cast", g.op("Less", z, zero), to=1),
                  hint="q_neg")
    else:
        mask_p = g.op("Cast", g.op("Greater", z, zero), to=1)
        mask_n = g.op("Cast", g.op("Less", z, zero), to=1)
        qp = ctx.stab_div(g.op("Mul", R, mask_p), p, epsilon, hint="q_pos")
        qn = ctx.stab_div(g.op("Mul", R, mask_n), n, epsilon, hint="q_neg")
    if ctx.nonnegative(x):
        return Product(x, (Vjp(ops, qp, "gpos", Gp), Vjp(ops, qn, "gneg", Gn)))
    rp = g.op("Mul", xp, g.op("Add", ops.vjp(qp, "gpos", Gp), ops.vjp(qn, "gneg", Gn)))
    rn = g.op("Mul", xn, g.op("Add", ops.vjp(qp, "gneg", Gn), ops.vjp(qn, "gpos", Gp)))
    return g.op("Add", rp, rn, hint="r_gamma")


def _small_sample(ops: LinearOps) -> bool:
    """Whether the constants of one sample's size (input and output of the layer) may be stored
    (see :data:`lrponnx.ops.context.SIZED_CONST_LIMIT`); else the explainer computes them."""
    z = ops.p.z_shape
    return sized_const_ok(ops.sample_shape()) and (z is None or sized_const_ok([d or 1 for d in z[1:]]))


def _div_by_ones_forward(ctx: Ctx, ops: LinearOps, x: str, R: str, key: str, W: np.ndarray, b, epsilon: float) -> str:
    """``R / stab(W 1 + b)`` for an all-ones input shaped like one sample of ``x``: a stored
    constant for ordinary sizes, computed by the explainer for a large declared input."""
    if _small_sample(ops):
        return ctx.stab_div_const(R, ops.constant_forward(np.ones(ops.sample_shape(), np.float32), W, b), epsilon)
    return ctx.stab_div(R, ops.forward(runtime_ones(ctx.g, x), key, W, b), epsilon)


@register
@dataclass(frozen=True)
class ZBox(LinearRule):
    name: ClassVar[str] = "zbox"
    summary: ClassVar[str] = "bounded input domain [low, high] (first layer on pixels; Montavon et al. 2017)"
    low: object = param(None, help="lower bound(s) in model input units, scalar or per channel (a/b/c)")
    high: object = param(None, help="upper bound(s)")
    epsilon: float = number(1e-6, nonnegative=True, help="stabiliser")

    def check(self):
        _check_box(self.low, self.high)

    def emit(self, ctx, ops, x, z, R):
        return zbox(ctx, ops, x, z, R, self.low, self.high, self.epsilon)


def _check_box(low, high) -> None:
    """zbox bounds: finite numbers, scalar or one per channel, low <= high everywhere."""
    arrays = {}
    for k, v in (("low", low), ("high", high)):
        if v is None:
            continue
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise RuleError(f"rule 'zbox': {k} must be a number or one number per channel "
                            f"(a/b/c), got {short(v)}") from None
        if a.ndim > 1 or a.size == 0:
            raise RuleError(f"rule 'zbox': {k} must be a number or one number per channel, got {short(v)}")
        if not np.all(np.isfinite(a)):
            raise RuleError(f"rule 'zbox': {k} must be finite numbers, got {fmt(a.tolist())}")
        arrays[k] = a.reshape(-1)
    if len(arrays) == 2:
        lo, hi = arrays["low"], arrays["high"]
        if lo.size != hi.size and 1 not in (lo.size, hi.size):
            raise RuleError(f"rule 'zbox': low has {lo.size} values and high {hi.size}; give a scalar or "
                            "one value per channel for each")
        bad = np.nonzero(np.broadcast_to(lo, np.broadcast_shapes(lo.shape, hi.shape)) > hi)[0]
        if bad.size:
            i = int(bad[0])
            raise RuleError(f"rule 'zbox': low must be <= high, got low={fmt(float(lo[min(i, lo.size - 1)]))} > "
                            f"high={fmt(float(hi[min(i, hi.size - 1)]))}"
                            + (f" (channel {i})" if max(lo.size, hi.size) > 1 else ""))


def zbox(ctx: Ctx, ops: LinearOps, x: str, z: str, R: str, low, high, epsilon: float) -> str:
    g, W, b = ctx.g, ops.p.W, ops.p.b
    shape = ops.sample_shape()
    Wp, Wn = _pos(W), _neg(W)
    if not _small_sample(ops):  # the bounds' forward pass runs in the explainer
        lo, hi = zbox_bounds(ctx, ops.unit, x, low, high, shape, full=False)
        ones = runtime_ones(g, x)
        bounds = g.op("Add", ops.forward(g.op("Mul", ones, g.const(lo, hint="zbox_low")), "pos", Wp, None),
                      ops.forward(g.op("Mul", ones, g.const(hi, hint="zbox_high")), "neg", Wn, None))
        b_full = ops.p.broadcast_channels(b, len(shape))
        d = g.op("Sub", z, g.op("Add", bounds, g.const(b_full, hint=f"{ops.unit.name}/zbox_bias")), hint="zbox_d")
        q = ctx.stab_div(R, d, epsilon)
        r = g.op("Mul", g.op("Sub", x, g.const(lo, hint="zbox_low")), ops.vjp(q, "pos", Wp))
        return g.op("Add", r, g.op("Mul", g.op("Sub", x, g.const(hi, hint="zbox_high")), ops.vjp(q, "neg", Wn)),
                    hint="r_zbox")
    lo, hi = zbox_bounds(ctx, ops.unit, x, low, high, shape)
    # d = W x - W+ l - W- h; the bias cancels. W x = z - b; the bound terms are constants.
    bounds = ops.constant_forward(lo, Wp, None) + ops.constant_forward(hi, Wn, None)
    b_full = ops.p.broadcast_channels(b, bounds.ndim)
    d = g.op("Sub", z, g.const(bounds + b_full, hint=f"{ops.unit.name}/zbox_shift"), hint="zbox_d")
    q = ctx.stab_div(R, d, epsilon)
    # x W^T q - l W+^T q - h W-^T q = (x - l) W+^T q + (x - h) W-^T q, since W = W+ + W-: two VJPs.
    r = g.op("Mul", g.op("Sub", x, g.const(lo, hint="zbox_low")), ops.vjp(q, "pos", Wp))
    return g.op("Add", r, g.op("Mul", g.op("Sub", x, g.const(hi, hint="zbox_high")), ops.vjp(q, "neg", Wn)),
                hint="r_zbox")


def zbox_bounds(ctx: Ctx, unit: Unit, x: str, low, high, shape: list[int], full: bool = True):
    """Bounds as full [1, C, ...] arrays in the units of ``x`` (``full=False``: [1, C, 1, ...]
    arrays that broadcast to it, for a declared input too large to store them whole).

    ``low``/``high`` are given in the model's input units (scalar or per channel) and mapped
    through the constant affine ops (Sub/Add/Mul/Div by constants) between the input and ``x``.
    """
    if low is None or high is None:
        raise RuleError(f"zbox on {unit.name!r} needs bounds: pass --low and --high "
                        "(or convert a model whose preprocessing metadata gives the pixel range)")
    C = shape[1]

    def as_array(v):
        a = np.asarray(v, dtype=np.float64).reshape(-1)
        if a.size == 1:
            return np.full([1] + (shape[1:] if full else [1] * (len(shape) - 1)), float(a[0]))
        if a.size != C:
            raise RuleError(f"zbox bounds must be a scalar or one value per channel ({C}), got {a.size}")
        a = a.reshape([1, C] + [1] * (len(shape) - 2))
        return np.broadcast_to(a, shape).copy() if full else a

    lo, hi = as_array(low), as_array(high)
    for node in reversed(_affine_chain(ctx.view, x)):
        other = node.input[1] if node.input[0] in ctx.view.dynamic else node.input[0]
        c = ctx.view.value(other).astype(np.float64)
        act_first = node.input[0] in ctx.view.dynamic
        f = {"Sub": (lambda v: v - c) if act_first else (lambda v: c - v), "Add": lambda v: v + c,
             "Mul": lambda v: v * c, "Div": lambda v: v / c}[node.op_type]
        lo, hi = f(lo), f(hi)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return lo.astype(np.float32), hi.astype(np.float32)


def _affine_chain(view, x: str) -> list:
    """The Sub/Add/Mul/Div-by-constant nodes from a model input to ``x``, nearest to x first."""
    chain = []
    while x in view.producer:
        node = view.producer[x]
        dyn = [i for i in node.input if i in view.dynamic]
        if node.op_type not in ("Sub", "Add", "Mul", "Div") or len(dyn) != 1:
            break
        if node.op_type == "Div" and node.input[0] not in view.dynamic:
            break
        chain.append(node)
        x = dyn[0]
    return chain


@register
@dataclass(frozen=True)
class WSquare(LinearRule):
    name: ClassVar[str] = "wsquare"
    summary: ClassVar[str] = "squared weights, input ignored (Montavon et al. 2017)"
    epsilon: float = number(1e-6, nonnegative=True, help="stabiliser")

    def emit(self, ctx, ops, x, z, R):
        W2, b2 = ops.p.W ** 2, ops.p.b ** 2
        return ops.vjp(_div_by_ones_forward(ctx, ops, x, R, "sq", W2, b2, self.epsilon), "sq", W2)


@register
@dataclass(frozen=True)
class Flat(LinearRule):
    name: ClassVar[str] = "flat"
    summary: ClassVar[str] = "all-ones weights, input ignored: relevance spread evenly over the receptive field"
    epsilon: float = number(1e-6, nonnegative=True, help="stabiliser")

    def emit(self, ctx, ops, x, z, R):
        epsilon = self.epsilon
        ones = np.ones(ops.p.weight_shape, np.float32)
        # 1^T (R / stab(1 . 1)): padding is zero in the ones input, so it does not count.
        ops1 = ops.single_channel_ones()
        if ops1 is not None:
            # With all-ones weights every input channel gets the same value: sum q over the output
            # channels first, then spread one channel through a ones kernel and broadcast it. The
            # denominator is the same in every output channel, so R is summed before the divide
            # (one full-size pass less on the largest tensor of most networks).
            g = ctx.g
            r_sum = g.op("ReduceSum", R, g.ints([1]), keepdims=1, hint="flat_rsum")
            if _small_sample(ops):
                # C_in times the window's count of ones (exact integers, as the full ones forward)
                count = ops1.constant_forward(np.ones(ops1.sample_shape(), np.float32), ops1.p.W, None)
                q1 = ctx.stab_div_const(r_sum, count * float(ops.p.x_shape[1]), epsilon)
            else:  # C_in times the window's count of ones, in the explainer
                count = ops1.forward(runtime_ones(g, x, channels=1), "ones1", ops1.p.W, None)
                q1 = ctx.stab_div(r_sum, g.op("Mul", count, g.const(float(ops.p.x_shape[1]))), epsilon,
                                  nonnegative=True)
            spread = ops1.vjp(q1, "ones1", ops1.p.W)
            return g.op("Expand", spread, g.op("Shape", x), hint="r_flat")
        return ops.vjp(_div_by_ones_forward(ctx, ops, x, R, "ones", ones, None, epsilon), "ones", ones)

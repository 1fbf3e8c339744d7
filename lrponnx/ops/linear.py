"""Rules for linear layers (Conv, ConvTranspose, Gemm, MatMul), in Zennit's skeleton.

Every rule is the same few parts: modify the inputs (x+, x-, ones, bounds), modify the
weights (W+, W-, W + gamma W+, W^2, ones: computed here once, stored as initializers), a
stabilised divide, a vector-Jacobian product ``W^T q`` and a reduction. :class:`LinearOps`
supplies the forward and the VJP for each layer type; the rules below never look at the op.

When the input is provably non-negative (after a ReLU) the x- terms are zero and skipped.
Rules that end in ``x * (W^T q)`` hand back a :class:`Product` of :class:`Vjp` terms: the
compiler multiplies once per ``x`` and merges VJPs with the same geometry into one convolution.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from lrponnx.errors import RuleError
from lrponnx.compiler.constants import run_op
from lrponnx.compiler.units import Unit
from lrponnx.ops.context import Ctx, Product, Unsupported, runtime_ones, sized_const_ok
from lrponnx.ops.registry import handler

LINEAR_RULES = ("epsilon", "zplus", "alpha-beta", "gamma", "zbox", "wsquare", "flat")


class LinearOps:
    """Forward and vector-Jacobian product of one linear layer with substitute weights."""

    def __init__(self, ctx: Ctx, unit: Unit):
        self.ctx, self.g, self.unit, self.p = ctx, ctx.g, unit, unit.info
        self._weights: dict[str, str] = {}
        p = self.p
        if p.kind in ("conv", "convtranspose"):
            x_shape, z_shape = p.x_shape, p.z_shape
            if x_shape is None or z_shape is None or any(d is None for d in x_shape[1:] + z_shape[1:]):
                from lrponnx.compiler.shapes import static_hint

                raise Unsupported("needs static channel and spatial sizes" + static_hint(ctx.view))

    # -- weights ---------------------------------------------------------------------------------
    def weight(self, key: str, W: np.ndarray) -> str:
        if key == "w" and self.p.source and not self.p.source_transposed:
            return self.p.source  # the model's own initializer: no second copy
        if key not in self._weights:
            self._weights[key] = self.g.const(W, hint=f"{self.unit.name}/W_{key}")
        return self._weights[key]

    def _conv_attrs(self) -> dict:
        """Every geometry attribute stated (WebGPU's provider reads them from the node)."""
        a = self.p.attrs
        return dict(kernel_shape=list(self.p.weight_shape[2:]), strides=a["strides"], pads=a["pads"],
                    dilations=a["dilations"], group=a["group"])

    def _flipped_attrs(self) -> dict:
        """The stride-1 backward Conv (kernel flipped, in/out swapped) with padding d(k-1)-p."""
        a, k = self.p.attrs, list(self.p.weight_shape[2:])
        return dict(kernel_shape=k, strides=[1] * len(k), pads=self._flipped_pads(), dilations=a["dilations"],
                    group=a["group"])

    def _vjp_output_padding(self) -> list[int]:
        """ConvTranspose output_padding that makes ``W^T q`` exactly the input's spatial size."""
        p, a = self.p, self.p.attrs
        k = p.weight_shape[2:]
        n = len(k)
        out = []
        for i in range(n):
            base = (a["strides"][i] * (p.z_shape[2 + i] - 1) + (k[i] - 1) * a["dilations"][i] + 1
                    - a["pads"][i] - a["pads"][n + i])
            out.append(p.x_shape[2 + i] - base)
        return out

    # -- the two linear maps -----------------------------------------------------------------------
    def forward(self, x: str, key: str, W: np.ndarray, b: np.ndarray | None) -> str:
        """``W x + b`` for substitute weights (b None: no bias)."""
        g, p = self.g, self.p
        w = self.weight(key, W)
        bias = [g.const(b, hint=f"{self.unit.name}/b_{key}")] if b is not None else []
        if p.kind == "conv":
            return g.op("Conv", x, w, *bias, hint=f"{self.unit.name}/z_{key}", **self._conv_attrs())
        if p.kind == "convtranspose":
            return g.op("ConvTranspose", x, w, *bias, hint=f"{self.unit.name}/z_{key}",
                        output_padding=p.attrs["output_padding"], **self._conv_attrs())
        if p.kind == "gemm":
            return g.op("Gemm", x, w, *bias, transB=1, hint=f"{self.unit.name}/z_{key}")
        z = g.op("MatMul", x, w, hint=f"{self.unit.name}/z_{key}")
        return g.op("Add", z, g.const(b, hint=f"{self.unit.name}/b_{key}")) if b is not None else z

    def vjp(self, q: str, key: str, W: np.ndarray | None) -> str:
        """``W^T q``: the gradient of ``W x`` with respect to x, shaped like x.
        ``W=None`` means the layer's own weight, read only if its initializer cannot be reused."""
        g, p = self.g, self.p
        if W is None:
            W = _LazyWeight(p)
        hint = f"{self.unit.name}/vjp_{key}"
        if p.kind == "conv":
            if self._vjp_as_conv():
                # Stride 1: the backward pass is a plain Conv with in/out swapped per group, the
                # kernel flipped and padding d(k-1)-p, which ORT runs faster than ConvTranspose.
                a = self.p.attrs
                return g.op("Conv", q, self.weight(f"{key}_flipped", flipped_transpose(W, a["group"])), hint=hint,
                            **self._flipped_attrs())
            return g.op("ConvTranspose", q, self.weight(key, W), hint=hint,
                        output_padding=self._vjp_output_padding(), **self._conv_attrs())
        if p.kind == "convtranspose":
            return g.op("Conv", q, self.weight(key, W), hint=hint, **self._conv_attrs())
        rank2 = p.x_shape is not None and len(p.x_shape) == 2
        if key == "w" and p.source and rank2 and (p.kind == "matmul" or p.source_transposed):
            # The initializer holds W as [in, out]: q [N, out] times its transpose, no copy.
            return g.op("Gemm", q, p.source, transB=1, hint=hint)
        if p.kind == "gemm":
            return g.op("MatMul", q, self.weight(key, W), hint=hint)
        return g.op("MatMul", q, self.weight(f"{key}_T", np.ascontiguousarray(W.T)), hint=hint)

    def _flipped_pads(self) -> list[int]:
        a, k = self.p.attrs, self.p.weight_shape[2:]
        n = len(k)
        return [a["dilations"][i % n] * (k[i % n] - 1) - a["pads"][i] for i in range(2 * n)]

    def _vjp_as_conv(self) -> bool:
        a, shape = self.p.attrs, self.p.weight_shape
        n = len(shape) - 2
        if any(st != 1 for st in a["strides"]):
            return False
        return all(a["dilations"][i % n] * (shape[2 + i % n] - 1) - a["pads"][i] >= 0 for i in range(2 * n))

    def constant_forward(self, x_value: np.ndarray, W: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """``W x + b`` for a constant input (one sample), computed now with ONNX Runtime."""
        p = self.p
        ins = [x_value, W] + ([b] if b is not None else [])
        if p.kind == "conv":
            return run_op("Conv", ins, **self._conv_attrs())
        if p.kind == "convtranspose":
            return run_op("ConvTranspose", ins, output_padding=p.attrs["output_padding"], **self._conv_attrs())
        if p.kind == "gemm":
            return run_op("Gemm", ins, transB=1)
        z = x_value @ W
        return z + b if b is not None else z

    def sample_shape(self) -> list[int]:
        """The input's shape for one sample (batch 1), which must be static past the batch dim."""
        shape = self.p.x_shape
        if shape is None or any(d is None for d in shape[1:]):
            raise Unsupported("this rule needs a static input shape past the batch dimension")
        return [1] + list(shape[1:])


@dataclass(frozen=True, eq=False)
class Vjp:
    """``W^T q`` of one layer, emitted when the compiler sums the relevance of ``x`` (a term of a
    :class:`Product`). Convolutions (group 1) with the same geometry that feed the same ``x`` are
    merged: ``sum_b W_b^T q_b`` is one convolution of the concatenated ``q_b`` with the weights
    stacked along their output channels, one GEMM instead of several plus their sum (the 1x1
    branches of an inception block; the two halves of the gamma rule)."""

    ops: LinearOps
    q: str
    key: str
    W: np.ndarray | None  # None: the layer's own weight

    def emit(self) -> str:
        return self.ops.vjp(self.q, self.key, self.W)

    @property
    def merge_key(self):
        p = self.ops.p
        if p.kind != "conv" or p.attrs["group"] != 1:
            return None
        as_conv = self.ops._vjp_as_conv()
        geometry = self.ops._flipped_pads() if as_conv else self.ops._vjp_output_padding()
        return ("conv", as_conv, tuple(p.weight_shape[2:]), tuple(p.attrs["strides"]), tuple(p.attrs["pads"]),
                tuple(p.attrs["dilations"]), tuple(geometry), tuple(p.x_shape[1:]))

    @staticmethod
    def emit_group(terms: list["Vjp"]) -> str:
        first = terms[0].ops
        g, a = first.g, first.p.attrs
        q = g.op("Concat", *[t.q for t in terms], axis=1, hint="vjp_q_cat")
        Ws = [np.asarray(t.W if t.W is not None else t.ops.p.W, np.float32) for t in terms]
        names = "+".join(t.ops.unit.name for t in terms)
        if first._vjp_as_conv():  # flipped kernels [C, M_b, k]: stack along axis 1
            W = np.concatenate([flipped_transpose(W, 1) for W in Ws], axis=1)
            return g.op("Conv", q, g.const(W, hint=f"{names}/W_merged_flipped"), hint="vjp_merged",
                        **first._flipped_attrs())  # group 1: merge_key takes group-1 convolutions only
        return g.op("ConvTranspose", q, g.const(np.concatenate(Ws, axis=0), hint=f"{names}/W_merged"),
                    output_padding=first._vjp_output_padding(), hint="vjp_merged", **first._conv_attrs())


class _LazyWeight:
    """Stands for the layer's own weight; loads it only when a copy really has to be made."""

    def __init__(self, p):
        self.p = p

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.p.W, dtype=dtype)

    @property
    def T(self):
        return self.p.W.T

    @property
    def shape(self):
        return self.p.weight_shape

    @property
    def ndim(self):
        return len(self.p.weight_shape)


def flipped_transpose(W: np.ndarray, group: int) -> np.ndarray:
    """Conv weight [M, C/g, *k] -> the weight of its transposed conv as a Conv: [C, M/g, *k],
    in/out swapped within each group and the kernel flipped in every spatial axis."""
    W = np.asarray(W)
    M, Cg = W.shape[:2]
    k = W.shape[2:]
    Wg = W.reshape((group, M // group, Cg) + k).swapaxes(1, 2)  # [g, C/g, M/g, *k]
    Wg = np.flip(Wg, axis=tuple(range(3, 3 + len(k))))
    return np.ascontiguousarray(Wg.reshape((group * Cg, M // group) + k))


def _pos(a):
    return np.maximum(a, 0)


def _neg(a):
    return np.minimum(a, 0)


# -- the rules ----------------------------------------------------------------------------------

def epsilon(ctx: Ctx, ops: LinearOps, x: str, z: str, R: str, epsilon: float = 1e-6) -> Product:
    q = ctx.stab_div(R, z, epsilon)
    return Product(x, (Vjp(ops, q, "w", None),))


def alpha_beta(ctx: Ctx, ops: LinearOps, x: str, z: str, R: str, alpha: float = 2.0, beta: float = 1.0,
               epsilon: float = 1e-6) -> str | Product:
    if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
        raise RuleError(f"alpha-beta needs alpha - beta = 1 and alpha, beta >= 0 (got alpha={alpha}, beta={beta})")
    g, W, b = ctx.g, ops.p.W, ops.p.b
    Wp, Wn = _pos(W), _neg(W)
    if ctx.nonnegative(x):
        xp, xn = x, None
    else:
        xp, xn = ctx.positive_part(x), ctx.negative_part(x)

    def part(Wa, Wb, bias, key_a, key_b):
        """``x+ (Wa^T q) + x- (Wb^T q)`` with ``q = R / stab(Wa x+ + bias + Wb x-)``.
        (Not ``W- x + b- = z - p``: that difference cancels badly where it is the denominator.)"""
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


def zplus(ctx: Ctx, ops: LinearOps, x: str, z: str, R: str, epsilon: float = 1e-6) -> str | Product:
    return alpha_beta(ctx, ops, x, z, R, alpha=1.0, beta=0.0, epsilon=epsilon)


#: Below this gamma, n = (2 + gamma) z - p loses too much precision: n gets its own convolution.
GAMMA_SHORTCUT = 0.1


def gamma(ctx: Ctx, ops: LinearOps, x: str, z: str, R: str, gamma: float = 0.25,
          epsilon: float = 1e-6) -> str | Product:
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
    (see :data:`lrponnx.ops.SIZED_CONST_LIMIT`); else the explainer computes them."""
    z = ops.p.z_shape
    return sized_const_ok(ops.sample_shape()) and (z is None or sized_const_ok([d or 1 for d in z[1:]]))


def _div_by_ones_forward(ctx: Ctx, ops: LinearOps, x: str, R: str, key: str, W: np.ndarray, b, epsilon: float) -> str:
    """``R / stab(W 1 + b)`` for an all-ones input shaped like one sample of ``x``: a stored
    constant for ordinary sizes, computed by the explainer for a large declared input."""
    if _small_sample(ops):
        return ctx.stab_div_const(R, ops.constant_forward(np.ones(ops.sample_shape(), np.float32), W, b), epsilon)
    return ctx.stab_div(R, ops.forward(runtime_ones(ctx.g, x), key, W, b), epsilon)


def zbox(ctx: Ctx, ops: LinearOps, x: str, z: str, R: str, low=None, high=None, epsilon: float = 1e-6) -> str:
    g, W, b = ctx.g, ops.p.W, ops.p.b
    shape = ops.sample_shape()
    Wp, Wn = _pos(W), _neg(W)
    if not _small_sample(ops):  # the bounds' forward pass runs in the explainer
        lo, hi = zbox_bounds(ctx, ops.unit, x, low, high, shape, full=False)
        ones = runtime_ones(g, x)
        bounds = g.op("Add", ops.forward(g.op("Mul", ones, g.const(lo, hint="zbox_low")), "pos", Wp, None),
                      ops.forward(g.op("Mul", ones, g.const(hi, hint="zbox_high")), "neg", Wn, None))
        b_full = b.reshape((1, -1) + (1,) * (len(shape) - 2)) if ops.p.kind in ("conv", "convtranspose") else b
        d = g.op("Sub", z, g.op("Add", bounds, g.const(b_full, hint=f"{ops.unit.name}/zbox_bias")), hint="zbox_d")
        q = ctx.stab_div(R, d, epsilon)
        r = g.op("Mul", g.op("Sub", x, g.const(lo, hint="zbox_low")), ops.vjp(q, "pos", Wp))
        return g.op("Add", r, g.op("Mul", g.op("Sub", x, g.const(hi, hint="zbox_high")), ops.vjp(q, "neg", Wn)),
                    hint="r_zbox")
    lo, hi = zbox_bounds(ctx, ops.unit, x, low, high, shape)
    # d = W x - W+ l - W- h; the bias cancels. W x = z - b; the bound terms are constants.
    bounds = ops.constant_forward(lo, Wp, None) + ops.constant_forward(hi, Wn, None)
    b_full = b.reshape((1, -1) + (1,) * (bounds.ndim - 2)) if ops.p.kind in ("conv", "convtranspose") else b
    d = g.op("Sub", z, g.const(bounds + b_full, hint=f"{ops.unit.name}/zbox_shift"), hint="zbox_d")
    q = ctx.stab_div(R, d, epsilon)
    # x W^T q - l W+^T q - h W-^T q = (x - l) W+^T q + (x - h) W-^T q, since W = W+ + W-: two VJPs.
    r = g.op("Mul", g.op("Sub", x, g.const(lo, hint="zbox_low")), ops.vjp(q, "pos", Wp))
    return g.op("Add", r, g.op("Mul", g.op("Sub", x, g.const(hi, hint="zbox_high")), ops.vjp(q, "neg", Wn)),
                hint="r_zbox")


def wsquare(ctx: Ctx, ops: LinearOps, x: str, z: str, R: str, epsilon: float = 1e-6) -> str:
    W2, b2 = ops.p.W ** 2, ops.p.b ** 2
    return ops.vjp(_div_by_ones_forward(ctx, ops, x, R, "sq", W2, b2, epsilon), "sq", W2)


def flat(ctx: Ctx, ops: LinearOps, x: str, z: str, R: str, epsilon: float = 1e-6) -> str:
    ones = np.ones(ops.p.weight_shape, np.float32)
    # 1^T (R / stab(1 . 1)): padding is zero in the ones input, so it does not count.
    if ops.p.kind == "conv" and ops.p.attrs["group"] == 1:
        # With all-ones weights every input channel gets the same value: sum q over the output
        # channels first, then spread one channel through a ones kernel and broadcast it. The
        # denominator is the same in every output channel, so R is summed before the divide
        # (one full-size pass less on the largest tensor of most networks).
        g = ctx.g
        ops1 = LinearOps.__new__(LinearOps)
        ops1.__dict__.update(ops.__dict__, _weights={})
        ops1.p = copy.copy(ops.p)
        ops1.p.W = np.ones((1, 1) + ops.p.weight_shape[2:])
        ops1.p.x_shape = [ops.p.x_shape[0], 1] + list(ops.p.x_shape[2:])
        r_sum = g.op("ReduceSum", R, g.ints([1]), keepdims=1, hint="flat_rsum")
        if _small_sample(ops):
            den = ops.constant_forward(np.ones(ops.sample_shape(), np.float32), ones, None)
            q1 = ctx.stab_div_const(r_sum, den[:, :1], epsilon)
        else:  # C_in times the window's count of ones, in the explainer
            count = ops1.forward(runtime_ones(g, x, channels=1), "ones1", ops1.p.W, None)
            q1 = ctx.stab_div(r_sum, g.op("Mul", count, g.const(float(ops.p.x_shape[1]))), epsilon, nonnegative=True)
        spread = ops1.vjp(q1, "ones1", ops1.p.W)
        return g.op("Expand", spread, g.op("Shape", x), hint="r_flat")
    return ops.vjp(_div_by_ones_forward(ctx, ops, x, R, "ones", ones, None, epsilon), "ones", ones)


RULE_FUNCTIONS = {"epsilon": epsilon, "zplus": zplus, "alpha-beta": alpha_beta, "gamma": gamma,
                  "zbox": zbox, "wsquare": wsquare, "flat": flat}


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


@handler("Linear", rules=LINEAR_RULES)
def linear_layer(ctx: Ctx, unit: Unit, R: str) -> dict:
    ops = LinearOps(ctx, unit)
    x = unit.inputs[0]
    rule = unit.rule
    fn = RULE_FUNCTIONS[rule.name]
    return {x: fn(ctx, ops, x, unit.output, R, **rule.params)}


@handler("Conv", "ConvTranspose", "Gemm", "MatMul", rules=("epsilon",))
def linear_not_constant(ctx: Ctx, unit: Unit, R: str) -> dict:
    # Reached only when units.py could not read constant weights.
    raise Unsupported("its weight or bias is computed at run time (or transA=1 / output_shape is set); "
                      "LRP needs constant weights")

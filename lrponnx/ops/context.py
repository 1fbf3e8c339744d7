"""What a relevance handler works with: the emission context :class:`Ctx` (graph builder, read-only
view, the stabilised divide shared by every rule), relevance products and their :func:`combine`,
and the sign analysis :func:`nonnegative`."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lrponnx.compiler.builder import GraphBuilder
from lrponnx.compiler.view import ModelView
from lrponnx.ops.conv_forms import relu_factored_quotient


@dataclass(frozen=True)
class Product:
    """Relevance ``x * (t_1 + t_2 + ...)``, handed back unmultiplied.

    The rules of most linear layers end in this product. Where several of them read the same
    ``x`` (the branches of an inception block) :func:`combine` multiplies once, and terms that
    know how to merge (vector-Jacobian products with the same geometry, see ``linear.Vjp``)
    become one convolution over their concatenated inputs. A term is a tensor name or an object
    with ``emit()``, ``merge_key`` (None: never merged) and ``emit_group(terms)``."""

    x: str
    terms: tuple


def combine(g: GraphBuilder, parts: list, type_proto=None) -> str:
    """The sum of the relevance parts one tensor receives (tensor names and Products)."""
    dense, by_x = [], {}
    for r in parts:
        if isinstance(r, Product):
            by_x.setdefault(r.x, []).extend(r.terms)
        else:
            dense.append(r)
    for x, terms in by_x.items():
        tensors = [t for t in terms if isinstance(t, str)]
        groups: dict = {}
        for t in terms:
            if not isinstance(t, str):
                groups.setdefault(t.merge_key if t.merge_key is not None else id(t), []).append(t)
        for group in groups.values():
            tensors.append(group[0].emit() if len(group) == 1 else type(group[0]).emit_group(group))
        f = tensors[0] if len(tensors) == 1 else g.op("Sum", *tensors, hint="r_factor_sum")
        dense.append(g.op("Mul", x, f, hint="r_times_x"))
        # remembered: a rule that divides this relevance by x again (eps = 0) takes f instead
        g.factored[dense[-1]] = (x, f)
        if type_proto is not None:
            g.declare(f, type_proto)
    out = dense[0] if len(dense) == 1 else g.op("Sum", *dense, hint="r_sum")
    if type_proto is not None:
        g.declare(out, type_proto)
    return out


#: What the explainer's graph is written for. "any": the fastest forms on ONNX Runtime's CPU
#: provider (3-D AveragePool for the LRN window, MaxPool's Indices for winner-take-all).
#: "webgpu": only ops and attributes onnxruntime-web's WebGPU provider runs (docs/webgpu.md).
TARGET_RUNTIMES = ("any", "webgpu")


class Unsupported(Exception):
    """Raised by a handler when this particular node cannot be explained (why = message)."""


#: Constants whose size follows the model's declared input size (the denominators of the flat,
#: wsquare and zbox rules, average pooling's divisors) are stored in the explainer when they have
#: at most this many elements; larger ones are computed by the explainer at run time from the
#: input's shape, so neither convert's memory nor the file grows with the declared size.
SIZED_CONST_LIMIT = 1 << 22


def sized_const_ok(shape) -> bool:
    """Whether a constant of this shape may be computed at convert time and stored."""
    return int(np.prod([int(d) for d in shape], dtype=object)) <= SIZED_CONST_LIMIT


def runtime_ones(g: GraphBuilder, x: str, channels: int | None = None) -> str:
    """Ones shaped like one sample of ``x`` ([1, C, *spatial]; ``channels`` replaces C), made at
    run time from ``x``'s shape: a convert-time constant of that size is not stored."""
    from onnx import TensorProto, helper

    rest = g.op("Shape", x, start=1 if channels is None else 2, hint="sample_dims")
    lead = g.ints([1] if channels is None else [1, channels])
    return g.op("ConstantOfShape", g.op("Concat", lead, rest, axis=0),
                value=helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0]), hint="sample_ones")


@dataclass
class Ctx:
    """What a handler may use: the graph builder, the read-only view, the compile options and small
    shared helpers.

    A handler that computes a forward node itself because it needs its parts anyway (only LRN does)
    hands the replacement nodes to :meth:`replace_forward`; the compiler puts them in place of the
    original node once, after emission."""

    g: GraphBuilder
    view: ModelView
    #: keep every forward node as it is (``convert(exact_forward=True)``): no :meth:`replace_forward`
    exact_forward: bool = False
    #: one of :data:`TARGET_RUNTIMES`: the runtime the explainer's graph is written for
    target_runtime: str = "any"
    #: for a ``multi_output`` handler: the relevance at each output of its unit (None: none arrives)
    out_relevance: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.target_runtime not in TARGET_RUNTIMES:
            raise ValueError(f"target_runtime must be one of {', '.join(TARGET_RUNTIMES)}, got {self.target_runtime!r}")

    @property
    def webgpu(self) -> bool:
        return self.target_runtime == "webgpu"

    def replace_forward(self, output: str, nodes: list) -> None:
        """``nodes`` (collected with ``g.detached()``) compute the forward tensor ``output`` in place of
        its producer, from then on (see :meth:`GraphBuilder.replace_forward`)."""
        self.g.replace_forward(output, nodes)

    # -- the stabilised divide shared by every rule ----------------------------------------------
    def stab_div(self, R: str, d: str, eps: float, hint: str = "q", nonnegative: bool = False) -> str:
        """``R / stab(d)`` with ``stab(d) = d + eps * sign0(d)``, ``sign0(0) = +1``.

        With ``eps = 0`` a zero denominator gives zero, never NaN. ``nonnegative``: the caller
        knows ``d >= 0`` (e.g. W+ x+ + b+), so ``stab(d) = d + eps`` needs no sign test.
        """
        g = self.g
        relu_q = relu_factored_quotient(g, self.view, R, d, eps)  # R = relu(d) f: no sign test (conv_forms)
        if relu_q is not None:
            return relu_q
        if eps > 0 and nonnegative:
            return g.op("Div", R, g.op("Add", d, g.const(float(eps)), hint=f"{hint}_den"), hint=hint)
        zero = g.const(0.0)
        if eps > 0:
            shift = g.op("Where", g.op("GreaterOrEqual", d, zero), g.const(float(eps)),
                         g.const(-float(eps)), hint=f"{hint}_eps")
            return g.op("Div", R, g.op("Add", d, shift, hint=f"{hint}_den"), hint=hint)
        # d + [d == 0] is d where d != 0 (exact) and 1 where d == 0; the quotient there is then zeroed
        # by a product with [d != 0]: the same numbers as two Wheres, ~2.7x faster in ONNX Runtime
        # (its Where with a broadcast scalar is slow: 1.7 of 6.2 s of the vit_b_16 explainer)
        zero_f = g.op("Cast", g.op("Equal", d, zero), to=1, hint=f"{hint}_is_zero")
        factored = g.factored.get(R)
        if factored is not None and factored[0] == d:
            # R = d * f (made by combine): R / d is f where d != 0, without the product and the divide
            # (the explainer drops the product when nothing else reads it; see compiler.prune_dead)
            return g.op("Mul", factored[1], g.op("Sub", g.const(1.0), zero_f, hint=f"{hint}_nonzero"), hint=hint)
        q = g.op("Div", R, g.op("Add", d, zero_f, hint=f"{hint}_den"))
        return g.op("Mul", q, g.op("Sub", g.const(1.0), zero_f, hint=f"{hint}_nonzero"), hint=hint)

    # -- signs of activations --------------------------------------------------------------------
    def stab_div_const(self, R: str, d: np.ndarray, eps: float, hint: str = "q") -> str:
        """``R / stab(d)`` for a denominator known at convert time: one Mul by its inverse."""
        d = np.asarray(d, dtype=np.float64)
        den = d + eps * np.where(d >= 0, 1.0, -1.0)
        inv = np.divide(1.0, den, out=np.zeros_like(den), where=den != 0)
        return self.g.op("Mul", R, self.g.const(inv, hint=f"{hint}_inv"), hint=hint)

    def positive_part(self, x: str) -> str:
        return self.g.op("Relu", x, hint="x_pos")

    def negative_part(self, x: str) -> str:
        g = self.g
        return g.op("Min", x, g.const(0.0), hint="x_neg")

    def nonnegative(self, name: str) -> bool:
        return nonnegative(self.view, name)

    def unbroadcast(self, r: str, target: str, r_shape: list | None) -> str:
        """Sum ``r`` down to the shape of ``target`` (the inverse of numpy broadcasting)."""
        t_shape = self.view.shape(target)
        if t_shape is None or r_shape is None or list(t_shape) == list(r_shape):
            return r
        g = self.g
        lead = len(r_shape) - len(t_shape)
        axes = list(range(lead)) + [lead + i for i, d in enumerate(t_shape)
                                    if d == 1 and r_shape[lead + i] != 1]
        if not axes:
            return r
        out = g.op("ReduceSum", r, g.ints(axes), keepdims=1, hint="unbroadcast")
        if lead:
            out = g.op("Reshape", out, g.op("Shape", target))
        return out


_NONNEG_SOURCES = {"Relu", "Sigmoid", "Softmax", "Softplus", "Abs", "Exp"}
_NONNEG_KEEPERS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Concat", "Reshape",
                   "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout", "LRN",
                   "WithinChannelLRN", "Add", "Sum", "Max", "Cast"}


def nonnegative(view: ModelView, name: str) -> bool:
    """True when ``name`` is provably >= 0 (e.g. after a ReLU): then its x- terms vanish and
    the rules can skip them, which is most of the speed of z+ and gamma."""
    memo = view.nonneg
    if name in memo:
        return memo[name]
    memo[name] = False  # guards against cycles
    result = False
    if view.is_const(name):
        result = bool(np.all(view.value(name) >= 0))
    elif name in view.producer:
        node = view.producer[name]
        data = [i for i in node.input if i and i in view.dynamic]
        if node.op_type in _NONNEG_SOURCES:
            result = True
        elif node.op_type == "Clip":
            lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
            result = lo is not None and view.is_const(lo) and float(view.value(lo)) >= 0
        elif node.op_type == "Pad":
            result = nonnegative(view, node.input[0]) and (
                len(node.input) < 3 or not node.input[2] or float(view.value(node.input[2])) >= 0)
        elif node.op_type in _NONNEG_KEEPERS:
            consts_ok = all(nonnegative(view, i) for i in node.input[1:] if i and view.is_const(i)
                            and node.op_type in ("Add", "Sum", "Max", "Concat"))
            result = consts_ok and all(nonnegative(view, i) for i in data)
    memo[name] = result
    return result



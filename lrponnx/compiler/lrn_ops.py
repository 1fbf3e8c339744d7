"""How local response normalisation is written in ONNX, and the one description the compiler uses.

Across channels ONNX has the ``LRN`` op. Within a channel (Caffe's ``WITHIN_CHANNEL``) it has
nothing, so we define a *model-local ONNX function* ``ai.lrponnx::WithinChannelLRN`` whose body
is standard ops (Mul, AveragePool, Pow, Div). Any ONNX runtime inlines and executes it as is,
and the compiler recognises the node as one LRN. See ``docs/lrn.md``.

    y = x / (1 + alpha * avgpool_{n x n, pad (n-1)/2, count_include_pad}(x^2)) ^ beta
      = x * (1 + alpha/n^2 * sum_window x^2) ^ (-beta)          (Caffe's formula; k is ignored)

Node attributes: ``alpha`` (float), ``beta`` (float), ``kernel_shape`` ([n, n]),
``pads`` ([p, p, p, p] with p = (n-1)/2). ``n`` must be odd, as in Caffe.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

LRPONNX_DOMAIN = "ai.lrponnx"
WITHIN_CHANNEL_LRN = "WithinChannelLRN"
FUNCTION_OPSET = 17   # the default; the body is built at the model's own opset (any >= 11 works)
MIN_FUNCTION_OPSET = 11  # Constant(value_float) and AveragePool(count_include_pad) exist from here


@dataclass(frozen=True)
class LrnSpec:
    """One LRN, whatever ONNX form it arrived in.

    ``y_c = x_c * (k + a * S_c) ** -beta`` with ``S_c`` the sum of ``x**2`` over the window of ``c``
    and ``a = alpha / size`` (across) or ``alpha / size**2`` (within). The window of channel ``c``
    (across) is ``[c - lo, c + hi]``; within a channel it is the ``size x size`` square centred on
    the pixel, ``lo = hi = (size-1)//2`` on each spatial axis.
    """

    region: str  # "across" | "within"
    size: int
    alpha: float
    beta: float
    k: float
    lo: int
    hi: int

    @property
    def a(self) -> float:
        return self.alpha / (self.size if self.region == "across" else self.size * self.size)

    @staticmethod
    def onnx_across(size: int, alpha: float, beta: float, bias: float) -> "LrnSpec":
        # ONNX LRN: window {c - floor((n-1)/2), ..., c + ceil((n-1)/2)}.
        return LrnSpec("across", size, alpha, beta, bias, (size - 1) // 2, size - 1 - (size - 1) // 2)

    @staticmethod
    def within(size: int, alpha: float, beta: float) -> "LrnSpec":
        if size % 2 != 1:
            raise ValueError(f"within-channel LRN needs an odd local_size, got {size}")
        return LrnSpec("within", size, alpha, beta, 1.0, (size - 1) // 2, (size - 1) // 2)


def _ref_attr(name: str, attr_type: int) -> onnx.AttributeProto:
    a = onnx.AttributeProto()
    a.name = name
    a.ref_attr_name = name
    a.type = attr_type
    return a


def within_channel_lrn_function(opset: int = FUNCTION_OPSET) -> onnx.FunctionProto:
    """The FunctionProto that a model using WithinChannelLRN nodes must carry in ``model.functions``.

    Its body imports the model's own default opset (onnx requires the two to agree); the ops
    it uses (Constant, Mul, AveragePool with stride 1 and symmetric pads, Add, Pow, Div) compute
    the same at every opset from 11 on."""
    if opset < MIN_FUNCTION_OPSET:
        raise ValueError(f"WithinChannelLRN needs opset >= {MIN_FUNCTION_OPSET}, got {opset}")
    alpha = helper.make_node("Constant", [], ["alpha"])
    alpha.attribute.append(_ref_attr("value_float", onnx.AttributeProto.FLOAT))
    alpha.attribute[0].ref_attr_name = "alpha"
    beta = helper.make_node("Constant", [], ["beta"])
    beta.attribute.append(_ref_attr("value_float", onnx.AttributeProto.FLOAT))
    beta.attribute[0].ref_attr_name = "beta"
    pool = helper.make_node("AveragePool", ["sq"], ["avg"], count_include_pad=1)
    pool.attribute.append(_ref_attr("kernel_shape", onnx.AttributeProto.INTS))
    pool.attribute.append(_ref_attr("pads", onnx.AttributeProto.INTS))
    body = [
        alpha,
        beta,
        helper.make_node("Constant", [], ["one"], value_float=1.0),
        helper.make_node("Mul", ["X", "X"], ["sq"]),
        pool,
        helper.make_node("Mul", ["avg", "alpha"], ["scaled"]),
        helper.make_node("Add", ["scaled", "one"], ["s"]),
        helper.make_node("Pow", ["s", "beta"], ["s_pow"]),
        helper.make_node("Div", ["X", "s_pow"], ["Y"]),
    ]
    return helper.make_function(
        LRPONNX_DOMAIN,
        WITHIN_CHANNEL_LRN,
        ["X"],
        ["Y"],
        body,
        [helper.make_opsetid("", opset)],
        attributes=["alpha", "beta", "kernel_shape", "pads"],
    )


def make_within_channel_lrn(x: str, y: str, size: int, alpha: float, beta: float, name: str | None = None) -> onnx.NodeProto:
    """A WithinChannelLRN node. Remember :func:`ensure_lrn_function` on the model that holds it."""
    spec = LrnSpec.within(size, alpha, beta)
    p = spec.lo
    return helper.make_node(
        WITHIN_CHANNEL_LRN, [x], [y], name=name, domain=LRPONNX_DOMAIN,
        alpha=float(alpha), beta=float(beta), kernel_shape=[size, size], pads=[p, p, p, p],
    )


def ensure_lrn_function(model: onnx.ModelProto) -> None:
    """Add the WithinChannelLRN function and its domain import to ``model`` if it is missing."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), FUNCTION_OPSET)
    if not any(f.domain == LRPONNX_DOMAIN and f.name == WITHIN_CHANNEL_LRN for f in model.functions):
        model.functions.append(within_channel_lrn_function(opset))
    align_function_opset(model)
    if not any(o.domain == LRPONNX_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(LRPONNX_DOMAIN, 1))
    if model.ir_version < 8:  # model-local functions need IR 8
        model.ir_version = 8


def align_function_opset(model: onnx.ModelProto) -> None:
    """After the model's opset changed (e.g. onnx's version converter), make our function's body
    import the same default opset, as onnx's checker requires."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return
    for f in model.functions:
        if f.domain == LRPONNX_DOMAIN and f.name == WITHIN_CHANNEL_LRN:
            for o in f.opset_import:
                if o.domain in ("", "ai.onnx"):
                    o.version = opset


def spec_of_node(node: onnx.NodeProto) -> LrnSpec | None:
    """The LrnSpec of an ONNX ``LRN`` or ``WithinChannelLRN`` node, else None."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "LRN" and node.domain in ("", "ai.onnx"):
        return LrnSpec.onnx_across(int(attrs["size"]), float(attrs.get("alpha", 1e-4)),
                                   float(attrs.get("beta", 0.75)), float(attrs.get("bias", 1.0)))
    if node.op_type == WITHIN_CHANNEL_LRN and node.domain == LRPONNX_DOMAIN:
        kernel = [int(k) for k in attrs["kernel_shape"]]
        n = kernel[0]
        if any(k != n for k in kernel) or list(attrs.get("pads", [])) != [(n - 1) // 2] * (2 * len(kernel)):
            return None  # not the square, centred window we define: the node is refused, not misread
        return LrnSpec.within(n, float(attrs["alpha"]), float(attrs["beta"]))
    return None

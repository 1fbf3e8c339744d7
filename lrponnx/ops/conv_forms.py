"""Emission forms chosen for speed in ONNX Runtime's CPU provider; the numbers are those of the
plain forms (bit for bit, or to float rounding where said).

ONNX Runtime runs convolutions in a blocked channel layout (NCHWc) and keeps a tensor in it only
through Conv, pools, BatchNormalization, Relu/Sigmoid/Tanh, Concat and Add/Sum/Mul of two blocked
tensors of one shape. Any other op (Min, Div, Where, a Mul by a scalar) gets a layout reorder, a
full copy, on each side. The forms here avoid such ops, or passes, where an equivalent exists.
(Measured and kept out: strided convolution VJPs as zero insertion + Conv, or as a polyphase
Conv + DepthToSpace; ONNX Runtime's ConvTranspose was faster on every geometry of the torchvision
nets but one. See docs/decisions.md, "Issue 13: explainer speed".)
"""
from __future__ import annotations

import numpy as np

from lrponnx.compiler.builder import GraphBuilder
from lrponnx.compiler.view import ModelView


def negative_magnitude(g: GraphBuilder, x: str, channels: int | None) -> tuple[str, float]:
    """``(m, s)`` with ``min(x, 0) = s * m``.

    With the channel count of a convolution's input known: ``m = relu(-x)``, the negation by a
    BatchNormalization with scale -1 (mean 0, variance 1, epsilon 0: exactly ``-x``), and
    ``s = -1``. A rule then pairs ``m`` with ``-W`` where it paired ``x-`` with ``W``:
    ``(-W)(-x-) = W x-`` with the same roundings. BatchNormalization and Relu keep ONNX Runtime's
    blocked layout, ``Min`` does not, so the two convolutions that read ``m``, the product with
    ``m`` and the sums around them run without reorders. Otherwise (a dense layer's input, whose
    axis 1 is not a channel axis): ``(Min(x, 0), 1)``."""
    if not channels:
        return g.op("Min", x, g.const(0.0), hint="x_neg"), 1.0
    zeros, ones = np.zeros(int(channels), np.float32), np.ones(int(channels), np.float32)
    neg_x = g.op("BatchNormalization", x, g.const(-ones, hint="bn_minus_one"), g.const(zeros, hint="bn_zero"),
                 g.const(zeros, hint="bn_zero"), g.const(ones, hint="bn_one"), epsilon=0.0, hint="x_negated")
    return g.op("Relu", neg_x, hint="x_neg_magnitude"), -1.0


def relu_factored_quotient(g: GraphBuilder, view: ModelView, R: str, d: str, eps: float) -> str | None:
    """``R / stab(d)`` without a sign test, where ``R = y * f`` (a product made by ``combine``) and
    ``y = relu(d)``: a residual sum followed by its ReLU (ResNet, RegNet), whose relevance is
    the product of ``y`` with the next layers' factors.

    Where ``d > 0``, ``y = d`` and ``stab(d) = y + eps``; where ``d <= 0``, ``y = 0`` and ``R = 0``.
    So the quotient is ``f * (y / (y + eps))`` (``f * [y > 0]`` for eps = 0): an Add, a Div and a
    Mul instead of the product ``y f``, the sign test, ``Where``, the shift and the divide (the
    product is dropped when nothing else reads it). The same numbers to float rounding (the
    product and the quotient are taken in another order). None where ``R`` is not of that form."""
    factored = g.factored.get(R)
    if factored is None:
        return None
    y, f = factored
    node = view.producer.get(y)
    if node is None or node.op_type != "Relu" or node.input[0] != d:
        return None
    if eps > 0:
        ratio = g.op("Div", y, g.op("Add", y, g.const(float(eps)), hint="q_relu_den"), hint="q_relu_ratio")
    else:
        ratio = g.op("Cast", g.op("Greater", y, g.const(0.0)), to=1, hint="q_relu_mask")
    return g.op("Mul", f, ratio, hint="q")

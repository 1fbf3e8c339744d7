"""Elementwise layers: ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal, BNLL, Power, Dropout; and Softmax."""
from __future__ import annotations

import numpy as np

from lrponnx.converters.caffe.graph import LayerCtx
from lrponnx.converters.caffe.layers.fill import by_role, normal
from lrponnx.converters.caffe.layers.registry import CaffeLayer, caffe_layer, register
from lrponnx.converters.caffe.net import Layer, canon_axis


@caffe_layer("ReLU")
def relu(c: LayerCtx) -> list[list[int]]:
    slope = float(c.layer.param("relu_param").negative_slope)
    if slope != 0.0:
        c.op("LeakyRelu", c.xs[0], alpha=slope)
    else:
        c.op("Relu", c.xs[0])
    return [list(c.shapes[0])]


def prelu_blobs(layer: Layer, shapes: list[list[int]]):
    c = shapes[0][1] if len(shapes[0]) > 1 else 1
    return [("slope", [1] if layer.param("prelu_param").channel_shared else [c])]


@caffe_layer("PReLU", blobs=prelu_blobs, random=by_role(slope=normal(0.05, mean=0.25)))
def prelu(c: LayerCtx) -> list[list[int]]:
    s = c.shapes[0]
    slope = c.blobs[0].reshape([-1] + [1] * max(0, len(s) - 2)) if len(s) > 2 else c.blobs[0]
    c.op("PRelu", c.xs[0], c.const("slope", slope))
    return [list(s)]


@caffe_layer("ELU")
def elu(c: LayerCtx) -> list[list[int]]:
    c.op("Elu", c.xs[0], alpha=float(c.layer.param("elu_param").alpha))
    return [list(c.shapes[0])]


def _same_op(onnx_op: str):
    """The conversion of a parameter-free elementwise layer: one ONNX op of the same meaning."""
    def convert(c: LayerCtx) -> list[list[int]]:
        c.op(onnx_op, c.xs[0])
        return [list(c.shapes[0])]
    return convert


for _caffe, _onnx in {"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs", "BNLL": "Softplus"}.items():
    register(CaffeLayer((_caffe,), _same_op(_onnx)))


@caffe_layer("Power")
def power(c: LayerCtx) -> list[list[int]]:
    """``(shift + scale * x) ^ power``: only the non-trivial steps."""
    p = c.layer.param("power_param")
    power, scale, shift = float(p.power), float(p.scale), float(p.shift)
    steps: list[tuple[str, float]] = []
    if scale != 1.0:
        steps.append(("Mul", scale))
    if shift != 0.0:
        steps.append(("Add", shift))
    if power != 1.0:
        steps.append(("Pow", power))
    if not steps:
        c.op("Identity", c.xs[0])
        return [list(c.shapes[0])]
    x = c.xs[0]
    for j, (op, v) in enumerate(steps):
        last = j == len(steps) - 1
        x = c.op(op, x, c.const(op.lower(), np.array(v)), tag=None if last else op.lower())
    return [list(c.shapes[0])]


def _dropout_is_identity(layer: Layer) -> bool:
    return bool(layer.param("dropout_param").scale_train)


@caffe_layer("Dropout", alias=_dropout_is_identity)
def dropout(c: LayerCtx) -> list[list[int]]:
    # only reached when scale_train is false: Caffe then scales by (1 - ratio) at test time
    ratio = float(c.layer.param("dropout_param").dropout_ratio)
    c.op("Mul", c.xs[0], c.const("scale", np.array(1.0 - ratio)))
    return [list(c.shapes[0])]


@caffe_layer("Softmax")
def softmax(c: LayerCtx) -> list[list[int]]:
    s = c.shapes[0]
    c.op("Softmax", c.xs[0], axis=canon_axis(c.layer.param("softmax_param").axis, len(s), c.layer))
    return [list(s)]

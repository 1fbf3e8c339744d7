"""LRN, BatchNorm, Scale and Bias."""
from __future__ import annotations

import numpy as np

from lrponnx.compiler.lrn_ops import make_within_channel_lrn

from lrponnx.converters.caffe.graph import LayerCtx
from lrponnx.converters.caffe.layers.fill import by_role, normal, ones, uniform
from lrponnx.converters.caffe.layers.registry import caffe_layer
from lrponnx.converters.caffe.net import Layer, canon_axis


@caffe_layer("LRN")
def lrn(c: LayerCtx) -> list[list[int]]:
    p = c.layer.param("lrn_param")
    s = c.shapes[0]
    size = int(p.local_size)
    if size % 2 != 1:
        raise c.layer.err(f"LRN only supports odd values for local_size, got {size}")
    if len(s) != 4:
        raise c.layer.err(f"LRN needs a 4-D blob, got shape {s}")
    if p.norm_region == 0:
        c.op("LRN", c.xs[0], size=size, alpha=float(p.alpha), beta=float(p.beta), bias=float(p.k))
    else:
        c.g.add(make_within_channel_lrn(c.xs[0], c.outs[0], size, float(p.alpha), float(p.beta), name=c.name))
        c.g.needs_lrn_function = True
    return [list(s)]


def batchnorm_blobs(layer: Layer, shapes: list[list[int]]):
    c = shapes[0][1] if len(shapes[0]) > 1 else 1
    return [("mean", [c]), ("variance", [c]), ("moving average factor", [1])]


def _batchnorm_check(layer: Layer):
    p = layer.param("batch_norm_param")
    if p.HasField("use_global_stats") and not p.use_global_stats:
        return "use_global_stats: false (batch statistics at test time) cannot be exported"
    return None


@caffe_layer("BatchNorm", blobs=batchnorm_blobs, check=_batchnorm_check,
             random=by_role(**{"mean": normal(0.1), "variance": uniform(0.5), "moving average factor": ones}))
def batchnorm(c: LayerCtx) -> list[list[int]]:
    """BatchNormalization with Caffe's stored statistics (divided by the moving-average factor);
    the driver may fold the following Scale layer in (``c.extra["fold_scale"]``: its blobs)."""
    s = c.shapes[0]
    if len(s) < 2:
        raise c.layer.err(f"BatchNorm needs a blob with a channel axis, got shape {s}")
    eps = float(c.layer.param("batch_norm_param").eps)
    mean, var, factor = c.blobs
    f = float(factor.reshape(-1)[0])
    sf = 0.0 if f == 0 else 1.0 / f
    mean = mean.astype(np.float64) * sf
    var = var.astype(np.float64) * sf
    C = s[1]
    gamma, beta = np.ones(C), np.zeros(C)
    fold = c.extra.get("fold_scale")
    if fold is not None:
        gamma = fold[0].astype(np.float64).reshape(C)
        if len(fold) > 1:
            beta = fold[1].astype(np.float64).reshape(C)
    inputs = [c.xs[0], c.const("scale", gamma), c.const("bias", beta), c.const("mean", mean), c.const("var", var)]
    c.op("BatchNormalization", *inputs, epsilon=eps)
    if fold is not None:
        c.g.graph.node[-1].doc_string = (f"Caffe BatchNorm {c.name!r} with the following Scale layer "
                                         f"{c.extra['fold_name']!r} folded in")
    return [list(s)]


def scale_bias_blobs(layer: Layer, shapes: list[list[int]]):
    """A learned parameter of shape ``bottom[axis : axis + num_axes]`` (none with two bottoms)."""
    if len(layer.bottoms) > 1:
        return None
    t = layer.type
    p = layer.param("scale_param" if t == "Scale" else "bias_param")
    s = shapes[0]
    axis = canon_axis(p.axis, len(s), layer)
    if p.num_axes < -1:
        raise layer.err("num_axes must be >= -1")
    end = len(s) if p.num_axes == -1 else axis + p.num_axes
    if end > len(s):
        raise layer.err(f"axis {p.axis} + num_axes {p.num_axes} exceed the bottom's {len(s)} axes")
    pshape = s[axis:end]
    if t == "Scale":
        return [("scale", pshape)] + ([("bias", pshape)] if p.bias_term else [])
    return [("bias", pshape)]


def _broadcast_param(arr: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A Caffe Scale/Bias parameter of shape s[axis:axis+k] as an ONNX-broadcastable array."""
    trailing = ndim - axis - arr.ndim
    return arr.reshape(list(arr.shape) + [1] * trailing) if trailing > 0 else arr


@caffe_layer("Scale", "Bias", bottoms=(1, 2), blobs=scale_bias_blobs,
             random=by_role(scale=uniform(0.5), bias=normal(0.1)))
def scale_bias(c: LayerCtx) -> list[list[int]]:
    t = c.layer.type
    p = c.layer.param("scale_param" if t == "Scale" else "bias_param")
    s = c.shapes[0]
    axis = canon_axis(p.axis, len(s), c.layer)
    op = "Mul" if t == "Scale" else "Add"
    if len(c.xs) == 2:
        s1 = c.shapes[1]
        if s[axis:axis + len(s1)] != s1:
            raise c.layer.err(f"bottom 1 shape {s1} does not match bottom 0 {s} from axis {axis}")
        other = c.xs[1]
        trailing = len(s) - axis - len(s1)
        if trailing > 0 and s1:  # right-pad with 1s so ONNX broadcasting lines the axes up
            tgt = s1 + [1] * trailing
            if axis == 0 and not c.g.fixed_batch:
                tgt[0] = 0  # bottom 1 starts with the batch axis: copy it
            other = c.op("Reshape", c.xs[1], c.ints("shape", tgt), tag="reshape")
        c.op(op, c.xs[0], other)
        return [list(s)]
    if axis == 0 and c.blobs[0].ndim > 0 and not c.g.fixed_batch:
        raise c.layer.unsupported("a learned parameter over the batch axis needs --input-shape with a fixed batch")
    w = _broadcast_param(c.blobs[0], axis, len(s))
    if t == "Scale" and p.bias_term:
        y = c.op("Mul", c.xs[0], c.const("scale", w), tag="scale")
        c.op("Add", y, c.const("bias", _broadcast_param(c.blobs[1], axis, len(s))))
    else:
        c.op(op, c.xs[0], c.const("scale" if t == "Scale" else "bias", w))
    return [list(s)]

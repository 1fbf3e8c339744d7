"""Convolution, Deconvolution and InnerProduct: the layers with a weight matrix."""
from __future__ import annotations

from lrponnx.converters.caffe.graph import LayerCtx
from lrponnx.converters.caffe.layers.fill import by_role, he_normal, normal
from lrponnx.converters.caffe.layers.registry import caffe_layer
from lrponnx.converters.caffe.net import Layer, canon_axis, prod


def conv_geometry(layer: Layer, nsp: int) -> dict:
    """Kernel, pad, stride, dilation, group, num_output and bias of a (de)convolution with
    ``nsp`` spatial axes, with Caffe's rules for the repeated and the ``_h``/``_w`` spellings."""
    p = layer.param("convolution_param")

    def pick(rep: list[int], h_field: str, w_field: str, default: int, what: str) -> list[int]:
        has_hw = p.HasField(h_field) or p.HasField(w_field)
        if has_hw:
            if nsp != 2:
                raise layer.err(f"{h_field}/{w_field} can only be used for 2-D convolution")
            if rep:
                raise layer.err(f"either {what} or {h_field}/{w_field} may be given, not both")
            return [int(getattr(p, h_field)), int(getattr(p, w_field))]
        if not rep:
            return [default] * nsp
        if len(rep) == 1:
            return [int(rep[0])] * nsp
        if len(rep) == nsp:
            return [int(v) for v in rep]
        raise layer.err(f"{what} must be given once or {nsp} times, got {len(rep)}")

    if (p.HasField("kernel_h") or p.HasField("kernel_w")) and not (p.HasField("kernel_h") and p.HasField("kernel_w")):
        raise layer.err("kernel_h and kernel_w must be given together")
    if not list(p.kernel_size) and not p.HasField("kernel_h"):
        raise layer.err("no kernel_size (or kernel_h/kernel_w) given")
    kernel = pick(list(p.kernel_size), "kernel_h", "kernel_w", 0, "kernel_size")
    pad = pick(list(p.pad), "pad_h", "pad_w", 0, "pad")
    stride = pick(list(p.stride), "stride_h", "stride_w", 1, "stride")
    dil = list(p.dilation)
    if not dil:
        dilation = [1] * nsp
    elif len(dil) == 1:
        dilation = [int(dil[0])] * nsp
    elif len(dil) == nsp:
        dilation = [int(v) for v in dil]
    else:
        raise layer.err(f"dilation must be given once or {nsp} times, got {len(dil)}")
    if any(k <= 0 for k in kernel):
        raise layer.err(f"kernel size must be positive, got {kernel}")
    if any(s <= 0 for s in stride):
        raise layer.err(f"stride must be positive, got {stride}")
    if any(d <= 0 for d in dilation):
        raise layer.err(f"dilation must be positive, got {dilation}")
    if not p.HasField("num_output") or p.num_output <= 0:
        raise layer.err("num_output must be given and positive")
    group = int(p.group)
    if group <= 0:
        raise layer.err("group must be positive")
    return dict(kernel=kernel, pad=pad, stride=stride, dilation=dilation, group=group,
                num_output=int(p.num_output), bias=bool(p.bias_term))


def conv_blobs(layer: Layer, shapes: list[list[int]]):
    s = shapes[0]
    if len(s) < 3:
        raise layer.err(f"needs an input with spatial axes, got shape {s}")
    geo = conv_geometry(layer, len(s) - 2)
    c, g, n = s[1], geo["group"], geo["num_output"]
    if c % g or n % g:
        raise layer.err(f"group {g} must divide both the input channels ({c}) and num_output ({n})")
    w = [n, c // g, *geo["kernel"]] if layer.type == "Convolution" else [c, n // g, *geo["kernel"]]
    return [("weight", w)] + ([("bias", [n])] if geo["bias"] else [])


@caffe_layer("Convolution", "Deconvolution", blobs=conv_blobs,
             random=by_role(weight=he_normal(lambda shape, layer: prod(shape[1:])), bias=normal(0.01)))
def convolution(c: LayerCtx) -> list[list[int]]:
    s = c.shapes[0]
    geo = conv_geometry(c.layer, len(s) - 2)
    if canon_axis(c.layer.param("convolution_param").axis, len(s), c.layer) != 1:
        raise c.layer.unsupported("convolution over an axis other than 1 (channels)")
    k, p, st, d = geo["kernel"], geo["pad"], geo["stride"], geo["dilation"]
    inputs = [c.xs[0], c.const("weight", c.blobs[0])]
    if geo["bias"]:
        inputs.append(c.const("bias", c.blobs[1]))
    if c.layer.type == "Convolution":
        out_sp = [(s[2 + i] + 2 * p[i] - (d[i] * (k[i] - 1) + 1)) // st[i] + 1 for i in range(len(k))]
        op = "Conv"
    else:
        out_sp = [st[i] * (s[2 + i] - 1) + (d[i] * (k[i] - 1) + 1) - 2 * p[i] for i in range(len(k))]
        op = "ConvTranspose"
    if any(o <= 0 for o in out_sp):
        raise c.layer.err(f"output size {out_sp} is not positive for input {s}, kernel {k}, pad {p}, stride {st}")
    c.op(op, *inputs, kernel_shape=k, pads=p + p, strides=st, dilations=d, group=geo["group"])
    return [[s[0], geo["num_output"], *out_sp]]


def inner_product_blobs(layer: Layer, shapes: list[list[int]]):
    p = layer.param("inner_product_param")
    if not p.HasField("num_output") or p.num_output <= 0:
        raise layer.err("num_output must be given and positive")
    s = shapes[0]
    axis = canon_axis(p.axis, len(s), layer)
    k, n = prod(s[axis:]), int(p.num_output)
    w = [k, n] if p.transpose else [n, k]
    return [("weight", w)] + ([("bias", [n])] if p.bias_term else [])


def _ip_fan_in(shape: list[int], layer: Layer) -> int:
    return shape[0] if layer.param("inner_product_param").transpose else shape[1]


@caffe_layer("InnerProduct", blobs=inner_product_blobs,
             random=by_role(weight=he_normal(_ip_fan_in), bias=normal(0.01)))
def inner_product(c: LayerCtx) -> list[list[int]]:
    p = c.layer.param("inner_product_param")
    s = c.shapes[0]
    axis = canon_axis(p.axis, len(s), c.layer)
    n, k = int(p.num_output), prod(s[axis:])
    w = c.blobs[0]
    out_shape = s[:axis] + [n]
    if axis == 1:
        x = c.xs[0]
        if len(s) != 2:
            x = c.op("Flatten", c.xs[0], tag="flatten", axis=1)
        inputs = [x, c.const("weight", w)]
        if p.bias_term:
            inputs.append(c.const("bias", c.blobs[1]))
        c.op("Gemm", *inputs, transB=0 if p.transpose else 1)
        return [out_shape]
    # general axis: [..., K] @ W^T (+ b)
    x = c.xs[0]
    if len(s) != axis + 1:
        tgt = c.reshape_target(s, s[:axis] + [k]) if axis == 0 else [0] * axis + [k]
        x = c.op("Reshape", c.xs[0], c.ints("shape", tgt), tag="reshape")
    wt = w if p.transpose else w.T
    if p.bias_term:
        y = c.op("MatMul", x, c.const("weight", wt), tag="matmul")
        c.op("Add", y, c.const("bias", c.blobs[1]))
    else:
        c.op("MatMul", x, c.const("weight", wt))
    return [out_shape]

"""Pooling: Caffe's output size (ceil rounding unless asked otherwise, the last window starting
inside the image) and its AVE divisor, reproduced with plain ONNX pooling ops (``docs/caffe.md``)."""
from __future__ import annotations

import math

from lrponnx.converters.caffe.graph import LayerCtx
from lrponnx.converters.caffe.layers.registry import caffe_layer
from lrponnx.converters.caffe.net import Layer

STOCHASTIC = 2


def _pool_pair(layer: Layer, p, field: str) -> tuple[int, int]:
    """PoolingParameter's ``pad``/``stride``: one value for both axes, or ``<field>_h`` and ``<field>_w``."""
    if p.HasField(f"{field}_h") or p.HasField(f"{field}_w"):
        if p.HasField(field):
            raise layer.err(f"give {field} OR {field}_h and {field}_w")
        return getattr(p, f"{field}_h"), getattr(p, f"{field}_w")
    value = getattr(p, field)
    return value, value


def _pool_floor(layer: Layer, p) -> bool:
    """Whether the output size rounds down: BVLC's ``round_mode: FLOOR`` or the forks'
    ``ceil_mode: false`` (OpenCV's caffe.proto, BVLC PR #3057). Both default to ceil."""
    by_round = p.HasField("round_mode") and p.round_mode == 1
    by_ceil = p.HasField("ceil_mode") and not p.ceil_mode
    if p.HasField("round_mode") and p.HasField("ceil_mode") and by_round != by_ceil:
        raise layer.err(f"round_mode: {'FLOOR' if by_round else 'CEIL'} and ceil_mode: "
                        f"{'true' if p.ceil_mode else 'false'} contradict each other")
    return by_round or by_ceil


def _pool_geometry(layer: Layer, s: list[int]) -> dict:
    p = layer.param("pooling_param")
    if len(s) != 4:
        raise layer.err(f"Caffe pools 4-D blobs only, got shape {s}")
    H, W = s[2], s[3]
    if p.global_pooling:
        if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
            raise layer.err("with global_pooling the kernel size cannot be given")
        kh, kw = H, W
    else:
        has_size = p.HasField("kernel_size")
        has_hw = p.HasField("kernel_h") and p.HasField("kernel_w")
        if has_size == has_hw:
            raise layer.err("give kernel_size OR kernel_h and kernel_w")
        kh, kw = (p.kernel_size, p.kernel_size) if has_size else (p.kernel_h, p.kernel_w)
    ph, pw = _pool_pair(layer, p, "pad")
    sh, sw = _pool_pair(layer, p, "stride")
    if kh <= 0 or kw <= 0:
        raise layer.err("kernel size must be positive")
    if sh <= 0 or sw <= 0:
        raise layer.err("stride must be positive")
    if p.global_pooling and (ph or pw or sh != 1 or sw != 1):
        raise layer.err("with global_pooling only pad = 0 and stride = 1 are allowed")
    if (ph or pw) and (ph >= kh or pw >= kw):
        raise layer.err(f"pad ({ph}, {pw}) must be smaller than the kernel ({kh}, {kw})")

    floor = _pool_floor(layer, p)

    def out_size(n: int, k: int, pad: int, st: int) -> int:
        q = (n + 2 * pad - k) / st
        o = (math.floor(q) if floor else math.ceil(q)) + 1
        return int(o)

    ho, wo = out_size(H, kh, ph, sh), out_size(W, kw, pw, sw)
    if ph or pw:  # Caffe: the last window must start inside the image or its left padding
        if (ho - 1) * sh >= H + ph:
            ho -= 1
        if (wo - 1) * sw >= W + pw:
            wo -= 1
    if ho <= 0 or wo <= 0:
        raise layer.err(f"kernel ({kh}, {kw}) is larger than the padded input {s}")
    return dict(k=[int(kh), int(kw)], pad=[int(ph), int(pw)], stride=[int(sh), int(sw)], out=[ho, wo],
                method=int(p.pool), global_=bool(p.global_pooling), size=[H, W])




def _check(layer: Layer):
    if layer.param("pooling_param").pool == STOCHASTIC:
        return "STOCHASTIC pooling (its test-time output is a probability-weighted average)"
    return None


@caffe_layer("Pooling", check=_check)
def pooling(c: LayerCtx) -> list[list[int]]:
    s = c.shapes[0]
    geo = _pool_geometry(c.layer, s)
    method = geo["method"]
    if method == STOCHASTIC:
        raise c.layer.unsupported("STOCHASTIC pooling (its test-time output is a probability-weighted average)")
    N, C = s[0], s[1]
    k, p, st, out, size = geo["k"], geo["pad"], geo["stride"], geo["out"], geo["size"]
    if geo["global_"]:
        c.op("GlobalMaxPool" if method == 0 else "GlobalAveragePool", c.xs[0])
        return [[N, C, 1, 1]]
    for i in range(2):
        if (out[i] - 1) * st[i] - p[i] >= size[i]:
            raise c.layer.unsupported(
                f"stride {st[i]} > kernel {k[i]} without padding leaves output windows wholly outside the input "
                "(Caffe fills them with -FLT_MAX or 0)")
    # end padding so that ONNX (floor rounding) yields exactly Caffe's output size
    end = [max(0, (out[i] - 1) * st[i] + k[i] - p[i] - size[i]) for i in range(2)]
    if method == 0:
        pads = p + end
        _check_pool_size(c.layer, size, k, pads, st, out)
        c.op("MaxPool", c.xs[0], kernel_shape=k, strides=st, pads=pads)
        return [[N, C, *out]]
    # AVE: Caffe divides by the window clipped to [-pad, size + pad): padding counts, beyond it not.
    if p == [0, 0]:
        pads = [0, 0] + end
        _check_pool_size(c.layer, size, k, pads, st, out)
        c.op("AveragePool", c.xs[0], kernel_shape=k, strides=st, pads=pads, count_include_pad=0)
    elif all(end[i] <= p[i] for i in range(2)):
        pads = p + end  # every window lies inside [-pad, size + pad): the divisor is always kh*kw
        _check_pool_size(c.layer, size, k, pads, st, out)
        c.op("AveragePool", c.xs[0], kernel_shape=k, strides=st, pads=pads, count_include_pad=1)
    else:
        # zero-pad explicitly (those zeros count), then exclude whatever lies beyond
        padded = c.op("Pad", c.xs[0], c.ints("pads", [0, 0, p[0], p[1], 0, 0, p[0], p[1]]), tag="pad",
                      mode="constant")
        psize = [size[i] + 2 * p[i] for i in range(2)]
        end2 = [max(0, (out[i] - 1) * st[i] + k[i] - psize[i]) for i in range(2)]
        pads = [0, 0] + end2
        _check_pool_size(c.layer, psize, k, pads, st, out)
        c.op("AveragePool", padded, kernel_shape=k, strides=st, pads=pads, count_include_pad=0)
    return [[N, C, *out]]


def _check_pool_size(layer, size, k, pads, st, out) -> None:
    for i in range(2):
        got = (size[i] + pads[i] + pads[i + 2] - k[i]) // st[i] + 1
        if got != out[i] or pads[i] >= k[i] or pads[i + 2] >= k[i]:  # pragma: no cover - our invariant
            raise AssertionError(f"pooling {layer.name}: ONNX size {got} != Caffe size {out[i]} (pads {pads})")


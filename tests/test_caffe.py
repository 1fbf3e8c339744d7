"""Caffe -> ONNX converter: numerical agreement with an independent float64 Caffe reference.

Everything needed to judge the converter is written here, separately from it:

* a tiny reader for protobuf text format (prototxt -> nested dicts), independent of the converter's
  protobuf schema;
* a protobuf *wire* encoder that writes ``.caffemodel`` files byte by byte from Caffe's field
  numbers (V2 ``layer``/``shape`` and V1 ``layers``/legacy 4-D dims);
* a float64 numpy implementation of Caffe's TEST-phase layer semantics, written from Caffe's C++
  (pooling rounding and AVE divisor, LRN both regions, grouped/dilated conv, ...).

The reference creates its own random weights, the test encodes them into a caffemodel, the converter
reads that back, and ONNX Runtime's output must match the reference with relative L2 <= 1e-5 on
every blob the ONNX graph exposes.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from lrponnx.converters.caffe import CaffeConversionWarning, convert
from lrponnx.converters.caffe import cli as caffe_cli
from lrponnx.errors import InvalidModelError, UnsupportedModelError

FIXTURES = Path(__file__).resolve().parent / "caffe_fixtures"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CAFFE = SHARED / "caffe"
TOL = 1e-5
# skip/guess notices are asserted explicitly where they matter; elsewhere they are noise
pytestmark = pytest.mark.filterwarnings("ignore::lrponnx.converters.caffe.CaffeConversionWarning")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not available: {path} is missing (the ../shared/data folder holds public "
                    "Caffe models and CIFAR-10 images that are not part of the repository)")
    return path


# =============================================================================================
# 1. protobuf text format, read independently of the converter's schema
# =============================================================================================

_TOK = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{}:\[\],;]|[^\s{}:\[\],;#"\']+')


def parse_text(text: str) -> dict:
    toks = [t for t in _TOK.findall(text) if t.strip() and not t.startswith("#")]
    pos = 0

    def scalar(tok: str):
        if tok[0] in "\"'":
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
        if tok in ("true", "True"):
            return True
        if tok in ("false", "False"):
            return False
        try:
            return int(tok)
        except ValueError:
            pass
        try:
            return float(tok)
        except ValueError:
            return tok  # an enum identifier

    def body(end: str | None) -> dict:
        nonlocal pos
        d: dict = {}
        while pos < len(toks) and toks[pos] != end:
            name = toks[pos]
            pos += 1
            if toks[pos] == ":":
                pos += 1
            if toks[pos] in ("{", "<"):
                pos += 1
                val = body("}")
                pos += 1
            else:
                val = scalar(toks[pos])
                pos += 1
            d.setdefault(name, []).append(val)
            if pos < len(toks) and toks[pos] in (",", ";"):
                pos += 1
        return d

    return body(None)


def g1(d: dict | None, key: str, default=None):
    if not d or key not in d:
        return default
    return d[key][0]


def gl(d: dict | None, key: str) -> list:
    return list(d.get(key, [])) if d else []


V1_TYPES = {  # V1 enum name -> (V2 name, enum number)
    "CONVOLUTION": ("Convolution", 4), "RELU": ("ReLU", 18), "POOLING": ("Pooling", 17), "LRN": ("LRN", 15),
    "SPLIT": ("Split", 22), "CONCAT": ("Concat", 3), "ELTWISE": ("Eltwise", 25), "SIGMOID": ("Sigmoid", 19),
    "DROPOUT": ("Dropout", 6), "INNER_PRODUCT": ("InnerProduct", 14), "TANH": ("TanH", 23),
    "SOFTMAX": ("Softmax", 20), "POWER": ("Power", 26), "FLATTEN": ("Flatten", 8), "DATA": ("Data", 5),
    "SOFTMAX_LOSS": ("SoftmaxWithLoss", 21), "ACCURACY": ("Accuracy", 1),
}


def net_layers(net: dict) -> tuple[list[dict], bool]:
    if "layers" in net:
        out = []
        for L in net["layers"]:
            L = dict(L)
            L["type"] = [V1_TYPES[g1(L, "type")][0]]
            out.append(L)
        return out, True
    return list(net.get("layer", [])), False


# =============================================================================================
# 2. a protobuf wire encoder for .caffemodel files
# =============================================================================================

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _ldp(field: int, parts: list[bytes]) -> list[bytes]:
    """A length-delimited field as a list of parts (no copy of big payloads until the final join)."""
    return [_key(field, 2), _varint(sum(len(p) for p in parts)), *parts]


def _int(field: int, v: int) -> bytes:
    return _key(field, 0) + _varint(v)


def _blob_parts(arr: np.ndarray, legacy: bool) -> list[bytes]:
    arr = np.asarray(arr, dtype="<f4")
    if legacy:  # BlobProto num=1 channels=2 height=3 width=4
        dims = (1,) * (4 - arr.ndim) + arr.shape
        head = b"".join(_int(f, d) for f, d in zip((1, 2, 3, 4), dims))
    else:  # BlobProto.shape = 7 -> BlobShape.dim = 1 (packed)
        head = _ld(7, _ld(1, b"".join(_varint(d) for d in arr.shape)))
    return [head, *_ldp(5, [arr.tobytes()])]  # data = 5, packed floats


def encode_blob(arr: np.ndarray, legacy: bool) -> bytes:
    return b"".join(_blob_parts(arr, legacy))


def encode_caffemodel(entries: list[tuple[str, str | int, list[np.ndarray]]], v1: bool, name: str = "net") -> bytes:
    out = [_ld(1, name.encode())]
    for lname, ltype, blobs in entries:
        if v1:  # V1LayerParameter: name=4, type=5 (enum), blobs=6; NetParameter.layers=2
            body = [_ld(4, lname.encode()), _int(5, int(ltype))]
            for b in blobs:
                body += _ldp(6, _blob_parts(b, True))
            out += _ldp(2, body)
        else:  # LayerParameter: name=1, type=2, blobs=7; NetParameter.layer=100
            body = [_ld(1, lname.encode()), _ld(2, str(ltype).encode())]
            for b in blobs:
                body += _ldp(7, _blob_parts(b, False))
            out += _ldp(100, body)
    return b"".join(out)


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return n, i


def _fields(b: bytes):
    """(field number, wire type, value) of a serialized message; value is bytes for wire type 2."""
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(b, i)
        elif wt == 2:
            n, i = _read_varint(b, i)
            v, i = b[i:i + n], i + n
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        else:
            raise ValueError(f"wire type {wt}")
        yield f, wt, v


def decode_caffemodel(raw: bytes) -> dict[str, list[np.ndarray]]:
    """Layer name -> flat float32 blobs, decoded straight from the wire (V1 and V2 layers)."""
    out = {}
    for f, _, v in _fields(raw):
        if f not in (2, 100):
            continue
        name_f, blob_f = (4, 6) if f == 2 else (1, 7)
        name, blobs = None, []
        for g, _, w in _fields(v):
            if g == name_f:
                name = w.decode()
            elif g == blob_f:
                data = b"".join(x if wt == 2 else x for h, wt, x in _fields(w) if h == 5)
                blobs.append(np.frombuffer(data, "<f4").copy())
        out[name] = blobs
    return out


# =============================================================================================
# 3. the float64 reference of Caffe's layers
# =============================================================================================

def _hw(p: dict | None, rep: str, h: str, w: str, default: int | None) -> list[int]:
    if p and (h in p or w in p):
        return [int(g1(p, h, 0)), int(g1(p, w, 0))]
    vals = gl(p, rep)
    if not vals:
        return [default, default]
    return [int(vals[0])] * 2 if len(vals) == 1 else [int(v) for v in vals]


def ref_conv(p, x, W):
    C = x.shape[1]
    n, grp = int(g1(p, "num_output")), int(g1(p, "group", 1))
    k = _hw(p, "kernel_size", "kernel_h", "kernel_w", None)
    pad = _hw(p, "pad", "pad_h", "pad_w", 0)
    st = _hw(p, "stride", "stride_h", "stride_w", 1)
    dl = gl(p, "dilation")
    d = [1, 1] if not dl else ([int(dl[0])] * 2 if len(dl) == 1 else [int(v) for v in dl])
    bias = g1(p, "bias_term", True)
    shapes = [[n, C // grp, *k]] + ([[n]] if bias else [])
    ws = W(shapes)
    w = ws[0]
    H, Wd = x.shape[2:]
    Ho = (H + 2 * pad[0] - (d[0] * (k[0] - 1) + 1)) // st[0] + 1
    Wo = (Wd + 2 * pad[1] - (d[1] * (k[1] - 1) + 1)) // st[1] + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    y = np.zeros((x.shape[0], n, Ho, Wo))
    cg, ng = C // grp, n // grp
    for g in range(grp):
        for ky in range(k[0]):
            for kx in range(k[1]):
                patch = xp[:, g * cg:(g + 1) * cg,
                           ky * d[0]: ky * d[0] + st[0] * (Ho - 1) + 1: st[0],
                           kx * d[1]: kx * d[1] + st[1] * (Wo - 1) + 1: st[1]]
                y[:, g * ng:(g + 1) * ng] += np.tensordot(
                    w[g * ng:(g + 1) * ng, :, ky, kx], patch, axes=([1], [1])).transpose(1, 0, 2, 3)
    if bias:
        y += ws[1].reshape(1, -1, 1, 1)
    return y


def ref_deconv(p, x, W):
    C = x.shape[1]
    n, grp = int(g1(p, "num_output")), int(g1(p, "group", 1))
    k = _hw(p, "kernel_size", "kernel_h", "kernel_w", None)
    pad = _hw(p, "pad", "pad_h", "pad_w", 0)
    st = _hw(p, "stride", "stride_h", "stride_w", 1)
    bias = g1(p, "bias_term", True)
    ws = W([[C, n // grp, *k]] + ([[n]] if bias else []))
    w = ws[0]
    N, _, H, Wd = x.shape
    full = np.zeros((N, n, st[0] * (H - 1) + k[0], st[1] * (Wd - 1) + k[1]))
    cg, ng = C // grp, n // grp
    for g in range(grp):
        for ky in range(k[0]):
            for kx in range(k[1]):
                contrib = np.einsum("nchw,co->nohw", x[:, g * cg:(g + 1) * cg], w[g * cg:(g + 1) * cg, :, ky, kx])
                full[:, g * ng:(g + 1) * ng, ky: ky + st[0] * (H - 1) + 1: st[0],
                     kx: kx + st[1] * (Wd - 1) + 1: st[1]] += contrib
    Ho, Wo = full.shape[2] - 2 * pad[0], full.shape[3] - 2 * pad[1]
    y = full[:, :, pad[0]:pad[0] + Ho, pad[1]:pad[1] + Wo]
    if bias:
        y = y + ws[1].reshape(1, -1, 1, 1)
    return y


def ref_pool(p, x):
    """Caffe's PoolingLayer (CPU), written after pooling_layer.cpp."""
    N, C, H, Wd = x.shape
    method = g1(p, "pool", "MAX")
    if g1(p, "global_pooling", False):
        kh, kw, ph, pw, sh, sw = H, Wd, 0, 0, 1, 1
    else:
        kh, kw = _hw(p, "kernel_size", "kernel_h", "kernel_w", None) if "kernel_size" in p else \
            (int(g1(p, "kernel_h")), int(g1(p, "kernel_w")))
        if "pad_h" in p or "pad_w" in p:
            ph, pw = int(g1(p, "pad_h", 0)), int(g1(p, "pad_w", 0))
        else:
            ph = pw = int(g1(p, "pad", 0))
        if "stride_h" in p or "stride_w" in p:
            sh, sw = int(g1(p, "stride_h", 1)), int(g1(p, "stride_w", 1))
        else:
            sh = sw = int(g1(p, "stride", 1))
    # BVLC: round_mode: FLOOR; Caffe forks and OpenCV (BVLC PR #3057): ceil_mode: false
    rnd = math.floor if g1(p, "round_mode", "CEIL") == "FLOOR" or g1(p, "ceil_mode", True) is False else math.ceil
    Ho = int(rnd((H + 2 * ph - kh) / sh)) + 1
    Wo = int(rnd((Wd + 2 * pw - kw) / sw)) + 1
    if ph or pw:
        if (Ho - 1) * sh >= H + ph:
            Ho -= 1
        if (Wo - 1) * sw >= Wd + pw:
            Wo -= 1
    y = np.zeros((N, C, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            hs, ws_ = i * sh - ph, j * sw - pw
            if method == "MAX":
                he, we = min(hs + kh, H), min(ws_ + kw, Wd)
                hs, ws_ = max(hs, 0), max(ws_, 0)
                y[:, :, i, j] = x[:, :, hs:he, ws_:we].max(axis=(2, 3))
            else:
                he, we = min(hs + kh, H + ph), min(ws_ + kw, Wd + pw)
                size = (he - hs) * (we - ws_)
                hs, ws_ = max(hs, 0), max(ws_, 0)
                he, we = min(he, H), min(we, Wd)
                y[:, :, i, j] = x[:, :, hs:he, ws_:we].sum(axis=(2, 3)) / size
    return y


def ref_lrn(p, x):
    size = int(g1(p, "local_size", 5))
    alpha, beta, k = float(g1(p, "alpha", 1.0)), float(g1(p, "beta", 0.75)), float(g1(p, "k", 1.0))
    sq = x * x
    if g1(p, "norm_region", "ACROSS_CHANNELS") == "WITHIN_CHANNEL":
        r = (size - 1) // 2
        sp = np.pad(sq, ((0, 0), (0, 0), (r, r), (r, r)))
        H, Wd = x.shape[2:]
        s = sum(sp[:, :, dy:dy + H, dx:dx + Wd] for dy in range(size) for dx in range(size))
        return x * (1.0 + alpha / size ** 2 * s) ** (-beta)
    pre = (size - 1) // 2
    C = x.shape[1]
    scale = np.empty_like(x)
    for c in range(C):
        lo, hi = max(0, c - pre), min(C, c + pre + 1)
        scale[:, c] = k + alpha / size * sq[:, lo:hi].sum(axis=1)
    return x * scale ** (-beta)


def ref_ip(p, x, W):
    n = int(g1(p, "num_output"))
    axis = int(g1(p, "axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    K = int(np.prod(x.shape[axis:]))
    tr = g1(p, "transpose", False)
    bias = g1(p, "bias_term", True)
    ws = W([[K, n] if tr else [n, K]] + ([[n]] if bias else []))
    y = x.reshape(int(np.prod(x.shape[:axis])), K) @ (ws[0] if tr else ws[0].T)
    if bias:
        y = y + ws[1]
    return y.reshape(list(x.shape[:axis]) + [n])


def ref_softmax(p, x):
    axis = int(g1(p, "axis", 1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def ref_eltwise(p, xs):
    op = g1(p, "operation", "SUM")
    if op == "PROD":
        return np.prod(np.stack(xs), axis=0)
    if op == "MAX":
        return np.max(np.stack(xs), axis=0)
    coeff = gl(p, "coeff") or [1.0] * len(xs)
    return sum(float(c) * x for c, x in zip(coeff, xs))


def ref_batchnorm(p, x, W):
    C = x.shape[1]
    mean, var, f = W([[C], [C], [1]])
    s = 0.0 if f[0] == 0 else 1.0 / f[0]
    eps = float(g1(p, "eps", 1e-5))
    sh = [1, C] + [1] * (x.ndim - 2)
    return (x - (mean * s).reshape(sh)) / np.sqrt((var * s).reshape(sh) + eps)


def _param_shape(p, x):
    axis = int(g1(p, "axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    na = int(g1(p, "num_axes", 1))
    end = x.ndim if na == -1 else axis + na
    return axis, list(x.shape[axis:end])


def _bshape(v, axis, ndim):
    return v.reshape(list(v.shape) + [1] * (ndim - axis - v.ndim))


def ref_scale(p, xs, W):
    x = xs[0]
    axis, shp = _param_shape(p, x)
    if len(xs) == 2:
        return x * _bshape(xs[1], axis, x.ndim)
    bias = g1(p, "bias_term", False)
    ws = W([shp] + ([shp] if bias else []))
    y = x * _bshape(ws[0], axis, x.ndim)
    if bias:
        y = y + _bshape(ws[1], axis, x.ndim)
    return y


def ref_bias(p, xs, W):
    x = xs[0]
    axis, shp = _param_shape(p, x)
    if len(xs) == 2:
        return x + _bshape(xs[1], axis, x.ndim)
    return x + _bshape(W([shp])[0], axis, x.ndim)


def ref_reshape(p, x):
    dims = [int(d) for d in gl(g1(p, "shape"), "dim")]
    axis, na = int(g1(p, "axis", 0)), int(g1(p, "num_axes", -1))
    axis = axis + x.ndim + 1 if axis < 0 else axis
    end = x.ndim if na == -1 else axis + na
    new = [x.shape[axis + i] if d == 0 else d for i, d in enumerate(dims)]
    shape = list(x.shape[:axis]) + new + list(x.shape[end:])
    return x.reshape(shape)


def ref_flatten(p, x):
    a, e = int(g1(p, "axis", 1)), int(g1(p, "end_axis", -1))
    a, e = a % x.ndim, e % x.ndim
    return x.reshape(list(x.shape[:a]) + [-1] + list(x.shape[e + 1:]))


def ref_forward(net: dict, inputs: dict[str, np.ndarray], weights: dict[str, list[np.ndarray]],
                rng: np.random.Generator | None = None, gain: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Run the net in float64. Weights missing from ``weights`` are created with ``rng`` (float32 values);
    ``gain`` scales the He-initialised weights of the named layers."""
    gain = gain or {}
    blobs = {k: np.asarray(v, np.float64) for k, v in inputs.items()}
    layers, _ = net_layers(net)
    for L in layers:
        t, name = g1(L, "type"), g1(L, "name")
        if t in ("Input", "Data", "Accuracy") or t.endswith("Loss"):
            continue
        inc = gl(L, "include")
        if inc and not any(g1(r, "phase", "TEST") == "TEST" for r in inc):
            continue

        def W(shapes, name=name, t=t):
            if name not in weights:
                arrs = []
                for j, s in enumerate(shapes):
                    if t == "BatchNorm":
                        a = [rng.normal(0, 0.5, s), rng.uniform(0.5, 2.0, s), np.array([2.0])][j]
                    elif t in ("Convolution", "Deconvolution", "InnerProduct") and j == 0:
                        fan = int(np.prod(s[1:])) if t != "InnerProduct" else int(min(s))
                        a = rng.standard_normal(s, dtype=np.float32)
                        a *= np.float32(gain.get(name, 1.0) * math.sqrt(2.0 / fan))
                    elif t == "PReLU":
                        a = rng.uniform(0.1, 0.4, s)
                    elif t == "Scale" and j == 0:
                        a = rng.uniform(0.5, 1.5, s)
                    else:
                        a = rng.normal(0, 0.1, s)
                    arrs.append(np.asarray(a, np.float32))
                weights[name] = arrs
            return [np.asarray(a, np.float64).reshape(s) for a, s in zip(weights[name], shapes)]

        xs = [blobs[b] for b in gl(L, "bottom")]
        tops = gl(L, "top")
        x = xs[0] if xs else None
        P = lambda key: g1(L, key, {})  # noqa: E731
        if t == "Convolution":
            y = ref_conv(P("convolution_param"), x, W)
        elif t == "Deconvolution":
            y = ref_deconv(P("convolution_param"), x, W)
        elif t == "Pooling":
            y = ref_pool(P("pooling_param"), x)
        elif t == "LRN":
            y = ref_lrn(P("lrn_param"), x)
        elif t == "InnerProduct":
            y = ref_ip(P("inner_product_param"), x, W)
        elif t == "ReLU":
            s = float(g1(P("relu_param"), "negative_slope", 0.0))
            y = np.where(x > 0, x, s * x)
        elif t == "PReLU":
            C = x.shape[1]
            sl = W([[1] if g1(P("prelu_param"), "channel_shared", False) else [C]])[0]
            sl = sl.reshape([1, -1] + [1] * (x.ndim - 2))
            y = np.maximum(x, 0) + sl * np.minimum(x, 0)
        elif t == "ELU":
            a = float(g1(P("elu_param"), "alpha", 1.0))
            y = np.where(x > 0, x, a * (np.exp(np.minimum(x, 0)) - 1))
        elif t == "Sigmoid":
            y = 1 / (1 + np.exp(-x))
        elif t == "TanH":
            y = np.tanh(x)
        elif t == "AbsVal":
            y = np.abs(x)
        elif t == "BNLL":
            y = np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0))))
        elif t == "Power":
            q = P("power_param")
            y = (float(g1(q, "shift", 0.0)) + float(g1(q, "scale", 1.0)) * x) ** float(g1(q, "power", 1.0))
        elif t == "Dropout":
            y = x.copy()
        elif t == "Softmax":
            y = ref_softmax(P("softmax_param"), x)
        elif t == "Concat":
            q = P("concat_param")
            y = np.concatenate(xs, axis=int(g1(q, "concat_dim", g1(q, "axis", 1))))
        elif t == "Eltwise":
            y = ref_eltwise(P("eltwise_param"), xs)
        elif t == "Flatten":
            y = ref_flatten(P("flatten_param"), x)
        elif t == "Reshape":
            y = ref_reshape(P("reshape_param"), x)
        elif t == "BatchNorm":
            y = ref_batchnorm(P("batch_norm_param"), x, W)
        elif t == "Scale":
            y = ref_scale(P("scale_param"), xs, W)
        elif t == "Bias":
            y = ref_bias(P("bias_param"), xs, W)
        elif t == "Split":
            for top in tops:
                blobs[top] = x.copy()
            continue
        elif t == "Crop":  # crop_layer.cpp: axes >= axis take bottom 1's size, from offset
            q = P("crop_param")
            axis = int(g1(q, "axis", 2)) % x.ndim
            offs = [int(v) for v in gl(q, "offset")]
            idx = [slice(None)] * axis
            for i in range(axis, x.ndim):
                o = 0 if not offs else offs[0] if len(offs) == 1 else offs[i - axis]
                idx.append(slice(o, o + xs[1].shape[i]))
            y = x[tuple(idx)]
        elif t == "Slice":  # slice_layer.cpp: at the slice_points, else equal parts
            q = P("slice_param")
            axis = int(g1(q, "slice_dim", g1(q, "axis", 1))) % x.ndim
            points = [int(v) for v in gl(q, "slice_point")]
            for top, part in zip(tops, np.split(x, points or len(tops), axis=axis)):
                blobs[top] = part
            continue
        else:
            raise NotImplementedError(t)
        blobs[tops[0]] = y
    return blobs


# =============================================================================================
# helpers: build a caffemodel from reference weights, run ONNX Runtime with every blob exposed
# =============================================================================================

def write_caffemodel(net: dict, weights: dict, path: Path) -> Path:
    layers, v1 = net_layers(net)
    raw_types = {g1(L, "name"): g1(L, "type") for L in (net.get("layers") or [])}
    entries = []
    for L in layers:  # like Caffe's Net::ToProto: every layer, parameter-free ones without blobs
        name = g1(L, "name")
        ltype = V1_TYPES[raw_types[name]][1] if v1 else g1(L, "type")
        entries.append((name, ltype, weights.get(name, [])))
    path.write_bytes(encode_caffemodel(entries, v1))
    return path


def session(model: onnx.ModelProto, extra_outputs=()) -> ort.InferenceSession:
    """An ORT session; ``extra_outputs`` are appended to ``model``'s outputs (in place, to save a copy)."""
    m = model
    produced = {o for n in m.graph.node for o in n.output}
    have = {o.name for o in m.graph.output}
    for name in extra_outputs:
        if name in produced and name not in have:
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


MAX_ERR: dict[str, float] = {}  # test name -> worst relative L2 seen (printed with -s)


def compare_all(model, ref: dict, feeds: dict, label: str, blobs=None) -> dict[str, float]:
    names = list(blobs) if blobs is not None else list(ref)
    sess = session(model, names)
    outs = [o.name for o in sess.get_outputs()]
    got = dict(zip(outs, sess.run(None, {k: v.astype(np.float32) for k, v in feeds.items()})))
    errs = {}
    for name in names:
        if name in got and name not in feeds:
            assert got[name].shape == ref[name].shape, (name, got[name].shape, ref[name].shape)
            errs[name] = rel_l2(got[name], ref[name])
    assert errs, "no blob could be compared"
    worst = max(errs, key=errs.get)
    MAX_ERR[label] = errs[worst]
    print(f"\n{label}: {len(errs)} blobs compared, worst {worst!r} rel L2 {errs[worst]:.2e}")
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{label}: blobs differ from the Caffe reference: {bad}"
    return errs


def run_fixture(tmp_path, fname: str, shape_override=None, batch=2, seed=0, weights=None, **kw):
    text = (FIXTURES / fname).read_text()
    net = parse_text(text)
    rng = np.random.default_rng(seed)
    if "layers" in net or "input" in net:
        in_name = g1(net, "input")
        dims = [int(d) for d in (gl(net, "input_dim") or gl(g1(net, "input_shape"), "dim"))]
    else:
        L0 = net["layer"][0]
        in_name = g1(L0, "top")
        dims = [int(d) for d in gl(g1(g1(L0, "input_param"), "shape"), "dim")]
    if shape_override:
        dims = list(shape_override)
    dims[0] = batch
    x = rng.uniform(-2, 2, dims).astype(np.float32)
    weights = dict(weights or {})
    ref = ref_forward(net, {in_name: x}, weights, rng)
    cm = write_caffemodel(net, weights, tmp_path / (Path(fname).stem + ".caffemodel"))
    shp = None if shape_override is None else "N," + ",".join(map(str, dims[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaffeConversionWarning)
        model = convert(FIXTURES / fname, cm, input_shape=shp, **kw)
    return model, ref, {in_name: x}


# =============================================================================================
# tests of the reference itself (against values worked out by hand from Caffe's code)
# =============================================================================================

def test_reference_pooling_matches_hand_computed_caffe_values():
    x = np.arange(25, dtype=np.float64).reshape(1, 1, 5, 5)
    # AVE k2 s2 p1 on 5x5: Caffe gives 3x3 (ceil(5/2)+1 = 4, last window starts at 6 >= 5+1 -> 3)
    y = ref_pool({"pool": ["AVE"], "kernel_size": [2], "stride": [2], "pad": [1]}, x)
    assert y.shape == (1, 1, 3, 3)
    assert y[0, 0, 0, 0] == pytest.approx(0 / 4)          # window rows/cols -1..0: one pixel, divisor 4
    assert y[0, 0, 2, 2] == pytest.approx((18 + 19 + 23 + 24) / 4)
    # AVE k3 s2 p0 on 6x6: ceil(3/2)+1 = 3; last window covers rows 4..5 only, divisor 2*3 (no padding)
    x6 = np.ones((1, 1, 6, 6))
    y = ref_pool({"pool": ["AVE"], "kernel_size": [3], "stride": [2]}, x6)
    assert y.shape == (1, 1, 3, 3) and np.allclose(y, 1.0)
    # AVE k3 s2 p1 on 6x6: windows end at 7 > 6 + 1? last start 2*3-1 = 5, end 8 clipped to 7: divisor 2*?
    y = ref_pool({"pool": ["AVE"], "kernel_size": [3], "stride": [2], "pad": [1]}, x6)
    assert y.shape == (1, 1, 4, 4)
    assert y[0, 0, 3, 3] == pytest.approx(1 / 4)  # one real pixel, window clipped to 2x2 (padding counts)
    assert y[0, 0, 0, 0] == pytest.approx(4 / 9)


def test_reference_lrn_matches_formula():
    x = np.arange(1, 13, dtype=np.float64).reshape(1, 3, 2, 2)
    y = ref_lrn({"local_size": [3], "alpha": [0.3], "beta": [0.5], "k": [2.0]}, x)
    c = 0  # channels 0 and 1 are in the window of channel 0 (zero padded)
    s = 2.0 + 0.3 / 3 * (x[0, 0, 0, 0] ** 2 + x[0, 1, 0, 0] ** 2)
    assert y[0, c, 0, 0] == pytest.approx(x[0, 0, 0, 0] * s ** -0.5)
    y = ref_lrn({"local_size": [3], "alpha": [0.3], "beta": [0.5], "norm_region": ["WITHIN_CHANNEL"]}, x)
    s = 1.0 + 0.3 / 9 * (x[0, 1] ** 2).sum()  # 2x2 image: every pixel's 3x3 window covers all of it
    assert y[0, 1, 1, 0] == pytest.approx(x[0, 1, 1, 0] * s ** -0.5)


def test_wire_encoder_roundtrips_through_protobuf_schema():
    from lrponnx.converters.caffe import proto
    raw = encode_caffemodel([("c", "Convolution", [np.ones((2, 3), np.float32)])], v1=False)
    net = proto.parse_binary_net(raw)
    assert net.layer[0].name == "c" and list(net.layer[0].blobs[0].shape.dim) == [2, 3]
    raw = encode_caffemodel([("c", 4, [np.ones((2, 3), np.float32)])], v1=True)
    net = proto.parse_binary_net(raw)
    b = net.layers[0].blobs[0]
    assert net.layers[0].type == 4 and (b.num, b.channels, b.height, b.width) == (1, 1, 2, 3)


# =============================================================================================
# small hand-written nets: every layer and edge case
# =============================================================================================

@pytest.mark.parametrize("hw", [(13, 13), (12, 12), (8, 11), (7, 10)])
def test_pooling_edge_cases_match_caffe(tmp_path, hw):
    model, ref, feeds = run_fixture(tmp_path, "pooling.prototxt", shape_override=[1, 3, *hw])
    errs = compare_all(model, ref, feeds, f"pooling {hw}")
    assert len(errs) == 22
    # ceil and floor rounding differ for some of these sizes: the converter must follow Caffe's ceil
    assert ref["max_k3s2"].shape != ref["max_floor"].shape or hw[0] % 2 == 1


@pytest.mark.parametrize("hw", [(13, 13), (12, 12), (8, 11)])
def test_ceil_mode_false_pools_with_floor_rounding(tmp_path, hw):
    """``ceil_mode: false`` (Caffe forks, OpenCV's caffe.proto) was dropped and pooled with ceil."""
    model, ref, feeds = run_fixture(tmp_path, "ceil_mode.prototxt", shape_override=[1, 3, *hw])
    compare_all(model, ref, feeds, f"ceil_mode {hw}")
    H, W = hw
    assert ref["max_k2s2_floor"].shape[2:] == ((H - 2) // 2 + 1, (W - 2) // 2 + 1)
    assert ref["max_k2s2_ceil"].shape[2:] == (-(-(H - 2) // 2) + 1, -(-(W - 2) // 2) + 1)


def test_ceil_mode_false_gives_the_authors_56x56(tmp_path):
    """The issue's case: a ResNet stem pool (k3 s2 p1) on 112x112 is 56x56 with ceil_mode: false;
    Caffe's default ceil rounding gives 57x57, which is what dropping the field produced."""
    def out(extra):
        p = tmp_path / "stem.prototxt"
        p.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 64 dim: 112 '
                     'dim: 112 } } }\nlayer { name: "pool1" type: "Pooling" bottom: "data" top: "pool1" '
                     f'pooling_param {{ pool: MAX kernel_size: 3 stride: 2 pad: 1 {extra} }} }}\n')
        return [d.dim_value for d in convert(p, random_weights=0).graph.output[0].type.tensor_type.shape.dim[2:]]
    assert out("ceil_mode: false") == out("round_mode: FLOOR") == [56, 56]
    assert out("") == out("ceil_mode: true") == [57, 57]


def test_round_mode_and_ceil_mode_are_one_setting(tmp_path):
    text = (FIXTURES / "ceil_mode.prototxt").read_text()
    bvlc = tmp_path / "round.prototxt"
    bvlc.write_text(text.replace("ceil_mode: false", "round_mode: FLOOR").replace("ceil_mode: true", "round_mode: CEIL"))
    a, b = convert(FIXTURES / "ceil_mode.prototxt", random_weights=0), convert(bvlc, random_weights=0)
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert a.graph.output == b.graph.output
    both = tmp_path / "both.prototxt"
    both.write_text(text.replace("MAX kernel_size: 2 stride: 2 ceil_mode: false",
                                 "MAX kernel_size: 2 stride: 2 ceil_mode: false round_mode: CEIL"))
    with pytest.raises(InvalidModelError, match=r"'max_k2s2_floor' \(Pooling\): round_mode: CEIL and "
                                                r"ceil_mode: false contradict"):
        convert(both, random_weights=0)
    agree = tmp_path / "agree.prototxt"
    agree.write_text(text.replace("ceil_mode: false", "ceil_mode: false round_mode: FLOOR"))
    assert convert(agree, random_weights=0).graph.output == a.graph.output


@pytest.mark.parametrize("hw", [(20, 20), (22, 18)])
def test_crop_and_slice_match_caffe(tmp_path, hw):
    model, ref, feeds = run_fixture(tmp_path, "crop_slice.prototxt", shape_override=[1, 3, *hw])
    errs = compare_all(model, ref, feeds, f"crop_slice {hw}")
    assert {"crop", "crop_c", "s0", "s1", "s2", "h0", "h1", "d0", "d1", "fc"} <= set(errs)
    assert ref["crop"].shape[2:] == hw and ref["s1"].shape[1] == 2 and ref["d0"].shape[1] == 5


def test_crop_and_slice_errors_name_the_layer(tmp_path):
    def net(body):
        return _tiny(tmp_path, body)
    cases = [
        ('layer { name: "c" type: "Crop" bottom: "data" bottom: "data" top: "c" crop_param { offset: 1 } }',
         InvalidModelError, r"'c' \(Crop\): axis 2: offset 1 \+ the reference's size 8 exceed"),
        ('layer { name: "c" type: "Crop" bottom: "data" bottom: "data" top: "c" crop_param { offset: 0 offset: 0 '
         'offset: 0 } }', InvalidModelError, r"'c' \(Crop\): offset must be given once or once per cropped axis \(2\)"),
        ('layer { name: "c" type: "Crop" bottom: "data" top: "c" }', UnsupportedModelError,
         r"layer 'c' \(Crop\): expects two bottoms"),
        ('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { slice_point: 1 slice_point: 2 } }',
         InvalidModelError, r"'s' \(Slice\): 2 slice_point\(s\) for 2 tops"),
        ('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { slice_point: 3 axis: 1 } }',
         InvalidModelError, r"'s' \(Slice\): slice_points \[3\] must increase strictly within \(0, 3\)"),
        ('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" }', InvalidModelError,
         r"'s' \(Slice\): axis 1 of size 3 does not split into 2 equal parts"),
        ('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { axis: 0 } }',
         UnsupportedModelError, r"'s' \(Slice\): slices the batch axis; give --input-shape"),
        ('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "a" slice_param { axis: 2 } }',
         UnsupportedModelError, r"'s' \(Slice\): names the same top twice"),
    ]
    for body, err, pattern in cases:
        with pytest.raises(err, match=pattern):
            convert(net(body), random_weights=0)
    # a fixed batch makes the batch-axis slice convertible
    m = convert(net('layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { axis: 0 } }'),
                random_weights=0, input_shape="2,3,8,8")
    a, b = session(m).run(["a", "b"], {"data": np.arange(384, dtype=np.float32).reshape(2, 3, 8, 8)})
    assert a.shape == b.shape == (1, 3, 8, 8) and b.min() == 192


def test_unknown_prototxt_fields_are_refused_by_name_all_at_once(tmp_path):
    p = _tiny(tmp_path, 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "c" param { lr_mult: 1 } '
                        'convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "msra" } '
                        'engine: CUDNN dilaton: 2 } }\n'
                        'layer { name: "pool1" type: "Pooling" bottom: "c" top: "p" pooling_param { pool: MAX '
                        'kernel_size: 2 stride: 2 ceil_mod: false } }\n'
                        'layer { name: "relu" type: "ReLU" bottom: "p" top: "p" relu_param { negative_slope: 0.1 } '
                        'fused: true [my.ext] { a: 1 } }\n')
    with pytest.raises(UnsupportedModelError) as ei:
        convert(p, random_weights=0)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("3 Caffe layer(s) cannot be converted: ")
    assert "layer 'conv1' (Convolution): unknown field convolution_param.dilaton (line 2)" in msg
    assert "layer 'pool1' (Pooling): unknown field pooling_param.ceil_mod (line 3)" in msg
    assert "layer 'relu' (ReLU): unknown fields fused (line 4), [my.ext] (line 4)" in msg
    # outside any layer
    q = tmp_path / "top.prototxt"
    q.write_text("force_backward: true\nprofile: 1\n" + p.read_text().split("\n", 1)[0] + "\n")
    with pytest.raises(InvalidModelError, match=r"top.prototxt: unknown net-level field profile \(line 2\)"):
        convert(q, random_weights=0)
    # layers that are not converted (TRAIN phase, data and loss layers) are not judged by their fields
    r = _tiny(tmp_path, 'layer { name: "d" type: "Data" top: "x" data_param { source: "db" backend: LMDB } '
                        'include { phase: TRAIN } }\n'
                        'layer { name: "drop" type: "Dropout" bottom: "data" top: "data" include { phase: TRAIN } '
                        'dropout_param { weird: 1 } }\n'
                        'layer { name: "l" type: "SoftmaxWithLoss" bottom: "data" bottom: "data" top: "l" '
                        'loss_param { normalize: false } }\n'
                        'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    assert [o.name for o in convert(r, random_weights=0).graph.output] == ["r"]


def test_unknown_field_scan_agrees_with_protobufs_strict_parser():
    """Mutated field names in the fixtures (and public nets): whenever protobuf's lenient parse
    succeeds, the scan finds no unknown field exactly when the strict parser accepts the text,
    and it names the mutated field. So the converter never drops a field the scan missed."""
    import random

    from google.protobuf import text_format

    from lrponnx.converters.caffe import proto
    rng = random.Random(13)
    files = sorted(FIXTURES.glob("*.prototxt")) + sorted((SHARED / "caffe_public").glob("*.prototxt"))
    texts = [f.read_text(errors="replace") for f in files]
    texts = [t for t in texts if not proto.scan_unknown_fields(t)]  # unsupported.prototxt has its own
    known = sorted({f.name for m in proto._POOL.FindFileByName(proto.NetParameter.DESCRIPTOR.file.name)
                    .message_types_by_name.values() for f in m.fields})
    checked = 0
    for _ in range(300):
        text = rng.choice(texts)
        names = list(re.finditer(r"\b([a-z_][a-z0-9_]*)(?=\s*[:{<])", text))
        m = rng.choice(names)
        new = rng.choice([m.group(1) + "x", rng.choice(known), "ceil_mode", "offsets"])
        mutated = text[:m.start()] + new + text[m.end():]
        try:
            proto.parse_prototxt(mutated)
        except proto.ProtoError:
            continue
        try:
            text_format.Parse(mutated, proto.NetParameter())
            strict_ok = True
        except text_format.ParseError:
            strict_ok = False
        unknown = proto.scan_unknown_fields(mutated)
        assert strict_ok == (not unknown), (new, m.group(1), unknown)
        if unknown:
            assert any(u.path.split(".")[-1] == new for u in unknown), (new, unknown)
        checked += 1
    assert checked > 150


def test_unknown_fields_are_refused_even_if_the_scan_fails(tmp_path, monkeypatch):
    """Fail closed: should the walker break on some text, protobuf's strict parser decides."""
    from lrponnx.converters.caffe import proto

    def broken(text):
        raise IndexError("walker bug")
    monkeypatch.setattr(proto, "scan_unknown_fields", broken)
    p = _tiny(tmp_path, 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" relu_param { slope: 1 } }\n')
    with pytest.raises(InvalidModelError, match='no field named "slope"'):
        convert(p, random_weights=0)
    ok = _tiny(tmp_path, 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    assert [o.name for o in convert(ok, random_weights=0).graph.output] == ["r"]


def test_training_only_fields_of_real_nets_parse(tmp_path):
    """V1 and V2 training fields (blobs_lr, weight_decay, param, fillers, engine) are known, not unknown."""
    from lrponnx.converters.caffe import proto
    v1 = ('name: "v1" input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
          'layers { name: "c" type: CONVOLUTION bottom: "data" top: "c" blobs_lr: 1 blobs_lr: 2 weight_decay: 1 '
          'weight_decay: 0 convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.01 } '
          'bias_filler { type: "constant" } } }\n'
          'layers { name: "s" type: SLICE bottom: "c" top: "a" top: "b" slice_param { slice_dim: 1 } }\n')
    assert proto.scan_unknown_fields(v1) == []
    p = tmp_path / "v1.prototxt"
    p.write_text(v1)
    m = convert(p, random_weights=0)
    assert [o.name for o in m.graph.output] == ["a", "b"]
    v2 = ('layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'
          'layer { name: "bn" type: "BatchNorm" bottom: "d" top: "d" param { lr_mult: 0 decay_mult: 0 } '
          'batch_norm_param { use_global_stats: true moving_average_fraction: 0.9 } propagate_down: true }\n'
          'layer { name: "sc" type: "Scale" bottom: "d" top: "d" scale_param { bias_term: true filler { value: 1 } '
          'bias_filler { value: 0 } } loss_weight: 0 }\n'
          'layer { name: "p" type: "Pooling" bottom: "d" top: "p" pooling_param { pool: MAX kernel_size: 2 '
          'engine: CAFFE round_mode: FLOOR } }\n')
    assert proto.scan_unknown_fields(v2) == []


def test_caffemodel_blob_fields_are_read_or_refused(tmp_path):
    from lrponnx.converters.caffe import proto
    from lrponnx.converters.caffe.convert import parse_caffemodel
    def model(**blob):
        net = proto.NetParameter()
        b = net.layer.add(name="c", type="Convolution").blobs.add(**blob)
        return net, b
    net, b = model(raw_data_type=2, raw_data=np.array([1.5, -2, 65504], "<f2").tobytes())
    b.shape.dim.extend([3])
    got = parse_caffemodel(net.SerializeToString(), "w.caffemodel")["c"][0]
    assert got.data.tolist() == [1.5, -2.0, 65504.0] and got.data.dtype == np.float32
    net, b = model(raw_data_type=3, raw_data=b"\0" * 8)
    with pytest.raises(InvalidModelError, match=r"layer 'c' \(Convolution\) blob 0: raw_data of type INT"):
        parse_caffemodel(net.SerializeToString(), "w.caffemodel")
    net, b = model(raw_data_type=1, raw_data=b"\0" * 6)
    with pytest.raises(InvalidModelError, match="6 bytes, not a whole number of 4-byte values"):
        parse_caffemodel(net.SerializeToString(), "w.caffemodel")
    net, b = model(data=[1.0, 2.0])
    raw = net.SerializeToString()
    # append field 15 (varint) inside the blob: unknown to BlobProto -> refused by number
    extra = proto.BlobProto(data=[1.0, 2.0]).SerializeToString() + bytes([15 << 3, 1])
    lp = proto.LayerParameter(name="c", type="Convolution")
    lp.blobs.add().ParseFromString(extra)
    bad = proto.NetParameter()
    bad.layer.append(lp)
    with pytest.raises(InvalidModelError, match=r"layer 'c' \(Convolution\) blob 0 has field number\(s\) 15"):
        parse_caffemodel(bad.SerializeToString(), "w.caffemodel")
    # gradients (diff, field 6) are not forward values: ignored
    diff = proto.BlobProto(data=[1.0, 2.0], shape=proto.BlobShape(dim=[2])).SerializeToString() + \
        bytes([6 << 3 | 2, 4]) + np.float32(3).tobytes()
    lp = proto.LayerParameter(name="c", type="Convolution")
    lp.blobs.add().ParseFromString(diff)
    ok = proto.NetParameter()
    ok.layer.append(lp)
    assert parse_caffemodel(ok.SerializeToString(), "w")["c"][0].data.tolist() == [1.0, 2.0] and raw
    # a V0 caffemodel: layers { layer { name, blobs } } (V1LayerParameter field 1)
    v0 = bytes([2 << 3 | 2, 5, 1 << 3 | 2, 3, 10, 1, 99])
    with pytest.raises(InvalidModelError, match="V0-format caffemodel"):
        parse_caffemodel(v0, "old.caffemodel")


def test_random_caffemodel_holds_the_seeds_weights(tmp_path):
    from lrponnx.converters.caffe.convert import random_caffemodel
    proto_path = FIXTURES / "layers_a.prototxt"
    cm = tmp_path / "r.caffemodel"
    cm.write_bytes(random_caffemodel(proto_path, 7))
    a, b = convert(proto_path, cm), convert(proto_path, random_weights=7)
    wa = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    wb = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert decode_caffemodel(cm.read_bytes())  # our own wire decoder reads it too


def test_pooling_ave_uses_plain_onnx_ops(tmp_path):
    model, _, _ = run_fixture(tmp_path, "pooling.prototxt", shape_override=[1, 3, 12, 12])
    ops = {n.op_type for n in model.graph.node}
    assert ops <= {"MaxPool", "AveragePool", "Pad", "GlobalMaxPool", "GlobalAveragePool"}
    names = {n.name for n in model.graph.node}
    assert "ave_k4s3p1" in names and "gmax" in names


def test_conv_spellings_groups_dilation_deconv(tmp_path):
    model, ref, feeds = run_fixture(tmp_path, "conv.prototxt")
    errs = compare_all(model, ref, feeds, "conv")
    assert {"conv_a", "conv_b", "conv_c", "conv_d", "conv_e", "deconv", "deconv_g"} <= set(errs)
    conv_b = next(n for n in model.graph.node if n.name == "conv_b")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv_b.attribute}
    assert attrs["kernel_shape"] == [3, 5] and attrs["pads"] == [1, 2, 1, 2] and attrs["strides"] == [1, 2]
    assert attrs["dilations"] == [2, 2] and attrs["group"] == 2 and len(conv_b.input) == 2


def test_layers_a_lrn_bn_eltwise_concat(tmp_path):
    # bn_zero has Caffe's moving-average factor 0: mean and variance become 0
    C = 32
    bnz = [np.full(C, 3.0, np.float32), np.full(C, 5.0, np.float32), np.zeros(1, np.float32)]
    model, ref, feeds = run_fixture(tmp_path, "layers_a.prototxt", weights={"bn_zero": bnz})
    assert [o.name for o in model.graph.output] == ["prob"]
    compare_all(model, ref, feeds, "layers_a")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 4  # bn1+sc1 and bn3+sc3 folded; bn2, bn_zero alone
    assert "WithinChannelLRN" in ops and ops.count("LRN") == 2
    lrn = next(n for n in model.graph.node if n.name == "norm_across")
    attrs = {a.name: helper.get_attribute_value(a) for a in lrn.attribute}
    assert attrs["bias"] == pytest.approx(2.0) and attrs["alpha"] == pytest.approx(0.5) and attrs["size"] == 3
    lrn5 = next(n for n in model.graph.node if n.name == "norm_across5")
    assert {a.name for a in lrn5.attribute} >= {"alpha", "beta", "bias", "size"}  # alpha always explicit


def test_layers_b_activations_shapes_scale_bias(tmp_path):
    model, ref, feeds = run_fixture(tmp_path, "layers_b.prototxt")
    errs = compare_all(model, ref, feeds, "layers_b")
    for blob in ("elu", "sig", "th", "ab", "bnll", "pw", "pw2", "bi", "sc2b", "bi2b", "sc_hw", "sc_s", "fl",
                 "fl_mid", "ipt", "rs", "rs_mid", "ip", "prob", "smap"):
        assert blob in errs, blob


def test_v1_format_with_inplace_layers(tmp_path):
    model, ref, feeds = run_fixture(tmp_path, "v1_net.prototxt")
    errs = compare_all(model, ref, feeds, "v1_net")
    assert {"conv1", "pool1", "norm1", "cat", "pool2", "fc", "prob", "flat", "norm_w"} <= set(errs)
    # SSA: every tensor is produced once; the blob's final value carries the blob's name
    outs = [o for n in model.graph.node for o in n.output]
    assert len(outs) == len(set(outs))
    relu = next(n for n in model.graph.node if n.name == "relu1")
    assert relu.output == ["conv1"] and relu.input == ["conv1@conv1"]


def test_batch_dim_is_symbolic_and_fixed_by_input_shape(tmp_path):
    model, ref, feeds = run_fixture(tmp_path, "v1_net.prototxt", batch=3)
    inp = model.graph.input[0].type.tensor_type.shape.dim
    assert inp[0].dim_param == "N" and [d.dim_value for d in inp[1:]] == [3, 12, 12]
    compare_all(model, ref, feeds, "v1_net batch 3", blobs=["prob"])
    cm = tmp_path / "v1_net.caffemodel"
    m2 = convert(FIXTURES / "v1_net.prototxt", cm, input_shape="3,3,12,12")
    assert [d.dim_value for d in m2.graph.input[0].type.tensor_type.shape.dim] == [3, 3, 12, 12]
    compare_all(m2, ref, feeds, "v1_net fixed batch", blobs=["prob"])


def test_node_names_follow_layers_and_checker_passes(tmp_path):
    model, _, _ = run_fixture(tmp_path, "layers_b.prototxt")
    names = {n.name for n in model.graph.node}
    assert {"elu", "sig", "tanh", "abs", "bnll", "pow", "ip_t", "rs", "prob", "smap"} <= names
    assert "split" not in names and "drop" not in names  # Split and Dropout leave no node
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].name == "x"


def test_opset_choice():
    for opset in (13, 18, onnx.defs.onnx_opset_version()):
        m = convert(FIXTURES / "conv.prototxt", random_weights=1, opset=opset)
        assert m.opset_import[0].version == opset
        session(m)  # ONNX Runtime accepts it
    # WITHIN_CHANNEL LRN is the model-local function of lrponnx.compiler.lrn_ops, built at the model's opset:
    # every opset gives the same numbers
    outs = []
    for opset in (13, 17, 22, onnx.defs.onnx_opset_version()):
        m = convert(FIXTURES / "layers_a.prototxt", random_weights=1, opset=opset)
        onnx.checker.check_model(m, full_check=True)
        sess = session(m)
        feed = {i.name: np.random.default_rng(0).normal(size=[d if isinstance(d, int) else 2 for d in i.shape])
                .astype(np.float32) for i in sess.get_inputs()}
        outs.append(sess.run(None, feed))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(InvalidModelError, match="opset"):
        convert(FIXTURES / "conv.prototxt", random_weights=1, opset=9)


def test_structural_edge_cases(tmp_path):
    # in place on the input blob; Silence consumes; Dropout with scale_train false scales by 1 - ratio
    p = _tiny(tmp_path, 'layer { name: "pw" type: "Power" bottom: "data" top: "data" power_param { scale: 2 } }\n'
                        'layer { name: "sil" type: "Silence" bottom: "data" }\n'
                        'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n'
                        'layer { name: "d" type: "Dropout" bottom: "r" top: "d" '
                        'dropout_param { dropout_ratio: 0.25 scale_train: false } }\n')
    m = convert(p, random_weights=0)
    assert [o.name for o in m.graph.output] == ["d"]
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    assert np.allclose(session(m).run(None, {"data": x})[0], np.maximum(2 * x, 0) * 0.75, atol=1e-6)
    # BatchNorm in place followed by a Scale that is not: not folded, blob "c" keeps the BN output
    p = _tiny(tmp_path, 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                        'convolution_param { num_output: 2 kernel_size: 1 } }\n'
                        'layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }\n'
                        'layer { name: "sc" type: "Scale" bottom: "c" top: "s" }\n')
    m = convert(p, random_weights=0)
    ops = [n.op_type for n in m.graph.node]
    assert ops == ["Conv", "BatchNormalization", "Mul"]
    assert next(n for n in m.graph.node if n.op_type == "BatchNormalization").output == ["c"]
    # a top produced twice (not in place) is refused, as in Caffe
    p = _tiny(tmp_path, 'layer { name: "a" type: "ReLU" bottom: "data" top: "t" }\n'
                        'layer { name: "b" type: "Sigmoid" bottom: "data" top: "t" }\n')
    with pytest.raises(InvalidModelError, match="multiple sources"):
        convert(p, random_weights=0)
    # a MemoryData layer provides the input shape when nothing else does
    p = tmp_path / "mem.prototxt"
    p.write_text('layer { name: "mem" type: "MemoryData" top: "data" top: "label" '
                 'memory_data_param { batch_size: 4 channels: 3 height: 5 width: 5 } }\n'
                 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    with pytest.warns(CaffeConversionWarning, match="becomes the graph input"):
        m = convert(p, random_weights=0)
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 5, 5]
    # absurd sizes are refused before anything is allocated
    p = _tiny(tmp_path, 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                        'inner_product_param { num_output: 4000000000 } }\n')
    with pytest.raises(InvalidModelError, match="too large"):
        convert(p, random_weights=0)


# =============================================================================================
# real architectures with random weights
# =============================================================================================

def _big_net(tmp_path, name: str, blobs: list[str], classifier: str, shared: dict | None = None):
    """Random weights for a BVLC deploy net, written as a caffemodel, converted and compared.

    ``shared`` (``{"weights": {...}, "caffemodel": path}``) lets nets with the same parameter blobs
    (AlexNet and CaffeNet) reuse one set of weights and one caffemodel file.
    """
    proto = need(CAFFE / name / "deploy.prototxt")
    net = parse_text(proto.read_text())
    rng = np.random.default_rng(123)
    L0 = net["layer"][0]
    dims = [int(d) for d in gl(g1(g1(L0, "input_param"), "shape"), "dim")]
    dims[0] = 1
    x = (rng.uniform(0, 255, dims) - np.array([104.0, 117.0, 123.0]).reshape(1, 3, 1, 1)).astype(np.float32)
    weights: dict = shared["weights"] if shared else {}
    # untrained He weights would give logits of ~1e3 and a one-hot softmax whose float32 evaluation alone
    # is off by ~1e-5; a smaller classifier gain gives trained-like logits (order 10)
    ref = ref_forward(net, {"data": x}, weights, rng, gain={classifier: 0.01})
    assert 1 < np.abs(ref[classifier]).max() < 100
    if shared and shared.get("caffemodel"):
        cm = shared["caffemodel"]
    else:
        cm = write_caffemodel(net, weights, tmp_path / f"{name}.caffemodel")
        if shared is not None:
            shared["caffemodel"] = cm
    model = convert(proto, cm, mean="104,117,123")
    if shared is None:
        cm.unlink()
    assert [o.name for o in model.graph.output] == ["prob"]
    compare_all(model, ref, {"data": x}, name, blobs=blobs)
    return model


@pytest.fixture(scope="module")
def alexnet_params(tmp_path_factory):
    """AlexNet and CaffeNet have the same parameter blobs (names and shapes): generate them once."""
    shared: dict = {"weights": {}}
    yield shared
    if shared.get("caffemodel"):
        shared["caffemodel"].unlink(missing_ok=True)  # 244 MB: not left in pytest's kept temp dirs
    shared.clear()


def test_bvlc_alexnet_random_weights(tmp_path, alexnet_params):
    m = _big_net(tmp_path, "bvlc_alexnet", ["conv1", "norm1", "pool1", "conv2", "norm2", "pool5", "fc6", "fc8",
                                            "prob"], "fc8", alexnet_params)
    meta = json.loads({p.key: p.value for p in m.metadata_props}["lrponnx.preprocessing"])
    assert meta["channel_order"] == "bgr" and meta["mean"] == [104.0, 117.0, 123.0] and meta["size"] == [227, 227]


def test_bvlc_reference_caffenet_random_weights(tmp_path, alexnet_params):
    _big_net(tmp_path, "bvlc_reference_caffenet", ["conv1", "pool1", "norm1", "conv5", "pool5", "fc7", "fc8",
                                                    "prob"], "fc8", alexnet_params)


def test_bvlc_googlenet_random_weights(tmp_path):
    m = _big_net(tmp_path, "bvlc_googlenet", ["conv1/7x7_s2", "pool1/norm1", "inception_3a/output",
                                              "inception_4e/output", "pool5/7x7_s1", "loss3/classifier", "prob"],
                 "loss3/classifier")
    assert any(n.op_type == "AveragePool" for n in m.graph.node)
    assert not any(n.op_type == "Dropout" for n in m.graph.node)


def test_random_weights_flag_is_deterministic_and_recorded():
    proto = FIXTURES / "layers_a.prototxt"
    a = convert(proto, random_weights=7)
    b = convert(proto, random_weights=7)
    c = convert(proto, random_weights=8)
    ia = {t.name: t.raw_data for t in a.graph.initializer}
    assert ia == {t.name: t.raw_data for t in b.graph.initializer}
    assert ia != {t.name: t.raw_data for t in c.graph.initializer}
    props = {p.key: p.value for p in a.metadata_props}
    assert props["lrponnx.weights"] == "random seed 7 (untrained)"
    var = next(t for t in a.graph.initializer if t.name == "bn2.var")
    assert (onnx.numpy_helper.to_array(var) > 0).all()
    x = np.random.default_rng(0).normal(size=(2, 6, 9, 9)).astype(np.float32)
    y = session(a).run(None, {"data": x})[0]
    assert np.all(np.isfinite(y)) and y.shape == (2, 10)


# =============================================================================================
# the real trained model: cifar10_full
# =============================================================================================

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_images():
    from PIL import Image
    root = need(SHARED / "cifar10_test_sample")
    xs, ys = [], []
    for ci, c in enumerate(CIFAR_CLASSES):
        for f in sorted((root / c).glob("*.jpg")):
            xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).transpose(2, 0, 1))
            ys.append(ci)
    return np.stack(xs), np.array(ys)


def _cifar_model(**kw):
    d = need(CAFFE / "cifar10_full")
    return convert(d / "cifar10_full.prototxt", d / "cifar10_full_iter_70000.caffemodel",
                   mean_file=d / "mean_rgb_3x32x32.npy", channel_order="rgb", **kw)


def test_cifar10_full_accuracy_on_1000_jpegs():
    d = need(CAFFE / "cifar10_full")
    model = _cifar_model()
    x, y = _cifar_images()
    assert len(y) == 1000
    mean = np.load(d / "mean_rgb_3x32x32.npy")
    probs = session(model).run(None, {"data": (x - mean).astype(np.float32)})[0]
    acc = float((probs.argmax(1) == y).mean())
    print(f"\ncifar10_full accuracy on cifar10_test_sample: {acc:.1%}")
    assert acc >= 0.79
    first = list(y).index(3)  # cat/0000.jpg
    assert probs[first, 3] == pytest.approx(0.74, abs=0.02) and probs[first, 5] == pytest.approx(0.21, abs=0.02)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("WithinChannelLRN") == 2
    meta = json.loads({p.key: p.value for p in model.metadata_props}["lrponnx.preprocessing"])
    assert meta["input"] == "data" and meta["channel_order"] == "rgb" and meta["pixel_scale"] == 255.0
    assert np.allclose(np.array(meta["mean"]), mean, atol=1e-4) and meta["size"] == [32, 32]
    assert meta["embedded"] is False and meta["scale"] == 1.0


def test_cifar10_full_matches_reference_on_a_batch(tmp_path):
    d = need(CAFFE / "cifar10_full")
    w = decode_caffemodel((d / "cifar10_full_iter_70000.caffemodel").read_bytes())
    assert sorted(k for k, v in w.items() if v) == ["conv1", "conv2", "conv3", "ip1"]
    x, _ = _cifar_images()
    mean = np.load(d / "mean_rgb_3x32x32.npy")
    feeds = {"data": (x[::50] - mean).astype(np.float32)}
    net = parse_text((d / "cifar10_full.prototxt").read_text())
    ref = ref_forward(net, feeds, w)
    compare_all(_cifar_model(), ref, feeds, "cifar10_full", blobs=["conv1", "pool1", "norm1", "pool2", "norm2",
                                                                   "pool3", "ip1", "prob"])


def test_cifar10_full_embedded_preprocessing():
    model = _cifar_model(embed_preprocessing=True)
    plain = _cifar_model()
    d = CAFFE / "cifar10_full"
    x, _ = _cifar_images()
    x = x[:64]
    mean = np.load(d / "mean_rgb_3x32x32.npy")
    a = session(model).run(None, {"data": x})[0]
    b = session(plain).run(None, {"data": (x - mean).astype(np.float32)})[0]
    assert np.abs(a - b).max() < 1e-5
    meta = json.loads({p.key: p.value for p in model.metadata_props}["lrponnx.preprocessing"])
    assert meta["embedded"] is True
    assert [n.op_type for n in model.graph.node][:2] == ["Sub", "Mul"]


def test_cifar10_train_test_prototxt_skips_train_layers():
    d = need(CAFFE / "cifar10_full")
    with pytest.warns(CaffeConversionWarning, match="skipping train-only layer 'loss'"):
        m = convert(d / "cifar10_full_train_test.prototxt", d / "cifar10_full_iter_70000.caffemodel",
                    input_shape="N,3,32,32", channel_order="rgb")
    assert [o.name for o in m.graph.output] == ["ip1"]
    x = np.random.default_rng(0).normal(0, 50, (2, 3, 32, 32)).astype(np.float32)
    logits = session(m).run(None, {"data": x})[0]
    deploy = _cifar_model()
    ref = session(deploy, ["ip1"]).run(["ip1"], {"data": x})[0]
    assert np.abs(logits - ref).max() < 1e-4


# =============================================================================================
# preprocessing options
# =============================================================================================

def test_mean_options_and_metadata(tmp_path):
    proto = FIXTURES / "v1_net.prototxt"
    m = convert(proto, random_weights=0, mean="1,2,3", scale=0.5, channel_order="rgb")
    meta = json.loads({p.key: p.value for p in m.metadata_props}["lrponnx.preprocessing"])
    assert meta == {"input": "data", "channel_order": "rgb", "pixel_scale": 255.0, "mean": [1.0, 2.0, 3.0],
                    "scale": 0.5, "size": [12, 12], "embedded": False}
    m = convert(proto, random_weights=0, mean=[7.0])
    meta = json.loads({p.key: p.value for p in m.metadata_props}["lrponnx.preprocessing"])
    assert meta["mean"] == [7.0, 7.0, 7.0] and meta["channel_order"] == "bgr"
    # a Caffe .binaryproto mean (BlobProto with legacy dims 1 x C x H x W)
    img = np.random.default_rng(0).uniform(0, 255, (3, 12, 12)).astype(np.float32)
    (tmp_path / "mean.binaryproto").write_bytes(encode_blob(img[None], legacy=True))
    m = convert(proto, random_weights=0, mean_file=tmp_path / "mean.binaryproto")
    meta = json.loads({p.key: p.value for p in m.metadata_props}["lrponnx.preprocessing"])
    assert np.allclose(meta["mean"], img, atol=1e-4)
    np.save(tmp_path / "mean.npy", img.mean(axis=(1, 2)))
    m = convert(proto, random_weights=0, mean_file=tmp_path / "mean.npy")
    meta = json.loads({p.key: p.value for p in m.metadata_props}["lrponnx.preprocessing"])
    assert np.allclose(meta["mean"], img.mean(axis=(1, 2)), atol=1e-4)
    with pytest.warns(CaffeConversionWarning, match="per-channel average"):
        np.save(tmp_path / "big.npy", np.ones((3, 20, 20), np.float32))
        m = convert(proto, random_weights=0, mean_file=tmp_path / "big.npy")
    with pytest.raises(InvalidModelError, match="3 channels"):
        convert(proto, random_weights=0, mean="1,2")
    with pytest.raises(InvalidModelError, match="channel"):
        np.save(tmp_path / "bad.npy", np.ones((4, 12, 12), np.float32))
        convert(proto, random_weights=0, mean_file=tmp_path / "bad.npy")
    # a 1-channel input is "gray"; --channel-order must fit the channel count
    p = tmp_path / "gray.prototxt"
    p.write_text('input: "img" input_dim: 1 input_dim: 1 input_dim: 28 input_dim: 28\n'
                 'layer { name: "r" type: "ReLU" bottom: "img" top: "r" }\n')
    meta = json.loads({q.key: q.value for q in convert(p, random_weights=0).metadata_props}["lrponnx.preprocessing"])
    assert meta["channel_order"] == "gray" and meta["input"] == "img" and meta["mean"] == [0.0]
    with pytest.raises(InvalidModelError, match="does not fit"):
        convert(p, random_weights=0, channel_order="rgb")
    # embedded: the graph takes pixels*255 and applies (x - mean) * scale itself
    me = convert(proto, random_weights=0, mean="10,20,30", scale=0.5, embed_preprocessing=True)
    mp = convert(proto, random_weights=0, mean="10,20,30", scale=0.5)
    x = np.random.default_rng(1).uniform(0, 255, (2, 3, 12, 12)).astype(np.float32)
    pre = ((x - np.array([10, 20, 30], np.float32).reshape(1, 3, 1, 1)) * 0.5).astype(np.float32)
    assert np.abs(session(me).run(None, {"data": x})[0] - session(mp).run(None, {"data": pre})[0]).max() < 1e-6


# =============================================================================================
# errors
# =============================================================================================

def test_unsupported_layers_are_listed_all_at_once():
    with pytest.warns(CaffeConversionWarning, match="skipping train-only layer 'loss'"):
        with pytest.raises(UnsupportedModelError) as ei:
            convert(FIXTURES / "unsupported.prototxt", random_weights=0)
    offenders = {o.node: o for o in ei.value.offenders}
    assert set(offenders) == {"py", "crop", "roi", "stoch"}
    assert offenders["roi"].op_type == "ROIPooling" and "STOCHASTIC" in offenders["stoch"].why
    assert "crop_param.offsets (line 6)" in offenders["crop"].why  # a misspelt field, refused by name
    msg = str(ei.value)
    assert msg.startswith("4 Caffe layer(s) cannot be converted: layer 'py' (Python): ") and "\n" not in msg
    assert "layer 'crop' (Crop): unknown field crop_param.offsets (line 6)" in msg


def _tiny(tmp_path, body: str, name="net.prototxt") -> Path:
    p = tmp_path / name
    p.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 '
                 'dim: 8 } } }\n' + body)
    return p


def test_wrong_blob_shape_and_count_name_the_layer(tmp_path):
    proto = _tiny(tmp_path, 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "c" '
                            'convolution_param { num_output: 4 kernel_size: 3 } }\n')
    cm = tmp_path / "w.caffemodel"
    cm.write_bytes(encode_caffemodel([("conv1", "Convolution", [np.zeros((4, 3, 5, 5), np.float32),
                                                               np.zeros(4, np.float32)])], v1=False))
    with pytest.raises(InvalidModelError, match=r"'conv1'.*\[4, 3, 5, 5\].*\[4, 3, 3, 3\]"):
        convert(proto, cm)
    cm.write_bytes(encode_caffemodel([("conv1", "Convolution", [np.zeros((4, 3, 3, 3), np.float32)])], v1=False))
    with pytest.raises(InvalidModelError, match=r"'conv1'.*1 blobs.*implies 2"):
        convert(proto, cm)
    cm.write_bytes(encode_caffemodel([("other", "Convolution", [np.zeros((4, 3, 3, 3), np.float32)])], v1=False))
    with pytest.raises(InvalidModelError, match="not the weights of this net"):
        convert(proto, cm)
    # legacy 4-D dims are accepted the way Caffe accepts them
    cm.write_bytes(encode_caffemodel([("conv1", 4, [np.ones((4, 3, 3, 3), np.float32), np.ones(4, np.float32)])],
                                     v1=True))
    convert(proto, cm)


def test_truncated_caffemodel_gives_one_clear_error(tmp_path):
    src = need(CAFFE / "cifar10_full" / "cifar10_full_iter_70000.caffemodel").read_bytes()
    proto = CAFFE / "cifar10_full" / "cifar10_full.prototxt"
    for cut in (len(src) - 1, len(src) // 2, 1000, 10, 1):
        p = tmp_path / f"cut{cut}.caffemodel"
        p.write_bytes(src[:cut])
        with pytest.raises(InvalidModelError) as ei:
            convert(proto, p)
        msg = str(ei.value)
        assert "\n" not in msg and ("truncated" in msg or "no weights" in msg or "not a Caffe" in msg), msg


def test_non_caffe_files_give_one_clear_error(tmp_path):
    proto = FIXTURES / "v1_net.prototxt"
    jpg = need(SHARED / "images" / "cat.jpg")
    onnx_file = tmp_path / "m.onnx"
    onnx.save(convert(proto, random_weights=0), onnx_file)
    (tmp_path / "text.caffemodel").write_text(proto.read_text())
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    (tmp_path / "h5.caffemodel").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    for bad in (jpg, onnx_file, tmp_path / "text.caffemodel", tmp_path / "empty.caffemodel",
                tmp_path / "h5.caffemodel", tmp_path / "missing.caffemodel"):
        with pytest.raises(InvalidModelError) as ei:
            convert(proto, bad)
        assert "\n" not in str(ei.value)
    with pytest.raises(InvalidModelError, match="not a text prototxt"):
        convert(jpg, random_weights=0)
    (tmp_path / "garbage.prototxt").write_text("layer { name: 'x' type: \n")
    with pytest.raises(InvalidModelError, match="not a valid Caffe prototxt"):
        convert(tmp_path / "garbage.prototxt", random_weights=0)
    (tmp_path / "nolayers.prototxt").write_text("foo: 1\nbar { baz: 2 }\n")
    with pytest.raises(InvalidModelError, match="no layer"):
        convert(tmp_path / "nolayers.prototxt", random_weights=0)
    with pytest.raises(InvalidModelError, match="random-weights"):
        convert(proto)


def test_other_prototxt_errors(tmp_path):
    p = _tiny(tmp_path, 'layer { name: "r" type: "ReLU" bottom: "nope" top: "r" }\n')
    with pytest.raises(InvalidModelError, match="unknown bottom blob 'nope'"):
        convert(p, random_weights=0)
    p = _tiny(tmp_path, 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                        'pooling_param { pool: MAX kernel_size: 1 stride: 3 } }\n')
    with pytest.raises(UnsupportedModelError, match="wholly outside"):
        convert(p, random_weights=0)
    p = _tiny(tmp_path, 'layer { name: "n" type: "LRN" bottom: "data" top: "n" lrn_param { local_size: 4 } }\n')
    with pytest.raises(InvalidModelError, match="odd"):
        convert(p, random_weights=0)
    p = tmp_path / "noinput.prototxt"
    p.write_text('layer { name: "r" type: "ReLU" bottom: "x" top: "r" }\n')
    with pytest.raises(InvalidModelError, match="no input"):
        convert(p, random_weights=0)
    with pytest.raises(InvalidModelError, match="input-shape"):
        convert(FIXTURES / "v1_net.prototxt", random_weights=0, input_shape="1,3,x,12")


# =============================================================================================
# CLI
# =============================================================================================

def test_cli_writes_atomically_and_exits_2_on_errors(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = caffe_cli.main([str(FIXTURES / "v1_net.prototxt"), "-o", str(out), "--random-weights", "3",
                         "--mean", "104,117,123"])
    assert rc == 0 and out.exists()
    onnx.checker.check_model(onnx.load(str(out)))
    assert "wrote" in capsys.readouterr().out
    # user errors: exit code 2, one clear line, nothing written and no temp file left behind
    bad_out = tmp_path / "bad.onnx"
    for argv in ([str(FIXTURES / "unsupported.prototxt"), "--random-weights", "0"],
                 [str(FIXTURES / "v1_net.prototxt")],
                 [str(FIXTURES / "v1_net.prototxt"), str(tmp_path / "missing.caffemodel")],
                 [str(FIXTURES / "v1_net.prototxt"), "--random-weights", "0", "--mean", "1,2"]):
        rc = caffe_cli.main(argv + ["-o", str(bad_out)])
        err = capsys.readouterr().err
        assert rc == 2 and "error:" in err and "Traceback" not in err
        if "unsupported" not in argv[0]:
            assert len(err.strip().splitlines()) == 1, err
    assert not bad_out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    # an existing output is replaced only by a complete model
    before = out.read_bytes()
    assert caffe_cli.main([str(FIXTURES / "unsupported.prototxt"), "--random-weights", "0", "-o", str(out)]) == 2
    assert out.read_bytes() == before


def test_cli_register_and_subprocess(tmp_path):
    import argparse
    parser = argparse.ArgumentParser(prog="lrponnx")
    sub = parser.add_subparsers(dest="cmd")
    caffe_cli.register(sub)
    args = parser.parse_args(["caffe2onnx", "a.prototxt", "b.caffemodel", "-o", "x.onnx", "--channel-order", "rgb",
                              "--input-shape", "1,3,32,32", "--embed-preprocessing", "--opset", "18"])
    assert args.func is caffe_cli.run and args.channel_order == "rgb" and args.embed_preprocessing
    out = tmp_path / "x.onnx"
    r = subprocess.run([sys.executable, "-m", "lrponnx.converters.caffe.cli", str(FIXTURES / "v1_net.prototxt"),
                        "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.strip().startswith("lrponnx caffe2onnx: error:") and len(r.stderr.strip().splitlines()) == 1

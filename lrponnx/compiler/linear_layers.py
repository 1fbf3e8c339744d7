"""Linear layers as a protocol: Conv, ConvTranspose, Gemm and MatMul each say, in one small class,
how to compute ``z = W x + b`` in the explainer (:meth:`~LinearLayer.emit_forward`), its
vector-Jacobian product ``W^T q`` (:meth:`~LinearLayer.emit_vjp`), the same forward at convert
time in numpy (:meth:`~LinearLayer.constant_forward`, no ONNX Runtime session), and how a
per-output-channel factor or constant enters their weight layout (BatchNorm and bias folding).

Rules never look at which op a layer is: they ask these methods (``ops/linear.py`` binds a layer
to the graph being emitted; ``rules/linear.py`` holds the rules). The layers are built by
:func:`lrponnx.compiler.units.build_units` and are the ``info`` of a linear unit.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from lrponnx.compiler import geometry
from lrponnx.compiler.view import attrs_of

#: ``weight(key, W) -> initializer name``: stores a substitute weight once per layer and key
#: (key "w" with ``W`` the layer's own weight may answer with the model's initializer).
WeightStore = Callable[[str, np.ndarray], str]


class LinearLayer:
    """``z = W x + b`` in the op's own weight layout (see each subclass).

    ``W`` is float32 and read from the model's initializer each time it is asked for, unless a
    folded BatchNorm changed it: large models are not held twice in memory. While ``source`` is
    set, the initializer of that name holds ``W`` unchanged (transposed if ``source_transposed``),
    so rules that need the plain weight reuse it instead of storing a copy.
    """

    op_type = ""
    #: a convolution: channels on axis 1, static channel and spatial sizes needed to emit it
    is_conv = False
    #: a following BatchNormalization (channels on axis 1) can be folded into W, b
    folds_batchnorm = True

    def __init__(self, b: np.ndarray | None, x_shape, *, view=None, source: str | None = None,
                 source_transposed: bool = False, W: np.ndarray | None = None):
        self.b, self.x_shape, self.z_shape = b, x_shape, None
        self._view, self.source, self.source_transposed = view, source, source_transposed
        self._W = None if W is None else np.asarray(W, dtype=np.float32)
        if W is not None:
            self.source = None

    @classmethod
    def from_node(cls, view, node) -> "LinearLayer | None":
        """The layer of a node of this op with constant weights (read from ``view``, a ModelView);
        None where it computes its weight at run time or uses a form not read here (the node then
        becomes a plain unit, whose handler says why)."""
        raise NotImplementedError

    # -- the weight ------------------------------------------------------------------------------
    @property
    def W(self) -> np.ndarray:
        if self._W is not None:
            return self._W
        W = self._view.value(self.source).astype(np.float32, copy=False)
        return W.T if self.source_transposed else W

    @W.setter
    def W(self, value: np.ndarray) -> None:
        self._W = np.asarray(value, dtype=np.float32)
        self.source = None

    @property
    def weight_shape(self) -> tuple:
        if self._W is not None:
            return self._W.shape
        shape = tuple(self._view.shape(self.source))
        return shape[::-1] if self.source_transposed else shape

    # -- the protocol ----------------------------------------------------------------------------
    def emit_forward(self, g, x: str, w: str, b: np.ndarray | None, name: str, key: str) -> str:
        """Emit ``W x + b`` reading weight initializer ``w`` (b None: no bias); ``name``/``key``
        make the tensor names (``{name}/z_{key}``, ``{name}/b_{key}``)."""
        raise NotImplementedError

    def emit_vjp(self, g, q: str, key: str, W, weight: WeightStore, hint: str) -> str:
        """Emit ``W^T q`` (shaped like x) for weight ``W`` (an array or a :class:`LazyWeight`),
        storing whatever form of it the chosen op needs through ``weight``."""
        raise NotImplementedError

    def vjp_merge_key(self):
        """VJPs of layers with equal keys that feed the same x are emitted as one op by
        :meth:`emit_vjp_group`; None: never merged."""
        return None

    def emit_vjp_group(self, g, qs: list[str], Ws: list[np.ndarray], names: str) -> str:
        raise NotImplementedError

    def constant_forward(self, x: np.ndarray, W: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """``W x + b`` for a constant input, in float64 numpy."""
        raise NotImplementedError

    def scale_output_channels(self, s: np.ndarray) -> np.ndarray:
        """``W`` with output channel ``o`` times ``s[o]`` (float64)."""
        raise NotImplementedError

    def channel_vector(self, value: np.ndarray) -> np.ndarray | None:
        """A constant added to ``z`` as a length-M bias vector, or None if it varies along
        another axis than the output channels."""
        v = np.asarray(value, dtype=np.float64)
        M = self.b.shape[0]
        if v.size == 1:
            return np.full(M, float(v.reshape(())))
        if v.size != M or v.shape[-1] != M:  # dense layers: channels are the last axis
            return None
        return v.reshape(M)

    def broadcast_channels(self, vec: np.ndarray, rank: int) -> np.ndarray:
        """A length-M per-channel vector shaped to broadcast against ``z`` of this rank."""
        return vec

    def x_is_matrix(self) -> bool:
        return self.x_shape is not None and len(self.x_shape) == 2

    def single_channel_ones(self) -> "LinearLayer | None":
        """This geometry with one input and one output channel and an all-ones kernel, when every
        output channel of an all-ones weight sees the same sum (the flat rule's shortcut)."""
        return None


class LazyWeight:
    """Stands for a layer's own weight; loads it only when a copy really has to be made."""

    def __init__(self, layer: LinearLayer):
        self.p = layer

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


# -- dense layers --------------------------------------------------------------------------------

class GemmLayer(LinearLayer):
    """Gemm: W [M, K] (out x in, transB applied; the model's initializer is [K, M] when transB=0)."""

    op_type = "Gemm"

    @classmethod
    def from_node(cls, view, node):
        x, w, c = (list(node.input) + [""] * 3)[:3]
        a = attrs_of(node)
        if not view.is_const(w) or (c and not view.is_const(c)) or a.get("transA", 0):
            return None
        transposed = not a.get("transB", 0)  # W is kept as [out, in]
        layer = cls(None, view.shape(x), view=view, source=w, source_transposed=transposed)
        alpha = float(a.get("alpha", 1.0))
        if alpha != 1.0:
            layer.W = layer.W.astype(np.float64) * alpha
        M = layer.weight_shape[0]
        b = np.zeros(M)
        if c:
            cv = view.value(c).astype(np.float64) * float(a.get("beta", 1.0))
            # C broadcasts against [N, M]: a scalar, [M], [1, M] or [1, 1] is a bias; [N, M] is not
            if cv.ndim > 2 or (cv.ndim == 2 and cv.shape[0] != 1) or cv.size not in (1, M):
                return None
            b = b + np.broadcast_to(cv.reshape(-1), (M,))
        layer.b = b
        return layer

    def emit_forward(self, g, x, w, b, name, key):
        bias = [g.const(b, hint=f"{name}/b_{key}")] if b is not None else []
        return g.op("Gemm", x, w, *bias, transB=1, hint=f"{name}/z_{key}")

    def emit_vjp(self, g, q, key, W, weight, hint):
        if key == "w" and self.source and self.source_transposed and self.x_is_matrix():
            # The initializer holds W as [in, out]: q [N, out] times its transpose, no copy.
            return g.op("Gemm", q, self.source, transB=1, hint=hint)
        return g.op("MatMul", q, weight(key, W), hint=hint)

    def constant_forward(self, x, W, b):
        z = np.asarray(x, np.float64) @ np.asarray(W, np.float64).T
        return z + b if b is not None else z

    def scale_output_channels(self, s):
        W = self.W.astype(np.float64)
        return W * s.reshape(-1, 1)


class MatMulLayer(LinearLayer):
    """MatMul by a constant: W [K, M] (in x out); x may have leading axes ([N, T, K])."""

    op_type = "MatMul"
    folds_batchnorm = False  # BatchNorm's channel axis 1 is not MatMul's output axis in general

    @classmethod
    def from_node(cls, view, node):
        x, w = (list(node.input) + [""] * 2)[:2]
        if not view.is_const(w) or x not in view.dynamic:
            return None
        shape = view.shape(w)
        if shape is None or len(shape) != 2:
            return None
        return cls(np.zeros(shape[1]), view.shape(x), view=view, source=w)

    def emit_forward(self, g, x, w, b, name, key):
        z = g.op("MatMul", x, w, hint=f"{name}/z_{key}")
        return g.op("Add", z, g.const(b, hint=f"{name}/b_{key}")) if b is not None else z

    def emit_vjp(self, g, q, key, W, weight, hint):
        if key == "w" and self.source and self.x_is_matrix():
            return g.op("Gemm", q, self.source, transB=1, hint=hint)  # [N, out] x [in, out]^T
        return g.op("MatMul", q, weight(f"{key}_T", np.ascontiguousarray(W.T)), hint=hint)

    def constant_forward(self, x, W, b):
        z = np.asarray(x, np.float64) @ np.asarray(W, np.float64)
        return z + b if b is not None else z

    def scale_output_channels(self, s):
        W = self.W.astype(np.float64)
        return W * s.reshape(1, -1)


# -- convolutions --------------------------------------------------------------------------------

class ConvLayer(LinearLayer):
    """Conv: W [M, C/g, *k]. Geometry explicit (``auto_pad`` SAME already turned into pads)."""

    op_type = "Conv"
    is_conv = True

    def __init__(self, b, x_shape, *, strides, pads, dilations, group: int, **kw):
        super().__init__(b, x_shape, **kw)
        self.strides, self.pads, self.dilations, self.group = list(strides), list(pads), list(dilations), int(group)

    @classmethod
    def from_node(cls, view, node):
        x, w, c = (list(node.input) + [""] * 3)[:3]
        a = attrs_of(node)
        if not view.is_const(w) or (c and not view.is_const(c)):
            return None
        w_shape = view.shape(w)
        if w_shape is None or len(w_shape) < 3:
            return None
        extra = cls._node_attributes(a, len(w_shape) - 2)
        if extra is None:
            return None
        group = int(a.get("group", 1))
        M = cls._out_channels(w_shape, group)
        b = view.value(c).astype(np.float64).reshape(M) if c else np.zeros(M)
        x_shape = view.shape(x)
        spatial = len(w_shape) - 2
        geo = dict(strides=list(a.get("strides", [1] * spatial)), dilations=list(a.get("dilations", [1] * spatial)),
                   group=group, pads=list(a.get("pads", [0] * (2 * spatial))))
        auto_pad = a.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad not in ("NOTSET", "VALID"):
            if not cls.reads_same_pads or x_shape is None or any(d is None for d in x_shape[2:]):
                return None
            geo["pads"] = geometry.same_pads(x_shape[2:], list(w_shape[2:]), geo["strides"], geo["dilations"],
                                             upper=auto_pad == "SAME_UPPER")
        return cls(b, x_shape, view=view, source=w, **geo, **extra)

    #: auto_pad SAME_UPPER/LOWER is turned into explicit pads (from a static input size)
    reads_same_pads = True

    @staticmethod
    def _out_channels(w_shape, group: int) -> int:
        return w_shape[0]

    @staticmethod
    def _node_attributes(a: dict, spatial: int) -> dict | None:
        """Attributes of this op beyond the shared geometry (None: a form not read here)."""
        return {}

    @property
    def kernel(self) -> list[int]:
        return list(self.weight_shape[2:])

    def conv_attrs(self) -> dict:
        """Every geometry attribute stated (WebGPU's provider reads them from the node)."""
        return dict(kernel_shape=self.kernel, strides=self.strides, pads=self.pads, dilations=self.dilations,
                    group=self.group)

    def channel_vector(self, value):
        v = np.asarray(value, dtype=np.float64)
        M = self.b.shape[0]
        if v.size == 1:
            return np.full(M, float(v.reshape(())))
        if v.size != M or self.x_shape is None:
            return None
        # Broadcast against [N, M, *spatial]: the channel axis is at position -(rank-1).
        full = [1] * (len(self.x_shape) - v.ndim) + list(v.shape)
        if full[1] != M:
            return None
        return v.reshape(M)

    def broadcast_channels(self, vec, rank):
        return np.asarray(vec).reshape((1, -1) + (1,) * (rank - 2))

    def scale_output_channels(self, s):
        W = self.W.astype(np.float64)
        return W * s.reshape((-1,) + (1,) * (W.ndim - 1))

    def emit_forward(self, g, x, w, b, name, key):
        bias = [g.const(b, hint=f"{name}/b_{key}")] if b is not None else []
        return g.op("Conv", x, w, *bias, hint=f"{name}/z_{key}", **self.conv_attrs())

    def constant_forward(self, x, W, b):
        return conv_forward(x, W, b, self.strides, self.pads, self.dilations, self.group)

    # -- the VJP ---------------------------------------------------------------------------------
    def emit_vjp(self, g, q, key, W, weight, hint):
        """``W^T q`` of a convolution: the transposed convolution of q."""
        if self.vjp_as_conv():
            # Stride 1: the backward pass is a plain Conv with in/out swapped per group, the kernel
            # flipped and padding d(k-1)-p, which ORT runs faster than ConvTranspose.
            return g.op("Conv", q, weight(f"{key}_flipped", flipped_transpose(W, self.group)), hint=hint,
                        **self.flipped_attrs())
        return g.op("ConvTranspose", q, weight(key, W), hint=hint, output_padding=self.vjp_output_padding(),
                    **self.conv_attrs())

    def vjp_as_conv(self) -> bool:
        """Whether the VJP is a stride-1 Conv with the flipped kernel (needs pads <= d(k-1))."""
        if any(s != 1 for s in self.strides):
            return False
        return all(p >= 0 for p in self.flipped_pads())

    def flipped_pads(self) -> list[int]:
        return geometry.flipped_pads(self.kernel, self.pads, self.dilations)

    def flipped_attrs(self) -> dict:
        """The stride-1 backward Conv (kernel flipped, in/out swapped) with padding d(k-1)-p."""
        k = self.kernel
        return dict(kernel_shape=k, strides=[1] * len(k), pads=self.flipped_pads(), dilations=self.dilations,
                    group=self.group)

    def vjp_output_padding(self) -> list[int]:
        """ConvTranspose output_padding that makes ``W^T q`` exactly the input's spatial size."""
        return geometry.transpose_output_padding(self.x_shape[2:], self.z_shape[2:], self.kernel, self.strides,
                                                 self.pads, self.dilations)

    def vjp_merge_key(self):
        """Convolutions (group 1) with the same geometry that feed the same ``x`` are merged:
        ``sum_b W_b^T q_b`` is one convolution of the concatenated ``q_b`` with the weights
        stacked along their output channels (the 1x1 branches of an inception block; the two
        halves of the gamma rule)."""
        if self.group != 1:
            return None
        as_conv = self.vjp_as_conv()
        form = self.flipped_pads() if as_conv else self.vjp_output_padding()
        return ("conv", as_conv, tuple(self.kernel), tuple(self.strides), tuple(self.pads), tuple(self.dilations),
                tuple(form), tuple(self.x_shape[1:]))

    def emit_vjp_group(self, g, qs, Ws, names):
        q = g.op("Concat", *qs, axis=1, hint="vjp_q_cat")
        if self.vjp_as_conv():  # flipped kernels [C, M_b, k]: stack along axis 1
            W = np.concatenate([flipped_transpose(W, 1) for W in Ws], axis=1)
            return g.op("Conv", q, g.const(W, hint=f"{names}/W_merged_flipped"), hint="vjp_merged",
                        **self.flipped_attrs())  # group 1: vjp_merge_key takes group-1 convolutions only
        return g.op("ConvTranspose", q, g.const(np.concatenate(Ws, axis=0), hint=f"{names}/W_merged"),
                    output_padding=self.vjp_output_padding(), hint="vjp_merged", **self.conv_attrs())

    def single_channel_ones(self):
        if self.group != 1:
            return None
        k = self.kernel
        ones = ConvLayer(np.zeros(1), [self.x_shape[0], 1] + list(self.x_shape[2:]), strides=self.strides,
                         pads=self.pads, dilations=self.dilations, group=1, W=np.ones([1, 1] + k, np.float32))
        ones.z_shape = [self.z_shape[0], 1] + list(self.z_shape[2:])
        return ones


class ConvTransposeLayer(ConvLayer):
    """ConvTranspose: W [C, M/g, *k]; output channel ``o = group * (M/g) + j``."""

    op_type = "ConvTranspose"

    def __init__(self, b, x_shape, *, output_padding, **kw):
        super().__init__(b, x_shape, **kw)
        self.output_padding = list(output_padding)

    reads_same_pads = False  # rare for ConvTranspose; the plain unit reports it

    @staticmethod
    def _out_channels(w_shape, group: int) -> int:
        return w_shape[1] * group

    @staticmethod
    def _node_attributes(a: dict, spatial: int) -> dict | None:
        if "output_shape" in a:
            return None  # rare; the plain unit reports it as unsupported
        return {"output_padding": list(a.get("output_padding", [0] * spatial))}

    def scale_output_channels(self, s):
        W = self.W.astype(np.float64)
        g = self.group
        C, Mg = W.shape[0], W.shape[1]
        Wg = W.reshape((g, C // g, Mg) + W.shape[2:])
        Wg = Wg * s.reshape((g, 1, Mg) + (1,) * (W.ndim - 2))
        return Wg.reshape(W.shape)

    def emit_forward(self, g, x, w, b, name, key):
        bias = [g.const(b, hint=f"{name}/b_{key}")] if b is not None else []
        return g.op("ConvTranspose", x, w, *bias, hint=f"{name}/z_{key}", output_padding=self.output_padding,
                    **self.conv_attrs())

    def emit_vjp(self, g, q, key, W, weight, hint):
        """The VJP of a transposed convolution is the convolution with the same weight."""
        return g.op("Conv", q, weight(key, W), hint=hint, **self.conv_attrs())

    def vjp_merge_key(self):
        return None

    def constant_forward(self, x, W, b):
        return conv_transpose_forward(x, W, b, self.strides, self.pads, self.dilations, self.group,
                                      self.output_padding)

    def single_channel_ones(self):
        return None


#: op type -> layer class: a new linear op is one class here (units.py reads this table)
LAYERS = {cls.op_type: cls for cls in (ConvLayer, ConvTransposeLayer, GemmLayer, MatMulLayer)}


def flipped_transpose(W: np.ndarray, group: int) -> np.ndarray:
    """Conv weight [M, C/g, *k] -> the weight of its transposed conv as a Conv: [C, M/g, *k],
    in/out swapped within each group and the kernel flipped in every spatial axis."""
    W = np.asarray(W)
    M, Cg = W.shape[:2]
    k = W.shape[2:]
    Wg = W.reshape((group, M // group, Cg) + k).swapaxes(1, 2)  # [g, C/g, M/g, *k]
    Wg = np.flip(Wg, axis=tuple(range(3, 3 + len(k))))
    return np.ascontiguousarray(Wg.reshape((group * Cg, M // group) + k))


# -- convolutions in numpy (convert-time constants) ------------------------------------------------

#: bytes of the gathered input windows per matrix product (bounds convert-time memory)
_BLOCK_BYTES = 1 << 25


def _offset_blocks(k, per_offset_bytes: int):
    """The kernel offsets in blocks small enough for one matrix product each."""
    offsets = list(np.ndindex(*k))
    size = max(1, _BLOCK_BYTES // max(1, per_offset_bytes))
    return [(i, offsets[i:i + size]) for i in range(0, len(offsets), size)]


def _window(j, start_scale, strides, count):
    """The strided slice per spatial axis that kernel offset ``j`` meets (``count`` positions)."""
    return tuple(slice(j[i] * start_scale[i], j[i] * start_scale[i] + strides[i] * (count[i] - 1) + 1, strides[i])
                 for i in range(len(j)))


def conv_forward(x, W, b, strides, pads, dilations, group: int) -> np.ndarray:
    """ONNX Conv in float64: x [N, C, *S], W [M, C/g, *k], explicit pads (begins, then ends).
    The strided windows of the padded input that a block of kernel offsets meets are gathered
    (im2col) and multiplied by the matching weights in one BLAS product per block."""
    x, W = np.asarray(x, np.float64), np.asarray(W, np.float64)
    N, n, k = x.shape[0], W.ndim - 2, W.shape[2:]
    M, Cg = W.shape[:2]
    x = _pad(x, pads)
    out = [geometry.conv_output_size(x.shape[2 + i], k[i], strides[i], dilations[i], 0, 0) for i in range(n)]
    P = int(np.prod(out))
    # [g, M/g, K, C/g]: the offsets of a block are consecutive along K
    Wk = np.ascontiguousarray(np.moveaxis(W.reshape(group, M // group, Cg, -1), 3, 2))
    z = np.zeros((N, group, M // group, P))
    for start, block in _offset_blocks(k, 8 * N * Cg * group * P):
        cols = np.stack([x[(slice(None), slice(None)) + _window(j, dilations, strides, out)].reshape(N, group, Cg, P)
                         for j in block], axis=2)  # [N, g, B, C/g, P]
        Wb = Wk[:, :, start:start + len(block)].reshape(group, M // group, -1)
        z += Wb @ cols.reshape(N, group, -1, P)  # [g, M/g, B C/g] @ [N, g, B C/g, P]
    z = z.reshape([N, M] + out)
    return z + np.asarray(b, np.float64).reshape((1, M) + (1,) * n) if b is not None else z


def conv_transpose_forward(x, W, b, strides, pads, dilations, group: int, output_padding) -> np.ndarray:
    """ONNX ConvTranspose in float64: x [N, C, *S], W [C, M/g, *k]. One BLAS product per block of
    kernel offsets; each offset's share is added onto its strided window of the full output,
    which the pads then crop."""
    x, W = np.asarray(x, np.float64), np.asarray(W, np.float64)
    N, n, k, S = x.shape[0], W.ndim - 2, W.shape[2:], x.shape[2:]
    C, Mg = W.shape[:2]
    Cg, P = C // group, int(np.prod(S))
    full = [geometry.conv_transpose_output_size(S[i], k[i], strides[i], dilations[i], 0, 0, output_padding[i])
            for i in range(n)]
    # [g, K, M/g, C/g]: the offsets of a block are consecutive along K
    Wk = np.ascontiguousarray(np.moveaxis(W.reshape(group, Cg, Mg, -1), (3, 2), (1, 2)))
    xg = x.reshape(N, group, Cg, P)
    z = np.zeros([N, group, Mg] + full)
    for start, block in _offset_blocks(k, 8 * N * Mg * group * P):
        Wb = Wk[:, start:start + len(block)].reshape(group, -1, Cg)
        parts = (Wb @ xg).reshape((N, group, len(block), Mg) + tuple(S))  # [g, B M/g, C/g] @ [N, g, C/g, P]
        for i, j in enumerate(block):
            z[(slice(None),) * 3 + _window(j, dilations, strides, S)] += parts[:, :, i]
    z = _pad(z.reshape([N, group * Mg] + full), [-p for p in pads])
    return z + np.asarray(b, np.float64).reshape((1, group * Mg) + (1,) * n) if b is not None else z


def _pad(x: np.ndarray, pads) -> np.ndarray:
    """Zero-pad (positive) or crop (negative) the spatial axes of [N, C, *S] by ONNX-ordered pads."""
    n = x.ndim - 2
    x = np.pad(x, [(0, 0), (0, 0)] + [(max(pads[i], 0), max(pads[n + i], 0)) for i in range(n)])
    crop = tuple(slice(max(-pads[i], 0), x.shape[2 + i] - max(-pads[n + i], 0)) for i in range(n))
    return x[(slice(None), slice(None)) + crop]

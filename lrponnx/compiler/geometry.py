"""Pad and window arithmetic of sliding-window ops (Conv, ConvTranspose, pooling), in one place.

Per spatial axis: input size ``n``, kernel ``k``, stride ``s``, dilation ``d``, pads ``begin``/
``end`` (ONNX order: all begins, then all ends). A window covers ``d (k - 1) + 1`` positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def window_extent(k: int, d: int) -> int:
    """Positions one dilated window covers."""
    return d * (k - 1) + 1


def conv_output_size(n: int, k: int, s: int, d: int, begin: int, end: int) -> int:
    """Output length of a Conv along one axis (floor mode)."""
    return (n + begin + end - window_extent(k, d)) // s + 1


def conv_transpose_output_size(n: int, k: int, s: int, d: int, begin: int, end: int,
                               output_padding: int = 0) -> int:
    """Output length of a ConvTranspose along one axis (ONNX's formula, explicit pads)."""
    return s * (n - 1) + output_padding + window_extent(k, d) - begin - end


def same_pads(size, kernel, strides, dilations, upper: bool) -> list[int]:
    """Explicit pads of ``auto_pad`` SAME_UPPER (``upper``) / SAME_LOWER: output = ceil(n / s),
    the odd pad going to the end (UPPER) or the beginning (LOWER)."""
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        out = -(-n // s)
        total = max(0, (out - 1) * s + window_extent(k, d) - n)
        small, big = total // 2, total - total // 2
        begin.append(small if upper else big)
        end.append(big if upper else small)
    return begin + end


def transpose_output_padding(x_size, z_size, kernel, strides, pads, dilations) -> list[int]:
    """The ConvTranspose ``output_padding`` that maps a Conv's output (``z_size``) back onto
    exactly its input's size (``x_size``): the Conv's VJP as a ConvTranspose."""
    n = len(kernel)
    return [x_size[i] - conv_transpose_output_size(z_size[i], kernel[i], strides[i], dilations[i],
                                                   pads[i], pads[n + i])
            for i in range(n)]


def flipped_pads(kernel, pads, dilations) -> list[int]:
    """Pads of a stride-1 Conv's VJP written as a Conv with the flipped kernel: ``d (k - 1) - p``
    on each side (negative: that form does not apply)."""
    n = len(kernel)
    return [dilations[i % n] * (kernel[i % n] - 1) - pads[i] for i in range(2 * n)]


# -- pooling (MaxPool, AveragePool and their Global forms) ------------------------------------------
# The numbers are ONNX Runtime's (PoolAttributes in onnxruntime/core/providers/cpu/nn/pool_attributes.h),
# which runs the explainer; tests/test_geometry.py compares them with it on random geometries.

def _auto_pad(attrs: dict) -> str:
    v = attrs.get("auto_pad", "NOTSET")
    v = v.decode() if isinstance(v, bytes) else v
    return v or "NOTSET"


def pool_output_size(size: int, kernel: int, stride: int = 1, dilation: int = 1, pad_head: int = 0,
                     pad_tail: int = 0, ceil_mode: bool = False) -> int:
    """Output length of one pooled axis. With ``ceil_mode`` a last window that would start in the end
    padding is dropped (ONNX Runtime does; onnx's shape inference before opset 22 keeps it)."""
    span = size + pad_head + pad_tail - window_extent(kernel, dilation)
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + pad_head else out


@dataclass(frozen=True)
class PoolGeometry:
    """One pooling node's windows over a known spatial shape, every attribute explicit."""

    spatial: tuple[int, ...]     # input sizes past N, C
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]        # [begins..., ends...] as the op pads (auto_pad resolved)
    ceil_mode: bool
    out: tuple[int, ...]         # output sizes past N, C

    @property
    def rank(self) -> int:
        return len(self.spatial)

    def floor_pads(self) -> list[int]:
        """The pads with ``ceil_mode``'s overhang added at the end, so that an ordinary (floor)
        convolution over the same windows has exactly ``out`` positions."""
        n, pads = self.rank, list(self.pads)
        for i in range(n):
            need = (self.out[i] - 1) * self.strides[i] + (self.kernel[i] - 1) * self.dilations[i] + 1
            have = self.spatial[i] + pads[i] + pads[n + i]
            if need > have:
                pads[n + i] += need - have
        return pads

    def transpose_output_padding(self) -> list[int]:
        """``output_padding`` that makes a ConvTranspose over these windows (with :meth:`floor_pads`)
        give back exactly the input's spatial size."""
        n, pads = self.rank, self.floor_pads()
        return [self.spatial[i] - (self.strides[i] * (self.out[i] - 1) + (self.kernel[i] - 1) * self.dilations[i]
                                   + 1 - pads[i] - pads[n + i]) for i in range(n)]

    def window_positions(self, axis: int) -> np.ndarray:
        """[out, kernel]: the input index each window entry reads on ``axis`` (may lie in the padding)."""
        i = axis
        return (np.arange(self.out[i])[:, None] * self.strides[i] - self.pads[i]
                + np.arange(self.kernel[i])[None, :] * self.dilations[i])

    def average_divisor(self, count_include_pad: bool) -> np.ndarray:
        """What AveragePool divides each output's window sum by, shaped ``out``: the entries inside
        the input, or (``count_include_pad``) inside the padded input, whose end the op clips at
        ``size + pad_end`` (a ``ceil_mode`` overhang beyond it is not counted)."""
        n, divisor = self.rank, np.ones([], np.float64)
        for i in range(n):
            pos = self.window_positions(i)
            if count_include_pad:
                inside = pos < self.spatial[i] + self.pads[n + i]
            else:
                inside = (pos >= 0) & (pos < self.spatial[i])
            divisor = np.multiply.outer(divisor, inside.sum(axis=1).astype(np.float64))
        return divisor


def pool_geometry(spatial, attrs: dict, global_pool: bool = False) -> PoolGeometry:
    """The windows of a MaxPool/AveragePool (node attributes ``attrs``) over ``spatial`` sizes;
    ``global_pool``: one window over the whole plane (GlobalAveragePool/GlobalMaxPool)."""
    spatial = tuple(int(d) for d in spatial)
    n = len(spatial)
    if global_pool:
        return PoolGeometry(spatial, spatial, (1,) * n, (1,) * n, (0,) * (2 * n), False, (1,) * n)
    kernel = tuple(int(k) for k in attrs["kernel_shape"])
    strides = tuple(int(s) for s in attrs.get("strides", [1] * n))
    dilations = tuple(int(d) for d in attrs.get("dilations", [1] * n))
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    mode = _auto_pad(attrs)
    if mode == "VALID":
        pads = [0] * (2 * n)
    elif mode in ("SAME_UPPER", "SAME_LOWER"):
        pads = same_pads(spatial, kernel, strides, dilations, upper=mode == "SAME_UPPER")
    else:
        pads = [int(p) for p in attrs.get("pads", [0] * (2 * n))]
    out = tuple(pool_output_size(spatial[i], kernel[i], strides[i], dilations[i], pads[i], pads[n + i], ceil_mode)
                for i in range(n))
    return PoolGeometry(spatial, kernel, strides, dilations, tuple(pads), ceil_mode, out)

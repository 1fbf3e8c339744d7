"""Pad and window arithmetic of sliding-window ops (Conv, ConvTranspose, pooling), in one place.

Per spatial axis: input size ``n``, kernel ``k``, stride ``s``, dilation ``d``, pads ``begin``/
``end`` (ONNX order: all begins, then all ends). A window covers ``d (k - 1) + 1`` positions.
"""
from __future__ import annotations


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

"""Pooling: average pools as the linear map they are (`norm`), max pools by winner-take-all
(the gradient) or proportionally to the window sum."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from lrponnx.compiler import geometry
from lrponnx.compiler.shapes import static_hint
from lrponnx.compiler.units import Unit
from lrponnx.ops.context import Ctx, Unsupported, runtime_ones, sized_const_ok
from lrponnx.ops.registry import handler


def _static(shape, first_axis: int) -> bool:
    """The shape is known, with fixed sizes from ``first_axis`` on."""
    return shape is not None and all(d is not None for d in shape[first_axis:])


def _window(ctx: Ctx, unit: Unit) -> dict:
    """Kernel, strides, dilations and the explicit pads of a pooling node, with ceil_mode's
    overhang turned into extra end padding so an ordinary (floor) conv sees the same windows."""
    why = _window_problem(ctx, unit)
    if why is not None:
        raise Unsupported(why)
    geo = _geometry(ctx, unit)
    xs = ctx.view.shape(unit.inputs[0])
    return dict(kernel=list(geo.kernel), strides=list(geo.strides), dilations=list(geo.dilations),
                pads=geo.floor_pads(), output_padding=geo.transpose_output_padding(), C=xs[1], x_shape=xs,
                y_shape=list(xs[:2]) + list(geo.out), geometry=geo)


def _geometry(ctx: Ctx, unit: Unit) -> geometry.PoolGeometry:
    """The node's windows over its (static) input, in numpy (compiler/geometry.py: ONNX Runtime's
    output sizes, which onnx's shape inference before opset 22 gets wrong for ceil_mode)."""
    xs = ctx.view.shape(unit.inputs[0])
    return geometry.pool_geometry(xs[2:], unit.info, global_pool=unit.op_type.startswith("Global"))


def _window_problem(ctx: Ctx, unit: Unit) -> str | None:
    """Why :func:`_window` cannot describe the node's windows (None: it can)."""
    if not _static(ctx.view.shape(unit.inputs[0]), 1):
        return "needs static channel and spatial sizes" + static_hint(ctx.view)
    if not unit.op_type.startswith("Global"):
        auto_pad = unit.info.get("auto_pad", b"NOTSET")
        if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID"):
            return "auto_pad SAME_* pooling is not supported; export with explicit pads"
    return None


def _conv_geometry(w: dict, group: int) -> dict:
    """A (depthwise) convolution over the pool's windows, every attribute stated."""
    return dict(kernel_shape=w["kernel"], strides=w["strides"], pads=w["pads"], dilations=w["dilations"],
                group=group)


def _window_sum_T(ctx: Ctx, w: dict, q: str) -> str:
    """``P^T q`` for P the window-sum map (depthwise ones kernel)."""
    ones = np.ones([w["C"], 1] + w["kernel"], np.float32)
    return ctx.g.op("ConvTranspose", q, ctx.g.const(ones, hint="pool_ones"), output_padding=w["output_padding"],
                    hint="pool_vjp", **_conv_geometry(w, w["C"]))


def _window_sum(ctx: Ctx, w: dict, x: str) -> str:
    ones = np.ones([w["C"], 1] + w["kernel"], np.float32)
    return ctx.g.op("Conv", x, ctx.g.const(ones, hint="pool_ones"), hint="pool_sum", **_conv_geometry(w, w["C"]))


def _average_pool_supported(ctx: Ctx, unit: Unit) -> str | None:
    """What :func:`average_pool` refuses, decided without emitting."""
    if unit.rule.name == "pass":
        return "pass is not a valid rule for pooling (shapes differ)"
    return _window_problem(ctx, unit)


def _max_pool_supported(ctx: Ctx, unit: Unit) -> str | None:
    """What :func:`max_pool` refuses, decided without emitting."""
    xs = ctx.view.shape(unit.inputs[0])
    if unit.rule.name == "proportional" or (ctx.webgpu and unit.op_type == "MaxPool"):
        return _window_problem(ctx, unit)
    if unit.op_type == "GlobalMaxPool":
        if ctx.webgpu and not _static(xs, 1):
            return "winner-take-all without Indices needs static channel and spatial sizes"
        if not ctx.webgpu and not _static(xs, 2):
            return "needs static spatial sizes"
    return None


@handler("AveragePool", "GlobalAveragePool", rules=("norm", "pass"), supports=_average_pool_supported)
def average_pool(ctx: Ctx, unit: Unit, R: str) -> dict:
    x, y = unit.inputs[0], unit.output
    if unit.rule.name == "pass":
        raise Unsupported("pass is not a valid rule for pooling (shapes differ)")
    w = _window(ctx, unit)
    eps = unit.rule.epsilon
    if unit.op_type == "GlobalAveragePool":
        # y = the plane's mean: x's share is x q / (H W), q broadcast over the plane (no constant
        # of the plane's size; the same numbers as the window-sum form below)
        q = ctx.stab_div(R, y, eps, nonnegative=ctx.nonnegative(x))
        inv = 1.0 / np.full([1, 1] + [1] * (len(w["kernel"])), int(np.prod(w["kernel"])), np.float32)
        return {x: ctx.g.op("Mul", x, ctx.g.op("Mul", q, ctx.g.const(inv, hint="pool_inv_div")), hint="r_avgpool")}
    if not sized_const_ok(w["x_shape"][2:]):
        return {x: _average_pool_runtime(ctx, unit, w, R, eps)}
    # P x = window_sum(x) / divisor. The divisor per output position follows the op's own
    # padding / count_include_pad / ceil semantics (compiler/geometry.py, checked against ORT).
    divisor = w["geometry"].average_divisor(bool(unit.info.get("count_include_pad", 0)))
    q = ctx.stab_div(R, y, eps, nonnegative=ctx.nonnegative(x))  # an average of x >= 0 is >= 0
    q = ctx.g.op("Mul", q, ctx.g.const(1.0 / divisor.reshape([1, 1] + list(divisor.shape)), hint="pool_inv_div"))
    return {x: ctx.g.op("Mul", x, _window_sum_T(ctx, w, q), hint="r_avgpool")}


def _average_pool_runtime(ctx: Ctx, unit: Unit, w: dict, R: str, eps: float) -> str:
    """:func:`average_pool` for a declared input too large for convert-time constants: the
    divisor (1 / (counted / averaged) = averaged / counted) is measured by the explainer on a
    ones plane made from the input's shape."""
    g, x, y = ctx.g, unit.inputs[0], unit.output
    ones = runtime_ones(g, x, channels=1)
    counted = g.op("Conv", ones, g.const(np.ones([1, 1] + w["kernel"], np.float32), hint="pool_ones"),
                   hint="pool_counted", **_conv_geometry(w, 1))
    averaged = g.op("AveragePool", ones, hint="pool_averaged", **dict(unit.info.items()))
    q = ctx.stab_div(R, y, eps, nonnegative=ctx.nonnegative(x))
    q = g.op("Mul", q, g.op("Div", averaged, counted, hint="pool_inv_div"))
    return g.op("Mul", x, _window_sum_T(ctx, w, q), hint="r_avgpool")


@handler("MaxPool", "GlobalMaxPool", rules=("winner-take-all", "proportional"), supports=_max_pool_supported)
def max_pool(ctx: Ctx, unit: Unit, R: str) -> dict:
    x = unit.inputs[0]
    g = ctx.g
    if unit.rule.name == "proportional":
        w = _window(ctx, unit)
        q = ctx.stab_div(R, _window_sum(ctx, w, x), unit.rule.epsilon,
                         nonnegative=ctx.nonnegative(x))
        return {x: g.op("Mul", x, _window_sum_T(ctx, w, q), hint="r_maxpool")}
    # Winner-take-all = the gradient of max pooling: each output's relevance goes to the
    # input position its max came from; overlapping windows add up (ScatterElements 'add').
    if ctx.webgpu:
        return {x: _wta_without_indices(ctx, unit, R)}
    if unit.op_type == "GlobalMaxPool":
        xs = ctx.view.shape(x)
        if not _static(xs, 2):
            raise Unsupported("needs static spatial sizes")
        attrs = dict(kernel_shape=list(xs[2:]))
    else:
        attrs = {k: v for k, v in unit.info.items() if k != "storage_order"}
    n = len(attrs["kernel_shape"])
    if "auto_pad" not in attrs:  # every attribute stated, as for every pool the explainer writes
        attrs = dict(dict(strides=[1] * n, pads=[0] * (2 * n), dilations=[1] * n), **attrs)
    _, indices = g.op("MaxPool", x, outputs=2, hint="argmax", **attrs)
    w = _static_window(ctx, unit) if unit.op_type == "MaxPool" and _disjoint(attrs) else None
    if w is not None:
        # No input lies in two windows, so no two outputs share a winner: MaxUnpool places each
        # output's relevance with a plain write, 5x faster than the scatter (VGG's 2x2/2 pools).
        # The pads include ceil mode's overhang: ORT checks the output size against them.
        return {x: g.op("MaxUnpool", R, indices, g.op("Shape", x), kernel_shape=w["kernel"],
                        strides=w["strides"], pads=w["pads"], hint="r_maxpool")}
    xs = ctx.view.shape(x)
    if not _static(xs, 1):
        flat_idx = g.op("Reshape", indices, g.ints([-1]))
        flat_r = g.op("Reshape", R, g.ints([-1]))
        zeros = g.op("ConstantOfShape", g.op("Shape", g.op("Reshape", x, g.ints([-1]))),
                     value=_float_tensor(0.0))
        scattered = g.op("ScatterElements", zeros, flat_idx, flat_r, axis=0, reduction="add")
        return {x: g.op("Reshape", scattered, g.op("Shape", x), hint="r_maxpool")}
    # One row per (sample, channel) plane: the indices count from the start of the whole tensor,
    # so each plane's offset (n C + c) H W comes off first. (ORT scatters rows faster than one long
    # vector: -10 % on the 98 MiB pool1 of GoogLeNet.)
    C, plane = xs[1], int(np.prod(xs[2:]))
    rows = g.op("Mul", g.op("Shape", x, start=0, end=1), g.ints([C]), hint="planes")
    offsets = g.op("Mul", g.op("Range", g.const(0, dtype=np.int64),
                               g.op("Squeeze", rows, g.ints([0])), g.const(1, dtype=np.int64)),
                   g.const(plane, dtype=np.int64))
    as_rows = g.op("Concat", rows, g.ints([-1]), axis=0)
    local = g.op("Sub", g.op("Reshape", indices, as_rows), g.op("Unsqueeze", offsets, g.ints([1])), hint="argmax_local")
    zeros = g.op("ConstantOfShape", g.op("Concat", rows, g.ints([plane]), axis=0), value=_float_tensor(0.0))
    r_rows = g.op("Reshape", R, as_rows)
    scattered = g.op("ScatterElements", zeros, local, r_rows, axis=1, reduction="add")
    return {x: g.op("Reshape", scattered, g.op("Shape", x), hint="r_maxpool")}


def _wta_without_indices(ctx: Ctx, unit: Unit, R: str) -> str:
    """Winner-take-all without MaxPool's ``Indices`` output (``target_runtime="webgpu"``: WebGPU's
    provider has no Indices), exact, with the first maximum of each window winning as in torch.

    The K = prod(kernel) entries of every window become K channels per input channel (a grouped
    Conv with one-hot kernels copies each entry exactly; window entries in the padding are set to
    -inf), ``ArgMax`` over them picks the first maximum, its one-hot mask times the relevance goes
    back to the window's positions with the transposed one-hot Conv, where overlapping windows add
    up. A global pool is one ``ArgMax`` over the flattened plane."""
    g, x = ctx.g, unit.inputs[0]
    xs = ctx.view.shape(x)
    if unit.op_type == "GlobalMaxPool":
        if not _static(xs, 1):
            raise Unsupported("winner-take-all without Indices needs static channel and spatial sizes")
        P = int(np.prod(xs[2:]))
        flat = g.op("Reshape", x, g.ints([0, xs[1], P]), hint="wta_plane")
        first = _as_float(g, g.op("ArgMax", flat, axis=2, keepdims=1, select_last_index=0, hint="wta_argmax"))
        hit = g.op("Cast", g.op("Equal", first, g.const(np.arange(P).reshape(1, 1, P))), to=TensorProto.FLOAT,
                   hint="wta_mask")
        placed = g.op("Mul", hit, g.op("Reshape", R, g.ints([0, xs[1], 1])), hint="wta_place")
        return g.op("Reshape", placed, g.op("Shape", x), hint="r_maxpool")
    w = _window(ctx, unit)
    C, k, ys = w["C"], w["kernel"], w["y_shape"]
    n, K = len(k), int(np.prod(k))
    # channel c*K + j holds window entry j (row-major over the kernel: torch's scan order)
    onehot = g.const(np.tile(np.eye(K, dtype=np.float32).reshape([K, 1] + k), [C, 1] + [1] * n),
                     hint="wta_onehot")
    geometry = _conv_geometry(w, C)
    entries = g.op("Conv", x, onehot, hint="wta_unfold", **geometry)             # [N, C*K, *ys]
    entries = g.op("Reshape", entries, g.ints([0, C, K] + ys[2:]), hint="wta_windows")  # [N, C, K, *ys]
    outside = _outside(w)
    if outside.any():
        entries = g.op("Add", entries, g.const(np.where(outside, -np.inf, 0.0).astype(np.float32),
                                               hint="wta_padding"), hint="wta_windows_masked")
    first = _as_float(g, g.op("ArgMax", entries, axis=2, keepdims=1, select_last_index=0, hint="wta_argmax"))
    hit = g.op("Cast", g.op("Equal", first, g.const(np.arange(K).reshape([1, 1, K] + [1] * n))), to=TensorProto.FLOAT,
               hint="wta_mask")
    placed = g.op("Mul", hit, g.op("Unsqueeze", R, g.ints([2])), hint="wta_place")  # [N, C, K, *ys]
    placed = g.op("Reshape", placed, g.ints([0, C * K] + ys[2:]))
    return g.op("ConvTranspose", placed, onehot, output_padding=w["output_padding"], hint="r_maxpool", **geometry)


def _as_float(g, index: str) -> str:
    """ArgMax's int64 as float32 (exact below 2^24), so the compare with the window positions runs
    on the WebGPU provider, whose Equal takes no int64 (it falls back to the CPU, and the mask with
    it)."""
    return g.op("Cast", index, to=TensorProto.FLOAT, hint="wta_argmax_f")


def _outside(w: dict) -> np.ndarray:
    """[1, 1, K, *ys]: True where window entry j of output position o lies in the padding."""
    k, s, d, pads, xs, ys = w["kernel"], w["strides"], w["dilations"], w["pads"], w["x_shape"], w["y_shape"]
    n = len(k)
    inside = np.ones([1] * (2 * n), bool)
    for i in range(n):  # axis i: [k_i, ys_i] positions o s + j d - p, broadcast into [k_0.., ys_0..]
        pos = np.arange(ys[2 + i])[None, :] * s[i] + np.arange(k[i])[:, None] * d[i] - pads[i]
        shape = [1] * (2 * n)
        shape[i], shape[n + i] = k[i], ys[2 + i]
        inside = inside & ((pos >= 0) & (pos < xs[2 + i])).reshape(shape)
    return ~inside.reshape([1, 1, int(np.prod(k))] + list(ys[2:]))


def _static_window(ctx: Ctx, unit: Unit) -> dict | None:
    try:
        return _window(ctx, unit)
    except Unsupported:  # symbolic sizes: the scatter needs none
        return None


def _disjoint(attrs: dict) -> bool:
    """Windows that never overlap: each spans at most its stride on every axis (node attributes)."""
    k = list(attrs["kernel_shape"])
    s = list(attrs.get("strides", [1] * len(k)))
    d = list(attrs.get("dilations", [1] * len(k)))
    return all((ki - 1) * di + 1 <= si for ki, si, di in zip(k, s, d))


def _float_tensor(v: float):
    from onnx import helper, TensorProto

    return helper.make_tensor("value", TensorProto.FLOAT, [1], [v])

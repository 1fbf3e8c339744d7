"""Layers that move values without weights: Concat, Eltwise, Crop, Slice, Split, Flatten, Reshape."""
from __future__ import annotations

import numpy as np

from lrponnx.converters.caffe.graph import LayerCtx
from lrponnx.converters.caffe.layers.registry import CaffeLayer, caffe_layer, register
from lrponnx.converters.caffe.net import canon_axis, prod

# Split copies its bottom to every top: no node, the tops are the bottom.
register(CaffeLayer(("Split",), None, tops=(1, None), alias=lambda layer: True))


@caffe_layer("Concat", bottoms=(1, None))
def concat(c: LayerCtx) -> list[list[int]]:
    p = c.layer.param("concat_param")
    s0 = c.shapes[0]
    raw = int(p.concat_dim) if p.HasField("concat_dim") else int(p.axis)
    axis = canon_axis(raw, len(s0), c.layer)
    for j, s in enumerate(c.shapes[1:], 1):
        if len(s) != len(s0) or any(s[i] != s0[i] for i in range(len(s0)) if i != axis):
            raise c.layer.err(f"bottom {j} has shape {s}, incompatible with bottom 0 {s0} for concat on axis {axis}")
    out = list(s0)
    out[axis] = sum(s[axis] for s in c.shapes)
    if len(c.xs) == 1:
        c.op("Identity", c.xs[0])
    else:
        c.op("Concat", *c.xs, axis=axis)
    return [out]


@caffe_layer("Eltwise", bottoms=(1, None))
def eltwise(c: LayerCtx) -> list[list[int]]:
    p = c.layer.param("eltwise_param")
    s0 = c.shapes[0]
    if len(c.xs) < 2:
        raise c.layer.err("Eltwise needs at least two bottoms")
    for j, s in enumerate(c.shapes[1:], 1):
        if s != s0:
            raise c.layer.err(f"bottom {j} has shape {s}, bottom 0 has {s0}; Eltwise needs equal shapes")
    op = int(p.operation)
    coeff = list(p.coeff)
    if coeff and len(coeff) != len(c.xs):
        raise c.layer.err(f"Eltwise takes one coeff per bottom: {len(coeff)} coeffs for {len(c.xs)} bottoms")
    if coeff and op != 1 and any(v != 1.0 for v in coeff):
        raise c.layer.err("Eltwise coeffs are only allowed for SUM")
    xs = list(c.xs)
    if op == 1 and coeff:
        for j, v in enumerate(coeff):
            if v != 1.0:
                xs[j] = c.op("Mul", xs[j], c.const(f"coeff{j}", np.array(v)), tag=f"coeff{j}")
    if op == 2:
        c.op("Max", *xs)
        return [list(s0)]
    binop = "Add" if op == 1 else "Mul"
    acc = xs[0]
    for j in range(1, len(xs)):
        if j == len(xs) - 1:
            c.op(binop, acc, xs[j])
        else:  # a chain of binary ops: the partial results are <layer>#acc<j>, made by nodes <layer>#<j>
            acc = c.g.op(binop, acc, xs[j], output=c.g.tmp(c.layer, f"acc{j}"), name=f"{c.name}#{j}")
    return [list(s0)]


@caffe_layer("Crop", bottoms=(2, 2), bottom_roles=("the blob to crop", "the reference"))
def crop(c: LayerCtx) -> list[list[int]]:
    """Caffe's CropLayer: bottom 0 cut to bottom 1's shape on ``axis`` and every later axis, starting
    at ``offset`` (none: 0; one: for all those axes; else one per axis). Bottom 1 gives only a shape."""
    p = c.layer.param("crop_param")
    s, ref = c.shapes
    nd = len(s)
    if len(ref) != nd:
        raise c.layer.err(f"bottom 1 (the reference) has {len(ref)} axes, bottom 0 has {nd}")
    axis = canon_axis(p.axis, nd, c.layer)
    offs = [int(v) for v in p.offset]
    n_crop = nd - axis
    if len(offs) not in (0, 1, n_crop):
        raise c.layer.err(f"offset must be given once or once per cropped axis ({n_crop}), got {len(offs)}")
    out = list(s)
    starts: list[int] = []
    ends: list[int] = []
    axes: list[int] = []
    for i in range(axis, nd):
        o = 0 if not offs else offs[0] if len(offs) == 1 else offs[i - axis]
        size = ref[i]
        if o + size > s[i]:
            raise c.layer.err(f"axis {i}: offset {o} + the reference's size {size} exceed bottom 0's size {s[i]} "
                              f"(bottom 0 {s}, bottom 1 {ref})")
        out[i] = size
        if o == 0 and size == s[i]:
            continue
        if i == 0 and not c.g.fixed_batch:
            raise c.layer.unsupported("crops the batch axis; give --input-shape with a fixed batch")
        starts.append(o)
        ends.append(o + size)
        axes.append(i)
    if not axes:
        c.op("Identity", c.xs[0])
        return [out]
    c.op("Slice", c.xs[0], c.ints("starts", starts), c.ints("ends", ends), c.ints("axes", axes))
    return [out]


@caffe_layer("Slice", tops=(1, None))
def slice_(c: LayerCtx) -> list[list[int]]:
    """Caffe's SliceLayer: bottom cut along ``axis`` (or the deprecated ``slice_dim``) at the
    ``slice_point``s, or into equal parts, one per top."""
    p = c.layer.param("slice_param")
    s = c.shapes[0]
    if p.HasField("axis") and p.HasField("slice_dim"):
        raise c.layer.err("either axis or slice_dim may be given, not both")
    axis = canon_axis(int(p.slice_dim) if p.HasField("slice_dim") else int(p.axis), len(s), c.layer)
    n, dim = len(c.outs), s[axis]
    if axis == 0 and n > 1 and not c.g.fixed_batch:
        raise c.layer.unsupported("slices the batch axis; give --input-shape with a fixed batch")
    points = [int(v) for v in p.slice_point]
    if points:
        if len(points) != n - 1:
            raise c.layer.err(f"{len(points)} slice_point(s) for {n} tops; Caffe needs one fewer than the tops")
        bounds = [0] + points + [dim]
        if any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise c.layer.err(f"slice_points {points} must increase strictly within (0, {dim}) on axis {axis}")
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    else:
        if dim % n:
            raise c.layer.err(f"axis {axis} of size {dim} does not split into {n} equal parts (one per top)")
        sizes = [dim // n] * n
    outs = []
    for size in sizes:
        o = list(s)
        o[axis] = size
        outs.append(o)
    if n == 1:
        c.op("Identity", c.xs[0])
        return outs
    c.op("Split", c.xs[0], c.ints("split", sizes), output=list(c.outs), axis=axis)
    return outs


@caffe_layer("Flatten")
def flatten(c: LayerCtx) -> list[list[int]]:
    p = c.layer.param("flatten_param")
    s = c.shapes[0]
    a = canon_axis(p.axis, len(s), c.layer)
    e = canon_axis(p.end_axis, len(s), c.layer, "end_axis")
    if e < a:
        raise c.layer.err(f"end_axis {p.end_axis} comes before axis {p.axis}")
    out = s[:a] + [prod(s[a:e + 1])] + s[e + 1:]
    if a == 1 and e == len(s) - 1:
        c.op("Flatten", c.xs[0], axis=1)
    else:
        tgt = c.reshape_target(s, out) if a == 0 else [0] + out[1:]
        c.op("Reshape", c.xs[0], c.ints("shape", tgt))
    return [out]


@caffe_layer("Reshape")
def reshape(c: LayerCtx) -> list[list[int]]:
    """Caffe's ``0`` (copy), ``-1`` (infer), ``axis`` and ``num_axes``, resolved statically."""
    p = c.layer.param("reshape_param")
    s = c.shapes[0]
    nd = len(s)
    axis = p.axis + nd + 1 if p.axis < 0 else p.axis
    if not 0 <= axis <= nd:
        raise c.layer.err(f"axis {p.axis} is out of range for a {nd}-D blob")
    if p.num_axes < -1:
        raise c.layer.err("num_axes must be >= -1")
    end = nd if p.num_axes == -1 else axis + p.num_axes
    if end > nd:
        raise c.layer.err(f"axis + num_axes ({axis} + {p.num_axes}) exceeds the {nd} axes of the bottom")
    dims = [int(d) for d in p.shape.dim]
    new = []
    infer = None
    for i, d in enumerate(dims):
        if d == 0:
            if axis + i >= nd:
                raise c.layer.err(f"shape dim {i} is 0 (copy) but the bottom has no axis {axis + i}")
            new.append(s[axis + i])
        elif d == -1:
            if infer is not None:
                raise c.layer.err("at most one shape dim may be -1")
            infer = i
            new.append(1)
        elif d < 0:
            raise c.layer.err(f"shape dim {d} is invalid")
        else:
            new.append(d)
    out = s[:axis] + new + s[end:]
    total = prod(s)
    if infer is not None:
        rest = prod(out)
        if rest == 0 or total % rest:
            raise c.layer.err(f"cannot reshape {s} to {dims}: {total} values do not divide")
        out[axis + infer] = total // rest
    if prod(out) != total:
        raise c.layer.err(f"cannot reshape {s} ({total} values) to {out} ({prod(out)} values)")
    c.op("Reshape", c.xs[0], c.ints("shape", c.reshape_target(s, out)))
    return [out]

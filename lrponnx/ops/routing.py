"""Exact relevance routing for ops that only move, select or copy values (rule ``pass``).

These ops compute nothing: every output element *is* one input element (or a zero / a constant).
Relevance therefore goes back exactly where the value came from, unchanged (the contract's "shape
and routing ops"; Montavon et al. 2019, sec. 10.2: only layers that compute get a rule, the rest is
the chain of the graph; Zennit and LXT route it through autograd, which does the same):

- **Split** (several outputs used): the relevance of every output, zeros for an unused one,
  concatenated back along the split axis into one tensor.
- **Slice** (constant starts/ends/axes/steps): scattered back; step 1 is a ``Pad`` with zeros
  (the inverse crop), other steps a scatter along the axis (one-hot ``MatMul``).
- **Gather** with constant indices (``x[:, 0]``, a class token): scattered back and *added*
  where an index repeats (the value was copied).
- **Expand** (a broadcast copy): summed back over the broadcast axes (every copy hands its
  relevance to the one source value).
- **Tile**: summed back over the tiles.
- **Where** with a constant condition: each branch gets the relevance of the positions it was
  selected at (a constant branch keeps its share).
- **Pad** in ``reflect`` / ``edge`` / ``wrap`` mode: the padded copies hand their relevance back to the value
  they copy (constant padding is cropped back in :mod:`.structural`).

An output element that is a constant (padding, a constant branch of ``Where``) keeps its relevance:
the routing conserves relevance exactly only where every output element comes from the input.
"""
from __future__ import annotations

import numpy as np

from lrponnx.compiler.shapes import static_hint
from lrponnx.compiler.units import Unit
from lrponnx.ops.context import Ctx, Unsupported
from lrponnx.ops.registry import handler

_INT64_MAX = np.iinfo(np.int64).max


def _const_ints(ctx: Ctx, name: str, what: str) -> list[int] | None:
    if not name:
        return None
    if not ctx.view.is_const(name):
        raise Unsupported(f"{what} computed at run time" + (
            " (if they only depend on the input's symbolic sizes, --input-shape with fixed sizes makes them "
            "constant)" if _symbolic_input(ctx) else ""))
    return [int(v) for v in np.asarray(ctx.view.value(name)).reshape(-1)]


def _symbolic_input(ctx: Ctx) -> bool:
    return any(s is not None and any(d is None for d in s) for s in map(ctx.view.shape, ctx.view.inputs))


def _zeros_like(ctx: Ctx, t: str) -> str:
    g = ctx.g
    from onnx import TensorProto, helper

    return g.op("ConstantOfShape", g.op("Shape", t, hint="zeros_shape"),
                value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]), hint="r_zeros")


def _rank(ctx: Ctx, x: str) -> int:
    shape = ctx.view.shape(x)
    if shape is None:
        raise Unsupported("needs the input's rank")
    return len(shape)


# -- Split -----------------------------------------------------------------------------------------

@handler("Split", rules=("pass",), multi_output=True)
def split_back(ctx: Ctx, unit: Unit, R: str | None) -> dict:
    node = unit.nodes[0]
    x = node.input[0]
    axis = int(unit.info.get("axis", 0))
    if axis < 0:
        axis += _rank(ctx, x)
    outs = [o for o in node.output]
    if any(not o for o in outs):
        raise Unsupported("an unnamed output in the middle")
    got = {o: ctx.out_relevance.get(o) for o in outs}
    if R is not None:
        got[unit.output] = R
    if all(r is None for r in got.values()):
        return {}
    parts = [got[o] if got[o] is not None else _zeros_like(ctx, o) for o in outs]
    if len(parts) == 1:
        return {x: parts[0]}
    return {x: ctx.g.op("Concat", *parts, axis=axis, hint="r_split")}


# -- one axis scattered back (Slice with steps, Gather, reflect padding) ---------------------------

def _scatter_axis(ctx: Ctx, R: str, axis: int, rank: int, index: np.ndarray, size: int, hint: str) -> str:
    """``R`` holds, along ``axis``, the values at ``index`` (1-D, into ``size`` positions) of a
    tensor of rank ``rank``; returns it scattered back to ``size`` positions, summed where an index
    repeats: a MatMul by the one-hot matrix [len(index), size] along that axis."""
    g = ctx.g
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    k = index.size
    if k and np.array_equal(index, np.arange(index[0], index[0] + k)) and index[0] >= 0 and index[-1] < size:
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = int(index[0]), int(size - index[-1] - 1)
        return g.op("Pad", R, g.ints(pads), mode="constant", hint=hint) if any(pads) else R
    onehot = np.zeros((k, size), dtype=np.float32)
    onehot[np.arange(k), index] = 1.0
    M = g.const(onehot, hint=f"{hint}_onehot")
    if axis == rank - 1:
        return g.op("MatMul", R, M, hint=hint)
    perm = [i for i in range(rank) if i != axis] + [axis]
    back = [0] * rank
    for i, p in enumerate(perm):
        back[p] = i
    moved = g.op("Transpose", R, perm=perm, hint=f"{hint}_moved")
    return g.op("Transpose", g.op("MatMul", moved, M, hint=f"{hint}_scatter"), perm=back, hint=hint)


def _axis_size(ctx: Ctx, x: str, axis: int) -> int:
    shape = ctx.view.shape(x)
    d = None if shape is None else shape[axis]
    if d is None:
        raise Unsupported(f"needs the static size of axis {axis} of {x!r}" + static_hint(ctx.view))
    return int(d)


# -- Slice -----------------------------------------------------------------------------------------

def slice_indices(starts, ends, axes, steps, shape, hint: str = "") -> dict[int, np.ndarray]:
    """{axis: the selected positions along it, in output order} of an ONNX Slice (numpy's rules)."""
    rank = len(shape)
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    picked = {}
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a + rank if a < 0 else a
        if st == 0:
            raise Unsupported("a Slice step of 0")
        if st == 1 and s in (0, -_INT64_MAX - 1) and e >= 2**31 - 1:
            continue  # the whole axis (``x[:, ...]`` written out by an exporter): nothing to scatter
        d = shape[a]
        if d is None:
            raise Unsupported(f"needs the static size of sliced axis {a}" + hint)
        s = max(min(s, _INT64_MAX - 1), -_INT64_MAX)
        e = max(min(e, _INT64_MAX - 1), -_INT64_MAX)
        picked[a] = np.arange(d)[slice(s, e, st)]
    return picked


@handler("Slice", rules=("pass",))
def slice_back(ctx: Ctx, unit: Unit, R: str) -> dict:
    node = unit.nodes[0]
    x = node.input[0]
    ins = list(node.input) + [""] * 5
    if len(node.input) > 1:  # opset >= 10: starts, ends, axes, steps as inputs
        starts = _const_ints(ctx, ins[1], "starts")
        ends = _const_ints(ctx, ins[2], "ends")
        axes = _const_ints(ctx, ins[3], "axes")
        steps = _const_ints(ctx, ins[4], "steps")
    else:
        a = unit.info
        starts, ends = list(a.get("starts", [])), list(a.get("ends", []))
        axes, steps = (list(a["axes"]) if "axes" in a else None), None
    shape = ctx.view.shape(x)
    if shape is None:
        raise Unsupported("needs the input's rank")
    rank = len(shape)
    picked = slice_indices(starts, ends, axes, steps, shape, static_hint(ctx.view))
    if 0 in picked and len(picked[0]) != (shape[0] or -1):
        raise Unsupported("slices the batch axis")
    r = R
    for a, idx in sorted(picked.items()):
        if len(idx) == 0:
            return {}
        r = _scatter_axis(ctx, r, a, rank, idx, int(shape[a]), hint="r_slice")
    return {x: r}


# -- Gather ----------------------------------------------------------------------------------------

@handler("Gather", rules=("pass",))
def gather_back(ctx: Ctx, unit: Unit, R: str) -> dict:
    node = unit.nodes[0]
    x, idx_name = node.input[0], node.input[1]
    if x not in ctx.view.dynamic:
        raise Unsupported("a lookup into a constant table by run-time indices (an embedding) is not a "
                          "routing op")
    shape = ctx.view.shape(x)
    if shape is None:
        raise Unsupported("needs the input's rank")
    rank = len(shape)
    axis = int(unit.info.get("axis", 0))
    axis = axis + rank if axis < 0 else axis
    g = ctx.g
    if rank == 1 and (not ctx.view.is_const(idx_name) or shape[0] is None):
        # a flattened tensor read at computed positions (the dynamo exporter's as_strided with a
        # dynamic batch): scatter-add back at run time, at the very positions the forward read
        flat_idx = g.op("Reshape", idx_name, g.ints([-1]), hint="gather_idx_flat")
        flat_r = g.op("Reshape", R, g.ints([-1]), hint="r_gather_flat")
        return {x: g.op("ScatterElements", _zeros_like(ctx, x), flat_idx, flat_r, axis=0, reduction="add",
                        hint="r_gather")}
    if not ctx.view.is_const(idx_name):
        raise Unsupported("indices computed at run time" + (
            " (if they only depend on the input's symbolic sizes, --input-shape with fixed sizes makes them "
            "constant)" if _symbolic_input(ctx) else ""))
    size = _axis_size(ctx, x, axis)
    idx = np.asarray(ctx.view.value(idx_name)).astype(np.int64)
    flat = np.where(idx < 0, idx + size, idx).reshape(-1)
    r = R
    if idx.ndim == 0:
        r = g.op("Unsqueeze", R, g.ints([axis]), hint="r_gather_axis")
    elif idx.ndim > 1:  # the index dims back into one axis: [lead..., K, trail...]
        trail = shape[axis + 1:]
        if any(d is None for d in trail):
            raise Unsupported("multi-dimensional indices need static trailing sizes")
        r = g.op("Reshape", R, g.ints([0] * axis + [flat.size] + [int(d) for d in trail]), hint="r_gather_flat")
    return {x: _scatter_axis(ctx, r, axis, rank, flat, size, hint="r_gather")}


# -- Expand / Tile ---------------------------------------------------------------------------------

@handler("Expand", rules=("pass",))
def expand_back(ctx: Ctx, unit: Unit, R: str) -> dict:
    x = unit.nodes[0].input[0]
    if x not in ctx.view.dynamic:
        return {}  # a constant copied to the batch (a class token, a mask): it keeps its share
    y_shape = ctx.view.shape(unit.output)
    x_shape = ctx.view.shape(x)
    if y_shape is None or x_shape is None:
        raise Unsupported("needs the ranks of input and output")
    lead = len(y_shape) - len(x_shape)
    if any(d is None and y_shape[lead + i] is not None and y_shape[lead + i] != 1 for i, d in enumerate(x_shape)):
        raise Unsupported("needs the input's static sizes along the broadcast axes")
    return {x: ctx.unbroadcast(R, x, y_shape)}


@handler("Tile", rules=("pass",))
def tile_back(ctx: Ctx, unit: Unit, R: str) -> dict:
    node = unit.nodes[0]
    x = node.input[0]
    reps = _const_ints(ctx, node.input[1], "repeats")
    shape = ctx.view.shape(x)
    if shape is None or any(d is None for k, d in enumerate(shape) if reps[k] != 1):
        raise Unsupported("needs the static sizes of the tiled axes")
    g = ctx.g
    if reps[0] != 1:
        raise Unsupported("tiles the batch axis")
    # [.., reps_k * d_k, ..] -> [.., reps_k, d_k, ..], summed over the reps axes
    target, axes = [0], []
    for k in range(1, len(shape)):
        if reps[k] != 1:
            axes.append(len(target))
            target += [reps[k], int(shape[k])]
        else:
            target.append(-1 if shape[k] is None else int(shape[k]))
    if not axes:
        return {x: R}
    if target.count(-1) > 1:
        raise Unsupported("needs static sizes")
    split = g.op("Reshape", R, g.ints(target), hint="r_tile_split")
    return {x: g.op("Reshape", g.op("ReduceSum", split, g.ints(axes), keepdims=0, hint="r_tile"),
                    g.op("Shape", x))}


# -- Where -----------------------------------------------------------------------------------------

@handler("Where", rules=("pass",))
def where_back(ctx: Ctx, unit: Unit, R: str) -> dict:
    node = unit.nodes[0]
    c, a, b = node.input[0], node.input[1], node.input[2]
    if not ctx.view.is_const(c):
        raise Unsupported("a condition computed from activations (only a constant condition routes exactly)")
    g = ctx.g
    y_shape = ctx.view.shape(unit.output)
    zero = g.const(0.0)
    out = {}
    if a in ctx.view.dynamic and ctx.view.is_float(a):
        out[a] = ctx.unbroadcast(g.op("Where", c, R, zero, hint="r_where_a"), a, y_shape)
    if b in ctx.view.dynamic and ctx.view.is_float(b):
        out[b] = ctx.unbroadcast(g.op("Where", c, zero, R, hint="r_where_b"), b, y_shape)
    return out


# -- Pad (reflect / edge) --------------------------------------------------------------------------

def pad_sources(size: int, before: int, after: int, mode: str) -> np.ndarray:
    """For each position of a padded axis, the input position its value is copied from."""
    pos = np.arange(-before, size + after)
    if mode == "edge":
        return np.clip(pos, 0, size - 1)
    if mode == "wrap":
        return np.mod(pos, size)
    if size == 1:
        return np.zeros_like(pos)
    period = 2 * (size - 1)
    m = np.mod(pos, period)
    return np.where(m < size, m, period - m)


def pad_copies(ctx: Ctx, unit: Unit, R: str, mode: str, pads: np.ndarray, axes: list[int] | None) -> str:
    """Relevance of ``reflect`` / ``edge`` padding routed back to the copied values."""
    x = unit.nodes[0].input[0]
    shape = ctx.view.shape(x)
    if shape is None:
        raise Unsupported("needs the input's rank")
    rank = len(shape)
    axes = list(range(rank)) if axes is None else [a + rank if a < 0 else a for a in axes]
    n = len(axes)
    r = R
    for i, a in enumerate(axes):
        before, after = int(pads[i]), int(pads[n + i])
        if before == 0 and after == 0:
            continue
        if before < 0 or after < 0:
            raise Unsupported("negative pads with reflect/edge mode")
        if a == 0:
            raise Unsupported("pads the batch axis")
        size = _axis_size(ctx, x, a)
        src = pad_sources(size, before, after, mode)
        r = _scatter_axis(ctx, r, a, rank, src, size, hint=f"r_pad_{mode}")
    return r

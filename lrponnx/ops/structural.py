"""Ops that move or merge relevance without weights: pass-through activations, reshapes,
Concat (split back), Pad (crop back), Add/Sum of activations (`norm`)."""
from __future__ import annotations

import numpy as np

from lrponnx.compiler.units import Unit
from lrponnx.ops.context import Ctx, Product, Unsupported
from lrponnx.ops.registry import handler

PASS_OPS = ("Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Dropout", "Identity", "Cast",
            "BatchNormalization")


@handler(*PASS_OPS, rules=("pass",))
def pass_through(ctx: Ctx, unit: Unit, R: str) -> dict:
    return {unit.inputs[0]: R}


@handler("Reshape", "Flatten", "Squeeze", "Unsqueeze", rules=("pass",))
def reshape_back(ctx: Ctx, unit: Unit, R: str) -> dict:
    x = unit.nodes[0].input[0]
    return {x: ctx.g.op("Reshape", R, ctx.g.op("Shape", x), hint="r_reshape")}


@handler("Transpose", rules=("pass",))
def transpose_back(ctx: Ctx, unit: Unit, R: str) -> dict:
    x = unit.inputs[0]
    perm = unit.info.get("perm")
    if perm is None:
        shape = ctx.view.shape(x)
        if shape is None:
            raise Unsupported("Transpose without perm needs a known rank")
        perm = list(range(len(shape)))[::-1]
    inverse = list(np.argsort(perm))
    return {x: ctx.g.op("Transpose", R, perm=[int(i) for i in inverse], hint="r_transpose")}


@handler("Add", "Sub", "Mul", "Div", "Sum", rules=("norm", "pass"))
def elementwise(ctx: Ctx, unit: Unit, R: str) -> dict:
    node = unit.nodes[0]
    dyn = unit.inputs
    y = unit.output
    y_shape = ctx.view.shape(y)
    if len(dyn) == 1:
        x = dyn[0]
        if node.op_type == "Div" and node.input[0] != x:
            raise Unsupported("division of a constant by an activation is not linear in it")
        if unit.rule.name == "norm" and node.op_type in ("Add", "Sub", "Sum"):
            # the constant addend keeps its share (AttnLRP: bias, position embeddings): x R / stab(y)
            q = ctx.stab_div(R, y, unit.rule.epsilon, hint="q_shift")
            if node.op_type == "Sub" and node.input[0] != x:
                q = ctx.g.op("Neg", q, hint="q_shift_neg")
            return {x: ctx.unbroadcast(ctx.g.op("Mul", x, q, hint="r_shift"), x, y_shape)}
        # An activation shifted or scaled by a constant (input normalisation): pass.
        return {x: ctx.unbroadcast(R, x, y_shape)}
    if node.op_type not in ("Add", "Sum"):
        raise Unsupported(f"{node.op_type} of two activations has no LRP rule in the contract")
    if unit.rule.name == "pass":
        raise Unsupported("pass cannot split relevance between several inputs; use norm")
    q = ctx.stab_div(R, y, unit.rule.epsilon)
    out = {}
    for a in dyn:
        if y_shape is not None and ctx.view.shape(a) == y_shape:
            # a q, summed with a's other relevance factors before one multiply (combine); the product
            # with a ReLU's output is what relu_factored_quotient divides without a sign test
            out[a] = Product(a, (q,))
        else:
            out[a] = ctx.unbroadcast(ctx.g.op("Mul", a, q, hint="r_add"), a, y_shape)
    return out


@handler("Concat", rules=("pass",))
def concat_split(ctx: Ctx, unit: Unit, R: str) -> dict:
    node = unit.nodes[0]
    axis = int(unit.info["axis"])
    sizes = []
    for i in node.input:
        shape = ctx.view.shape(i)
        sizes.append(None if shape is None else shape[axis])
    if any(s is None for s in sizes):  # e.g. a class token expanded to the batch: sizes read at run time
        g = ctx.g
        split = g.op("Concat", *[g.op("Gather", g.op("Shape", i), g.ints([axis]), axis=0) for i in node.input],
                     axis=0, hint="concat_sizes")
    else:
        split = ctx.g.ints(sizes)
    parts = ctx.g.op("Split", R, split, axis=axis, outputs=len(sizes), hint="r_concat")
    if len(sizes) == 1:
        parts = [parts]
    return {i: p for i, p in zip(node.input, parts) if i in ctx.view.dynamic}


@handler("Pad", rules=("pass",))
def pad_crop(ctx: Ctx, unit: Unit, R: str) -> dict:
    node = unit.nodes[0]
    mode = unit.info.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if not ctx.view.is_const(node.input[1]):
        raise Unsupported("pads computed at run time (from activations, or from sizes that stay symbolic: "
                          "--input-shape may fix them)")
    pads = ctx.view.value(node.input[1]).astype(np.int64)
    axes = [node.input[3]] if len(node.input) > 3 and node.input[3] else []
    if mode in ("reflect", "edge", "wrap"):  # copies of input values: routed back to them
        from lrponnx.ops.routing import pad_copies

        if axes and not ctx.view.is_const(axes[0]):
            raise Unsupported("axes computed at run time")
        axis_list = [int(a) for a in ctx.view.value(axes[0]).reshape(-1)] if axes else None
        return {node.input[0]: pad_copies(ctx, unit, R, mode, pads, axis_list)}
    if mode != "constant":
        raise Unsupported(f"padding mode {mode!r}")
    # Pad with negated pads crops (and re-pads with zeros where the forward cropped).
    r = ctx.g.op("Pad", R, ctx.g.ints(-pads), "", *axes, mode="constant", hint="r_pad")
    return {node.input[0]: r}

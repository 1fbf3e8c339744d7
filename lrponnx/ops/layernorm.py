"""Layer normalisation with the normalisation held constant (the AttnLRP rule for LayerNorm).

``y = (x - mean(x)) / σ ⊙ γ + β`` with ``σ = sqrt(var(x) + eps)`` over the normalised axes. Holding
``σ`` constant (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
Transformers", ICML 2024, the identity rule on ``1/σ``; the same "LN-rule" as Ali et al., "XAI for
Transformers: Better Explanations through Conservative Propagation", ICML 2022, which detaches
``σ``), ``y`` is a linear map of ``x``: centring (``I - 11ᵀ/n``), a scale by ``γ/σ``, and the bias
``β``. The epsilon rule on that map (the contract, ``../shared/docs/lrp-rules.md``, "Beyond
Caffe-era CNNs"):

    s = R_y / stab(y),  g = s ⊙ γ / σ,  R_x = x ⊙ (g − mean(g))     (mean over the normalised axes)

``β`` keeps its share (``Σ R_x = Σ (y − β) ⊙ s``). Rule ``epsilon`` (default; its stabiliser is the
composite's ``--epsilon``), or ``pass`` (``R_x = R_y``, the identity, for comparison).

Two forms are recognised:

- the ONNX ``LayerNormalization`` op (opset 17; both PyTorch exporters write ``nn.LayerNorm`` and
  torchvision's ``LayerNorm2d`` as a permute + this op over the last axis);
- the decomposed chain ``ReduceMean → Sub → Pow|Mul → ReduceMean → Add(eps) → Sqrt → Div`` (or
  ``Mul(·, Reciprocal)``), then optionally ``Mul(γ)`` and ``Add(β)`` by constants: what a
  hand-written LayerNorm (ConvNeXt's channels-first one, ``(x - u) / sqrt(s + eps)``) exports to, over
  any axes. :func:`lrponnx.compiler.layernorm_match.find_decomposed_layernorm` groups those nodes
  into one unit (kind ``LayerNorm``); there the forward's own ``σ`` (the Sqrt) is reused.
"""
from __future__ import annotations

import numpy as np

from lrponnx.compiler.layernorm_match import LayerNormSpec
from lrponnx.compiler.units import Unit
from lrponnx.ops.context import Ctx, Unsupported
from lrponnx.ops.registry import handler

RULES = ("epsilon", "pass")


def _static_count(ctx: Ctx, x: str, axes: list[int]) -> int:
    shape = ctx.view.shape(x)
    if shape is None or any(shape[a] is None for a in axes):
        from lrponnx.compiler.shapes import static_hint

        raise Unsupported("needs the static sizes of the normalised axes" + static_hint(ctx.view))
    return int(np.prod([shape[a] for a in axes]))


def _mean(ctx: Ctx, t: str, axes: list[int], n: int, hint: str) -> str:
    g = ctx.g
    return g.op("Mul", g.op("ReduceSum", t, g.ints(axes), keepdims=1, hint=f"{hint}_sum"), g.const(1.0 / n),
                hint=hint)


def layer_norm_relevance(ctx: Ctx, unit: Unit, R: str, spec: LayerNormSpec) -> dict:
    if unit.rule.name == "pass":
        return {spec.x: R}
    g = ctx.g
    x, axes = spec.x, spec.axes
    n = _static_count(ctx, x, axes)
    if spec.sigma is not None:
        sigma = spec.sigma
    else:  # σ as the forward computes it (float32, population variance)
        centred = g.op("Sub", x, _mean(ctx, x, axes, n, "ln_mean"), hint="ln_centred")
        var = _mean(ctx, g.op("Mul", centred, centred, hint="ln_sq"), axes, n, "ln_var")
        sigma = g.op("Sqrt", g.op("Add", var, g.const(float(spec.eps)), hint="ln_var_eps"), hint="ln_sigma")
    s = ctx.stab_div(R, unit.output, unit.rule.epsilon, hint="q_ln")
    gs = s if spec.gamma is None else g.op("Mul", s, g.const(spec.gamma, hint=f"{unit.name}/gamma"), hint="ln_sg")
    gq = g.op("Div", gs, sigma, hint="ln_g")
    centred_g = g.op("Sub", gq, _mean(ctx, gq, axes, n, "ln_g_mean"), hint="ln_g_centred")
    return {x: g.op("Mul", x, centred_g, hint="r_ln")}


@handler("LayerNormalization", rules=RULES)
def layer_normalization(ctx: Ctx, unit: Unit, R: str) -> dict:
    node = unit.nodes[0]
    if len([o for o in node.output if o]) > 1 and any(ctx.view.consumers.get(o) for o in node.output[1:] if o):
        raise Unsupported("its Mean / InvStdDev outputs are used")
    x = node.input[0]
    shape = ctx.view.shape(x)
    if shape is None:
        raise Unsupported("needs the input's rank")
    rank = len(shape)
    axis = int(unit.info.get("axis", -1))
    axis = axis + rank if axis < 0 else axis
    if axis == 0:
        raise Unsupported("normalises over the batch axis")
    ins = list(node.input) + ["", ""]
    for i in (ins[1], ins[2]):
        if i and not ctx.view.is_const(i):
            raise Unsupported("its scale or bias is computed at run time")
    gamma = ctx.view.value(ins[1]).astype(np.float32) if ins[1] else None
    beta = ctx.view.value(ins[2]).astype(np.float32) if ins[2] else None
    spec = LayerNormSpec(x, list(range(axis, rank)), float(unit.info.get("epsilon", 1e-5)), gamma, beta)
    return layer_norm_relevance(ctx, unit, R, spec)


@handler("LayerNorm", rules=RULES)
def layer_norm_decomposed(ctx: Ctx, unit: Unit, R: str) -> dict:
    return layer_norm_relevance(ctx, unit, R, unit.info)

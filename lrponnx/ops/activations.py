"""Elementwise activations (the identity rule) and gating products (signal takes all).

- **Identity** (``pass``): an elementwise non-linearity hands its output relevance to its input
  unchanged, as ReLU does under LRP (Bach et al. 2015; Montavon et al. 2019, sec. 10.2.1; Zennit's
  ``Pass`` on activations; LXT's identity rule for GELU/SiLU, Achtibat et al. 2024). ReLU, Sigmoid,
  Tanh, Clip (ReLU6), LeakyRelu, PRelu and Elu are in :mod:`.structural`; the ops added here are
  HardSigmoid, HardSwish, Gelu, Softplus, Softsign, Selu, Celu, Mish, ThresholdedRelu and Swish.
- **Signal takes all** (``signal-takes-all``): a product ``y = s ⊙ g`` of two activations where
  ``g`` is a gate, i.e. computed through a sigmoid-like non-linearity (Sigmoid, HardSigmoid, the
  hard sigmoid ``Clip(x + 3, 0, 6) / 6``, or ``0.5 (1 + Erf(x / √2))`` of GELU written with Erf):
  ``R_s = R_y`` and the gate gets nothing (Arras et al. 2017, "Explaining recurrent neural network
  predictions in sentiment analysis", for the gates of LSTMs). This covers squeeze-excitation
  blocks (``x · Sigmoid(fc(pool(x)))``), SiLU/Swish written as ``x · Sigmoid(x)``, HardSwish
  written as ``x · HardSigmoid(x)`` and GELU written with Erf (then identity overall, as the
  ``Gelu`` op). Which operand is the gate is read from the graph: the operand whose producer,
  through constant shifts/scales, casts and reshapes, is one of those gate ops. When both or
  neither are, the node is refused. ``lrponnx inspect`` shows the decision in its notes.
- A product with a constant (layer scale) is the ``pass`` of :mod:`.structural`: unchanged.
"""
from __future__ import annotations

import numpy as np

from lrponnx.compiler.units import Unit
from lrponnx.ops.context import Ctx, Unsupported
from lrponnx.ops.registry import handler
from lrponnx.ops.structural import elementwise

IDENTITY_OPS = ("HardSigmoid", "HardSwish", "Gelu", "Softplus", "Softsign", "Selu", "Celu", "Mish",
                "ThresholdedRelu", "Swish")

#: ops whose output is a gate (a value in [0, 1] that scales a signal)
GATE_OPS = ("Sigmoid", "HardSigmoid", "Erf")
#: ops a gate may pass through on its way to the product without stopping being the gate
_TRANSPARENT = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Transpose")
_AFFINE = ("Add", "Sub", "Mul", "Div")


@handler(*IDENTITY_OPS, rules=("pass",))
def identity(ctx: Ctx, unit: Unit, R: str) -> dict:
    return {unit.inputs[0]: R}


def gate_source(view, name: str, depth: int = 8):
    """The gate op that ``name`` is computed through (a NodeProto), or None."""
    for _ in range(depth):
        node = view.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in GATE_OPS:
            return node
        dyn = [i for i in node.input if i and i in view.dynamic]
        if len(dyn) != 1:
            return None
        if node.op_type == "Clip":  # hard sigmoid: Clip(x + 3, 0, 6) / 6 (a ReLU6 alone is no gate)
            lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
            hi = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if lo and hi and view.is_const(lo) and view.is_const(hi) and float(view.value(lo)) == 0.0 \
                    and _scaled_to_unit(view, name, float(view.value(hi))):
                return node
            return None
        if node.op_type in _TRANSPARENT or (node.op_type in _AFFINE and node.input[0] == dyn[0]) \
                or (node.op_type in ("Add", "Mul") and dyn[0] in node.input):
            name = dyn[0]
            continue
        return None
    return None


def _scaled_to_unit(view, clip_out: str, hi: float) -> bool:
    """``Clip(.., 0, hi)`` followed by a division by ``hi`` (or a product with ``1/hi``)."""
    for user in view.consumers.get(clip_out, []):
        other = [i for i in user.input if i and i != clip_out]
        if len(other) != 1 or not view.is_const(other[0]):
            continue
        v = np.asarray(view.value(other[0]), dtype=np.float64)
        if v.size != 1:
            continue
        v = float(v.reshape(()))
        if (user.op_type == "Div" and abs(v - hi) < 1e-6 * hi) or (user.op_type == "Mul" and abs(v * hi - 1) < 1e-6):
            return True
    return False


def split_gate(ctx: Ctx, unit: Unit) -> tuple[str, str, str]:
    """(signal, gate, how the gate was recognised) for a product of two activations."""
    a, b = unit.inputs[0], unit.inputs[1]
    ga, gb = gate_source(ctx.view, a), gate_source(ctx.view, b)
    if ga is not None and gb is not None:
        raise Unsupported(f"both operands are gates ({ga.op_type} {ga.name!r}, {gb.op_type} {gb.name!r}): "
                          "no signal to give the relevance to")
    if ga is None and gb is None:
        raise Unsupported("product of two activations where neither is a gate (computed through Sigmoid, "
                          "HardSigmoid or GELU's Erf): no LRP rule")
    return (b, a, f"{ga.op_type} {ga.name!r}") if ga is not None else (a, b, f"{gb.op_type} {gb.name!r}")


@handler("Mul", rules=("signal-takes-all", "pass", "norm"), replace=True)  # refines structural's Mul
def gated_product(ctx: Ctx, unit: Unit, R: str) -> dict:
    """A product: by a constant, ``pass`` (structural); of two activations, signal takes all."""
    if len(unit.inputs) == 1:
        return elementwise(ctx, unit, R)
    if len(set(unit.nodes[0].input)) == 1:
        raise Unsupported("the square of an activation (x * x) has no LRP rule")
    if unit.rule.name != "signal-takes-all":
        raise Unsupported(f"rule {unit.rule.name!r} cannot split a product of two activations; "
                          "use signal-takes-all")
    signal, gate, how = split_gate(ctx, unit)
    note = f"signal takes all: signal {signal!r}, gate {gate!r} (through {how}) gets no relevance"
    if note not in unit.notes:
        unit.notes.append(note)
    return {signal: ctx.unbroadcast(R, signal, ctx.view.shape(unit.output))}

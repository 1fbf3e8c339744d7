"""Linear layers (Conv, ConvTranspose, Gemm, MatMul with constant weights): the operations
their rules are built from.

:class:`LinearOps` supplies the forward ``W x + b`` and the vector-Jacobian product ``W^T q``
of one layer for substitute weights; :class:`Vjp` is one such product left for the compiler to
emit (and merge with its siblings). The rules themselves (epsilon, zplus, alpha-beta, gamma,
zbox, wsquare, flat) are in lrponnx/rules/linear.py; the ``Linear`` handler below calls the
unit's rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrponnx.compiler.linear_layers import LazyWeight, LinearLayer
from lrponnx.compiler.shapes import static_hint
from lrponnx.compiler.units import Unit
from lrponnx.ops.context import Ctx, Unsupported
from lrponnx.ops.registry import UNKNOWN, handler


class LinearOps:
    """One linear layer (``p``: its :class:`~lrponnx.compiler.linear_layers.LinearLayer`) bound to
    the graph being emitted: forward and vector-Jacobian product with substitute weights, each
    weight stored once per key. ``layer`` replaces the unit's own (the flat rule's one-channel
    form of it)."""

    def __init__(self, ctx: Ctx, unit: Unit, layer: LinearLayer | None = None):
        self.ctx, self.g, self.unit = ctx, ctx.g, unit
        self.p: LinearLayer = unit.info if layer is None else layer
        self._weights: dict[str, str] = {}
        why = _conv_shape_problem(ctx, self.p)
        if why is not None:
            raise Unsupported(why)

    def weight(self, key: str, W: np.ndarray) -> str:
        """The initializer holding substitute weight ``W`` (stored once per key)."""
        if key == "w" and self.p.source and not self.p.source_transposed:
            return self.p.source  # the model's own initializer: no second copy
        if key not in self._weights:
            self._weights[key] = self.g.const(W, hint=f"{self.unit.name}/W_{key}")
        return self._weights[key]

    def forward(self, x: str, key: str, W: np.ndarray, b: np.ndarray | None) -> str:
        """``W x + b`` for substitute weights (b None: no bias)."""
        return self.p.emit_forward(self.g, x, self.weight(key, W), b, self.unit.name, key)

    def vjp(self, q: str, key: str, W: np.ndarray | None) -> str:
        """``W^T q``: the gradient of ``W x`` with respect to x, shaped like x.
        ``W=None`` means the layer's own weight, read only if its initializer cannot be reused."""
        return self.p.emit_vjp(self.g, q, key, LazyWeight(self.p) if W is None else W, self.weight,
                               hint=f"{self.unit.name}/vjp_{key}")

    def constant_forward(self, x_value: np.ndarray, W: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """``W x + b`` for a constant input (one sample), computed now in numpy (float64)."""
        return self.p.constant_forward(x_value, W, b)

    def single_channel_ones(self) -> "LinearOps | None":
        """This layer with one channel in and out and an all-ones kernel (see
        :meth:`LinearLayer.single_channel_ones`), bound to the same graph; None where it does not apply."""
        layer = self.p.single_channel_ones()
        return None if layer is None else LinearOps(self.ctx, self.unit, layer)

    def sample_shape(self) -> list[int]:
        """The input's shape for one sample (batch 1), which must be static past the batch dim."""
        shape = self.p.x_shape
        if shape is None or any(d is None for d in shape[1:]):
            raise Unsupported("this rule needs a static input shape past the batch dimension")
        return [1] + list(shape[1:])


@dataclass(frozen=True, eq=False)
class Vjp:
    """``W^T q`` of one layer, emitted when the compiler sums the relevance of ``x`` (a term of a
    :class:`~lrponnx.ops.context.Product`). Terms whose layers give the same
    :meth:`~LinearLayer.vjp_merge_key` (group-1 convolutions of one geometry reading the same x)
    are emitted as one op by the layer's ``emit_vjp_group``."""

    ops: LinearOps
    q: str
    key: str
    W: np.ndarray | None  # None: the layer's own weight

    def emit(self) -> str:
        return self.ops.vjp(self.q, self.key, self.W)

    @property
    def merge_key(self):
        return self.ops.p.vjp_merge_key()

    @staticmethod
    def emit_group(terms: list["Vjp"]) -> str:
        first = terms[0].ops
        Ws = [np.asarray(t.W if t.W is not None else t.ops.p.W, np.float32) for t in terms]
        names = "+".join(t.ops.unit.name for t in terms)
        return first.p.emit_vjp_group(first.g, [t.q for t in terms], Ws, names)


def _conv_shape_problem(ctx: Ctx, p: LinearLayer) -> str | None:
    """A convolution's rules need its static channel and spatial sizes (None: they are known)."""
    if p.is_conv and (p.x_shape is None or p.z_shape is None or any(d is None for d in p.x_shape[1:] + p.z_shape[1:])):
        return "needs static channel and spatial sizes" + static_hint(ctx.view)
    return None


def _linear_supported(ctx: Ctx, unit: Unit):
    """What the Linear handler refuses, without emitting: a convolution without static sizes. With
    a static input past the batch dimension no rule refuses (LinearOps.sample_shape); otherwise it
    depends on the rule's form, and only the emission tells."""
    why = _conv_shape_problem(ctx, unit.info)
    if why is not None:
        return why
    x_shape = unit.info.x_shape
    return None if x_shape is not None and all(d is not None for d in x_shape[1:]) else UNKNOWN


_NOT_CONSTANT = ("its weight or bias is computed at run time (or transA=1 / output_shape is set); "
                 "LRP needs constant weights")


@handler("Linear", rules=(), supports=_linear_supported)
def linear_layer(ctx: Ctx, unit: Unit, R: str) -> dict:
    # The rule emits itself: lrponnx/rules/linear.py (its rules name "Linear" in ``applies_to``).
    ops = LinearOps(ctx, unit)
    x = unit.inputs[0]
    return {x: unit.rule.emit(ctx, ops, x, unit.output, R)}


# MatMul and Gemm that are no linear layer have their own handlers (ops/matmul.py).
@handler("Conv", "ConvTranspose", rules=("epsilon",), supports=lambda ctx, unit: _NOT_CONSTANT)
def linear_not_constant(ctx: Ctx, unit: Unit, R: str) -> dict:
    # Reached only when units.py could not read constant weights.
    raise Unsupported(_NOT_CONSTANT)

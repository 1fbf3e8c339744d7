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

from lrponnx.compiler.constants import run_op
from lrponnx.compiler.units import Unit
from lrponnx.ops.context import Ctx, Unsupported
from lrponnx.ops.registry import handler


class LinearOps:
    """Forward and vector-Jacobian product of one linear layer with substitute weights."""

    def __init__(self, ctx: Ctx, unit: Unit):
        self.ctx, self.g, self.unit, self.p = ctx, ctx.g, unit, unit.info
        self._weights: dict[str, str] = {}
        p = self.p
        if p.kind in ("conv", "convtranspose"):
            x_shape, z_shape = p.x_shape, p.z_shape
            if x_shape is None or z_shape is None or any(d is None for d in x_shape[1:] + z_shape[1:]):
                from lrponnx.compiler.shapes import static_hint

                raise Unsupported("needs static channel and spatial sizes" + static_hint(ctx.view))

    # -- weights ---------------------------------------------------------------------------------
    def weight(self, key: str, W: np.ndarray) -> str:
        if key == "w" and self.p.source and not self.p.source_transposed:
            return self.p.source  # the model's own initializer: no second copy
        if key not in self._weights:
            self._weights[key] = self.g.const(W, hint=f"{self.unit.name}/W_{key}")
        return self._weights[key]

    def _conv_attrs(self) -> dict:
        """Every geometry attribute stated (WebGPU's provider reads them from the node)."""
        a = self.p.attrs
        return dict(kernel_shape=list(self.p.weight_shape[2:]), strides=a["strides"], pads=a["pads"],
                    dilations=a["dilations"], group=a["group"])

    def _flipped_attrs(self) -> dict:
        """The stride-1 backward Conv (kernel flipped, in/out swapped) with padding d(k-1)-p."""
        a, k = self.p.attrs, list(self.p.weight_shape[2:])
        return dict(kernel_shape=k, strides=[1] * len(k), pads=self._flipped_pads(), dilations=a["dilations"],
                    group=a["group"])

    def _vjp_output_padding(self) -> list[int]:
        """ConvTranspose output_padding that makes ``W^T q`` exactly the input's spatial size."""
        p, a = self.p, self.p.attrs
        k = p.weight_shape[2:]
        n = len(k)
        out = []
        for i in range(n):
            base = (a["strides"][i] * (p.z_shape[2 + i] - 1) + (k[i] - 1) * a["dilations"][i] + 1
                    - a["pads"][i] - a["pads"][n + i])
            out.append(p.x_shape[2 + i] - base)
        return out

    # -- the two linear maps -----------------------------------------------------------------------
    def forward(self, x: str, key: str, W: np.ndarray, b: np.ndarray | None) -> str:
        """``W x + b`` for substitute weights (b None: no bias)."""
        g, p = self.g, self.p
        w = self.weight(key, W)
        bias = [g.const(b, hint=f"{self.unit.name}/b_{key}")] if b is not None else []
        if p.kind == "conv":
            return g.op("Conv", x, w, *bias, hint=f"{self.unit.name}/z_{key}", **self._conv_attrs())
        if p.kind == "convtranspose":
            return g.op("ConvTranspose", x, w, *bias, hint=f"{self.unit.name}/z_{key}",
                        output_padding=p.attrs["output_padding"], **self._conv_attrs())
        if p.kind == "gemm":
            return g.op("Gemm", x, w, *bias, transB=1, hint=f"{self.unit.name}/z_{key}")
        z = g.op("MatMul", x, w, hint=f"{self.unit.name}/z_{key}")
        return g.op("Add", z, g.const(b, hint=f"{self.unit.name}/b_{key}")) if b is not None else z

    def vjp(self, q: str, key: str, W: np.ndarray | None) -> str:
        """``W^T q``: the gradient of ``W x`` with respect to x, shaped like x.
        ``W=None`` means the layer's own weight, read only if its initializer cannot be reused."""
        g, p = self.g, self.p
        if W is None:
            W = _LazyWeight(p)
        hint = f"{self.unit.name}/vjp_{key}"
        if p.kind == "conv":
            if self._vjp_as_conv():
                # Stride 1: the backward pass is a plain Conv with in/out swapped per group, the
                # kernel flipped and padding d(k-1)-p, which ORT runs faster than ConvTranspose.
                a = self.p.attrs
                return g.op("Conv", q, self.weight(f"{key}_flipped", flipped_transpose(W, a["group"])), hint=hint,
                            **self._flipped_attrs())
            return g.op("ConvTranspose", q, self.weight(key, W), hint=hint,
                        output_padding=self._vjp_output_padding(), **self._conv_attrs())
        if p.kind == "convtranspose":
            return g.op("Conv", q, self.weight(key, W), hint=hint, **self._conv_attrs())
        rank2 = p.x_shape is not None and len(p.x_shape) == 2
        if key == "w" and p.source and rank2 and (p.kind == "matmul" or p.source_transposed):
            # The initializer holds W as [in, out]: q [N, out] times its transpose, no copy.
            return g.op("Gemm", q, p.source, transB=1, hint=hint)
        if p.kind == "gemm":
            return g.op("MatMul", q, self.weight(key, W), hint=hint)
        return g.op("MatMul", q, self.weight(f"{key}_T", np.ascontiguousarray(W.T)), hint=hint)

    def _flipped_pads(self) -> list[int]:
        a, k = self.p.attrs, self.p.weight_shape[2:]
        n = len(k)
        return [a["dilations"][i % n] * (k[i % n] - 1) - a["pads"][i] for i in range(2 * n)]

    def _vjp_as_conv(self) -> bool:
        a, shape = self.p.attrs, self.p.weight_shape
        n = len(shape) - 2
        if any(st != 1 for st in a["strides"]):
            return False
        return all(a["dilations"][i % n] * (shape[2 + i % n] - 1) - a["pads"][i] >= 0 for i in range(2 * n))

    def constant_forward(self, x_value: np.ndarray, W: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """``W x + b`` for a constant input (one sample), computed now with ONNX Runtime."""
        p = self.p
        ins = [x_value, W] + ([b] if b is not None else [])
        if p.kind == "conv":
            return run_op("Conv", ins, **self._conv_attrs())
        if p.kind == "convtranspose":
            return run_op("ConvTranspose", ins, output_padding=p.attrs["output_padding"], **self._conv_attrs())
        if p.kind == "gemm":
            return run_op("Gemm", ins, transB=1)
        z = x_value @ W
        return z + b if b is not None else z

    def sample_shape(self) -> list[int]:
        """The input's shape for one sample (batch 1), which must be static past the batch dim."""
        shape = self.p.x_shape
        if shape is None or any(d is None for d in shape[1:]):
            raise Unsupported("this rule needs a static input shape past the batch dimension")
        return [1] + list(shape[1:])


@dataclass(frozen=True, eq=False)
class Vjp:
    """``W^T q`` of one layer, emitted when the compiler sums the relevance of ``x`` (a term of a
    :class:`Product`). Convolutions (group 1) with the same geometry that feed the same ``x`` are
    merged: ``sum_b W_b^T q_b`` is one convolution of the concatenated ``q_b`` with the weights
    stacked along their output channels, one GEMM instead of several plus their sum (the 1x1
    branches of an inception block; the two halves of the gamma rule)."""

    ops: LinearOps
    q: str
    key: str
    W: np.ndarray | None  # None: the layer's own weight

    def emit(self) -> str:
        return self.ops.vjp(self.q, self.key, self.W)

    @property
    def merge_key(self):
        p = self.ops.p
        if p.kind != "conv" or p.attrs["group"] != 1:
            return None
        as_conv = self.ops._vjp_as_conv()
        geometry = self.ops._flipped_pads() if as_conv else self.ops._vjp_output_padding()
        return ("conv", as_conv, tuple(p.weight_shape[2:]), tuple(p.attrs["strides"]), tuple(p.attrs["pads"]),
                tuple(p.attrs["dilations"]), tuple(geometry), tuple(p.x_shape[1:]))

    @staticmethod
    def emit_group(terms: list["Vjp"]) -> str:
        first = terms[0].ops
        g, a = first.g, first.p.attrs
        q = g.op("Concat", *[t.q for t in terms], axis=1, hint="vjp_q_cat")
        Ws = [np.asarray(t.W if t.W is not None else t.ops.p.W, np.float32) for t in terms]
        names = "+".join(t.ops.unit.name for t in terms)
        if first._vjp_as_conv():  # flipped kernels [C, M_b, k]: stack along axis 1
            W = np.concatenate([flipped_transpose(W, 1) for W in Ws], axis=1)
            return g.op("Conv", q, g.const(W, hint=f"{names}/W_merged_flipped"), hint="vjp_merged",
                        **first._flipped_attrs())  # group 1: merge_key takes group-1 convolutions only
        return g.op("ConvTranspose", q, g.const(np.concatenate(Ws, axis=0), hint=f"{names}/W_merged"),
                    output_padding=first._vjp_output_padding(), hint="vjp_merged", **first._conv_attrs())


class _LazyWeight:
    """Stands for the layer's own weight; loads it only when a copy really has to be made."""

    def __init__(self, p):
        self.p = p

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


def flipped_transpose(W: np.ndarray, group: int) -> np.ndarray:
    """Conv weight [M, C/g, *k] -> the weight of its transposed conv as a Conv: [C, M/g, *k],
    in/out swapped within each group and the kernel flipped in every spatial axis."""
    W = np.asarray(W)
    M, Cg = W.shape[:2]
    k = W.shape[2:]
    Wg = W.reshape((group, M // group, Cg) + k).swapaxes(1, 2)  # [g, C/g, M/g, *k]
    Wg = np.flip(Wg, axis=tuple(range(3, 3 + len(k))))
    return np.ascontiguousarray(Wg.reshape((group * Cg, M // group) + k))


@handler("Linear", rules=())
def linear_layer(ctx: Ctx, unit: Unit, R: str) -> dict:
    # The rule emits itself: lrponnx/rules/linear.py (its rules name "Linear" in ``applies_to``).
    ops = LinearOps(ctx, unit)
    x = unit.inputs[0]
    return {x: unit.rule.emit(ctx, ops, x, unit.output, R)}


# MatMul and Gemm that are no linear layer have their own handlers (ops/matmul.py).
@handler("Conv", "ConvTranspose", rules=("epsilon",))
def linear_not_constant(ctx: Ctx, unit: Unit, R: str) -> dict:
    # Reached only when units.py could not read constant weights.
    raise Unsupported("its weight or bias is computed at run time (or transA=1 / output_shape is set); "
                      "LRP needs constant weights")

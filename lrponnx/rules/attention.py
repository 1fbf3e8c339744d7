"""AttnLRP rules (Achtibat et al., ICML 2024), emitted by lrponnx/ops/attention.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lrponnx.rules.base import Rule, register


@register
@dataclass(frozen=True)
class AttnLrpSoftmax(Rule):
    name: ClassVar[str] = "attnlrp-softmax"
    summary: ClassVar[str] = "Softmax inside the network: R_x = x (R - s sum R) (AttnLRP)"


@register
@dataclass(frozen=True)
class Uniform(Rule):
    """The eps-0 decomposition split evenly between the two factors (no stabiliser)."""

    name: ClassVar[str] = "uniform"
    summary: ClassVar[str] = "a product of two activations (Q K^T, A V): each factor half (AttnLRP)"


@register
@dataclass(frozen=True)
class AttnLrp(Rule):
    name: ClassVar[str] = "attnlrp"
    summary: ClassVar[str] = "a fused Attention op: the softmax and uniform rules inside it (AttnLRP)"

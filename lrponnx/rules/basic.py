"""Rules that the op handlers implement themselves (they branch on ``unit.rule.name`` and read
the rule's parameters as attributes, e.g. ``unit.rule.epsilon``): which kinds take each is
stated by the handlers (``@handler(..., rules=(...))`` in lrponnx/ops)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lrponnx.rules.base import Rule, number, register


@register
@dataclass(frozen=True)
class Pass(Rule):
    name: ClassVar[str] = "pass"
    summary: ClassVar[str] = "relevance passes through unchanged (activations, reshapes, routing)"


@register
@dataclass(frozen=True)
class Norm(Rule):
    name: ClassVar[str] = "norm"
    summary: ClassVar[str] = "each input's share of the output (Add, average pools, reductions)"
    epsilon: float = number(1e-6, nonnegative=True, help="stabiliser")


@register
@dataclass(frozen=True)
class WinnerTakeAll(Rule):
    name: ClassVar[str] = "winner-take-all"
    summary: ClassVar[str] = "a max pool's relevance goes to the maximum of each window"


@register
@dataclass(frozen=True)
class Proportional(Rule):
    name: ClassVar[str] = "proportional"
    summary: ClassVar[str] = "a max pool's relevance shared by each input's share of the window sum"
    epsilon: float = number(1e-6, nonnegative=True, help="stabiliser")


@register
@dataclass(frozen=True)
class SignalTakesAll(Rule):
    name: ClassVar[str] = "signal-takes-all"
    summary: ClassVar[str] = "a product of a signal and a gate (SiLU, SE blocks): the signal gets all"

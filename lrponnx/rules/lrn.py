"""THE LRN RULES: ``taylor`` (Binder et al., ICANN 2016) and ``identity``, for LRN /
WithinChannelLRN units.

Their parameters, defaults and checks are here; the emission is in
:func:`lrponnx.ops.lrn.lrn` (ops/lrn.py), because it shares the recomputed forward pass
(``x^2`` and ``s``) with the LRN node it replaces. The equations are in that module's docstring.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lrponnx.errors import RuleError
from lrponnx.rules.base import Rule, number, param, register

#: what taylor divides by: the sum of its Taylor terms (conservative) or the LRN output
DENOMINATORS = ("sum", "output")


@register
@dataclass(frozen=True)
class Taylor(Rule):
    name: ClassVar[str] = "taylor"
    summary: ClassVar[str] = "first-order Taylor expansion of LRN (Binder et al. 2016); emitted in ops/lrn.py"
    epsilon: float = number(1e-6, nonnegative=True, help="stabiliser (--lrn-epsilon)")
    denominator: str = param("sum", help="sum (of the Taylor terms, conservative) or output (--lrn-denominator)")

    def check(self):
        if self.denominator not in DENOMINATORS:
            raise RuleError(f"taylor's denominator must be 'sum' or 'output', got {self.denominator!r}")


@register
@dataclass(frozen=True)
class Identity(Rule):
    name: ClassVar[str] = "identity"
    summary: ClassVar[str] = "LRN hands the relevance through unchanged (the paper's baseline)"


#: the rules the LRN unit kind accepts (--lrn-rule), the default first
LRN_RULES = ("taylor", "identity")

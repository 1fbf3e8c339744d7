"""Composites: which rule each unit gets.

A composite (preset, as Zennit's layer-map composites) is an ordered list of
``(predicate over a unit, rule)``; the first predicate that holds gives the unit its rule. After
the composite's own entries come the ones every composite shares (:data:`COMMON_ENTRIES`):
attention ops are refused, LRN gets ``--lrn-rule``, an activation shifted or scaled by a
constant passes, LayerNorm and MatMul/Gemm by a constant get epsilon; any other unit gets its
handler's default rule (the first it names). Overrides by node name, op type or position
(``#N``, the node's index in the graph) come last.

The knobs of the CLI and API (``--epsilon``, ``--gamma``, ``--low/--high``, ``--lrn-*``) travel
in :class:`RuleOptions`; a composite's entries may be rules or functions of the options.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Union

from lrponnx.compiler.units import Unit
from lrponnx.errors import RuleError, shorten
from lrponnx.ops import Handler, load_handlers
from lrponnx.rules.attention import AttnLrp, AttnLrpSoftmax, Uniform
from lrponnx.rules.base import RULES, Rule, default, make_rule, parse_rule  # noqa: F401  (parse_rule: API)
from lrponnx.rules.basic import Norm, Pass
from lrponnx.rules.linear import AlphaBeta, Epsilon, Flat, Gamma, ZBox, ZPlus
from lrponnx.rules.lrn import LRN_RULES, Taylor

Predicate = Callable[[Unit], bool]


# -- predicates over units ------------------------------------------------------------------------

def is_linear(u: Unit) -> bool:
    """Conv, ConvTranspose, Gemm or MatMul with constant weights (``ops/linear.py``)."""
    return u.kind == "Linear"


def is_conv(u: Unit) -> bool:
    return is_linear(u) and u.info.is_conv


def is_dense(u: Unit) -> bool:
    return is_linear(u) and not is_conv(u)


def is_first_linear(u: Unit) -> bool:
    """A linear layer reached from a model input through no other linear layer."""
    return is_linear(u) and u.first


def is_first_conv(u: Unit) -> bool:
    return is_conv(u) and u.first


def is_softmax(u: Unit) -> bool:
    return u.kind == "Softmax"


def is_fused_attention(u: Unit) -> bool:
    return u.kind == "Attention"


def is_activation_product(u: Unit) -> bool:
    """A MatMul of two activations (attention's Q K^T and A V)."""
    return u.kind == "MatMul" and len(u.inputs) == 2


def is_attention(u: Unit) -> bool:
    return is_softmax(u) or is_fused_attention(u) or is_activation_product(u)


def is_constant_addend(u: Unit) -> bool:
    """An activation plus or minus a constant."""
    return u.kind in ("Add", "Sub", "Sum") and len(u.inputs) == 1


def is_constant_shift(u: Unit) -> bool:
    """An activation shifted or scaled by a constant."""
    return u.kind in ("Add", "Sub", "Mul", "Div", "Sum") and len(u.inputs) == 1


def is_lrn(u: Unit) -> bool:
    return u.kind == "LRN"


#: units whose default rule is the epsilon rule with the composite's --epsilon: LayerNorm (held
#: constant, ops/layernorm.py) and MatMul/Gemm with the constant on the left (ops/matmul.py)
EPSILON_KINDS = ("LayerNormalization", "LayerNorm", "MatMul", "Gemm")


def is_epsilon_kind(u: Unit) -> bool:
    return u.kind in EPSILON_KINDS


# -- options and composites ------------------------------------------------------------------------

@dataclass
class RuleOptions:
    """The knobs of the CLI and API; their defaults are the rules' own."""

    composite: str = "epsilon-plus-flat"
    epsilon: float = default(Epsilon, "epsilon")      # the epsilon rule's epsilon (dense layers)
    gamma: float = default(Gamma, "gamma")
    low: object = default(ZBox, "low")                # zbox bounds in model input units
    high: object = default(ZBox, "high")
    lrn_rule: str = LRN_RULES[0]
    lrn_epsilon: float = default(Taylor, "epsilon")
    lrn_denominator: str = default(Taylor, "denominator")
    overrides: list = field(default_factory=list)   # [(selector, Rule)]


#: an entry's rule: a rule, a function of the options, or None (the unit is refused)
Entry = tuple[Predicate, Union[Rule, Callable[[RuleOptions], Rule], None]]


def dense_epsilon(o: RuleOptions) -> Rule:
    """epsilon:epsilon=--epsilon"""
    return Epsilon(epsilon=o.epsilon)


def gamma_rule(o: RuleOptions) -> Rule:
    """gamma:gamma=--gamma"""
    return Gamma(gamma=o.gamma)


def box_rule(o: RuleOptions) -> Rule:
    """zbox:low=--low,high=--high"""
    return ZBox(low=o.low, high=o.high)


def lrn_rule(o: RuleOptions) -> Rule:
    """--lrn-rule (taylor:epsilon=--lrn-epsilon,denominator=--lrn-denominator)"""
    if o.lrn_rule == "taylor":
        return Taylor(epsilon=o.lrn_epsilon, denominator=o.lrn_denominator)
    return make_rule(o.lrn_rule)


@dataclass(frozen=True)
class Composite:
    name: str
    entries: list            # [Entry]: the first predicate that holds gives the rule
    #: the stabiliser of every chosen rule that has one, LRN's excepted (AttnLRP: 0); None: as chosen
    epsilon: float | None = None
    summary: str = ""


#: what every composite does after its own entries
COMMON_ENTRIES: list = [
    (is_attention, None),              # refused unless the composite has the AttnLRP rules
    (is_lrn, lrn_rule),
    (is_constant_shift, Pass()),
    (is_epsilon_kind, dense_epsilon),  # the dense layers' stabiliser (--epsilon)
]


_ALPHA2_BETA1 = AlphaBeta(alpha=2.0, beta=1.0)

COMPOSITES: dict[str, Composite] = {c.name: c for c in [
    Composite("epsilon-plus", [(is_conv, ZPlus()), (is_dense, dense_epsilon)],
              summary="z+ on convolutions, epsilon on dense layers"),
    Composite("epsilon-plus-flat", [(is_first_linear, Flat()), (is_conv, ZPlus()), (is_dense, dense_epsilon)],
              summary="epsilon-plus with flat on the first layer(s)"),
    Composite("epsilon-alpha2-beta1", [(is_conv, _ALPHA2_BETA1), (is_dense, dense_epsilon)],
              summary="alpha2-beta1 on convolutions, epsilon on dense layers"),
    Composite("epsilon-alpha2-beta1-flat",
              [(is_first_linear, Flat()), (is_conv, _ALPHA2_BETA1), (is_dense, dense_epsilon)],
              summary="epsilon-alpha2-beta1 with flat on the first layer(s)"),
    Composite("epsilon-gamma-box", [(is_first_conv, box_rule), (is_conv, gamma_rule), (is_dense, dense_epsilon)],
              summary="zbox on the first convolution(s), gamma on the others, epsilon on dense layers"),
    # AttnLRP (Achtibat et al., ICML 2024; LXT 2.1): epsilon with eps = 0 on linear layers and Adds,
    # LayerNorm with sigma constant, the softmax rule and the uniform rule on Q K^T and A V
    Composite("attnlrp", [(is_linear, dense_epsilon), (is_softmax, AttnLrpSoftmax()),
                          (is_fused_attention, AttnLrp()), (is_activation_product, Uniform()),
                          (is_constant_addend, Norm())],  # a constant addend keeps its share
              epsilon=0.0, summary="AttnLRP for transformers: eps 0, softmax and uniform rules"),
]}
DEFAULT_COMPOSITE = RuleOptions.composite


def parse_override(text: str) -> tuple[str, Rule]:
    """``NODE_OR_OPTYPE_OR_#N=RULE[:k=v,...]``."""
    selector, eq, rule = text.partition("=")
    if not eq or not selector or not rule:
        raise RuleError(f"bad --rule {shorten(text)!r}; expected NODE_OR_OPTYPE=RULE[:k=v,...]")
    return selector.strip(), parse_rule(rule.strip())


def check_options(opts: RuleOptions) -> None:
    """Check every rule parameter of the options, used by the composite or not (``--gamma nan``
    with a composite without the gamma rule is still a mistake): by making the rules."""
    dense_epsilon(opts)
    gamma_rule(opts)
    box_rule(opts)
    Taylor(denominator=opts.lrn_denominator)
    try:
        Taylor(epsilon=opts.lrn_epsilon)
    except RuleError as e:
        raise RuleError(f"{e} (the LRN rule's stabiliser, --lrn-epsilon)") from None


def mark_first_layers(units: list[Unit], inputs: list[str]) -> None:
    """A first layer is a linear layer reached from a model input through no other linear layer."""
    reached = set(inputs)
    for u in units:  # topological order
        if not any(i in reached for i in u.inputs):
            continue
        if is_linear(u):
            u.first = True
        else:
            reached.add(u.output)


def rules_for_kind(kind: str, h: Handler | None = None) -> list[str]:
    """The rules a unit kind accepts: those its handler names (the first is its default), then
    every registered rule that lists the kind in ``applies_to``."""
    h = h if h is not None else load_handlers().get(kind)
    if h is None:
        return []
    names = list(h.rules)
    return names + [n for n, cls in RULES.items() if kind in cls.applies_to and n not in names]


def assign_rules(units: list[Unit], inputs: list[str], opts: RuleOptions) -> None:
    if opts.composite not in COMPOSITES:
        raise RuleError(f"unknown composite {opts.composite!r}; choose one of: {', '.join(COMPOSITES)}")
    if opts.lrn_rule not in LRN_RULES:  # checked even when the model has no LRN
        raise RuleError(f"unknown LRN rule {opts.lrn_rule!r}; choose taylor or identity")
    check_options(opts)
    comp = COMPOSITES[opts.composite]
    table = load_handlers()
    mark_first_layers(units, inputs)
    for u in units:
        u.rule = _default_rule(u, comp, opts, table.get(u.kind))
        if comp.epsilon is not None and u.rule is not None and hasattr(u.rule, "epsilon") and not is_lrn(u):
            u.rule = dataclasses.replace(u.rule, epsilon=comp.epsilon)
    _apply_overrides(units, opts.overrides, table)


def _default_rule(u: Unit, comp: Composite, opts: RuleOptions, h: Handler | None) -> Rule | None:
    if h is None:
        return None
    for predicate, rule in comp.entries + COMMON_ENTRIES:
        if predicate(u):
            return rule(opts) if callable(rule) else rule
    if not h.rules:
        raise RuleError(f"composite {comp.name!r} has no rule for {shorten(u.name)!r} ({u.op_type})")
    return make_rule(h.rules[0])  # the handler's default


def _apply_overrides(units: list[Unit], overrides, table) -> None:
    for selector, rule in overrides:
        if selector.startswith("#"):
            try:
                pos = int(selector[1:])
            except ValueError:
                raise RuleError(f"bad position selector {selector!r}; expected #N") from None
            hits = [u for u in units if pos in u.positions]
        else:
            hits = [u for u in units if u.name == selector or any(n.name == selector for n in u.nodes)]
            if not hits:
                hits = [u for u in units if u.op_type == selector or u.kind == selector]
        if not hits:
            raise RuleError(f"--rule {shorten(selector)}=...: no node with that name, op type or position")
        for u in hits:
            h = table.get(u.kind)
            allowed = rules_for_kind(u.kind, h) if h is not None else []
            if rule.name not in allowed:
                raise RuleError(f"rule {rule.name!r} does not apply to {shorten(u.name)!r} ({u.op_type}); "
                                f"allowed: {', '.join(allowed) or 'none'}")
            u.rule = rule

"""Rules and composites: which rule each unit gets.

A rule is a name and its parameters. A composite (preset, as in Zennit 0.5.1) says which
rule the first layer, other convolutions and dense layers get; activations pass, Add and
average pools use `norm`, max pools winner-take-all, LRN the Taylor rule. Overrides by node
name, op type or position (``#N``, the node's index in the graph) come last.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lrponnx.errors import RuleError
from lrponnx.ops import Handler, load_handlers
from lrponnx.compiler.units import Unit

#: default parameters of every rule; "epsilon" is each rule's stabiliser.
RULE_DEFAULTS: dict[str, dict] = {
    "epsilon": {"epsilon": 1e-6},
    "zplus": {"epsilon": 1e-6},
    "alpha-beta": {"alpha": 2.0, "beta": 1.0, "epsilon": 1e-6},
    "gamma": {"gamma": 0.25, "epsilon": 1e-6},
    "zbox": {"low": None, "high": None, "epsilon": 1e-6},
    "wsquare": {"epsilon": 1e-6},
    "flat": {"epsilon": 1e-6},
    "pass": {},
    "norm": {"epsilon": 1e-6},
    "winner-take-all": {},
    "proportional": {"epsilon": 1e-6},
    "taylor": {"epsilon": 1e-6, "denominator": "sum"},
    "identity": {},
    "signal-takes-all": {},
    "attnlrp-softmax": {},     # AttnLRP: Softmax inside the network (ops/attention.py)
    "uniform": {},             # AttnLRP: a product of two activations, each factor half
    "attnlrp": {},             # AttnLRP inside a fused Attention op (softmax + uniform rules)
}


@dataclass
class Rule:
    name: str
    params: dict = field(default_factory=dict)

    def __str__(self) -> str:
        shown = {k: v for k, v in self.params.items() if v is not None}
        return self.name + (":" + ",".join(f"{k}={_fmt(v)}" for k, v in shown.items()) if shown else "")


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "/".join(_fmt(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def make_rule(name: str, **params) -> Rule:
    if name not in RULE_DEFAULTS:
        raise RuleError(f"unknown rule {name!r}; known rules: {', '.join(RULE_DEFAULTS)}")
    merged = dict(RULE_DEFAULTS[name])
    for k, v in params.items():
        if k == "stabilizer":
            k = "epsilon"
        if k not in merged:
            raise RuleError(f"rule {name!r} has no parameter {k!r} (it has: {', '.join(merged) or 'none'})")
        merged[k] = v
    for k in ("epsilon", "gamma", "alpha", "beta"):
        if k in merged:
            try:
                merged[k] = float(merged[k])
            except (TypeError, ValueError, OverflowError):
                raise RuleError(f"rule {name!r}: {k} must be a number, got {_short(merged[k])}") from None
            # inf or NaN gives all-zero or all-NaN heatmaps; alpha and beta have their own rule below
            if not np.isfinite(merged[k]) or (merged[k] < 0 and k in ("epsilon", "gamma")):
                raise RuleError(f"rule {name!r}: {k} must be a finite number"
                                f"{' >= 0' if k in ('epsilon', 'gamma') else ''}, got {merged[k]:g}")
    if name == "zbox":
        _check_box(merged["low"], merged["high"])
    if name == "alpha-beta":
        a, b = float(merged["alpha"]), float(merged["beta"])
        if a < 0 or b < 0 or abs(a - b - 1.0) > 1e-9:
            raise RuleError(f"alpha-beta needs alpha - beta = 1 and alpha, beta >= 0 (got alpha={a:g}, beta={b:g})")
    if name == "taylor" and merged["denominator"] not in ("sum", "output"):
        raise RuleError(f"taylor's denominator must be 'sum' or 'output', got {merged['denominator']!r}")
    return Rule(name, merged)


def _shorten_name(name: str) -> str:
    from lrponnx.errors import shorten

    return shorten(name)


def _short(v) -> str:
    from lrponnx.errors import shorten

    return shorten(repr(v))


def _check_box(low, high) -> None:
    """zbox bounds: finite numbers, scalar or one per channel, low <= high everywhere."""
    arrays = {}
    for k, v in (("low", low), ("high", high)):
        if v is None:
            continue
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise RuleError(f"rule 'zbox': {k} must be a number or one number per channel "
                            f"(a/b/c), got {_short(v)}") from None
        if a.ndim > 1 or a.size == 0:
            raise RuleError(f"rule 'zbox': {k} must be a number or one number per channel, got {_short(v)}")
        if not np.all(np.isfinite(a)):
            raise RuleError(f"rule 'zbox': {k} must be finite numbers, got {_fmt(a.tolist())}")
        arrays[k] = a.reshape(-1)
    if len(arrays) == 2:
        lo, hi = arrays["low"], arrays["high"]
        if lo.size != hi.size and 1 not in (lo.size, hi.size):
            raise RuleError(f"rule 'zbox': low has {lo.size} values and high {hi.size}; give a scalar or "
                            "one value per channel for each")
        bad = np.nonzero(np.broadcast_to(lo, np.broadcast_shapes(lo.shape, hi.shape)) > hi)[0]
        if bad.size:
            i = int(bad[0])
            raise RuleError(f"rule 'zbox': low must be <= high, got low={_fmt(float(lo[min(i, lo.size - 1)]))} > "
                            f"high={_fmt(float(hi[min(i, hi.size - 1)]))}"
                            + (f" (channel {i})" if max(lo.size, hi.size) > 1 else ""))


def check_options(opts: "RuleOptions") -> None:
    """Check every rule parameter of the options, used by the composite or not (``--gamma nan``
    with a composite without the gamma rule is still a mistake): through :func:`make_rule`,
    the one place rule parameters are made."""
    make_rule("epsilon", epsilon=opts.epsilon)
    make_rule("gamma", gamma=opts.gamma)
    make_rule("zbox", low=opts.low, high=opts.high)
    try:
        make_rule("taylor", epsilon=opts.lrn_epsilon, denominator=opts.lrn_denominator)
    except RuleError as e:
        raise RuleError(f"{e} (the LRN rule's stabiliser, --lrn-epsilon)") from None


def parse_rule(text: str) -> Rule:
    """``RULE[:k=v,...]``, e.g. ``epsilon:epsilon=0.25`` or ``zbox:low=-1,high=1``.
    Per-channel values use ``/``: ``low=-2.1/-2.0/-1.8``."""
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise RuleError(f"bad rule parameter {item!r} in {text!r}; expected key=value")
        params[k.strip()] = _parse_value(v.strip())
    return make_rule(name.strip(), **params)


def _parse_value(v: str):
    if "/" in v:
        try:
            return [float(x) for x in v.split("/")]
        except ValueError:
            raise RuleError(f"bad per-channel value {_short(v)}; expected numbers separated by /") from None
    try:
        return float(v)
    except ValueError:
        return v


@dataclass(frozen=True)
class Composite:
    first: str | None      # rule of the first linear layer(s) (None: as other layers)
    conv: str              # other Conv / ConvTranspose
    dense: str             # Gemm / MatMul
    first_conv_only: bool = False
    conv_params: tuple = ()
    #: the stabiliser of every default rule that has one (AttnLRP: 0); None: --epsilon and the defaults
    epsilon: float | None = None
    #: Softmax inside the net and MatMul of two activations get the AttnLRP rules (else refused)
    attention: bool = False


COMPOSITES: dict[str, Composite] = {
    "epsilon-plus": Composite(None, "zplus", "epsilon"),
    "epsilon-plus-flat": Composite("flat", "zplus", "epsilon"),
    "epsilon-alpha2-beta1": Composite(None, "alpha-beta", "epsilon", conv_params=(("alpha", 2.0), ("beta", 1.0))),
    "epsilon-alpha2-beta1-flat": Composite("flat", "alpha-beta", "epsilon",
                                           conv_params=(("alpha", 2.0), ("beta", 1.0))),
    "epsilon-gamma-box": Composite("zbox", "gamma", "epsilon", first_conv_only=True),
    # AttnLRP (Achtibat et al., ICML 2024; LXT 2.1): epsilon with eps = 0 on linear layers and Adds,
    # LayerNorm with sigma constant, the softmax rule and the uniform rule on Q K^T and A V
    "attnlrp": Composite(None, "epsilon", "epsilon", epsilon=0.0, attention=True),
}
DEFAULT_COMPOSITE = "epsilon-plus-flat"


@dataclass
class RuleOptions:
    composite: str = DEFAULT_COMPOSITE
    epsilon: float = 1e-6          # the epsilon rule's epsilon (dense layers)
    gamma: float = 0.25
    low: object = None             # zbox bounds in model input units
    high: object = None
    lrn_rule: str = "taylor"
    lrn_epsilon: float = 1e-6
    lrn_denominator: str = "sum"
    overrides: list = field(default_factory=list)   # [(selector, Rule)]


def parse_override(text: str) -> tuple[str, Rule]:
    """``NODE_OR_OPTYPE_OR_#N=RULE[:k=v,...]``."""
    selector, eq, rule = text.partition("=")
    if not eq or not selector or not rule:
        raise RuleError(f"bad --rule {_shorten_name(text)!r}; expected NODE_OR_OPTYPE=RULE[:k=v,...]")
    return selector.strip(), parse_rule(rule.strip())


def mark_first_layers(units: list[Unit], inputs: list[str]) -> None:
    """A first layer is a linear layer reached from a model input through no other linear layer."""
    producers_of = {}
    for u in units:
        producers_of[u.output] = u
    reached = set(inputs)
    for u in units:  # topological order
        if not any(i in reached for i in u.inputs):
            continue
        if u.kind == "Linear":
            u.first = True
        else:
            reached.add(u.output)


def assign_rules(units: list[Unit], inputs: list[str], opts: RuleOptions) -> None:
    if opts.composite not in COMPOSITES:
        raise RuleError(f"unknown composite {opts.composite!r}; choose one of: {', '.join(COMPOSITES)}")
    if opts.lrn_rule not in ("taylor", "identity"):  # checked even when the model has no LRN
        raise RuleError(f"unknown LRN rule {opts.lrn_rule!r}; choose taylor or identity")
    if opts.lrn_denominator not in ("sum", "output"):
        raise RuleError(f"taylor's denominator must be 'sum' or 'output', got {opts.lrn_denominator!r}")
    check_options(opts)
    comp = COMPOSITES[opts.composite]
    table = load_handlers()
    mark_first_layers(units, inputs)
    for u in units:
        u.rule = _default_rule(u, comp, opts, table.get(u.kind))
        if comp.epsilon is not None and u.rule is not None and "epsilon" in u.rule.params and u.kind != "LRN":
            u.rule = make_rule(u.rule.name, **{**u.rule.params, "epsilon": comp.epsilon})
    _apply_overrides(units, opts.overrides, table)


def _default_rule(u: Unit, comp: Composite, opts: RuleOptions, h: Handler | None) -> Rule | None:
    if h is None:
        return None
    if u.kind in ("Softmax", "Attention") or (u.kind == "MatMul" and len(u.inputs) == 2):  # attention (AttnLRP)
        return make_rule({"Softmax": "attnlrp-softmax", "Attention": "attnlrp"}.get(u.kind, "uniform")) \
            if comp.attention else None
    if u.kind == "Linear":
        is_conv = u.info.kind in ("conv", "convtranspose")
        if u.first and comp.first and (is_conv or not comp.first_conv_only):
            if comp.first == "zbox":
                return make_rule("zbox", low=opts.low, high=opts.high)
            return make_rule(comp.first)
        if is_conv:
            if comp.conv == "gamma":
                return make_rule("gamma", gamma=opts.gamma)
            return make_rule(comp.conv, **dict(comp.conv_params))
        return make_rule(comp.dense, epsilon=opts.epsilon) if comp.dense == "epsilon" else make_rule(comp.dense)
    if u.kind == "LRN":
        if opts.lrn_rule not in ("taylor", "identity"):
            raise RuleError(f"unknown LRN rule {opts.lrn_rule!r}; choose taylor or identity")
        if opts.lrn_rule == "taylor":
            return make_rule("taylor", epsilon=opts.lrn_epsilon, denominator=opts.lrn_denominator)
        return make_rule("identity")
    if comp.attention and u.kind in ("Add", "Sub", "Sum") and len(u.inputs) == 1:
        return make_rule("norm")  # AttnLRP: a constant addend keeps its share (eps set by the composite)
    if u.kind in ("Add", "Sub", "Mul", "Div", "Sum") and len(u.inputs) == 1:
        return make_rule("pass")  # an activation shifted or scaled by a constant
    if u.kind in EPSILON_KINDS and h.rules[0] == "epsilon":
        return make_rule("epsilon", epsilon=opts.epsilon)  # the dense layers' stabiliser (--epsilon)
    return make_rule(h.rules[0])


#: units whose default rule is the epsilon rule with the composite's --epsilon: LayerNorm (held
#: constant, ops/layernorm.py) and MatMul/Gemm with the constant on the left (ops/matmul.py)
EPSILON_KINDS = ("LayerNormalization", "LayerNorm", "MatMul", "Gemm")


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
            raise RuleError(f"--rule {_shorten_name(selector)}=...: no node with that name, op type or position")
        for u in hits:
            h = table.get(u.kind)
            if h is None or rule.name not in h.rules:
                allowed = ", ".join(h.rules) if h else "none"
                raise RuleError(f"rule {rule.name!r} does not apply to {_shorten_name(u.name)!r} ({u.op_type}); "
                                f"allowed: {allowed}")
            u.rule = rule

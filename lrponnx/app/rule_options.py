"""The rule options shared by ``convert``, ``inspect``, ``explain`` and ``evaluate``: flags whose
defaults and choices are read from the rule classes (lrponnx/rules), and ``lrponnx rules``, the
listing of every rule with its parameters, generated from the classes."""
from __future__ import annotations

import argparse
import dataclasses


def _floats(text: str):
    values = [float(v) for v in text.split(",") if v.strip()]
    return values[0] if len(values) == 1 else values


def add_rule_flags(p: argparse.ArgumentParser) -> None:
    from lrponnx.rules.base import default
    from lrponnx.rules.composites import COMPOSITES, DEFAULT_COMPOSITE
    from lrponnx.rules.linear import Epsilon, Gamma, ZBox
    from lrponnx.rules.lrn import DENOMINATORS, LRN_RULES, Taylor

    p.add_argument("--composite", default=DEFAULT_COMPOSITE, choices=sorted(COMPOSITES),
                   help=f"rule preset (default {DEFAULT_COMPOSITE}; `lrponnx rules` lists them)")
    p.add_argument("--epsilon", type=float, default=default(Epsilon, "epsilon"),
                   help="epsilon of the epsilon rule (dense layers, LayerNorm, MatMul by a constant; default %(default)g)")
    p.add_argument("--gamma", type=float, default=default(Gamma, "gamma"),
                   help="gamma of the gamma rule (default %(default)g)")
    p.add_argument("--low", type=_floats, default=default(ZBox, "low"),
                   help="zbox lower bound(s), scalar or per channel, in the model's input units")
    p.add_argument("--high", type=_floats, default=default(ZBox, "high"), help="zbox upper bound(s)")
    p.add_argument("--rule", action="append", default=[], metavar="NODE_OR_OPTYPE=RULE[:k=v,...]",
                   help="override a rule by node name, op type or position (#N); repeatable "
                        "(`lrponnx rules` lists every rule and its parameters)")
    p.add_argument("--lrn-rule", default=LRN_RULES[0], choices=list(LRN_RULES),
                   help=f"rule for LRN layers (default {LRN_RULES[0]}, Binder et al. 2016)")
    p.add_argument("--lrn-epsilon", type=float, default=default(Taylor, "epsilon"),
                   help="stabiliser of the LRN taylor rule (default %(default)g)")
    p.add_argument("--lrn-denominator", default=default(Taylor, "denominator"), choices=list(DENOMINATORS),
                   help="divide by the sum of the Taylor terms (conservative) or by the LRN output")
    p.add_argument("--seed", default="logit", choices=["logit", "one"],
                   help="start relevance: the target logit (default) or 1 (Zennit's usual choice)")
    p.add_argument("--target-runtime", default="any", choices=["any", "webgpu"],
                   help="write the graph for this runtime: any (default, fastest on ONNX Runtime's CPU) or "
                        "webgpu (onnxruntime-web's WebGPU provider; no 3-D pooling, no MaxPool Indices)")
    p.add_argument("--explain-output", default=None, metavar="NAME",
                   help="the model output whose class scores are explained (the input of a final Softmax is "
                        "taken); default: the only output, or the only one made by a Softmax")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="fix the model's input shape (N or ? keeps a dim symbolic; NAME:DIMS;NAME:DIMS for "
                        "several inputs) when its sizes are symbolic and the rules need them static")


def rule_kwargs(args) -> dict:
    return dict(composite=args.composite, epsilon=args.epsilon, gamma=args.gamma, low=args.low, high=args.high,
                rules=args.rule, lrn_rule=args.lrn_rule, lrn_epsilon=args.lrn_epsilon,
                lrn_denominator=args.lrn_denominator, seed=args.seed, target_runtime=args.target_runtime,
                output=args.explain_output, input_shape=args.input_shape)


def describe_rules() -> str:
    """Every registered rule (its parameters with their defaults, the unit kinds it applies to)
    and every composite (its entries in order), read from the classes."""
    from lrponnx.ops import load_handlers
    from lrponnx.rules import RULES
    from lrponnx.rules.base import fmt
    from lrponnx.rules.composites import COMMON_ENTRIES, COMPOSITES, DEFAULT_COMPOSITE

    handlers = load_handlers()
    lines = ["Rules (--rule NODE_OR_OPTYPE=RULE[:k=v,...]; per-channel values a/b/c):", ""]
    for name, cls in RULES.items():
        kinds = list(cls.applies_to) + sorted(k for k, h in handlers.items()
                                              if name in h.rules and k not in cls.applies_to)
        lines.append(f"  {name}" + (f"  {cls.summary}" if cls.summary else ""))
        for f in dataclasses.fields(cls):
            shown = "none" if f.default is None else fmt(f.default)
            lines.append(f"      {f.name}={shown}" + (f"  {f.metadata['help']}" if f.metadata.get("help") else ""))
        lines.append(f"      applies to: {', '.join(kinds) or '-'}")
    lines += ["", "Composites (--composite; the first matching entry gives a unit its rule):", ""]

    def entry(pred, rule) -> str:
        shown = "refused" if rule is None else (rule.__doc__ if callable(rule) else str(rule))
        return f"      {pred.__name__} -> {shown}"

    for name, comp in COMPOSITES.items():
        lines.append(f"  {name}{' (default)' if name == DEFAULT_COMPOSITE else ''}"
                     + (f"  {comp.summary}" if comp.summary else "")
                     + (f"; every stabiliser {comp.epsilon:g}" if comp.epsilon is not None else ""))
        lines += [entry(p, r) for p, r in comp.entries]
    lines += ["", "  then, in every composite:"] + [entry(p, r) for p, r in COMMON_ENTRIES]
    lines.append("      otherwise -> the op handler's default rule (the first of those it names)")
    return "\n".join(lines)

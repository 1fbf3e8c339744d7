"""What a rule is: a frozen dataclass whose fields are its parameters, registered by name.

A rule class states, in one place, its name, its typed parameters with their defaults, the
checks on them (``__post_init__``), the unit kinds it applies to, and (rules that carry their
own emission, e.g. every rule for linear layers) how its relevance is computed::

    @register
    @dataclass(frozen=True)
    class Epsilon(LinearRule):
        name: ClassVar[str] = "epsilon"
        epsilon: float = number(1e-6, nonnegative=True)

        def emit(self, ctx, ops, x, z, R): ...

``make_rule(name, **params)`` and ``parse_rule("name:k=v,...")`` build rules from user input.
This module imports nothing of the compiler, so every part of the package may import it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from lrponnx.errors import RuleError, shorten

#: every registered rule class by name, in registration order (the order ``lrponnx rules`` shows)
RULES: dict[str, type["Rule"]] = {}


def number(default: float, nonnegative: bool = False, help: str = ""):
    """A float parameter: checked to be a finite number (and >= 0 if ``nonnegative``) when a rule
    is made, and stored as a Python float."""
    return field(default=default, metadata={"number": True, "nonnegative": nonnegative, "help": help})


def param(default, help: str = ""):
    """Any other parameter (a choice, bounds, ...): the rule's ``check`` validates it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Rule:
    """Base of every rule. Subclasses set ``name`` and ``applies_to`` and add parameters as fields."""

    #: the name users write (``--rule Conv=NAME``, ``lrponnx.rules`` metadata)
    name: ClassVar[str] = ""
    #: unit kinds (``Unit.kind``) this rule may be given to besides the kinds whose handler names it
    #: (``@handler(..., rules=(...))``): rules with their own ``emit`` list their kinds here
    applies_to: ClassVar[tuple[str, ...]] = ()
    #: one line for ``lrponnx rules``
    summary: ClassVar[str] = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.metadata.get("number"):
                object.__setattr__(self, f.name, self._number(f.name, getattr(self, f.name),
                                                                f.metadata["nonnegative"]))
        self.check()

    def check(self) -> None:
        """Rule-specific checks beyond the numbers (override; raise :class:`RuleError`)."""

    def _number(self, k: str, v, nonnegative: bool) -> float:
        try:
            v = float(v)
        except (TypeError, ValueError, OverflowError):
            raise RuleError(f"rule {self.name!r}: {k} must be a number, got {short(v)}") from None
        # inf or NaN gives all-zero or all-NaN heatmaps
        if not np.isfinite(v) or (nonnegative and v < 0):
            raise RuleError(f"rule {self.name!r}: {k} must be a finite number{' >= 0' if nonnegative else ''}, "
                            f"got {v:g}")
        return v

    @property
    def params(self) -> dict:
        """The parameters as a dict (in field order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        shown = {k: v for k, v in self.params.items() if v is not None}
        return self.name + (":" + ",".join(f"{k}={fmt(v)}" for k, v in shown.items()) if shown else "")


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: make the rule known by its name. A second rule with the same name is a
    mistake (two plugins, or a copy-paste), never a silent replacement: :func:`unregister` first."""
    if not cls.name:
        raise ValueError(f"rule class {cls.__qualname__} has no name")
    if cls.name in RULES:
        old = RULES[cls.name]
        raise ValueError(f"rule {cls.name!r} is already registered by {old.__module__}.{old.__qualname__}")
    RULES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget a rule (tests, plugins that replace one on purpose)."""
    del RULES[name]


def parameters(cls: type[Rule]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def default(cls: type[Rule], parameter: str):
    """The default of one parameter of a rule class (the CLI's flags read theirs here)."""
    for f in dataclasses.fields(cls):
        if f.name == parameter:
            return f.default
    raise KeyError(f"{cls.name} has no parameter {parameter!r}")


def make_rule(name: str, **params) -> Rule:
    """The rule ``name`` with the given parameters, the others at their defaults."""
    cls = RULES.get(name)
    if cls is None:
        raise RuleError(f"unknown rule {name!r}; known rules: {', '.join(RULES)}")
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in params.items():
        if k == "stabilizer":
            k = "epsilon"
        if k not in known:
            raise RuleError(f"rule {name!r} has no parameter {k!r} (it has: {', '.join(known) or 'none'})")
        kwargs[k] = v
    return cls(**kwargs)


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
            raise RuleError(f"bad per-channel value {short(v)}; expected numbers separated by /") from None
    try:
        return float(v)
    except ValueError:
        return v


def fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "/".join(fmt(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def short(v) -> str:
    """A user-given value as it may appear in a message."""
    return shorten(repr(v))

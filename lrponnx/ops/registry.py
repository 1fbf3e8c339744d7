"""The op -> relevance handler table: one :class:`Handler` per unit kind, registered with
:func:`handler`. A kind registered twice is a mistake unless the second registration says
``replace=True`` (a module that refines or wraps another's handler: activations refines Mul,
attention wraps MatMul and Gather; it reads the previous one with :func:`previous` first)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lrponnx.compiler.units import Unit


@dataclass(frozen=True)
class Handler:
    fn: Callable[["Ctx", Unit, str], dict]
    #: rule names this handler implements itself; the first is the unit kind's default rule.
    #: Rules with their own emission name the kind in their ``applies_to`` instead (rules/linear.py).
    rules: tuple[str, ...]
    #: the handler explains every output of its node (Split): it reads ``ctx.out_relevance``
    #: ({output: relevance or None}) and gets ``R`` None when only other outputs carry relevance
    multi_output: bool = False


HANDLERS: dict[str, Handler] = {}


def handler(*kinds: str, rules: tuple[str, ...] = ("pass",), multi_output: bool = False, replace: bool = False):
    """Register the decorated function for ``kinds``. Raises if a kind already has a handler,
    unless ``replace=True``; ``replace=True`` for a kind without one is also an error (the module
    it meant to refine was not imported first)."""
    def register(fn):
        for kind in kinds:
            old = HANDLERS.get(kind)
            if old is not None and not replace:
                raise ValueError(f"op kind {kind!r} already has a handler ({old.fn.__module__}.{old.fn.__qualname__}); "
                                 "pass replace=True to refine it on purpose")
            if old is None and replace:
                raise ValueError(f"op kind {kind!r} has no handler to replace")
        for kind in kinds:
            HANDLERS[kind] = Handler(fn, tuple(rules), multi_output)
        return fn
    return register


def previous(kind: str) -> Handler | None:
    """The handler registered for ``kind`` so far (read it before replacing it to wrap it)."""
    return HANDLERS.get(kind)


def unregister(kind: str) -> None:
    """Forget a kind's handler (tests, plugins)."""
    del HANDLERS[kind]

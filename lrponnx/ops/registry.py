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
    #: ``supports(ctx, unit) -> None | str``: a cheap check, without emitting, whether ``fn`` explains
    #: the unit (None) or refuses it (the reason, in the words ``fn`` raises), or :data:`UNKNOWN`. It
    #: must not say None where ``fn`` refuses. Left out (or UNKNOWN): only an emission can tell, and
    #: ``lrponnx inspect`` runs ``fn`` on the unit alone into a scratch graph (``convert`` emits once
    #: and collects the refusals on the way, see compiler/emit.py)
    supports: Callable[["Ctx", Unit], str | None] | None = None


#: What a ``supports`` check returns when only an emission can tell (e.g. a rule that needs static
#: shapes only in some of its forms): ``lrponnx inspect`` then emits the unit alone into a scratch graph.
UNKNOWN = "unknown: emit to find out"


def always(ctx, unit) -> None:
    """The ``supports`` check of a handler that explains every unit of its kinds."""
    return None


HANDLERS: dict[str, Handler] = {}


def handler(*kinds: str, rules: tuple[str, ...] = ("pass",), multi_output: bool = False, replace: bool = False,
            supports: Callable | None = None):
    """Register the decorated function for ``kinds``. Raises if a kind already has a handler,
    unless ``replace=True``; ``replace=True`` for a kind without one is also an error (the module
    it meant to refine was not imported first). ``supports``: see :attr:`Handler.supports`."""
    def register(fn):
        for kind in kinds:
            old = HANDLERS.get(kind)
            if old is not None and not replace:
                raise ValueError(f"op kind {kind!r} already has a handler ({old.fn.__module__}.{old.fn.__qualname__}); "
                                 "pass replace=True to refine it on purpose")
            if old is None and replace:
                raise ValueError(f"op kind {kind!r} has no handler to replace")
        for kind in kinds:
            HANDLERS[kind] = Handler(fn, tuple(rules), multi_output, supports)
        return fn
    return register


def previous(kind: str) -> Handler | None:
    """The handler registered for ``kind`` so far (read it before replacing it to wrap it)."""
    return HANDLERS.get(kind)


def unregister(kind: str) -> None:
    """Forget a kind's handler (tests, plugins)."""
    del HANDLERS[kind]

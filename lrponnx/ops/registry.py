"""The op -> relevance handler table: one :class:`Handler` per unit kind, registered with
:func:`handler`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lrponnx.compiler.units import Unit


@dataclass(frozen=True)
class Handler:
    fn: Callable[["Ctx", Unit, str], dict]
    rules: tuple[str, ...]      # rule names the unit accepts; the first is its default
    #: the handler explains every output of its node (Split): it reads ``ctx.out_relevance``
    #: ({output: relevance or None}) and gets ``R`` None when only other outputs carry relevance
    multi_output: bool = False


HANDLERS: dict[str, Handler] = {}


def handler(*kinds: str, rules: tuple[str, ...] = ("pass",), multi_output: bool = False):
    def register(fn):
        for kind in kinds:
            HANDLERS[kind] = Handler(fn, rules, multi_output)
        return fn
    return register



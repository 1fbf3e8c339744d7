"""Caffe layer types, one declaration each.

A :class:`CaffeLayer` says everything the converter needs to know about a layer type: how many
bottoms and tops it takes, the parameter blobs it expects (and their shapes, from the prototxt and
the bottom shapes), how to make random ones, what refuses it before any shape is known, and its
conversion to ONNX nodes. The driver (``convert.py``) reads nothing else about layer types::

    @caffe_layer("Sigmoid")
    def sigmoid(c: LayerCtx) -> list[list[int]]:
        c.op("Sigmoid", c.xs[0])
        return [list(c.shapes[0])]

Registering a type twice raises; :func:`unregister` removes a declaration (for tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from lrponnx.converters.caffe.graph import LayerCtx
from lrponnx.converters.caffe.net import Layer

#: ``(role, shape)`` of each parameter blob, in the caffemodel's order
BlobShapes = list[tuple[str, list[int]]]


@dataclass(frozen=True)
class CaffeLayer:
    """One Caffe layer type (or several spellings that convert alike)."""
    types: tuple[str, ...]
    #: emits the ONNX nodes (``c.op``/``c.const``) and returns the tops' Caffe shapes; None for a
    #: layer whose tops are its bottom (no node: Split)
    convert: Optional[Callable[[LayerCtx], list[list[int]]]]
    #: how many bottoms: ``(fewest, most)``, ``most`` None for no limit
    bottoms: tuple[int, Optional[int]] = (1, 1)
    #: what the bottoms are, for the message when their number is wrong
    bottom_roles: tuple[str, ...] = ()
    #: how many tops: ``(fewest, most)``
    tops: tuple[int, Optional[int]] = (1, 1)
    #: the parameter blobs the layer must have, from the layer and its bottom shapes (None: none);
    #: a layer type with ``blobs`` counts as parametric (its weights are looked up by layer name)
    blobs: Optional[Callable[[Layer, list[list[int]]], Optional[BlobShapes]]] = None
    #: random (untrained) blobs for ``--random-weights``: ``(layer, blob shapes, rng) -> arrays``
    random: Optional[Callable[[Layer, BlobShapes, np.random.Generator], list[np.ndarray]]] = None
    #: why this layer cannot be converted, from its parameters alone (None: it can)
    check: Optional[Callable[[Layer], Optional[str]]] = None
    #: whether the layer's tops are just its bottom at test time (no node)
    alias: Optional[Callable[[Layer], bool]] = None

    def __post_init__(self):
        if not self.types:
            raise ValueError("a Caffe layer declaration needs at least one type name")
        if (self.blobs is None) != (self.random is None):
            raise ValueError(f"Caffe layer {self.types[0]!r}: declare blobs and random together")
        if self.convert is None and self.alias is None:
            raise ValueError(f"Caffe layer {self.types[0]!r}: needs a conversion or an alias rule")

    @property
    def parametric(self) -> bool:
        return self.blobs is not None

    def is_alias(self, layer: Layer) -> bool:
        return self.alias is not None and self.alias(layer)

    def expected_blobs(self, layer: Layer, shapes: list[list[int]]) -> Optional[BlobShapes]:
        return self.blobs(layer, shapes) if self.blobs is not None else None

    def static_check(self, layer: Layer) -> Optional[str]:
        """Why ``layer`` cannot be converted judging by its bottoms, tops and parameters alone."""
        why = _count_check(len(layer.bottoms), self.bottoms, "bottom", self.bottom_roles)
        if why:
            return why
        if len(set(layer.tops)) != len(layer.tops):
            return "names the same top twice"
        why = _count_check(len(layer.tops), self.tops, "top", ())
        if why:
            return why
        return self.check(layer) if self.check is not None else None


_WORDS = {0: "no", 1: "one", 2: "two", 3: "three"}


def _count_check(n: int, bounds: tuple[int, Optional[int]], what: str, roles: tuple[str, ...]) -> Optional[str]:
    lo, hi = bounds
    if lo <= n and (hi is None or n <= hi):
        return None
    if hi is None:
        return f"has no {what}" if lo == 1 else f"expects at least {_WORDS.get(lo, lo)} {what}s, has {n}"
    roles_text = f" ({' and '.join(roles)})" if roles else ""
    if lo == hi:
        count = "exactly one" if lo == 1 else _WORDS.get(lo, str(lo))
        return f"expects {count} {what}{'' if lo == 1 else 's'}{roles_text}, has {n}"
    return f"expects {_WORDS.get(lo, lo)} or {_WORDS.get(hi, hi)} {what}s{roles_text}, has {n}"


#: Caffe type name -> its declaration
LAYERS: dict[str, CaffeLayer] = {}


def register(decl: CaffeLayer) -> CaffeLayer:
    """Add a declaration; a type name that is already declared raises ``ValueError``."""
    taken = [t for t in decl.types if t in LAYERS]
    if taken or len(set(decl.types)) != len(decl.types):
        raise ValueError(f"Caffe layer type(s) {', '.join(map(repr, taken or decl.types))} already declared")
    for t in decl.types:
        LAYERS[t] = decl
    return decl


def unregister(*types: str) -> None:
    """Remove the declarations of ``types`` (a type not declared raises ``KeyError``)."""
    for t in types:
        del LAYERS[t]


def caffe_layer(*types: str, **meta) -> Callable:
    """Decorator: declare the decorated function as the conversion of Caffe layer ``types``;
    ``meta`` are the other :class:`CaffeLayer` fields (``bottoms``, ``blobs``, ``random``, ...)."""
    def deco(fn: Callable[[LayerCtx], list[list[int]]]):
        register(CaffeLayer(tuple(types), fn, **meta))
        return fn
    return deco


def supported_types() -> list[str]:
    """Every layer type the converter accepts (the declared ones and ``Input``), sorted."""
    return sorted(set(LAYERS) | {"Input"})

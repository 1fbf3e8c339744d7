"""Random (untrained) parameter blobs for ``--random-weights``: Caffe's "fillers", one per blob
role. Deterministic for a seed: each filler draws from the converter's one generator, layer by
layer in prototxt order, blob by blob."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from lrponnx.converters.caffe.net import Layer

f32 = np.float32
#: ``(rng, shape, layer) -> array``
Filler = Callable[[np.random.Generator, list[int], Layer], np.ndarray]


def he_normal(fan_in: Callable[[list[int], Layer], int]) -> Filler:
    """N(0, 2 / fan_in) (He et al. 2015); ``fan_in(shape, layer)``."""
    def fill(rng, shape, layer):
        a = rng.standard_normal(shape, dtype=f32)
        a *= f32(math.sqrt(2.0 / max(1, fan_in(shape, layer))))
        return a
    return fill


def normal(std: float, mean: float = 0.0) -> Filler:
    """N(mean, std²)."""
    if mean:
        return lambda rng, shape, layer: f32(mean) + f32(std) * rng.standard_normal(shape, dtype=f32)
    return lambda rng, shape, layer: rng.standard_normal(shape, dtype=f32) * f32(std)


def uniform(low: float) -> Filler:
    """U(low, low + 1)."""
    return lambda rng, shape, layer: rng.random(shape, dtype=f32) + f32(low)


def ones(rng, shape, layer) -> np.ndarray:
    return np.ones(shape, f32)


def by_role(**fillers: Filler):
    """A declaration's ``random``: the filler named by each blob's role, in blob order."""
    def random(layer: Layer, expected, rng: np.random.Generator) -> list[np.ndarray]:
        return [np.asarray(fillers[role](rng, [int(d) for d in shape], layer), dtype=f32) for role, shape in expected]
    return random

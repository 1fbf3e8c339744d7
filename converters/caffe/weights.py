"""Where a layer's parameter blobs come from: the caffemodel (checked against the shapes the
prototxt implies, as Caffe checks them), else random ones from ``--random-weights SEED``."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lrponnx.errors import InvalidModelError, shorten
from lrponnx.files import varint

from lrponnx.converters.caffe import proto as cpb
from lrponnx.converters.caffe.layers import LAYERS
from lrponnx.converters.caffe.net import Layer, prod, warn
from lrponnx.converters.caffe.reading import Blob, load_caffemodel

MAX_PARAMS = (2**31 - 2**26) // 4  # float32 parameters that fit one ONNX file (protobuf's 2 GiB limit)


class WeightSource:
    """The caffemodel's blobs by layer name and/or a seeded generator, handed out layer by layer."""

    def __init__(self, caffemodel: str | os.PathLike | None, random_weights: int | None, layers: list[Layer],
                 blobs_out: dict | None = None):
        self.caffemodel = caffemodel
        self.seed = random_weights
        self.weights: dict[str, list[Blob]] | None = None
        if caffemodel is not None:
            self.weights = load_caffemodel(caffemodel)
            needing = [L.name for L in layers if L.type in LAYERS and LAYERS[L.type].parametric]
            if needing and not any(n in self.weights for n in needing):
                raise InvalidModelError(f"{Path(caffemodel).name} has no layer named like the prototxt's "
                                        f"({', '.join(needing[:3])}{', ...' if len(needing) > 3 else ''}): "
                                        "not the weights of this net")
        self.rng = np.random.default_rng(random_weights) if random_weights is not None else None
        self.blobs_out = blobs_out  # layer name -> (type, arrays), for random_caffemodel
        self.missing: list[str] = []
        self.random_used: list[str] = []
        self.n_params = 0

    def blobs_for(self, M: Layer, bshapes: list[list[int]]) -> list[np.ndarray]:
        """The parameter blobs of layer ``M`` given its bottom shapes (``[]`` for a layer without)."""
        exp = LAYERS[M.type].expected_blobs(M, bshapes)
        arrs: list[np.ndarray] = []
        if exp:
            self.n_params += sum(prod(shp) for _, shp in exp)
            if self.n_params > MAX_PARAMS:
                raise M.err(f"the net needs more than {MAX_PARAMS:,} parameters by this layer "
                            f"({', '.join(f'{r} {list(shp)}' for r, shp in exp)}): too large for one ONNX file")
            src = self.weights.get(M.name) if self.weights is not None else None
            if not src:
                if self.rng is None:
                    self.missing.append(f"{shorten(M.name)} ({M.type})")
                    arrs = [np.zeros([int(d) for d in s], np.float32) for _, s in exp]
                else:
                    if self.weights is not None:
                        self.random_used.append(M.name)
                    arrs = LAYERS[M.type].random(M, exp, self.rng)
            else:
                arrs = _checked(M, exp, src)
        if self.blobs_out is not None:
            self.blobs_out[M.name] = (M.type, arrs)
        return arrs

    def finish(self) -> None:
        """After the last layer: missing weights are an error, random stand-ins a warning."""
        if self.missing:
            raise InvalidModelError(f"{Path(self.caffemodel).name} has no weights for layer(s) "
                                    f"{', '.join(self.missing)} (names must match the prototxt; --random-weights SEED "
                                    "fills them)")
        if self.random_used:
            warn(f"caffemodel lacks layer(s) {', '.join(self.random_used)}: filled with random weights")

    def description(self) -> str:
        """The ``lrponnx.weights`` metadata value."""
        if self.caffemodel is None:
            return f"random seed {self.seed} (untrained)"
        return f"caffemodel {Path(self.caffemodel).name}" + (
            f" (+ random seed {self.seed} for {len(self.random_used)} layer(s))" if self.random_used else "")


def _checked(M: Layer, exp, src: list[Blob]) -> list[np.ndarray]:
    if len(src) != len(exp):
        raise M.err(f"the caffemodel has {len(src)} blobs, the prototxt implies {len(exp)} "
                    f"({', '.join(r for r, _ in exp)})")
    arrs = []
    for j, ((role, shp), blob) in enumerate(zip(exp, src)):
        if not blob.matches(shp):
            raise M.err(f"blob {j} ({role}) has shape {list(blob.shape)} in the caffemodel but "
                        f"the prototxt implies {list(shp)}")
        if not np.all(np.isfinite(blob.data)):
            raise M.err(f"blob {j} ({role}) in the caffemodel contains NaN or infinite values")
        arrs.append(blob.data.reshape([int(d) for d in shp]))
    return arrs


def blob_bytes(a: np.ndarray) -> bytes:
    """A BlobProto (shape + packed float data) as bytes, without a Python float per value."""
    bp = cpb.BlobProto()
    bp.shape.dim.extend(int(d) for d in a.shape)
    raw = np.ascontiguousarray(a, dtype="<f4").tobytes()
    return bp.SerializeToString() + varint(5 << 3 | 2) + varint(len(raw)) + raw  # field 5: packed data

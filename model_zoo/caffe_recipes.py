"""Recipes that go through the Caffe converter (``lrponnx.converters.caffe.convert``).

* ``bvlc-alexnet``, ``bvlc-caffenet``, ``bvlc-googlenet``: the real BVLC deploy prototxts with
  **untrained, deterministic random weights** (their trained weights are not available here).
* ``cifar10-full-caffe``: Caffe's real trained ``cifar10_full`` model (prototxt + caffemodel).

All inputs come from the shared data folder (``../shared/data``, see :mod:`._shared`); nothing is
bundled. The converter is imported lazily, so the registry works while it is still being written.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from lrponnx.errors import LrpOnnxError

from lrponnx.model_zoo._shared import CIFAR10_CLASSES, require_shared
from lrponnx.metadata import CLASSES_KEY, ZOO_KEY

DEFAULT_SEED = 0

# ImageNet Caffe models: BGR, 0-255, minus the mean (B, G, R) = (104, 117, 123).
IMAGENET_MEAN_BGR = [104.0, 117.0, 123.0]

BVLC = {
    "bvlc-alexnet": "bvlc_alexnet",
    "bvlc-caffenet": "bvlc_reference_caffenet",
    "bvlc-googlenet": "bvlc_googlenet",
}


class ConverterUnavailableError(LrpOnnxError):
    """``lrponnx.converters.caffe.convert`` cannot be imported (yet)."""


def caffe_converter():
    """The converter function, or :class:`ConverterUnavailableError` with the reason."""
    try:
        from lrponnx.converters import caffe as module
    except Exception as e:  # ImportError, or an error inside a half-written converter
        raise ConverterUnavailableError(f"the Caffe converter cannot be imported: {type(e).__name__}: {e}") from e
    convert = getattr(module, "convert", None)
    if not callable(convert):
        raise ConverterUnavailableError("lrponnx.converters.caffe has no convert() yet")
    return convert


def converter_available() -> bool:
    try:
        caffe_converter()
    except ConverterUnavailableError:
        return False
    return True


def _set_meta(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Set (add or overwrite) metadata_props keys."""
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            p = model.metadata_props.add()
            p.key, p.value = k, v


def _has_meta(model: onnx.ModelProto, key: str) -> bool:
    return any(p.key == key for p in model.metadata_props)


def _save(model: onnx.ModelProto, name: str, out_dir: str | Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    out = Path(out_dir) / f"{name}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def build_bvlc(name: str, out_dir: str | Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Convert ``caffe/<folder>/deploy.prototxt`` with random weights drawn from ``seed``."""
    folder = BVLC[name]
    prototxt = require_shared("caffe", folder, "deploy.prototxt")
    convert = caffe_converter()
    model = convert(str(prototxt), None, random_weights=seed, mean=list(IMAGENET_MEAN_BGR), channel_order="bgr")
    # the converter records the weights ("lrponnx.weights": "random seed N (untrained)")
    _set_meta(model, {ZOO_KEY: name})
    if not model.doc_string:
        model.doc_string = f"{name}: BVLC {folder} architecture, UNTRAINED random weights (seed {seed})"
    return _save(model, name, out_dir)


def build_cifar10_full_caffe(out_dir: str | Path) -> Path:
    """Convert Caffe's trained cifar10_full (V1 prototxt + caffemodel), mean image from the JPEG training set."""
    base = ("caffe", "cifar10_full")
    prototxt = require_shared(*base, "cifar10_full.prototxt")
    caffemodel = require_shared(*base, "cifar10_full_iter_70000.caffemodel")
    mean_file = require_shared(*base, "mean_rgb_3x32x32.npy")  # float32 [3, 32, 32], R, G, B, 0-255
    convert = caffe_converter()
    # the full mean image (what the net was trained with), recorded as a nested C x H x W list in the metadata
    model = convert(str(prototxt), str(caffemodel), mean_file=str(mean_file), channel_order="rgb")
    meta = {ZOO_KEY: "cifar10-full-caffe"}
    if not _has_meta(model, CLASSES_KEY):
        meta[CLASSES_KEY] = json.dumps(CIFAR10_CLASSES)
    _set_meta(model, meta)
    return _save(model, "cifar10-full-caffe", out_dir)


__all__ = ["BVLC", "ConverterUnavailableError", "build_bvlc", "build_cifar10_full_caffe", "caffe_converter",
           "converter_available"]

"""A few sample photos for demos, taken from scikit-image's bundled data (no download).

Needs the optional extra ``lrponnx[samples]`` (scikit-image). The photos ship inside the scikit-image
wheel (skimage/data/*.png|jpg); nothing is fetched from the network.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from lrponnx.errors import LrpOnnxError

__all__ = ["SAMPLE_NAMES", "SamplesUnavailableError", "sample_image", "sample_images", "square_resize"]

# name -> skimage.data function (all are RGB photos bundled with scikit-image >= 0.19)
_SOURCES = {
    "astronaut": "astronaut",  # Eileen Collins, NASA (public domain)
    "cat": "chelsea",          # Chelsea the cat
    "coffee": "coffee",        # a cup of coffee
    "rocket": "rocket",        # a rocket on its launch pad (NASA)
}
SAMPLE_NAMES: tuple[str, ...] = tuple(_SOURCES)


class SamplesUnavailableError(LrpOnnxError):
    """scikit-image (or one of its bundled photos) is not available."""


def _load(name: str) -> np.ndarray:
    if name not in _SOURCES:
        raise SamplesUnavailableError(f"unknown sample {name!r}; choose one of: {', '.join(SAMPLE_NAMES)}")
    try:
        import skimage.data as data
    except ImportError:
        raise SamplesUnavailableError(
            "sample photos need scikit-image: pip install 'lrponnx[samples]'"
        ) from None
    try:
        img = getattr(data, _SOURCES[name])()
    except Exception as e:  # noqa: BLE001 - a missing bundled file would make skimage try to download
        raise SamplesUnavailableError(f"sample photo {name!r} is not available in this scikit-image: {e}") from None
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] < 3:
        raise SamplesUnavailableError(f"sample photo {name!r} is not an RGB uint8 image (shape {img.shape})")
    return np.ascontiguousarray(img[:, :, :3])


def square_resize(rgb: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Centre-crop RGB uint8 [H,W,3] to a square, then resize to (H, W) with Pillow bilinear."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    sq = Image.fromarray(np.ascontiguousarray(rgb[top:top + side, left:left + side]))
    out_h, out_w = int(size[0]), int(size[1])
    if (out_h, out_w) != (side, side):
        sq = sq.resize((out_w, out_h), Image.Resampling.BILINEAR)
    return np.asarray(sq)


def sample_image(name: str, size: Sequence[int] | None = (32, 32)) -> np.ndarray:
    """One sample photo as RGB uint8 [H,W,3], centre-cropped to a square and resized to ``size`` (H, W);
    ``size=None`` returns the full original photo."""
    img = _load(name)
    if size is None:
        return img
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"size must be (H, W) with positive ints; got {size!r}")
    return square_resize(img, size)


def sample_images(size: Sequence[int] = (32, 32), names: Sequence[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """[(name, RGB uint8 [H,W,3])] for the bundled photos (all of :data:`SAMPLE_NAMES` by default)."""
    return [(n, sample_image(n, size)) for n in (SAMPLE_NAMES if names is None else names)]

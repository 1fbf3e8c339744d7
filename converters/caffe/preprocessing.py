"""The input's preprocessing: the mean and scale a Caffe net expects, as the metadata the
explainer reads (``lrponnx.preprocessing``) and as an array the converter can embed."""
from __future__ import annotations

import math

import numpy as np

from lrponnx.errors import InvalidModelError, shorten

from lrponnx.converters.caffe.net import warn
from lrponnx.converters.caffe.reading import load_mean_file

PIXEL_SCALE = 255.0


def _parse_mean(mean) -> list[float]:
    if isinstance(mean, str):
        parts = [p for p in mean.replace(" ", ",").split(",") if p]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise InvalidModelError(f"--mean {mean!r}: expected comma-separated numbers, e.g. 104,117,123") from None
    else:
        try:
            vals = [float(v) for v in np.asarray(mean, dtype=np.float64).reshape(-1)]
        except (TypeError, ValueError):
            raise InvalidModelError(f"mean {mean!r} is not a list of numbers") from None
    if not vals:
        raise InvalidModelError("--mean is empty")
    if not all(math.isfinite(v) for v in vals):
        raise InvalidModelError("--mean contains NaN or infinite values")
    return vals


def preprocessing(input_name: str, shape: list[int], mean, mean_file, scale: float,
                   channel_order: str | None) -> tuple[dict, np.ndarray | None]:
    """The metadata dict and the mean as an array broadcastable against one input (C,1,1 or C,H,W)."""
    if mean is not None and mean_file is not None:
        raise InvalidModelError("give --mean or --mean-file, not both")
    C = shape[1] if len(shape) > 1 else None
    spatial = shape[2:] if len(shape) >= 3 else []
    if channel_order is not None:
        channel_order = channel_order.lower()
        if channel_order not in ("bgr", "rgb", "gray"):
            raise InvalidModelError(f"--channel-order must be bgr, rgb or gray, got {channel_order!r}")
        if (C != 1) if channel_order == "gray" else (C != 3):
            raise InvalidModelError(f"--channel-order {channel_order} does not fit the input {shorten(input_name)!r} "
                                    f"of shape {shape}")
    elif C == 3:
        channel_order = "bgr"
    elif C == 1:
        channel_order = "gray"
    if not math.isfinite(scale) or scale == 0:
        raise InvalidModelError(f"--scale must be a finite non-zero number, got {scale}")

    image: np.ndarray | None = None
    vals: list[float] | None = None
    if mean_file is not None:
        arr = load_mean_file(mean_file)
        if C is not None and arr.shape[0] != C:
            raise InvalidModelError(f"mean file has {arr.shape[0]} channels, the input {shorten(input_name)!r} has {C}")
        if arr.ndim == 1:
            vals = [float(v) for v in arr]
        elif list(arr.shape[1:]) == list(spatial):
            image = arr
        else:
            warn(f"mean image is {'x'.join(map(str, arr.shape[1:]))} but the input is "
                  f"{'x'.join(map(str, spatial))}: using its per-channel average (as Caffe's Classifier does)")
            vals = [float(v) for v in arr.reshape(arr.shape[0], -1).mean(axis=1)]
    elif mean is not None:
        vals = _parse_mean(mean)
    else:
        vals = [0.0] * (C or 1)
    if image is not None:
        mean_meta: list = image.tolist()
        mean_arr = image
    else:
        if C is not None and len(vals) == 1 and C > 1:
            vals = vals * C
        if C is not None and len(vals) != C:
            raise InvalidModelError(f"mean has {len(vals)} values but the input {shorten(input_name)!r} has {C} channels")
        mean_meta = [float(v) for v in vals]
        mean_arr = np.asarray(vals, dtype=np.float64).reshape([len(vals)] + [1] * len(spatial))
    meta = {
        "input": input_name,
        "channel_order": channel_order,
        "pixel_scale": PIXEL_SCALE,
        "mean": mean_meta,
        "scale": float(scale),
        "size": [int(d) for d in spatial[-2:]] if len(spatial) >= 2 else [int(d) for d in spatial],
        "embedded": False,
    }
    return meta, mean_arr


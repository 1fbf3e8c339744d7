"""Read images into model tensors, driven by preprocessing metadata stored in the ONNX model.

Converters record how the graph expects its input in ``model.metadata_props`` under the key
``lrponnx.preprocessing`` (:data:`METADATA_KEY`), as a JSON object::

    {"input": "data",              # graph input the tensor is fed to (null: the first graph input)
     "channel_order": "bgr",       # "rgb" | "bgr" | "gray": channel order the graph expects
     "pixel_scale": 255.0,         # an image in [0, 1] times this gives the graph's units before mean
     "mean": [104.0, 117.0, 123.0],  # per channel in graph channel order, or nested C x H x W
     "scale": 1.0,
     "std": [1.0, 1.0, 1.0],       # optional, per channel; divides after the mean
     "size": [227, 227],           # [H, W] the image is resized ("squashed") to
     "embedded": false}

The tensor fed to the graph (float32 [C,H,W]) is::

    ((img_in_channel_order * pixel_scale - mean) / std) * scale,   img = rgb_uint8 / 255

With ``"embedded": true`` the graph does mean/std/scale itself: the tensor is ``img * pixel_scale``
(in channel order) and mean/std/scale are kept for the record only.

Finding and reading input files (folders, ``.npy`` batches) is :mod:`lrponnx.app.inputs`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lrponnx.errors import LrpOnnxError
from lrponnx.metadata import PREPROCESSING_KEY

__all__ = [
    "METADATA_KEY",
    "IMAGE_EXTENSIONS",
    "PRESETS",
    "PreprocessingError",
    "InputError",
    "ImageReadError",
    "Preprocessing",
    "read_rgb",
]

METADATA_KEY = PREPROCESSING_KEY
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_CHANNELS = {"rgb": 3, "bgr": 3, "gray": 1}

#: Named starting points for :meth:`Preprocessing.from_flags`.
PRESETS: dict[str, dict] = {
    # image in [0, 1], RGB, nothing else
    "raw": {"channel_order": "rgb", "pixel_scale": 1.0},
    # torchvision ImageNet models
    "torchvision": {"channel_order": "rgb", "pixel_scale": 1.0,
                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    # Caffe ImageNet models (BGR, 0..255, per-channel ImageNet mean in BGR order)
    "caffe": {"channel_order": "bgr", "pixel_scale": 255.0, "mean": [104.0, 117.0, 123.0]},
}


class PreprocessingError(LrpOnnxError):
    """Preprocessing metadata or flags are missing, malformed or inconsistent."""


class InputError(LrpOnnxError):
    """An input path is missing, empty, or holds something that cannot be fed to the model."""


class ImageReadError(InputError):
    """An image file cannot be opened or decoded."""


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _finite(x, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise PreprocessingError(f"{what} must be a number; got {x!r}") from None
    if not math.isfinite(v):
        raise PreprocessingError(f"{what} must be finite; got {x!r}")
    return v


def _parse_numbers(value, what: str) -> list[float]:
    """'104,117,123' / '104 117 123' / [104, 117, 123] / 0.5 -> list of floats."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
        if not parts:
            raise PreprocessingError(f"{what} is empty")
        return [_finite(p, what) for p in parts]
    if isinstance(value, (int, float)):
        return [_finite(value, what)]
    return [_finite(v, what) for v in value]


def _parse_size(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p for p in re.split(r"[x,\s]+", value.strip().lower()) if p]
    elif isinstance(value, (int, np.integer)):
        parts = [value, value]
    else:
        parts = list(value)
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise PreprocessingError(f"size must be [H, W]; got {value!r}")
    try:
        h, w = (int(p) for p in parts)
        if any(float(p) != int(p) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise PreprocessingError(f"size must be two positive integers [H, W]; got {value!r}") from None
    if h < 1 or w < 1:
        raise PreprocessingError(f"size must be two positive integers [H, W]; got {value!r}")
    return h, w


def _center_crop(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre crop [C,H',W'] to [C,H,W] with Caffe's test-phase offsets (H'-H)//2, (W'-W)//2."""
    h, w = size
    top, left = (a.shape[1] - h) // 2, (a.shape[2] - w) // 2
    return a[:, top:top + h, left:left + w]


def read_rgb(path) -> Image.Image:
    """Open an image file as an RGB PIL image (EXIF orientation applied), or raise ImageReadError."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode == "F":
                raise ImageReadError(
                    f"cannot read image {str(p)!r}: floating-point images are not supported "
                    "(give the model tensor as a .npy file instead)"
                )
            if im.mode == "I" or im.mode.startswith("I;16"):
                # 16-bit (or 32-bit integer) grey: Pillow's convert("RGB") would clip at 255, so scale
                a = np.asarray(im).astype(np.float64)
                if im.mode.startswith("I;16") or a.max(initial=0) > 255:
                    a = a / 257.0
                im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
            if im.mode not in ("RGB", "L"):
                if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
                    # composite transparent pixels on white rather than on whatever colour they hold
                    rgba = im.convert("RGBA")
                    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, rgba)
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image {str(p)!r}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"cannot read image {str(p)!r}: it is a folder") from None
    except PermissionError:
        raise ImageReadError(f"cannot read image {str(p)!r}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read image {str(p)!r}: not an image format Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"cannot read image {str(p)!r}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise ImageReadError(f"cannot read image {str(p)!r}: the file is truncated or corrupt ({e})") from None


def _as_rgb_uint8(image) -> np.ndarray:
    """An RGB uint8 [H,W,3] array (gray is repeated, alpha dropped); the same check as rendering's."""
    from lrponnx.app.render import as_rgb_uint8

    try:
        return as_rgb_uint8(image)
    except ValueError as e:
        raise PreprocessingError(str(e)) from None


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Preprocessing:
    """How to turn an RGB image into the tensor the graph expects (see the module docstring).

    ``mean``: None (no mean), a tuple with one value per channel in *graph* channel order (one value is
    broadcast), or a float64 array [C,H,W]. A [C,H,W] mean larger than ``size`` is centre-cropped to it
    (Caffe's test-phase crop); when ``size`` is None it becomes the mean's [H, W].
    ``size``: (H, W) to resize to, or None to keep the image size.
    """

    input: str | None = None
    channel_order: str = "rgb"
    pixel_scale: float = 1.0
    mean: tuple[float, ...] | np.ndarray | None = None
    scale: float = 1.0
    std: tuple[float, ...] | None = None
    size: tuple[int, int] | None = None
    embedded: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        order = str(self.channel_order).lower()
        if order not in _CHANNELS:
            raise PreprocessingError(f"channel_order must be one of {sorted(_CHANNELS)}; got {self.channel_order!r}")
        set_("channel_order", order)
        c = _CHANNELS[order]
        if self.input is not None and not isinstance(self.input, str):
            raise PreprocessingError(f"input must be a graph input name; got {self.input!r}")
        ps = _finite(self.pixel_scale, "pixel_scale")
        if ps <= 0:
            raise PreprocessingError(f"pixel_scale must be > 0; got {ps}")
        set_("pixel_scale", ps)
        sc = _finite(self.scale, "scale")
        if sc == 0:
            raise PreprocessingError("scale must not be 0")
        set_("scale", sc)
        set_("size", _parse_size(self.size))
        set_("embedded", bool(self.embedded))

        if self.std is not None:
            std = _parse_numbers(self.std, "std")
            if len(std) == 1:
                std = std * c
            if len(std) != c:
                raise PreprocessingError(f"std has {len(std)} values; the {order} input has {c} channel(s)")
            if any(s == 0 for s in std):
                raise PreprocessingError(f"std must not contain 0; got {std}")
            set_("std", tuple(std))

        mean = self.mean
        if mean is not None:
            try:
                arr = np.asarray(mean, dtype=np.float64)
            except (TypeError, ValueError):
                raise PreprocessingError("mean must be a list of numbers or a nested C x H x W list") from None
            if not np.isfinite(arr).all():
                raise PreprocessingError("mean must be finite")
            if arr.ndim <= 1:
                vals = arr.reshape(-1).tolist()
                if len(vals) == 1:
                    vals = vals * c
                if len(vals) != c:
                    raise PreprocessingError(f"mean has {len(vals)} values; the {order} input has {c} channel(s)")
                set_("mean", tuple(vals))
            elif arr.ndim == 3:
                if arr.shape[0] != c:
                    raise PreprocessingError(
                        f"mean is {arr.shape[0]} x {arr.shape[1]} x {arr.shape[2]}; the {order} input has {c} channel(s)"
                    )
                if self.size is None:
                    set_("size", (int(arr.shape[1]), int(arr.shape[2])))
                h, w = self.size
                if arr.shape[1] < h or arr.shape[2] < w:
                    raise PreprocessingError(
                        f"mean image is {arr.shape[1]} x {arr.shape[2]}, smaller than the input size {h} x {w}"
                    )
                arr = np.array(arr)  # own copy
                arr.setflags(write=False)
                set_("mean", arr)
            else:
                raise PreprocessingError(f"mean must be per-channel or C x H x W; got {arr.ndim} dimensions")

    # ---------------------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return _CHANNELS[self.channel_order]

    def _mean_array(self, hw: tuple[int, int]) -> np.ndarray:
        c = self.channels
        if self.mean is None:
            return np.zeros((c, 1, 1))
        if isinstance(self.mean, np.ndarray):
            if self.mean.shape[1:] == tuple(hw):
                return self.mean
            if self.mean.shape[1] < hw[0] or self.mean.shape[2] < hw[1]:
                raise PreprocessingError(
                    f"mean image is {self.mean.shape[1]} x {self.mean.shape[2]}, smaller than the input {hw[0]} x {hw[1]}"
                )
            return _center_crop(self.mean, hw)
        return np.asarray(self.mean, dtype=np.float64).reshape(c, 1, 1)

    def _std_array(self) -> np.ndarray:
        if self.std is None:
            return np.ones((self.channels, 1, 1))
        return np.asarray(self.std, dtype=np.float64).reshape(self.channels, 1, 1)

    # ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        mean = self.mean
        if mean is None:
            mean = [0.0] * self.channels
        elif isinstance(mean, np.ndarray):
            mean = mean.tolist()
        else:
            mean = list(mean)
        d = {
            "input": self.input,
            "channel_order": self.channel_order,
            "pixel_scale": self.pixel_scale,
            "mean": mean,
            "scale": self.scale,
        }
        if self.std is not None:
            d["std"] = list(self.std)
        d["size"] = list(self.size) if self.size is not None else None
        d["embedded"] = self.embedded
        return d

    def to_metadata(self) -> tuple[str, str]:
        """(key, JSON string) for ``model.metadata_props``."""
        return METADATA_KEY, json.dumps(self.to_dict(), separators=(",", ":"))

    def __eq__(self, other):
        if not isinstance(other, Preprocessing):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable-looking contents (arrays); not hashable

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        if not isinstance(d, dict):
            raise PreprocessingError(f"{METADATA_KEY} must be a JSON object; got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}  # unknown keys are ignored (newer writers)
        for k in ("pixel_scale", "scale", "channel_order"):
            if kwargs.get(k, 0) is None:
                del kwargs[k]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreprocessingError(f"model metadata {METADATA_KEY!r} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_model(cls, model) -> "Preprocessing | None":
        """Read the metadata from an onnx.ModelProto (or a path to an .onnx file); None if it has none.

        If the metadata has no ``size``, it is taken from the static H, W of the graph input (``input``, or
        the first graph input that is not an initializer), when those are known.
        """
        if isinstance(model, (str, Path)):
            import onnx

            try:
                model = onnx.load(str(model), load_external_data=False)
            except Exception as e:  # noqa: BLE001 - onnx raises many kinds
                raise PreprocessingError(f"cannot read ONNX model {str(model)!r}: {e}") from None
        text = None
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                text = prop.value
        if text is None:
            return None
        pre = cls.from_json(text)
        if pre.size is None:
            hw = _graph_input_hw(model, pre.input)
            if hw is not None:
                pre = dataclasses.replace(pre, size=hw)
        return pre

    def write_to_model(self, model):
        """Set (or replace) the metadata entry on an onnx.ModelProto in place; returns the model."""
        key, value = self.to_metadata()
        for prop in list(model.metadata_props):
            if prop.key == key:
                model.metadata_props.remove(prop)
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
        return model

    @classmethod
    def from_flags(cls, *, base: "Preprocessing | None" = None, preset: str | None = None,
                   input: str | None = None, channel_order: str | None = None,
                   pixel_scale: float | str | None = None, mean=None, std=None,
                   scale: float | str | None = None, size=None,
                   embedded: bool | None = None) -> "Preprocessing":
        """Build from command-line style values; a given value overrides ``preset``, which overrides ``base``.

        ``mean``/``std``: "104,117,123", a list, one number, or (mean only) a path to a .npy C x H x W array.
        ``size``: "224", "224x224", "224,224", an int or (H, W). ``preset``: one of :data:`PRESETS`.
        Without base or preset the defaults are those of the dataclass (RGB, pixel_scale 1, no mean).
        """
        d = base.to_dict() if base is not None else {}
        if base is not None and isinstance(base.mean, np.ndarray):
            d["mean"] = base.mean
        if preset is not None:
            if preset not in PRESETS:
                raise PreprocessingError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
            if base is not None:
                for k in ("mean", "std"):  # a preset replaces the normalisation as a whole
                    d.pop(k, None)
            d.update(PRESETS[preset])
        if mean is not None:
            if isinstance(mean, (str, Path)) and str(mean).lower().endswith(".npy"):
                try:
                    mean = np.load(str(mean), allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise PreprocessingError(f"cannot read mean file {str(mean)!r}: {e}") from None
            elif not isinstance(mean, np.ndarray):
                try:
                    mean = _parse_numbers(mean, "mean")
                except PreprocessingError:
                    if isinstance(mean, str):
                        raise
                    mean = np.asarray(mean, dtype=np.float64)  # nested C x H x W list
            d["mean"] = mean
        if std is not None:
            d["std"] = _parse_numbers(std, "std")
        if input is not None:
            d["input"] = input
        if channel_order is not None:
            d["channel_order"] = channel_order
        if pixel_scale is not None:
            d["pixel_scale"] = pixel_scale
        if scale is not None:
            d["scale"] = scale
        if size is not None:
            d["size"] = _parse_size(size)
        if embedded is not None:
            d["embedded"] = embedded
        return cls.from_dict(d)

    # ---------------------------------------------------------------------------------------------
    def resize(self, rgb) -> np.ndarray:
        """RGB uint8 [H,W,3] (or PIL image) -> resized to ``size`` with Pillow bilinear ("squash")."""
        img = rgb if isinstance(rgb, Image.Image) else Image.fromarray(_as_rgb_uint8(rgb))
        img = img.convert("RGB")
        if self.size is not None and (img.height, img.width) != self.size:
            img = img.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        return np.asarray(img)

    def apply(self, rgb, *, resize: bool = True) -> np.ndarray:
        """RGB uint8 [H,W,3] (or PIL image) -> model tensor float32 [C,H,W] (a new array).

        With ``resize=True`` an image that is not ``size`` is resized first (see :meth:`resize`);
        with ``resize=False`` a wrong size is an error.
        """
        img = _as_rgb_uint8(rgb)
        if self.size is not None and img.shape[:2] != self.size:
            if not resize:
                raise PreprocessingError(
                    f"image is {img.shape[0]} x {img.shape[1]}; the model expects {self.size[0]} x {self.size[1]}"
                )
            img = self.resize(img)
        if self.channel_order == "gray":
            img = np.asarray(Image.fromarray(img).convert("L"))[:, :, None]
        elif self.channel_order == "bgr":
            img = img[:, :, ::-1]
        x = img.transpose(2, 0, 1).astype(np.float64) / 255.0
        x = x * self.pixel_scale
        if not self.embedded:
            x = (x - self._mean_array(x.shape[1:])) / self._std_array() * self.scale
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_display(self, tensor) -> np.ndarray:
        """Invert :meth:`apply`: model tensor [C,H,W] (or [1,C,H,W]) -> RGB uint8 [H,W,3] for overlays."""
        t = np.asarray(tensor)
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != self.channels:
            raise PreprocessingError(
                f"tensor must be [{self.channels},H,W] for a {self.channel_order} input; got shape {np.shape(tensor)}"
            )
        x = t.astype(np.float64)
        if not self.embedded:
            x = x / self.scale * self._std_array() + self._mean_array(x.shape[1:])
        x = x / self.pixel_scale
        if self.channel_order == "bgr":
            x = x[::-1]
        elif self.channel_order == "gray":
            x = np.repeat(x, 3, axis=0)
        return np.ascontiguousarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0))

    def load_image(self, path) -> tuple[np.ndarray, np.ndarray]:
        """Read an image file: (tensor float32 [C,H,W], display RGB uint8 [H,W,3] at the model's size)."""
        display = self.resize(read_rgb(path))
        return self.apply(display, resize=False), display


def _graph_input_hw(model, name: str | None) -> tuple[int, int] | None:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if name is not None:
        inputs = [i for i in inputs if i.name == name]
    if not inputs:
        return None
    t = inputs[0].type.tensor_type
    if not t.HasField("shape") or len(t.shape.dim) != 4:
        return None
    dims = t.shape.dim
    if dims[2].HasField("dim_value") and dims[3].HasField("dim_value") and dims[2].dim_value > 0 and dims[3].dim_value > 0:
        return int(dims[2].dim_value), int(dims[3].dim_value)
    return None


"""Render relevance heatmaps as images, with colour maps implemented as numpy lookup tables.

Rendering never changes the numbers: every function here reads the relevance array and returns new
arrays/images; nothing is modified in place. Matplotlib is not needed.

Pipeline for one heatmap (see docs/rendering.md)::

    relevance [C,H,W] --to_heatmap(reduce)--> h [H,W] float64
    h --scale s = max|h| (or a percentile of |h|)--> colour index in 0..255 --LUT--> RGB uint8

Value -> colour index, for the diverging (symmetric) maps (``coldnhot``, ``bwr``, ``seismic``), exactly as
``zennit.image.imgify(h, symmetric=True, cmap=...)``::

    index = floor(clip((h + s) / (2 s) * 255, 0, 255))          # = floor(127.5 * (v + 1)), v = h / s

so ``h = 0`` -> index 127 (:data:`CENTER_INDEX`), ``h = +s`` (and anything above) -> 255,
``h = -s`` (and anything below) -> 0. Index ``k`` holds ``v`` in ``[k/127.5 - 1, (k+1)/127.5 - 1)``, so the
bins are symmetric about zero (``v`` and ``-v`` land on ``127 + d`` and ``127 - d``), and bin 127 is the one
centred on zero; the single value ``v = +1`` alone reaches bin 255.
Zennit samples its lookup table at ``x = k / 255``, so the colour at index 127 is one table step away from
the map's nominal centre colour (for ``coldnhot`` it is (0, 0, 3), not pure black; for ``bwr``
(253, 253, 255), not pure white). We keep that on purpose, for exact parity with Zennit.

For the sequential maps (``hot``, ``gray``) the default is ``index = floor(clip(h / s * 255, 0, 255))``:
0 (and every negative value) -> index 0, ``+s`` -> 255 (as ``imgify(h, vmin=0, vmax=s)``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "CMAPS",
    "CENTER_INDEX",
    "check_cmap",
    "DEFAULT_CMAP",
    "REDUCTIONS",
    "colormap",
    "is_diverging",
    "to_heatmap",
    "symmetric_scale",
    "normalize_symmetric",
    "color_index",
    "colorize",
    "render",
    "overlay",
    "grid",
    "overview",
    "save_png",
]

# --------------------------------------------------------------------------------------------------
# Colour maps.
#
# Each map is a piecewise-linear ramp given by nodes (lookup index, RGB). The node positions are the
# ones Zennit's colour-map language produces for its built-in maps (zennit/image.py, zennit/cmap.py):
#   coldnhot '0ff,00f,80:000,f00,ff0,fff'    bwr '00f,80:fff,f00'    seismic '0000d0,80:d0d0d0,d00000'
#   hot      '000,f00,ff0,fff'               gray '000,fff'
# where un-indexed colours are spaced evenly (index int()-truncated) between indexed ones.
# The table entry k is the ramp evaluated at k, rounded to 12 decimals and truncated to uint8, as
# zennit.cmap.ColorMap.palette does.
# --------------------------------------------------------------------------------------------------
_NODES: dict[str, tuple[tuple[int, tuple[int, int, int]], ...]] = {
    "coldnhot": (
        (0, (0, 255, 255)),      # cyan      (most negative)
        (64, (0, 0, 255)),       # blue
        (128, (0, 0, 0)),        # black     (zero)
        (170, (255, 0, 0)),      # red
        (212, (255, 255, 0)),    # yellow
        (255, (255, 255, 255)),  # white     (most positive)
    ),
    "bwr": (
        (0, (0, 0, 255)),
        (128, (255, 255, 255)),
        (255, (255, 0, 0)),
    ),
    "seismic": (
        (0, (0, 0, 208)),
        (128, (208, 208, 208)),
        (255, (208, 0, 0)),
    ),
    "hot": (
        (0, (0, 0, 0)),
        (85, (255, 0, 0)),
        (170, (255, 255, 0)),
        (255, (255, 255, 255)),
    ),
    "gray": (
        (0, (0, 0, 0)),
        (255, (255, 255, 255)),
    ),
}
_DIVERGING = frozenset({"coldnhot", "bwr", "seismic"})

CMAPS: tuple[str, ...] = tuple(_NODES)
DEFAULT_CMAP = "coldnhot"
#: The colour index a relevance of exactly 0 gets with a diverging (symmetric) map.
CENTER_INDEX = 127


def _build_lut(nodes) -> np.ndarray:
    idx = np.array([n[0] for n in nodes], dtype=np.float64)
    col = np.array([n[1] for n in nodes], dtype=np.float64)
    k = np.arange(256, dtype=np.float64)
    ramp = np.stack([np.interp(k, idx, col[:, c]) for c in range(3)], axis=1)
    lut = np.floor(np.clip(ramp.round(12), 0.0, 255.0)).astype(np.uint8)
    lut.setflags(write=False)
    return lut


_LUTS: dict[str, np.ndarray] = {name: _build_lut(nodes) for name, nodes in _NODES.items()}


def check_cmap(cmap: str) -> str:
    """``cmap`` if it names one of :data:`CMAPS`, else ValueError listing them (cheap: callers check
    a user's choice before doing any work)."""
    if not isinstance(cmap, str) or cmap not in _LUTS:
        raise ValueError(f"unknown colour map {cmap!r}; choose one of: {', '.join(CMAPS)}")
    return cmap


_check_cmap = check_cmap


def colormap(cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """The 256x3 uint8 lookup table of a colour map (a read-only array)."""
    return _LUTS[_check_cmap(cmap)]


def is_diverging(cmap: str) -> bool:
    """True for the maps meant for signed relevance (centre = zero): coldnhot, bwr, seismic."""
    return _check_cmap(cmap) in _DIVERGING


# --------------------------------------------------------------------------------------------------
# Relevance -> 2-D heatmap -> normalised values -> colour indices
# --------------------------------------------------------------------------------------------------
REDUCTIONS: tuple[str, ...] = ("sum", "abs-sum", "pos-sum", "neg-sum", "max-norm", "l2-norm")


def to_heatmap(relevance, reduce: str = "sum") -> np.ndarray:
    """Reduce relevance [C,H,W] (or [1,C,H,W], or [H,W]) to a float64 heatmap [H,W] (a new array).

    reduce:
      ``sum``       sum over channels (signed; conserves total relevance)  -- default
      ``abs-sum``   sum of |R| over channels
      ``pos-sum``   sum of max(R, 0) over channels
      ``neg-sum``   sum of min(R, 0) over channels (<= 0)
      ``max-norm``  max over channels of |R| (the L-infinity norm of the channel vector)
      ``l2-norm``   sqrt of the sum of R^2 over channels
    A [H,W] input is returned as a float64 copy for ``sum``; the other reductions are applied to its
    single channel (e.g. ``abs-sum`` gives |R|).
    """
    r = np.asarray(relevance)
    if r.ndim == 4:
        if r.shape[0] != 1:
            raise ValueError(
                f"relevance has a batch of {r.shape[0]}; render one sample at a time (relevance[i])"
            )
        r = r[0]
    if r.ndim == 2:
        r = r[None]
    if r.ndim != 3:
        raise ValueError(f"relevance must be [C,H,W], [1,C,H,W] or [H,W]; got shape {tuple(np.shape(relevance))}")
    if not np.issubdtype(r.dtype, np.number) or np.issubdtype(r.dtype, np.complexfloating):
        raise ValueError(f"relevance must be a real numeric array; got dtype {r.dtype}")
    r = r.astype(np.float64)  # always a copy
    if reduce == "sum":
        h = r.sum(axis=0)
    elif reduce == "abs-sum":
        h = np.abs(r).sum(axis=0)
    elif reduce == "pos-sum":
        h = np.clip(r, 0.0, None).sum(axis=0)
    elif reduce == "neg-sum":
        h = np.clip(r, None, 0.0).sum(axis=0)
    elif reduce == "max-norm":
        h = np.abs(r).max(axis=0)
    elif reduce == "l2-norm":
        h = np.sqrt((r * r).sum(axis=0))
    else:
        raise ValueError(f"unknown reduce {reduce!r}; choose one of: {', '.join(REDUCTIONS)}")
    return h


def _as_heatmap(h) -> np.ndarray:
    a = np.asarray(h, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"heatmap must be 2-D [H,W]; got shape {a.shape} (use to_heatmap first)")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"heatmap has {bad} non-finite value(s) (NaN/inf); refusing to render it")
    return a


def symmetric_scale(h, percentile: float | None = None) -> float:
    """The scale s that maps to the ends of the colour map: max |h|, or the given percentile of |h|.

    If the percentile is 0 while max |h| > 0 (mostly-zero heatmaps), max |h| is used instead.
    Returns 0.0 only for an all-zero heatmap.
    """
    a = np.abs(_as_heatmap(h))
    if a.size == 0:
        return 0.0
    top = float(a.max())
    if percentile is None:
        return top
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in (0, 100]; got {percentile}")
    s = float(np.percentile(a, float(percentile)))
    return s if s > 0.0 else top


def normalize_symmetric(h, percentile: float | None = None) -> np.ndarray:
    """Return v = clip(h / s, -1, 1) (a new float64 array) with s from :func:`symmetric_scale`.

    0 maps to 0, +s to +1, -s to -1; values beyond +-s (only with a percentile) are clipped.
    An all-zero heatmap gives all zeros. Colour index of v (diverging maps): floor(127.5 * (v + 1)).
    """
    a = _as_heatmap(h)
    s = symmetric_scale(a, percentile)
    if s == 0.0:
        return np.zeros_like(a)
    return np.clip(a / s, -1.0, 1.0)


def color_index(h, scale: float | None = None, *, percentile: float | None = None,
                symmetric: bool = True) -> np.ndarray:
    """Colour-table index (uint8 [H,W]) of every heatmap value.

    symmetric=True:  floor(clip((h + s) / (2 s) * 255, 0, 255))  (0 -> 127, +s -> 255, -s -> 0)
    symmetric=False: floor(clip(h / s * 255, 0, 255))            (<=0 -> 0, +s -> 255)
    ``scale`` defaults to :func:`symmetric_scale` (h, percentile). The arithmetic is written exactly as
    zennit.image.imgify does it (with vmin=-s, vmax=s, resp. vmin=0, vmax=s), so the indices are equal
    bit for bit. With s == 0 (all-zero heatmap) every pixel gets 127 (symmetric) or 0.
    """
    a = _as_heatmap(h)
    s = symmetric_scale(a, percentile) if scale is None else float(scale)
    if not (np.isfinite(s) and s >= 0.0):
        raise ValueError(f"scale must be a finite value >= 0; got {scale}")
    if s == 0.0:
        return np.full(a.shape, CENTER_INDEX if symmetric else 0, dtype=np.uint8)
    if symmetric:
        vmin, vmax = -s, s
    else:
        vmin, vmax = 0.0, s
    x = (a - vmin) / (vmax - vmin)
    return (x * 255).clip(0, 255).astype(np.uint8)


def colorize(heatmap, cmap: str = DEFAULT_CMAP, *, percentile: float | None = None,
             symmetric: bool | None = None, scale: float | None = None) -> np.ndarray:
    """Heatmap [H,W] -> RGB uint8 [H,W,3]. ``symmetric=None`` picks it from the map (diverging or not)."""
    lut = colormap(cmap)
    if symmetric is None:
        symmetric = is_diverging(cmap)
    return lut[color_index(heatmap, scale, percentile=percentile, symmetric=symmetric)]


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def _pil_size(size: Sequence[int]) -> tuple[int, int]:
    """(H, W) -> Pillow's (W, H)."""
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"size must be (H, W) with positive ints; got {size!r}")
    return int(size[1]), int(size[0])


def render(relevance, cmap: str = DEFAULT_CMAP, *, reduce: str = "sum", percentile: float | None = None,
           symmetric: bool | None = None, scale: float | None = None,
           size: Sequence[int] | None = None) -> Image.Image:
    """Relevance [C,H,W] / [1,C,H,W] / [H,W] -> RGB PIL image of the heatmap.

    ``size=(H, W)`` enlarges/shrinks the *coloured* image with nearest neighbour (colours stay exact).
    ``scale`` fixes s (e.g. to share one scale between several heatmaps); default max|h| / percentile.
    """
    rgb = colorize(to_heatmap(relevance, reduce), cmap, percentile=percentile, symmetric=symmetric,
                   scale=scale)
    img = Image.fromarray(rgb)
    if size is not None:
        img = img.resize(_pil_size(size), Image.Resampling.NEAREST)
    return img


def as_rgb_uint8(image) -> np.ndarray:
    """An RGB uint8 [H,W,3] array from a PIL image or an array (gray is repeated, alpha dropped)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB [H,W,3] (or a PIL image); got dtype {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image must be [H,W,3] uint8; got shape {a.shape}")
    return a[:, :, :3]


def overlay(image, relevance, alpha: float = 0.6, *, cmap: str = DEFAULT_CMAP, reduce: str = "sum",
            percentile: float | None = None, symmetric: bool | None = None, scale: float | None = None,
            weight: str = "magnitude") -> Image.Image:
    """Blend the coloured heatmap over an RGB uint8 image ([H,W,3] array or PIL image).

    weight="magnitude" (default): per-pixel opacity alpha * |v| (v = h/s clipped to [-1, 1]; for
    sequential maps alpha * clip(v, 0, 1)), so pixels without relevance show the image unchanged.
    weight="constant": opacity alpha everywhere.
    If the image is not the heatmap's size, the heatmap colours/opacities are resized to the image with
    nearest neighbour.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    if weight not in ("magnitude", "constant"):
        raise ValueError(f"weight must be 'magnitude' or 'constant'; got {weight!r}")
    base = as_rgb_uint8(image)
    h = _as_heatmap(to_heatmap(relevance, reduce))
    if symmetric is None:
        symmetric = is_diverging(cmap)
    s = symmetric_scale(h, percentile) if scale is None else float(scale)
    rgb = colorize(h, cmap, symmetric=symmetric, scale=s)
    if weight == "constant":
        w = np.full(h.shape, float(alpha))
    elif s == 0.0:
        w = np.zeros(h.shape)
    else:
        v = np.clip(h / s, -1.0, 1.0)
        w = float(alpha) * (np.abs(v) if symmetric else np.clip(v, 0.0, 1.0))
    if base.shape[:2] != h.shape:
        pil_wh = (base.shape[1], base.shape[0])
        rgb = np.asarray(Image.fromarray(rgb).resize(pil_wh, Image.Resampling.NEAREST))
        w = np.asarray(Image.fromarray(w.astype(np.float32)).resize(pil_wh, Image.Resampling.NEAREST),
                       dtype=np.float64)
    w = w[:, :, None]
    out = base.astype(np.float64) * (1.0 - w) + rgb.astype(np.float64) * w
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return int(np.ceil(x1 - min(x0, 0))), int(np.ceil(y1 - min(y0, 0)))


def grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] | None = None, *,
         col_labels: Sequence[str] | None = None, scale: int = 1, pad: int = 4,
         background: tuple[int, int, int] = (255, 255, 255),
         text_color: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Lay images out in a grid (one list per row). Returns one RGB image.

    ``labels``: one text per row, drawn left of the row; ``col_labels``: one text per column, drawn on
    top. Text uses Pillow's default font. ``scale`` enlarges every cell image by an integer factor with
    nearest neighbour (for small 32x32 inputs). Cells are centred in their column width / row height.
    """
    rows = [list(r) for r in rows]
    if not rows or not any(rows):
        raise ValueError("grid needs at least one image")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} row labels for {len(rows)} rows")
    ncols = max(len(r) for r in rows)
    if col_labels is not None and len(col_labels) > ncols:
        raise ValueError(f"got {len(col_labels)} column labels for {ncols} columns")
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive int; got {scale}")
    cells = []
    for r in rows:
        row = []
        for im in r:
            if not isinstance(im, Image.Image):
                raise TypeError(f"grid cells must be PIL images; got {type(im).__name__}")
            im = im.convert("RGB")
            if scale != 1:
                im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
            row.append(im)
        cells.append(row)

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_w = [0] * ncols
    row_h = [0] * len(cells)
    for i, row in enumerate(cells):
        for j, im in enumerate(row):
            col_w[j] = max(col_w[j], im.width)
            row_h[i] = max(row_h[i], im.height)
    label_w = max((_text_size(probe, str(t), font)[0] for t in labels), default=0) if labels else 0
    left = label_w + pad if label_w else 0
    header_h = max((_text_size(probe, str(t), font)[1] for t in col_labels), default=0) if col_labels else 0
    top = header_h + pad if header_h else 0
    for j, t in enumerate(col_labels or ()):
        col_w[j] = max(col_w[j], _text_size(probe, str(t), font)[0])

    width = pad + left + sum(col_w) + pad * ncols
    height = pad + top + sum(row_h) + pad * len(cells)
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)

    xs = [pad + left + sum(col_w[:j]) + pad * j for j in range(ncols)]
    for j, t in enumerate(col_labels or ()):
        tw, _ = _text_size(draw, str(t), font)
        draw.text((xs[j] + (col_w[j] - tw) // 2, pad), str(t), fill=text_color, font=font)
    y = pad + top
    for i, row in enumerate(cells):
        if labels:
            tw, th = _text_size(draw, str(labels[i]), font)
            draw.text((pad, y + max(0, (row_h[i] - th) // 2)), str(labels[i]), fill=text_color, font=font)
        for j, im in enumerate(row):
            canvas.paste(im, (xs[j] + (col_w[j] - im.width) // 2, y + (row_h[i] - im.height) // 2))
        y += row_h[i] + pad
    return canvas


def overview(entries: Sequence[tuple[str, object, object]], *, cmap: str = DEFAULT_CMAP, reduce: str = "sum",
             percentile: float | None = None, alpha: float = 0.6, scale: int = 1) -> Image.Image:
    """Overview image: one row per input, "input | heatmap | overlay", labelled with the input's name.

    entries: (name, display image RGB uint8 [H,W,3], relevance [C,H,W]). Each heatmap is scaled on its own.
    """
    if not entries:
        raise ValueError("overview needs at least one entry")
    rows, names = [], []
    for name, display, relevance in entries:
        base = as_rgb_uint8(display)
        heat = render(relevance, cmap, reduce=reduce, percentile=percentile)
        if heat.size != (base.shape[1], base.shape[0]):
            heat = heat.resize((base.shape[1], base.shape[0]), Image.Resampling.NEAREST)
        rows.append([Image.fromarray(base), heat,
                     overlay(base, relevance, alpha, cmap=cmap, reduce=reduce, percentile=percentile)])
        names.append(str(name))
    return grid(rows, names, col_labels=["input", f"heatmap ({cmap})", "overlay"], scale=scale)


def save_png(image, path) -> Path:
    """Save a PIL image (or an RGB uint8 [H,W,3] array) as PNG, creating parent folders. Returns the path."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(as_rgb_uint8(image))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    image.save(p, format="PNG")
    return p

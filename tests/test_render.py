"""Heatmap rendering: value -> colour index -> colour, parity with Zennit, no mutation, images."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lrponnx.app import render as R


# ------------------------------------------------------------------------------------ lookup tables
def test_luts_are_256x3_uint8_and_read_only():
    for name in R.CMAPS:
        lut = R.colormap(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        with pytest.raises(ValueError):
            lut[0, 0] = 1
    assert R.DEFAULT_CMAP == "coldnhot"
    with pytest.raises(ValueError, match="unknown colour map"):
        R.colormap("viridis")


def test_lut_node_colours():
    c = R.colormap("coldnhot")
    assert c[0].tolist() == [0, 255, 255]      # cyan
    assert c[64].tolist() == [0, 0, 255]       # blue
    assert c[128].tolist() == [0, 0, 0]        # black
    assert c[170].tolist() == [255, 0, 0]      # red
    assert c[212].tolist() == [255, 255, 0]    # yellow
    assert c[255].tolist() == [255, 255, 255]  # white
    b = R.colormap("bwr")
    assert b[0].tolist() == [0, 0, 255] and b[128].tolist() == [255, 255, 255] and b[255].tolist() == [255, 0, 0]
    assert R.colormap("gray")[np.arange(256)].tolist() == [[i, i, i] for i in range(256)]


# ------------------------------------------------------------------------------------ value -> index
def test_value_to_index_symmetric():
    h = np.array([[-2.0, -1.0, 0.0, 1.0, 2.0]])
    idx = R.color_index(h)  # s = 2
    assert idx.tolist() == [[0, 63, 127, 191, 255]]
    assert R.CENTER_INDEX == 127
    # the bin of index 127 is [-1/255, 1/255) in normalised units: centred on zero
    v = np.array([[-1 / 255 + 1e-9, 0.0, 1 / 255 - 1e-9, 1 / 255, -1 / 255 - 1e-9, 1.0]])
    assert R.color_index(v, 1.0).tolist() == [[127, 127, 127, 128, 126, 255]]


def test_index_symmetric_about_centre():
    rng = np.random.default_rng(0)
    v = rng.uniform(-0.999, 0.999, size=(1, 5000))
    v = v[np.abs(np.abs(v * 127.5) - np.round(np.abs(v * 127.5))) > 1e-6][None]  # avoid exact bin edges
    up, down = R.color_index(v, 1.0).astype(int), R.color_index(-v, 1.0).astype(int)
    assert np.array_equal(up - 127, 127 - down)


def test_zero_maps_to_centre_colour_and_extremes_to_ends():
    h = np.array([[0.0, 3.0, -3.0, 7.5, -7.5]])
    for name in ("coldnhot", "bwr", "seismic"):
        lut = R.colormap(name)
        rgb = R.colorize(h, name)
        assert rgb[0, 0].tolist() == lut[127].tolist()   # 0 -> index 127
        assert rgb[0, 3].tolist() == lut[255].tolist()   # +max -> top
        assert rgb[0, 4].tolist() == lut[0].tolist()     # -max -> bottom
        assert rgb[0, 1].tolist() == lut[127 + 51].tolist()  # 3/7.5 = 0.4 -> floor(127.5*1.4 = 178.5)
        assert rgb[0, 2].tolist() == lut[127 - 51].tolist()  # -0.4 -> floor(127.5*0.6 = 76.5)
    # Zennit samples the table at k/255, so index 127 is one step off the nominal centre colour
    assert R.colorize(np.array([[0.0, 1.0]]), "coldnhot")[0, 0].tolist() == [0, 0, 3]
    assert R.colorize(np.array([[0.0, 1.0]]), "bwr")[0, 0].tolist() == [253, 253, 255]


def test_sequential_maps_start_at_zero():
    h = np.array([[-1.0, 0.0, 0.5, 1.0]])
    assert R.color_index(h, symmetric=False).tolist() == [[0, 0, 127, 255]]
    rgb = R.colorize(h, "hot")  # symmetric=None -> sequential for hot
    assert rgb[0, 1].tolist() == [0, 0, 0] and rgb[0, 3].tolist() == [255, 255, 255]
    assert not R.is_diverging("hot") and not R.is_diverging("gray") and R.is_diverging("coldnhot")


def test_normalize_symmetric():
    h = np.array([[-4.0, -1.0, 0.0, 2.0]])
    v = R.normalize_symmetric(h)
    assert np.allclose(v, [[-1.0, -0.25, 0.0, 0.5]])
    assert R.normalize_symmetric(np.zeros((2, 2))).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    # percentile: scale from the 50th percentile of |h| = 1.5, larger values clipped
    v = R.normalize_symmetric(h, percentile=50)
    assert np.allclose(v, [[-1.0, -1 / 1.5, 0.0, 1.0]])
    # a percentile that is 0 falls back to max |h|
    sparse = np.zeros((10, 10))
    sparse[0, 0] = -2.0
    assert R.symmetric_scale(sparse, percentile=90) == 2.0
    # index from normalised values: floor(127.5 * (v + 1))
    ramp = np.linspace(-1, 1, 1001)[None]
    assert np.array_equal(R.color_index(ramp, 1.0),
                          np.floor(127.5 * (R.normalize_symmetric(ramp) + 1)).clip(0, 255).astype(np.uint8))
    with pytest.raises(ValueError, match="percentile"):
        R.symmetric_scale(h, percentile=0)
    with pytest.raises(ValueError, match="non-finite"):
        R.normalize_symmetric(np.array([[np.nan, 1.0]]))


def test_all_zero_heatmap():
    assert (R.color_index(np.zeros((3, 3))) == 127).all()
    assert (R.color_index(np.zeros((3, 3)), symmetric=False) == 0).all()
    img = R.overlay(np.full((3, 3, 3), 77, np.uint8), np.zeros((3, 3, 3)))
    assert (np.asarray(img) == 77).all()


# ------------------------------------------------------------------------------------ zennit parity
def _zennit_rgb(img, name):
    from zennit.image import palette

    # zennit 0.5.1 passes a numpy array to putpalette, which Pillow 13 cannot read back; put the same
    # palette as bytes so the P image can be converted.
    img.putpalette(palette(name).tobytes())
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("name", ["coldnhot", "bwr", "seismic", "hot", "gray"])
def test_lut_equals_zennit_palette(name):
    zimage = pytest.importorskip("zennit.image")
    assert np.array_equal(R.colormap(name), zimage.palette(name))


@pytest.mark.parametrize("name", ["coldnhot", "bwr"])
@pytest.mark.parametrize("top", [1.0, 3.7, 1e-3])
def test_ramp_colours_equal_zennit_imgify(name, top):
    zimage = pytest.importorskip("zennit.image")
    ramp = np.linspace(-top, top, 2001).reshape(23, 87)
    ours = np.asarray(R.render(ramp, name))
    theirs = _zennit_rgb(zimage.imgify(ramp, symmetric=True, cmap=name), name)
    assert np.array_equal(ours, theirs)
    # asymmetric data: the scale is max |h| on both sides
    skew = np.linspace(-0.3 * top, top, 2001).reshape(23, 87)
    assert np.array_equal(np.asarray(R.render(skew, name)),
                          _zennit_rgb(zimage.imgify(skew, symmetric=True, cmap=name), name))


def test_sequential_ramp_equals_zennit_imgify():
    zimage = pytest.importorskip("zennit.image")
    ramp = np.linspace(-1.0, 2.5, 1001)[None]
    for name in ("hot", "gray"):
        theirs = _zennit_rgb(zimage.imgify(ramp, vmin=0.0, vmax=2.5, cmap=name), name)
        assert np.array_equal(np.asarray(R.render(ramp, name)), theirs)


# ------------------------------------------------------------------------------------ no mutation
def test_rendering_does_not_change_relevance():
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        rel = rng.normal(size=(3, 8, 9)).astype(dtype)
        rel[0, 0, 0] = 50.0  # triggers clipping with a percentile
        before = rel.copy()
        img = np.asarray(rng.integers(0, 256, size=(8, 9, 3), dtype=np.uint8))
        img_before = img.copy()
        R.render(rel, percentile=90)
        R.render(rel, "hot", reduce="abs-sum")
        R.overlay(img, rel, percentile=90)
        R.normalize_symmetric(R.to_heatmap(rel))
        h = R.to_heatmap(rel[0])
        h[:] = 0  # the returned heatmap is a copy, not a view
        R.overview([("x", img, rel)])
        assert rel.dtype == dtype and np.array_equal(rel, before)
        assert np.array_equal(img, img_before)
    h2 = np.linspace(-1, 1, 12).reshape(3, 4)
    h2_before = h2.copy()
    R.colorize(h2, percentile=50)
    R.normalize_symmetric(h2, percentile=50)
    assert np.array_equal(h2, h2_before)


# ------------------------------------------------------------------------------------ to_heatmap
def test_to_heatmap_reductions():
    r = np.array([[[1.0, -2.0]], [[-3.0, 0.5]]])  # [C=2, H=1, W=2]
    assert R.to_heatmap(r).tolist() == [[-2.0, -1.5]]
    assert R.to_heatmap(r, "abs-sum").tolist() == [[4.0, 2.5]]
    assert R.to_heatmap(r, "pos-sum").tolist() == [[1.0, 0.5]]
    assert R.to_heatmap(r, "neg-sum").tolist() == [[-3.0, -2.0]]
    assert R.to_heatmap(r, "max-norm").tolist() == [[3.0, 2.0]]
    assert np.allclose(R.to_heatmap(r, "l2-norm"), [[np.sqrt(10), np.sqrt(4.25)]])
    assert R.to_heatmap(r[None]).tolist() == [[-2.0, -1.5]]       # [1,C,H,W]
    assert R.to_heatmap(r[0]).dtype == np.float64                   # [H,W]
    assert R.to_heatmap(r.astype(np.float32)).dtype == np.float64
    with pytest.raises(ValueError, match="unknown reduce"):
        R.to_heatmap(r, "median")
    with pytest.raises(ValueError, match="batch"):
        R.to_heatmap(np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        R.to_heatmap(np.zeros(5))


# ------------------------------------------------------------------------------------ images
def test_render_image_and_size():
    rel = np.zeros((3, 4, 5))
    rel[:, 0, 0] = 1.0
    img = R.render(rel)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (5, 4)
    big = R.render(rel, size=(8, 10))
    assert big.size == (10, 8)
    a = np.asarray(big)
    assert a[0, 0].tolist() == a[1, 1].tolist() == [255, 255, 255]  # nearest keeps exact colours


def test_overlay_blends_by_magnitude():
    base = np.full((2, 2, 3), 100, np.uint8)
    rel = np.array([[[0.0, 1.0], [-1.0, 0.5]]])  # [1,2,2]
    out = np.asarray(R.overlay(base, rel, alpha=1.0))
    lut = R.colormap("coldnhot")
    assert out[0, 0].tolist() == [100, 100, 100]       # no relevance: image unchanged
    assert out[0, 1].tolist() == lut[255].tolist()      # full relevance, alpha 1: pure colour
    assert out[1, 0].tolist() == lut[0].tolist()
    half = np.asarray(R.overlay(base, rel, alpha=0.5, weight="constant"))
    exp = np.rint(100 * 0.5 + lut[127].astype(float) * 0.5)
    assert half[0, 0].tolist() == exp.tolist()
    # image larger than the heatmap: heatmap is upscaled to the image
    assert R.overlay(np.zeros((6, 6, 3), np.uint8), rel).size == (6, 6)
    with pytest.raises(ValueError, match="uint8"):
        R.overlay(base.astype(np.float32), rel)


def test_grid_and_overview(tmp_path):
    a = Image.new("RGB", (10, 8), (255, 0, 0))
    b = Image.new("RGB", (6, 6), (0, 255, 0))
    g = R.grid([[a, b], [b]], labels=["first", "second"], col_labels=["x", "y"], pad=2)
    assert g.mode == "RGB"
    assert g.width > 10 + 6 and g.height > 8 + 6
    # the text is drawn: some dark pixels left of the images
    arr = np.asarray(g)
    assert (arr.sum(axis=2) < 200).any()
    g2 = R.grid([[a]], scale=3, pad=0)
    assert g2.size == (30, 24)
    with pytest.raises(ValueError):
        R.grid([])
    with pytest.raises(ValueError, match="labels"):
        R.grid([[a]], labels=["a", "b"])

    rng = np.random.default_rng(0)
    entries = [(f"img{i}", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), rng.normal(size=(3, 16, 16)))
               for i in range(2)]
    ov = R.overview(entries, scale=2)
    assert ov.height > 2 * 32 and ov.width > 3 * 32
    p = R.save_png(ov, tmp_path / "sub" / "overview.png")
    assert p.exists()
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == ov.size
    p2 = R.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "arr.png")
    assert p2.exists()

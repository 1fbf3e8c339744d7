"""Preprocessing metadata, image -> tensor, tensor -> display, input expansion, sample photos."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from lrponnx.errors import LrpOnnxError
from lrponnx.app.preprocess import (
    METADATA_KEY,
    ImageReadError,
    InputError,
    Preprocessing,
    PreprocessingError,
)
from lrponnx.app.inputs import expand_inputs, iter_inputs

CAFFE = Preprocessing(input="data", channel_order="bgr", pixel_scale=255.0, mean=[104.0, 117.0, 123.0],
                      size=(6, 5))


def _rgb(h=6, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _model(meta: str | None = None, shape=(1, 3, 6, 5)):
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["data"], ["y"])], "g", [x], [y]))
    if meta is not None:
        e = m.metadata_props.add()
        e.key, e.value = METADATA_KEY, meta
    return m


# ------------------------------------------------------------------------------------ formula
def test_apply_formula_bgr_caffe():
    img = _rgb()
    t = CAFFE.apply(img)
    assert t.dtype == np.float32 and t.shape == (3, 6, 5)
    # channel 0 of the graph is blue
    exp_b = img[:, :, 2].astype(np.float64) / 255 * 255 - 104.0
    exp_r = img[:, :, 0].astype(np.float64) - 123.0
    assert np.allclose(t[0], exp_b, atol=1e-4) and np.allclose(t[2], exp_r, atol=1e-4)


def test_bgr_vs_rgb_ordering():
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 0] = 200  # red
    rgb = Preprocessing(channel_order="rgb", pixel_scale=255.0)
    bgr = Preprocessing(channel_order="bgr", pixel_scale=255.0)
    assert rgb.apply(img)[:, 0, 0].tolist() == [200.0, 0.0, 0.0]
    assert bgr.apply(img)[:, 0, 0].tolist() == [0.0, 0.0, 200.0]
    # the mean is in graph channel order
    bgr_m = Preprocessing(channel_order="bgr", pixel_scale=255.0, mean=[1.0, 2.0, 3.0])
    assert bgr_m.apply(img)[:, 0, 0].tolist() == [-1.0, -2.0, 197.0]
    # and display goes back to RGB
    assert bgr_m.to_display(bgr_m.apply(img))[0, 0].tolist() == [200, 0, 0]


def test_std_and_scale():
    img = np.full((1, 1, 3), 255, np.uint8)
    p = Preprocessing(channel_order="rgb", pixel_scale=1.0, mean=[0.485, 0.456, 0.406],
                      std=[0.229, 0.224, 0.225], scale=2.0)
    exp = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]) * 2.0
    assert np.allclose(p.apply(img)[:, 0, 0], exp, atol=1e-6)


def test_mean_per_channel_and_chw():
    img = _rgb(4, 4, seed=3)
    chw = np.stack([np.full((4, 4), 104.0), np.full((4, 4), 117.0), np.full((4, 4), 123.0)])
    chw[0, 1, 2] = 50.0
    per = Preprocessing(channel_order="bgr", pixel_scale=255.0, mean=[104, 117, 123], size=(4, 4))
    full = Preprocessing(channel_order="bgr", pixel_scale=255.0, mean=chw.tolist())
    assert full.size == (4, 4)  # taken from the mean image
    a, b = per.apply(img), full.apply(img)
    diff = a - b
    assert np.allclose(diff[0, 1, 2], -54.0, atol=1e-4)
    diff[0, 1, 2] = 0
    assert np.allclose(diff, 0, atol=1e-4)
    # a larger mean image is centre-cropped (Caffe test-phase crop)
    big = np.zeros((3, 8, 8))
    big[:, 2:6, 2:6] = chw
    cropped = Preprocessing(channel_order="bgr", pixel_scale=255.0, mean=big, size=(4, 4))
    assert np.allclose(cropped.apply(img), b)
    assert np.array_equal(cropped.to_display(b), img)
    # one value broadcasts; wrong lengths / shapes are clear errors
    assert Preprocessing(mean=[0.5]).mean == (0.5, 0.5, 0.5)
    with pytest.raises(PreprocessingError, match="mean has 2 values"):
        Preprocessing(mean=[1, 2])
    with pytest.raises(PreprocessingError, match="smaller"):
        Preprocessing(mean=np.zeros((3, 2, 2)), size=(4, 4))
    with pytest.raises(PreprocessingError, match="channel"):
        Preprocessing(mean=np.zeros((1, 4, 4)))


def test_round_trip_apply_to_display():
    rng = np.random.default_rng(5)
    configs = [
        CAFFE,
        Preprocessing(channel_order="rgb", pixel_scale=1.0, mean=[0.485, 0.456, 0.406],
                      std=[0.229, 0.224, 0.225], size=(6, 5)),
        Preprocessing(channel_order="bgr", pixel_scale=255.0, mean=rng.uniform(90, 130, (3, 6, 5)), scale=0.017),
        Preprocessing(channel_order="rgb", pixel_scale=255.0, mean=[127.5], scale=1 / 127.5, embedded=True),
    ]
    img = _rgb(6, 5, seed=11)
    for p in configs:
        t = p.apply(img)
        back = p.to_display(t)
        assert back.dtype == np.uint8 and back.shape == img.shape
        assert np.abs(back.astype(int) - img.astype(int)).max() == 0, p
        assert np.array_equal(p.to_display(t[None]), back)  # [1,C,H,W] accepted


def test_gray_channel_order():
    p = Preprocessing(channel_order="gray", pixel_scale=255.0, scale=1 / 256)
    gray = np.repeat(np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)[:, :, None], 3, axis=2)
    t = p.apply(gray)
    assert t.shape == (1, 4, 6)
    assert np.allclose(t[0], gray[:, :, 0] / 256, atol=1e-6)
    assert np.array_equal(p.to_display(t), gray)


def test_embedded_skips_mean():
    img = np.full((2, 2, 3), 51, np.uint8)
    p = Preprocessing(channel_order="rgb", pixel_scale=255.0, mean=[100, 100, 100], embedded=True)
    assert np.allclose(p.apply(img), 51.0)


def test_apply_resizes_and_validates():
    p = Preprocessing(size=(3, 4))
    assert p.apply(_rgb(10, 7)).shape == (3, 3, 4)
    with pytest.raises(PreprocessingError, match="expects 3 x 4"):
        p.apply(_rgb(10, 7), resize=False)
    with pytest.raises(PreprocessingError, match="uint8"):
        p.apply(np.zeros((3, 4, 3), np.float32))
    with pytest.raises(PreprocessingError, match="tensor must be"):
        p.to_display(np.zeros((1, 3, 4), np.float32))


# ------------------------------------------------------------------------------------ metadata
def test_metadata_round_trip():
    for p in (CAFFE,
              Preprocessing(input="x", channel_order="rgb", pixel_scale=1.0, mean=[0.485, 0.456, 0.406],
                            std=[0.229, 0.224, 0.225], size=(224, 224)),
              Preprocessing(channel_order="bgr", pixel_scale=255.0, mean=np.arange(3 * 6 * 5.0).reshape(3, 6, 5)),
              Preprocessing()):
        key, value = p.to_metadata()
        assert key == METADATA_KEY == "lrponnx.preprocessing"
        d = json.loads(value)
        assert set(d) >= {"input", "channel_order", "pixel_scale", "mean", "scale", "size", "embedded"}
        m = _model(value)
        q = Preprocessing.from_model(m)
        # without a size in the metadata, from_model takes H, W from the graph input [1,3,6,5]
        expected = p if p.size is not None else dataclasses.replace(p, size=(6, 5))
        assert q == expected
        assert Preprocessing.from_model(onnx.load_from_string(m.SerializeToString())) == expected
        assert np.array_equal(q.apply(_rgb()), p.apply(_rgb()))


def test_from_model_converter_json_and_missing():
    text = json.dumps({"input": "data", "channel_order": "bgr", "pixel_scale": 255.0,
                       "mean": [104.0, 117.0, 123.0], "scale": 1.0, "size": [6, 5], "embedded": False,
                       "future_key": 1})
    p = Preprocessing.from_model(_model(text))
    assert p == CAFFE and p.std is None
    assert Preprocessing.from_model(_model(None)) is None
    # size missing: taken from the graph input's static shape
    q = Preprocessing.from_model(_model(json.dumps({"channel_order": "rgb"}), shape=(1, 3, 7, 9)))
    assert q.size == (7, 9) and q.pixel_scale == 1.0 and q.mean is None
    with pytest.raises(PreprocessingError, match="not valid JSON"):
        Preprocessing.from_model(_model("{oops"))
    with pytest.raises(PreprocessingError, match="channel_order"):
        Preprocessing.from_model(_model(json.dumps({"channel_order": "hsv"})))
    # write_to_model replaces an existing entry
    m = _model(text)
    Preprocessing(channel_order="rgb").write_to_model(m)
    assert [e.key for e in m.metadata_props].count(METADATA_KEY) == 1
    assert Preprocessing.from_model(m).channel_order == "rgb"


def test_from_model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(CAFFE.to_metadata()[1]), str(path))
    assert Preprocessing.from_model(path) == CAFFE


def test_from_flags():
    p = Preprocessing.from_flags(channel_order="bgr", pixel_scale="255", mean="104,117,123", size="6x5",
                                 input="data")
    assert p == CAFFE
    tv = Preprocessing.from_flags(preset="torchvision", size=224)
    assert tv.size == (224, 224) and tv.std == (0.229, 0.224, 0.225) and tv.channel_order == "rgb"
    # flags override a base (e.g. the model's metadata)
    q = Preprocessing.from_flags(base=CAFFE, mean="100 100 100")
    assert q.mean == (100.0, 100.0, 100.0) and q.channel_order == "bgr" and q.size == (6, 5)
    with pytest.raises(PreprocessingError, match="preset"):
        Preprocessing.from_flags(preset="nope")
    with pytest.raises(PreprocessingError, match="size"):
        Preprocessing.from_flags(size="6x5x2")
    with pytest.raises(PreprocessingError, match="mean must be a number"):
        Preprocessing.from_flags(mean="1,a,3")
    with pytest.raises(PreprocessingError, match="std must not contain 0"):
        Preprocessing.from_flags(std="1,0,1")


def test_from_flags_mean_npy(tmp_path):
    mean = np.full((3, 6, 5), 7.0)
    np.save(tmp_path / "mean.npy", mean)
    p = Preprocessing.from_flags(channel_order="bgr", pixel_scale=255, mean=str(tmp_path / "mean.npy"))
    assert isinstance(p.mean, np.ndarray) and p.size == (6, 5)


def test_errors_are_lrponnx_errors():
    assert issubclass(PreprocessingError, LrpOnnxError)
    assert issubclass(ImageReadError, InputError) and issubclass(InputError, LrpOnnxError)


# ------------------------------------------------------------------------------------ files
def test_load_image_and_errors(tmp_path):
    img = _rgb(20, 30, seed=2)
    Image.fromarray(img).save(tmp_path / "a.png")
    t, disp = CAFFE.load_image(tmp_path / "a.png")
    assert t.shape == (3, 6, 5) and t.dtype == np.float32 and disp.shape == (6, 5, 3) and disp.dtype == np.uint8
    exp = np.asarray(Image.fromarray(img).resize((5, 6), Image.Resampling.BILINEAR))
    assert np.array_equal(disp, exp)
    assert np.array_equal(CAFFE.to_display(t), disp)
    # RGBA / palette / gray files are read as RGB
    Image.fromarray(img).convert("L").save(tmp_path / "g.png")
    Image.fromarray(img).convert("RGBA").save(tmp_path / "rgba.png")
    assert CAFFE.load_image(tmp_path / "g.png")[1].shape == (6, 5, 3)
    assert CAFFE.load_image(tmp_path / "rgba.png")[1].shape == (6, 5, 3)
    # 16-bit grey is scaled to 8 bit (65535 -> 255), not clipped
    Image.fromarray(np.full((6, 5), 65535 // 2, np.uint16)).save(tmp_path / "g16.png")
    assert (CAFFE.load_image(tmp_path / "g16.png")[1] == 127).all()

    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(ImageReadError, match="not an image format"):
        CAFFE.load_image(tmp_path / "bad.png")
    with pytest.raises(ImageReadError, match="no such file"):
        CAFFE.load_image(tmp_path / "missing.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        CAFFE.load_image(tmp_path / "trunc.png")


def test_expand_and_iter_inputs(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("b.jpg", "a.PNG", "c.png"):
        Image.fromarray(_rgb(8, 8)).save(d / name, format="PNG" if name.lower().endswith("png") else "JPEG")
    (d / "notes.txt").write_text("x")
    (d / ".hidden.png").write_bytes(b"")
    arr = np.random.default_rng(0).normal(size=(2, 3, 6, 5)).astype(np.float32)
    np.save(tmp_path / "batch.npy", arr)
    np.save(tmp_path / "one.npy", arr[0])

    paths = expand_inputs([d, tmp_path / "one.npy"])
    assert [p.name for p in paths] == ["a.PNG", "b.jpg", "c.png", "one.npy"]

    items = list(iter_inputs([d, tmp_path / "batch.npy", tmp_path / "one.npy"], CAFFE))
    assert [i.name for i in items] == ["a.PNG", "b.jpg", "c.png", "batch[0]", "batch[1]", "one"]
    assert all(i.tensor.shape == (3, 6, 5) and i.tensor.dtype == np.float32 for i in items)
    assert items[3].index == 0 and items[4].index == 1 and items[5].index is None
    assert np.array_equal(items[4].tensor, arr[1])
    assert items[4].display.shape == (6, 5, 3)

    # .npy without preprocessing: tensor only; images need preprocessing
    (only,) = list(iter_inputs(tmp_path / "one.npy"))
    assert only.display is None
    with pytest.raises(PreprocessingError, match="no 'lrponnx.preprocessing' metadata"):
        list(iter_inputs(d))
    with pytest.raises(InputError, match="does not exist"):
        expand_inputs([tmp_path / "nope"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no images"):
        expand_inputs(empty)
    np.save(tmp_path / "wrong.npy", np.zeros((3, 7, 7), np.float32))
    with pytest.raises(InputError, match="model expects"):
        list(iter_inputs(tmp_path / "wrong.npy", CAFFE))
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(InputError, match="expected"):
        list(iter_inputs(tmp_path / "flat.npy"))


# ------------------------------------------------------------------------------------ samples
def test_sample_images():
    pytest.importorskip("skimage")
    from lrponnx.app.samples import SAMPLE_NAMES, SamplesUnavailableError, sample_image, sample_images

    samples = sample_images(size=(32, 32))
    assert [n for n, _ in samples] == list(SAMPLE_NAMES) and len(samples) >= 4
    for _, img in samples:
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 5
    assert sample_image("cat", size=(16, 24)).shape == (16, 24, 3)
    assert sample_image("coffee", size=None).shape == (400, 600, 3)
    with pytest.raises(SamplesUnavailableError):
        sample_image("dog")
    # a sample goes through preprocessing and back unchanged
    p = Preprocessing.from_flags(preset="caffe", size=32)
    assert np.array_equal(p.to_display(p.apply(samples[0][1])), samples[0][1])

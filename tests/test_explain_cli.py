"""`lrponnx explain` on real files: preprocessing read back from the converted model's metadata."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
from PIL import Image

from lrponnx.app.cli import main
from lrponnx.converters.caffe import convert as caffe_convert
from lrponnx.files import save_model


def _own_preprocessing(path, mean):
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)  # H, W, 3 in R, G, B
    return rgb.transpose(2, 0, 1) - mean


def test_explain_jpegs_with_a_converted_caffe_model(shared_data, tmp_path):
    caffe = shared_data / "caffe" / "cifar10_full"
    mean = np.load(caffe / "mean_rgb_3x32x32.npy").astype(np.float32)
    model = caffe_convert(caffe / "cifar10_full.prototxt", caffe / "cifar10_full_iter_70000.caffemodel",
                          mean_file=str(caffe / "mean_rgb_3x32x32.npy"), channel_order="rgb")
    model_path = save_model(model, tmp_path / "cifar10_full.onnx")
    images = sorted((shared_data / "cifar10_test_sample" / "cat").glob("*.jpg"))[:6]
    images += sorted((shared_data / "cifar10_test_sample" / "ship").glob("*.jpg"))[:6]
    out = tmp_path / "out"
    assert main(["explain", str(model_path), *map(str, images), "-o", str(out), "--save-raw"]) == 0

    # The test's own preprocessing: RGB, 0-255, minus the mean image; prediction from ORT directly.
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = np.stack([_own_preprocessing(p, mean) for p in images])
    expected = sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)
    summary = json.loads((out / "summary.json").read_text())["done"]
    assert [s["prediction"] for s in summary] == expected.tolist()
    assert [s["input"] for s in summary] == [str(p) for p in images]
    # Same-named inputs from two folders keep apart; every heatmap and raw array is there.
    assert (out / "cat_0000_heatmap.png").exists() and (out / "ship_0000_heatmap.png").exists()
    raws = sorted(out.glob("*_relevance.npy"))
    assert len(raws) == len(images) and np.load(raws[0]).shape == (3, 32, 32)
    assert (out / "overview.png").exists()


def test_explain_npy_with_a_plain_model_compiles_on_the_fly(tmp_path):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 5)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 8, 8), str(path), input_names=["x"], output_names=["y"],
                      dynamo=False, dynamic_axes={"x": {0: "N"}})
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "batch.npy", x)
    out = tmp_path / "out"
    assert main(["explain", str(path), str(tmp_path / "batch.npy"), "-o", str(out), "--target", "2",
                 "--save-raw", "--composite", "epsilon-plus"]) == 0
    summary = json.loads((out / "summary.json").read_text())["done"]
    assert [s["target"] for s in summary] == [2, 2, 2]
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    assert [s["prediction"] for s in summary] == logits.argmax(1).tolist()
    assert len(list(out.glob("*_relevance.npy"))) == 3

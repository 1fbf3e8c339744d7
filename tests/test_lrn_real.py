"""The LRN rule on the real trained Caffe model (cifar10_full: two WITHIN_CHANNEL LRN layers)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import lrponnx
from lrponnx.converters.caffe import convert as caffe_convert
from lrponnx.app.render import render
from explainer_feeds import with_target


@pytest.fixture(scope="module")
def cifar10_full(request):
    from conftest import shared_data_path

    root = shared_data_path()
    caffe = root / "caffe" / "cifar10_full"
    model = caffe_convert(caffe / "cifar10_full.prototxt", caffe / "cifar10_full_iter_70000.caffemodel",
                          mean_file=str(caffe / "mean_rgb_3x32x32.npy"), channel_order="rgb")
    mean = np.load(caffe / "mean_rgb_3x32x32.npy").astype(np.float32)
    paths = [sorted((root / "cifar10_test_sample" / c).glob("*.jpg"))[0] for c in ("cat", "ship", "horse", "frog")]
    x = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32).transpose(2, 0, 1) - mean for p in paths])
    return model, x


def _run(explainer, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(explainer.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, with_target(sess, {"data": x}))))


def test_taylor_conserves_and_inhibits_neighbours_on_the_real_model(cifar10_full):
    model, x = cifar10_full
    ex = lrponnx.convert(model, "epsilon-plus", lrn_epsilon=0.0, layer_relevance=True)
    out = _run(ex, x)
    lrn_units = ["norm1", "norm2"]
    for name in lrn_units:
        r_out = out[f"lrp_out/{name}"]
        (r_in_name,) = [k for k in out if k.startswith(f"lrp_in/{name}/")]
        r_in = out[r_in_name]
        # conservation per sample (lrn-epsilon 0)
        s_out, s_in = r_out.reshape(len(x), -1).sum(1), r_in.reshape(len(x), -1).sum(1)
        np.testing.assert_allclose(s_in, s_out, rtol=1e-5, atol=1e-6 * np.abs(r_out).sum() / len(x))
    rel = out["relevance"]
    assert rel.shape == x.shape and np.isfinite(rel).all()
    # the heatmap renders and is not flat
    img = np.asarray(render(rel[0]))
    assert img.shape == (32, 32, 3) and img.std() > 5


def test_taylor_moves_relevance_compared_with_identity(cifar10_full):
    model, x = cifar10_full
    taylor = _run(lrponnx.convert(model, "epsilon-plus", lrn_rule="taylor"), x)["relevance"]
    identity = _run(lrponnx.convert(model, "epsilon-plus", lrn_rule="identity"), x)["relevance"]
    diff = np.linalg.norm((taylor - identity).reshape(len(x), -1), axis=1)
    size = np.linalg.norm(identity.reshape(len(x), -1), axis=1)
    # the LRN layers of this model matter (inputs in 0-255 units): the heatmaps differ visibly,
    # but the rule is a local correction, not a different explanation
    assert np.all(diff / size > 1e-3) and np.all(diff / size < 0.5)

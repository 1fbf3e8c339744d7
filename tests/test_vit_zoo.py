"""The bundled vit-cifar10 (issue 14): checksum, AttnLRP explainer, accuracy on the shared test
sample, and ``lrponnx demo --model vit-cifar10`` (the transformer heatmap beside the CNN one)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

import lrponnx
from lrponnx.model_zoo import registry


@pytest.fixture(scope="module")
def vit_path():
    return registry.bundled_path("vit-cifar10")


def test_bundled_vit_checksum_and_metadata(vit_path):
    import onnx

    m = onnx.load(str(vit_path))
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["lrponnx.composite"] == "attnlrp" and meta["lrponnx.patch_size"] == "4"
    assert json.loads(meta["lrponnx.classes"])[0] == "airplane"
    prep = json.loads(meta["lrponnx.preprocessing"])
    assert prep["size"] == [32, 32] and len(prep["std"]) == 3
    assert {n.op_type for n in m.graph.node} >= {"Softmax", "LayerNormalization", "MatMul", "Erf"}
    assert vit_path.stat().st_size < 2 * 2**20
    assert "vit-cifar10" in [e.name for e in registry.list_models()]
    assert registry.get("vit-cifar10").card().startswith("# vit-cifar10")


def test_vit_explainer_outputs_and_relevance(vit_path):
    ex = lrponnx.Explainer(lrponnx.convert(vit_path, composite="attnlrp"))
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    out = ex.explain(x)
    plain = ort.InferenceSession(str(vit_path), providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
    np.testing.assert_allclose(out.outputs["logits"], plain, rtol=0, atol=1e-5)
    assert out.relevance.shape == x.shape and np.all(np.isfinite(out.relevance))
    ratio = out.relevance.reshape(4, -1).sum(1) / plain[np.arange(4), out.target]
    assert np.all(np.abs(ratio) < 10)  # not conservative, but of the logit's order (docs/rules.md)


def test_vit_accuracy_on_test_sample(vit_path, shared_data):
    from lrponnx.model_zoo._shared import load_image_folder, onnx_accuracy

    images, labels = load_image_folder(shared_data / "cifar10_test_sample")
    acc = onnx_accuracy(vit_path, images, labels)
    card = registry.get("vit-cifar10").card()
    assert acc > 0.35, acc  # far above chance (0.1); the card states the measured figure
    assert f"{acc * 100:.1f} %" in card


def test_demo_with_the_vit_beside_the_cnn(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "lrponnx.app.cli", "demo", "--model", "vit-cifar10", "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "overview.png").is_file() and (out / "explainer_vit-cifar10.onnx").is_file()
    assert len(list(out.glob("*_vit-cifar10_heatmap.png"))) >= 3
    from PIL import Image

    with Image.open(out / "overview.png") as im:
        assert im.width > 4 * 128  # input | CNN | ViT | per patch
    bad = subprocess.run([sys.executable, "-m", "lrponnx.app.cli", "demo", "--model", "no-such-model", "-o",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("lrponnx: error:") and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()

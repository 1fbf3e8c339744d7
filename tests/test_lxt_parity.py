"""AttnLRP parity with LXT 2.1, the authors' implementation (issue 14).

Each model has seeded random weights (no downloads), is exported by both PyTorch exporters and
converted with ``--composite attnlrp``. Checked per model and exporter: the explainer's outputs
equal the exported model's in ONNX Runtime (and PyTorch's to float rounding), its relevance agrees
with LXT's AttnLRP in float64 within 1e-4 relative L2 per sample, and its conservation (input
relevance sum / target logit) is LXT's. The full-size torchvision models are marked slow."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import attn_models as AM
import lxt_reference as L

pytestmark = pytest.mark.skipif(L.LXT_ERROR is not None, reason=L.LXT_ERROR or "")

PARITY = 1e-4


@pytest.fixture(scope="module")
def small_models():
    return {"vit": AM.small_vit(), "bert": AM.small_bert()}


@pytest.fixture(scope="module")
def exported(small_models, tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("attn")
    out = {}
    for exporter in AM.EXPORTERS:
        out["vit", exporter] = AM.export(small_models["vit"], torch.tensor(AM.images(2)), folder / f"vit_{exporter}.onnx",
                                         exporter, "x")
        out["bert", exporter] = AM.export(AM.LogitsOnly(small_models["bert"]), torch.tensor(AM.token_ids(2)),
                                          folder / f"bert_{exporter}.onnx", exporter, "ids")
    return out


def _check(model_path, torch_model, x, target, reference, input_name):
    import torch

    import lrponnx

    explainer = lrponnx.convert(model_path, composite="attnlrp")
    out = lrponnx.Explainer(explainer).explain(x, target=target)
    plain = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {input_name: x})[0]
    np.testing.assert_allclose(out.outputs["logits"], plain, rtol=0, atol=1e-6 * max(1.0, np.abs(plain).max()))
    with torch.no_grad():
        np.testing.assert_allclose(out.outputs["logits"], torch_model(torch.tensor(x)).numpy(), rtol=1e-4, atol=1e-5)
    R_lxt, logit = reference
    dist = L.rel_l2(out.relevance, R_lxt)
    assert np.all(dist < PARITY), f"relative L2 to LXT per sample: {dist}"
    ours = out.relevance.reshape(len(x), -1).sum(1) / logit
    theirs = R_lxt.reshape(len(x), -1).sum(1) / logit
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    return dist, ours, theirs


@pytest.mark.parametrize("exporter", AM.EXPORTERS)
def test_small_vit(exported, small_models, exporter):
    x, target = AM.images(2), np.array([3, 7])
    _check(exported["vit", exporter], small_models["vit"], x, target,
           L.vision_relevance(small_models["vit"], x, target), "x")


@pytest.mark.parametrize("exporter", AM.EXPORTERS)
def test_small_bert(exported, small_models, exporter):
    ids, target = AM.token_ids(2), np.array([0, 2])
    out = _check(exported["bert", exporter], AM.LogitsOnly(small_models["bert"]), ids, target,
                 L.bert_relevance(small_models["bert"], ids, target), "ids")
    assert out is not None


def test_lxt_patches_are_undone(small_models):
    """The reference patches classes only inside its ``with`` block: plain PyTorch afterwards."""
    import torch

    before = torch.nn.LayerNorm.forward, torch.nn.GELU.forward, torch.nn.MultiheadAttention.forward
    L.vision_relevance(small_models["vit"], AM.images(1), np.array([0]))
    assert (torch.nn.LayerNorm.forward, torch.nn.GELU.forward, torch.nn.MultiheadAttention.forward) == before
    assert "original_forward" not in torch.nn.GELU.__dict__


@pytest.mark.slow
@pytest.mark.parametrize("exporter", AM.EXPORTERS)
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t"])
def test_torchvision_full_size(name, exporter, tmp_path):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    if name.startswith("vit"):
        AM.randomise_head(model)
    x, target = AM.images(1, 224), np.array([5])
    path = AM.export(model, torch.tensor(x), tmp_path / f"{name}.onnx", exporter, "x")
    _check(path, model, x, target, L.vision_relevance(model, x, target), "x")


def test_small_vit_fused_attention(small_models, tmp_path):
    """dynamo at opset 23 writes scaled_dot_product_attention as one ``Attention`` op."""
    import onnx
    import torch

    x, target = AM.images(2), np.array([1, 4])
    path = AM.export(small_models["vit"], torch.tensor(x), tmp_path / "vit23.onnx", "dynamo", "x", opset=23)
    assert "Attention" in {n.op_type for n in onnx.load(str(path)).graph.node}
    _check(path, small_models["vit"], x, target, L.vision_relevance(small_models["vit"], x, target), "x")

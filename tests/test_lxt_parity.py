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
    # equal to float rounding: ORT fuses the forward differently when the relevance graph reads it
    np.testing.assert_allclose(out.outputs["logits"], plain, rtol=0, atol=1e-5 * max(1.0, np.abs(plain).max()))
    with torch.no_grad():
        ref = torch_model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(out.outputs["logits"], ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))
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


FULL_SIZE = {}


def _full_size(name):
    """torchvision ``name`` with seeded random weights, one 224x224 input and LXT's relevance,
    computed once for both exporters."""
    if name not in FULL_SIZE:
        import torch
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        if name.startswith("vit"):
            AM.randomise_head(model)
        x, target = AM.images(1, 224), np.array([5])
        FULL_SIZE[name] = model, x, target, L.vision_relevance(model, x, target)
    return FULL_SIZE[name]


@pytest.mark.slow
@pytest.mark.parametrize("name,exporter", [("vit_b_16", "torchscript"), ("vit_b_16", "dynamo"),
                                           ("swin_t", "torchscript"), ("swin_t", "dynamo")])
def test_torchvision_full_size(name, exporter, tmp_path):
    import torch

    model, x, target, reference = _full_size(name)
    path = AM.export(model, torch.tensor(x), tmp_path / f"{name}.onnx", exporter, "x")
    _check(path, model, x, target, reference, "x")

def test_small_vit_fused_attention(small_models, tmp_path):
    """dynamo at opset 23 writes scaled_dot_product_attention as one ``Attention`` op."""
    import onnx
    import torch

    x, target = AM.images(2), np.array([1, 4])
    path = AM.export(small_models["vit"], torch.tensor(x), tmp_path / "vit23.onnx", "dynamo", "x", opset=23)
    assert "Attention" in {n.op_type for n in onnx.load(str(path)).graph.node}
    _check(path, small_models["vit"], x, target, L.vision_relevance(small_models["vit"], x, target), "x")


def test_small_bert_with_a_padding_mask(small_models, tmp_path):
    """ids and an attention mask as two int64 inputs: the masked tokens get no relevance, the mask
    input none either, the rest is LXT's."""
    import torch

    import lrponnx

    bert = small_models["bert"]

    class WithMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = bert

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).logits

    ids, mask, target = AM.token_ids(2), np.ones((2, 12), np.int64), np.array([1, 0])
    mask[1, 8:] = 0
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(WithMask().eval(), (torch.tensor(ids), torch.tensor(mask)), str(tmp_path / "b.onnx"),
                          input_names=["ids", "mask"], output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"ids": {0: "N"}, "mask": {0: "N"}})
    sess = ort.InferenceSession(lrponnx.convert(tmp_path / "b.onnx", composite="attnlrp").SerializeToString(),
                                providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"ids": ids, "mask": mask, "target": target})))
    R_lxt, _ = L.bert_relevance(bert, ids, target, attention_mask=mask)
    assert np.all(L.rel_l2(got["relevance_ids"], R_lxt) < PARITY)
    assert np.all(got["relevance_ids"][1, 8:] == 0) and np.all(got["relevance_mask"] == 0)

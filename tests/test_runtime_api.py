"""The explainer's input contract (format 2) and the Python API's handling of what users feed.

Contract: ``target`` is an ordinary, required int64 graph input of shape [N] (the first input's
batch dimension), with no initializer, so every ONNX Runtime lists it and takes the feed; -1 means
the argmax. Older explainers (a ``[-1]`` initializer behind ``target``) are upgraded in memory.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrponnx
from lrponnx.app.cli import main
from lrponnx.app.runtime import Explainer, LegacyExplainerWarning, NonFiniteRelevanceWarning

RNG = np.random.default_rng(15)
W1 = RNG.normal(size=(12, 6)).astype(np.float32)
W2 = RNG.normal(size=(6, 4)).astype(np.float32)
EPS = dict(composite="epsilon-plus", rules=["MatMul=epsilon"], epsilon=1e-9)  # every layer epsilon (LRP-0)


def mlp(batch="N", in_type=TensorProto.FLOAT, scale=1.0) -> onnx.ModelProto:
    """x [batch, 3, 2, 2] -> (Cast) -> Flatten -> MatMul -> Relu -> MatMul -> y [batch, 4]."""
    nodes = [helper.make_node("Flatten", ["xf"], ["f"]), helper.make_node("MatMul", ["f", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]), helper.make_node("MatMul", ["a", "W2"], ["y"])]
    nodes.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT) if in_type != TensorProto.FLOAT
                 else helper.make_node("Identity", ["x"], ["xf"]))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", in_type, [batch, 3, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
                          [numpy_helper.from_array(W1 * scale, "W1"), numpy_helper.from_array(W2 * scale, "W2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def numpy_lrp0(x, target):
    """LRP-0 (epsilon -> 0) of the MLP by hand: R = x * grad of the target logit (no bias, ReLU)."""
    f = x.reshape(len(x), -1).astype(np.float64)
    h = f @ W1
    y = np.maximum(h, 0) @ W2
    t = np.where(np.asarray(target) < 0, y.argmax(1), target)
    grad_a = W2.T[t]                        # [n, 6]
    grad_f = (grad_a * (h > 0)) @ W1.T      # [n, 12]
    return (f * grad_f).reshape(x.shape), y


def legacy(explainer: onnx.ModelProto) -> onnx.ModelProto:
    """An explainer as lrponnx wrote them before format 2: `target` backed by a [-1] initializer."""
    old = onnx.ModelProto()
    old.CopyFrom(explainer)
    old.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "target"))
    keep = [p for p in old.metadata_props if p.key != "lrponnx.format"]
    del old.metadata_props[:]
    old.metadata_props.extend(keep)
    return old


def test_target_is_an_ordinary_required_input_with_the_batch_dimension():
    for batch in ("N", 3):
        ex = lrponnx.convert(mlp(batch), **EPS)
        assert "target" not in {t.name for t in ex.graph.initializer}
        (t,) = [i for i in ex.graph.input if i.name == "target"]
        assert t.type.tensor_type.elem_type == TensorProto.INT64
        (d,) = t.type.tensor_type.shape.dim
        assert (d.dim_param or d.dim_value) == batch
        meta = {p.key: p.value for p in ex.metadata_props}
        assert meta["lrponnx.format"] == "2" and meta["lrponnx.target_input"] == "target"
        # ONNX Runtime lists it among the session's inputs (what Node and the browser go by) ...
        sess = ort.InferenceSession(ex.SerializeToString(), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["x", "target"]
        # ... and requires it
        with pytest.raises(Exception, match="target"):
            sess.run(None, {"x": np.zeros((3, 3, 2, 2), np.float32)})


def test_explain_feeds_minus_one_by_default_and_the_fed_target_otherwise():
    ex = Explainer(mlp(), **EPS)
    x = RNG.normal(size=(3, 3, 2, 2)).astype(np.float32)
    want, y = numpy_lrp0(x, [-1, -1, -1])
    out = ex.explain(x)
    np.testing.assert_allclose(out.relevance, want, rtol=1e-4, atol=1e-5)
    assert out.target.tolist() == y.argmax(1).tolist() and not out.nonfinite.any()
    fed = (y.argmax(1) + 1) % 4
    target = [int(fed[0]), -1, int(fed[2])]
    want, _ = numpy_lrp0(x, target)
    out = ex.explain(x, target=target)
    np.testing.assert_allclose(out.relevance, want, rtol=1e-4, atol=1e-5)
    assert out.target.tolist() == [fed[0], y.argmax(1)[1], fed[2]]
    out = ex.explain(x, target=int(fed[0]))  # one int for every sample
    np.testing.assert_allclose(out.relevance, numpy_lrp0(x, [fed[0]] * 3)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target, message", [
    (4, r"target 4 is out of range: give -1 \(predicted class\) or a class in \[0, 4\)"),
    (-2, r"target -2 is out of range"),
    ([0, 9], r"target 9 is out of range"),
    (2 ** 70, r"target must be -1 \(predicted class\) or a class in \[0, 4\)"),
    ([1, 2 ** 70], r"target must be -1"),
    (np.uint64(2 ** 63 + 5), r"target must be -1"),
    (1.5, r"whole numbers"),
    (float("nan"), r"whole numbers"),
    ([1, 2, 3], r"target has 3 entries for a batch of 2"),
    ("cat", r"one integer or one per sample"),
])
def test_a_target_out_of_range_is_a_clear_error(target, message):
    ex = Explainer(mlp(), **EPS)
    with pytest.raises(lrponnx.LrpOnnxError, match=message):
        ex.explain(np.ones((2, 3, 2, 2), np.float32), target=target)


@pytest.mark.parametrize("shape", [(3, 2, 2), (2, 3, 2, 3), (2, 12), (2, 3, 2, 2, 1)])
def test_a_wrong_shape_names_the_expected_one(shape):
    ex = Explainer(mlp(), **EPS)
    with pytest.raises(lrponnx.LrpOnnxError, match=r"input 'x' expects shape \[N, 3, 2, 2\] \(float32\), got "
                       + repr(list(shape)).replace("[", r"\[").replace("]", r"\]")):
        ex.explain(np.ones(shape, np.float32))


def test_unknown_and_non_numeric_inputs_are_clear_errors():
    ex = Explainer(mlp(), **EPS)
    with pytest.raises(lrponnx.LrpOnnxError, match="unknown input"):
        ex.explain({"x": np.ones((1, 3, 2, 2)), "z": np.ones(1)})
    with pytest.raises(lrponnx.LrpOnnxError, match="expected numbers"):
        ex.explain(np.full((1, 3, 2, 2), "a"))


def test_non_finite_inputs_are_refused_and_non_finite_relevance_is_flagged():
    ex = Explainer(mlp(), **EPS)
    x = np.ones((2, 3, 2, 2), np.float32)
    x[1, 0, 0, 0] = np.nan
    with pytest.raises(lrponnx.LrpOnnxError, match="1 non-finite value"):
        ex.explain(x)
    with pytest.raises(lrponnx.LrpOnnxError, match="beyond float32's range"):
        ex.explain(np.full((1, 3, 2, 2), 1e300))
    # finite inputs whose logits overflow float32: the relevance of those samples is NaN/inf
    big = Explainer(mlp(scale=1e18), **EPS)
    x = np.stack([np.full((3, 2, 2), 1e-30), np.full((3, 2, 2), 1e6)]).astype(np.float32)
    x[:, 0] *= -1  # a mix of signs, so the ReLU passes something for either sample
    with pytest.warns(NonFiniteRelevanceWarning, match=r"1 of 2 sample\(s\).*samples \[1\]"):
        out = big.explain(x)
    assert out.nonfinite.tolist() == [False, True]
    assert np.isfinite(out.relevance[0]).all() and not np.isfinite(out.relevance[1]).all()


def test_an_uint8_input_model_works_through_the_api_and_the_cli(tmp_path):
    model = mlp(in_type=TensorProto.UINT8)
    ex = Explainer(model, **EPS)
    assert ex.session.get_inputs()[0].type == "tensor(uint8)"
    x = RNG.integers(0, 256, (2, 3, 2, 2)).astype(np.uint8)
    want, _ = numpy_lrp0(x, [-1, -1])
    out = ex.explain(x)
    np.testing.assert_allclose(out.relevance, want, rtol=1e-4, atol=1e-3)
    # whole numbers in another dtype are converted; anything else is refused before ORT sees it
    np.testing.assert_array_equal(ex.explain(x.astype(np.float32)).relevance, out.relevance)
    with pytest.raises(lrponnx.LrpOnnxError, match=r"input 'x' is uint8: values must be whole numbers in \[0, 255\]"):
        ex.explain(x.astype(np.float32) + 0.5)
    with pytest.raises(lrponnx.LrpOnnxError, match="whole numbers in"):
        ex.explain(x.astype(np.int64) + 300)
    # convert + explain from the command line, .npy input
    src = tmp_path / "u8.onnx"
    onnx.save(model, src)
    assert main(["convert", str(src), "-o", str(tmp_path / "ex.onnx"), "--composite", "epsilon-plus", "--rule", "MatMul=epsilon", "--epsilon", "1e-9"]) == 0
    np.save(tmp_path / "batch.npy", x)
    assert main(["explain", str(tmp_path / "ex.onnx"), str(tmp_path / "batch.npy"), "-o", str(tmp_path / "out"),
                 "--save-raw"]) == 0
    raws = sorted((tmp_path / "out").glob("*_relevance.npy"))
    assert len(raws) == 2
    np.testing.assert_allclose(np.stack([np.load(r) for r in raws]), want, rtol=1e-3, atol=1e-3)


def test_an_explainer_from_before_format_2_is_upgraded_with_a_note(tmp_path, capsys):
    new = lrponnx.convert(mlp(), **EPS)
    old = legacy(new)
    sess = ort.InferenceSession(old.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]  # what made Node ignore and the web refuse it
    x = RNG.normal(size=(2, 3, 2, 2)).astype(np.float32)
    with pytest.warns(LegacyExplainerWarning, match="before input format 2.*upgraded in memory"):
        ex = Explainer(old)
    assert [i.name for i in ex.session.get_inputs()] == ["x", "target"]
    assert "target" not in {t.name for t in ex.model.graph.initializer}
    assert old.graph.initializer[-1].name == "target"  # the caller's model is left as it was
    for target in (None, [3, 0]):
        np.testing.assert_array_equal(ex.explain(x, target).relevance, Explainer(new).explain(x, target).relevance)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a current explainer: no warning
        Explainer(new)
    path = tmp_path / "old.onnx"
    onnx.save(old, path)
    np.save(tmp_path / "x.npy", x)
    assert main(["explain", str(path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err.count("lrponnx: note: this explainer was written by lrponnx") == 1
    assert "upgraded in memory" in err and "Warning" not in err
    assert onnx.load(str(path)).graph.initializer[-1].name == "target"  # the file is left as it was


def test_an_explainer_of_a_newer_format_is_refused():
    newer = lrponnx.convert(mlp(), **EPS)
    for p in newer.metadata_props:
        if p.key == "lrponnx.format":
            p.value = "3"
    with pytest.raises(lrponnx.LrpOnnxError, match="lrponnx format 3.*reads format 2"):
        Explainer(newer)


def test_two_onnxruntime_packages_side_by_side_warn(monkeypatch):
    import lrponnx.app.runtime as rt

    monkeypatch.setattr(rt, "ort_packages", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.warns(RuntimeWarning, match="onnxruntime and onnxruntime-gpu are installed side by side"):
        Explainer(mlp(), **EPS)
    monkeypatch.setattr(rt, "ort_packages", lambda: ["onnxruntime"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Explainer(mlp(), **EPS)

"""Region perturbation (AOPC): orders, noise, the formula, the batched ORT path and the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrponnx.errors import LrpOnnxError
from lrponnx.app.perturbation import (Curve, LogitModel, aopc, compare_heatmaps, draw_noise, evaluate, morf_order,
                                  noise_bounds, perturbation_curves, perturbed_inputs, random_order,
                                  region_map, region_scores)

C, H, W, K = 2, 8, 8, 3


def _linear_model(path=None, *, fixed_batch: bool = False, seed: int = 0):
    """x [N,2,8,8] -> Flatten -> Gemm (no bias) -> logits -> Softmax. Relevance under epsilon = x * W[t]."""
    rng = np.random.default_rng(seed)
    Wt = rng.normal(size=(K, C * H * W)).astype(np.float32)
    n = 1 if fixed_batch else "N"
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["flat", "W"], ["logits"], transB=1, name="fc"),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1, name="softmax")]
    g = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, C, H, W])],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [n, K])],
                          [numpy_helper.from_array(Wt, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    if path is not None:
        onnx.save(m, str(path))
    return m, Wt.reshape(K, C, H, W)


# ---------------------------------------------------------------------------------------------- regions
def test_region_map_and_scores():
    ids, n = region_map(8, 8, 4)
    assert n == 4 and ids[0, 0] == 0 and ids[0, 4] == 1 and ids[4, 0] == 2 and ids[7, 7] == 3
    ids, n = region_map(5, 7, 2)                        # edge regions cut short
    assert n == 3 * 4 and ids[4, 6] == 11 and ids[4, 0] == 8
    r = np.zeros((C, H, W))
    r[0, 0, 0], r[1, 1, 1] = 1.0, 2.0                   # region 0, both channels: 3
    r[1, 7, 7] = 5.0                                    # region 3
    r[0, 2, 6] = -1.0                                   # region 1
    np.testing.assert_allclose(region_scores(r, 4), [3.0, -1.0, 0.0, 5.0])
    assert morf_order(r, 4).tolist() == [3, 0, 2, 1]
    assert morf_order(np.stack([r, -r]), 4).tolist() == [[3, 0, 2, 1], [1, 2, 0, 3]]
    assert morf_order(np.zeros((C, H, W)), 4).tolist() == [0, 1, 2, 3]   # ties: row-major


def test_perturbed_inputs_replace_regions_cumulatively():
    x = np.zeros((1, C, H, W), np.float32)
    noise = np.ones((1, C, H, W), np.float32)
    stack = perturbed_inputs(x, np.array([[2, 0, 3, 1]]), noise, 4, 4)
    assert stack.shape == (1, 5, C, H, W)
    assert stack[0, 0].sum() == 0                                  # x^(0) = x
    assert stack[0, 1, :, 4:, :4].min() == 1 and stack[0, 1].sum() == C * 16
    assert stack[0, 2, :, :4, :4].min() == 1 and stack[0, 2].sum() == 2 * C * 16
    assert stack[0, 4].min() == 1
    with pytest.raises(Exception):
        perturbed_inputs(x, np.array([[0, 1, 2, 3]]), noise, 4, 5)


# ---------------------------------------------------------------------------------------------- noise
def test_noise_range_and_determinism():
    low = np.array([-1.0, 10.0])[:, None, None]
    high = np.array([1.0, 20.0])[:, None, None]
    a = draw_noise((C, H, W), low, high, seed=3, index=7)
    b = draw_noise((C, H, W), low, high, seed=3, index=7)
    c = draw_noise((C, H, W), low, high, seed=4, index=7)
    d = draw_noise((C, H, W), low, high, seed=3, index=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert a[0].min() >= -1 and a[0].max() <= 1 and a[1].min() >= 10 and a[1].max() <= 20
    big = draw_noise((2, 64, 64), low, high, seed=0, index=0)      # really spans the range
    assert big[0].min() < -0.95 and big[0].max() > 0.95 and big[1].min() < 10.5 and big[1].max() > 19.5
    np.testing.assert_array_equal(random_order(16, 1, 2), random_order(16, 1, 2))
    assert sorted(random_order(16, 1, 2)) == list(range(16))
    assert not np.array_equal(random_order(16, 1, 2), random_order(16, 1, 3))


def test_noise_bounds_data_and_pixel():
    from lrponnx.app.preprocess import Preprocessing

    data = np.random.default_rng(0).normal(size=(5, C, H, W))
    lo, hi, _ = noise_bounds("data", (C, H, W), data=data)
    np.testing.assert_allclose(lo[:, 0, 0], data.min(axis=(0, 2, 3)))
    np.testing.assert_allclose(hi[:, 0, 0], data.max(axis=(0, 2, 3)))
    pre = Preprocessing.from_flags(mean=[100.0, 110.0, 120.0], pixel_scale=255, size=(4, 4))
    lo, hi, desc = noise_bounds("auto", (3, 4, 4), preprocessing=pre)
    assert "pixel" in desc
    np.testing.assert_allclose(lo[:, 0, 0], [-100, -110, -120], atol=1e-4)
    np.testing.assert_allclose(hi[:, 0, 0], [155, 145, 135], atol=1e-4)


# ---------------------------------------------------------------------------------------------- AOPC
def test_aopc_formula_by_hand():
    f = np.array([[4.0, 3.0, 1.0], [2.0, 2.0, 5.0]])
    # image 0: (0 + 1 + 3)/3; image 1: (0 + 0 - 3)/3
    np.testing.assert_allclose(aopc(f), [4 / 3, -1.0])
    c = Curve("x", f)
    assert c.aopc == pytest.approx((4 / 3 - 1) / 2)
    np.testing.assert_allclose(c.mean_drop, [0.0, 0.5, 0.0])
    np.testing.assert_allclose(c.running_aopc, [0.0, 0.25, 0.5 / 3])


def test_toy_f_perfect_order_beats_random_and_matches_hand_computation():
    """f(x) = sum(w * x) with 4 regions; noise = 0, so a step removes that region's contribution."""
    w = np.zeros((1, 1, 4, 4))
    w[0, 0, :2, :2], w[0, 0, :2, 2:], w[0, 0, 2:, :2], w[0, 0, 2:, 2:] = 1.0, 4.0, 2.0, 3.0
    x = np.ones((1, 1, 4, 4), np.float32)

    def forward(b):
        return (b.reshape(b.shape[0], -1) @ w.reshape(-1))[:, None]

    rel = x * w                                          # exact contributions: 4, 16, 8, 12 per region
    order = morf_order(rel, 2)
    assert order.tolist() == [[1, 3, 2, 0]]
    f = perturbation_curves(forward, x, order, np.zeros_like(x), [0], 2, 4)
    np.testing.assert_allclose(f, [[40, 24, 12, 4, 0]])
    assert aopc(f)[0] == pytest.approx((0 + 16 + 28 + 36 + 40) / 5)
    worst = perturbation_curves(forward, x, order[:, ::-1].copy(), np.zeros_like(x), [0], 2, 4)
    rnd = np.stack([random_order(4, 0, k) for k in range(24)])
    f_rnd = perturbation_curves(forward, np.repeat(x, 24, 0), rnd, np.zeros((24, 1, 4, 4), np.float32),
                                np.zeros(24, int), 2, 4)
    assert aopc(f)[0] >= aopc(f_rnd).max() >= aopc(f_rnd).mean() > aopc(worst)[0]


# ---------------------------------------------------------------------------------------------- ORT path
def test_logit_model_exposes_logits_and_frees_a_fixed_batch(tmp_path):
    m, Wt = _linear_model(fixed_batch=True)
    fwd = LogitModel(m, batch_size=4)
    x = np.random.default_rng(1).normal(size=(5, C, H, W)).astype(np.float32)
    np.testing.assert_allclose(fwd(x), x.reshape(5, -1) @ Wt.reshape(K, -1).T, rtol=1e-4, atol=1e-4)
    assert fwd.logits == "logits" and not fwd._fixed_one


def test_evaluate_linear_model_end_to_end():
    m, Wt = _linear_model()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, C, H, W)).astype(np.float32)
    methods = {"eps": dict(composite="epsilon-plus", epsilon=1e-9),
               "flip": dict(composite="epsilon-plus", epsilon=1e-9, seed="one")}
    res = evaluate(m, x, methods, region=2, steps=None, seed=5, noise="data", progress=False,
                   keep_relevance=True, batch_size=100)
    logits = x.reshape(6, -1) @ Wt.reshape(K, -1).T
    t = logits.argmax(1)
    np.testing.assert_array_equal(res.target, t)
    np.testing.assert_allclose(res.f0, logits[np.arange(6), t], rtol=1e-4)
    # the relevance of a linear model under LRP-epsilon is x * W[t] (times logit / logit)
    np.testing.assert_allclose(res.relevance["eps"], x * Wt[t], rtol=1e-3, atol=1e-4)
    # hand computation of the MoRF curve of image 0 with the same noise
    low, high, _ = noise_bounds("data", (C, H, W), data=x)
    noise = draw_noise((C, H, W), low, high, 5, 0)
    order = morf_order(x[0] * Wt[t[0]], 2)
    cur = x[0].astype(np.float64).copy()
    ids, n = region_map(H, W, 2)
    want = [float((cur * Wt[t[0]]).sum())]
    for r in order:
        cur[:, ids == r] = noise[:, ids == r]
        want.append(float((cur * Wt[t[0]]).sum()))
    np.testing.assert_allclose(res.curves["eps"].f[0], want, rtol=1e-4, atol=1e-3)
    assert res.curves["eps"].f.shape == (6, n + 1)
    # the exact contributions order beats random on average
    assert res.curves["eps"].aopc > res.curves["random"].aopc
    # same-noise determinism: a rerun gives identical numbers
    again = evaluate(m, x, {"eps": methods["eps"]}, region=2, seed=5, noise="data", progress=False, batch_size=7)
    np.testing.assert_allclose(again.curves["eps"].f, res.curves["eps"].f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again.curves["random"].f, res.curves["random"].f, rtol=1e-5, atol=1e-5)
    st = compare_heatmaps(res.relevance["eps"], res.relevance["eps"], 2)
    assert st["rel_l2_median"] == 0 and st["order_identical"] == 1 and st["region_rank_corr"] == pytest.approx(1)
    d = res.to_dict()
    assert set(d["results"]) == {"eps", "flip", "random"} and len(d["results"]["eps"]["mean_drop"]) == n + 1


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_evaluate_npy_smoke(tmp_path, capsys):
    from lrponnx.app.cli import main

    _linear_model(tmp_path / "lin.onnx")
    x = np.random.default_rng(3).normal(size=(4, C, H, W)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "eval"
    rc = main(["evaluate", str(tmp_path / "lin.onnx"), str(tmp_path / "x.npy"), "--composite", "epsilon-plus",
               "--region", "4", "--steps", "3", "--limit", "3", "--rng-seed", "1", "--compare-lrn",
               "-o", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "random" in text and "lrn=taylor" in text and "lrn=identity" in text
    data = json.loads((out / "aopc.json").read_text())
    assert data["n_images"] == 3 and data["config"]["steps"] == 3 and data["config"]["regions"] == 4
    assert "pixel" not in data["config"]["noise"]                    # no metadata: data range
    assert (out / "aopc_curves.png").stat().st_size > 1000
    # no LRN in this model: both rules give the same heatmap and the same AOPC
    r = data["results"]
    keys = [k for k in r if k != "random"]
    assert r[keys[0]]["aopc"] == pytest.approx(r[keys[1]]["aopc"])


def test_cli_evaluate_bad_steps_is_a_clean_error(tmp_path, capsys):
    from lrponnx.app.cli import main

    _linear_model(tmp_path / "lin.onnx")
    np.save(tmp_path / "x.npy", np.zeros((2, C, H, W), np.float32))
    rc = main(["evaluate", str(tmp_path / "lin.onnx"), str(tmp_path / "x.npy"), "--steps", "99",
               "-o", str(tmp_path / "o"), "--composite", "epsilon-plus"])
    assert rc == 2 and "steps" in capsys.readouterr().err


def test_cli_class_folders_and_spread_limit(tmp_path, capsys):
    """A folder of class folders is walked one level down; --limit keeps inputs from every class."""
    from PIL import Image

    from lrponnx.app.cli import main
    from lrponnx.app.preprocess import Preprocessing

    rng = np.random.default_rng(4)
    Wt = rng.normal(size=(K, 3 * 8 * 8)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Flatten", ["x"], ["flat"], axis=1),
                           helper.make_node("Gemm", ["flat", "W"], ["logits"], transB=1)], "lin3",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])],
                          [numpy_helper.from_array(Wt, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    Preprocessing.from_flags(mean=[0.5, 0.5, 0.5], size=(8, 8)).write_to_model(m)
    onnx.save(m, str(tmp_path / "lin3.onnx"))
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / cls / f"{k}.png")
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "lin3.onnx"), str(data), "--limit", "2", "--composite", "epsilon-plus",
                 "-o", str(out), "--no-progress"]) == 0
    d = json.loads((out / "aopc.json").read_text())
    assert d["n_images"] == 2 and "pixel" in d["config"]["noise"]
    assert {p.split("/")[-2] for p in d["input_names"]} == {"a", "b"}
    lo, hi = d["config"]["noise_low_range"], d["config"]["noise_high_range"]
    assert lo == pytest.approx([-0.5, -0.5]) and hi == pytest.approx([0.5, 0.5])


def test_mean_replacement_is_the_data_mean():
    data = np.random.default_rng(5).normal(size=(4, C, H, W))
    lo, hi, desc = noise_bounds("mean", (C, H, W), data=data)
    np.testing.assert_allclose(lo, data.mean(0))
    np.testing.assert_allclose(draw_noise((C, H, W), lo, hi, 0, 0), data.mean(0), rtol=1e-6)
    with pytest.raises(Exception):
        noise_bounds("pixel", (C, H, W), data=data)


# ---------------------------------------------------------------------------------------------- --explain-output
def _two_head_model(path=None):
    """x -> Flatten -> Gemm Wa -> logits -> Softmax -> prob [N,3], and a second head Gemm Wb -> box [N,4]."""
    rng = np.random.default_rng(7)
    Wa = rng.normal(size=(K, C * H * W)).astype(np.float32)
    Wb = rng.normal(size=(4, C * H * W)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["flat", "Wa"], ["logits"], transB=1, name="fa"),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1, name="softmax"),
             helper.make_node("Gemm", ["flat", "Wb"], ["box"], transB=1, name="fb")]
    g = helper.make_graph(nodes, "two_heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, H, W])],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", K]),
                           helper.make_tensor_value_info("box", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(Wa, "Wa"), numpy_helper.from_array(Wb, "Wb")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    if path is not None:
        onnx.save(m, str(path))
    return m, Wb.reshape(4, C, H, W)


def test_evaluate_scores_the_explained_output():
    """The forward-only scoring follows --explain-output: targets, f0 and the curves are the chosen head's."""
    m, Wb = _two_head_model()
    x = np.random.default_rng(8).normal(size=(5, C, H, W)).astype(np.float32)
    res = evaluate(m, x, {"eps": dict(composite="epsilon-plus", epsilon=1e-9)}, region=4, seed=1, noise="data",
                   progress=False, keep_relevance=True, output="box")
    box = x.reshape(5, -1) @ Wb.reshape(4, -1).T
    t = box.argmax(1)
    assert res.config["logits"] == "box"
    np.testing.assert_array_equal(res.target, t)
    np.testing.assert_allclose(res.f0, box[np.arange(5), t], rtol=1e-4)
    np.testing.assert_allclose(res.relevance["eps"], x * Wb[t], rtol=1e-3, atol=1e-4)
    # the convert kwargs may carry the output instead (as the CLI's rule flags do)
    again = evaluate(m, x, {"eps": dict(composite="epsilon-plus", epsilon=1e-9, output="box")}, region=4, seed=1,
                     noise="data", progress=False)
    np.testing.assert_allclose(again.curves["eps"].f, res.curves["eps"].f, rtol=1e-5, atol=1e-5)
    with pytest.raises(LrpOnnxError, match="different outputs"):
        evaluate(m, x, {"eps": dict(composite="epsilon-plus", output="box")}, output="prob", progress=False)


def test_cli_evaluate_explain_output(tmp_path, capsys):
    from lrponnx.app.cli import main

    _, Wb = _two_head_model(tmp_path / "two.onnx")
    x = np.random.default_rng(9).normal(size=(3, C, H, W)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    args = [str(tmp_path / "x.npy"), "--composite", "epsilon-plus", "--steps", "2", "--no-progress"]
    assert main(["evaluate", str(tmp_path / "two.onnx"), *args, "--explain-output", "box",
                 "-o", str(tmp_path / "ev")]) == 0
    d = json.loads((tmp_path / "ev" / "aopc.json").read_text())
    assert d["config"]["logits"] == "box"
    # an explainer of one head cannot be scored on another
    assert main(["convert", str(tmp_path / "two.onnx"), "-o", str(tmp_path / "ex.onnx"), "--composite",
                 "epsilon-plus", "--explain-output", "box"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ex.onnx"), str(tmp_path / "x.npy"), "--steps", "2", "--no-progress",
                 "--explain-output", "prob", "-o", str(tmp_path / "ev2")]) == 2
    assert "explains 'box'" in capsys.readouterr().err


def test_provider_choice(tmp_path, capsys, monkeypatch):
    """--provider cuda without a CUDA provider is one line, exit 2, before any work."""
    from lrponnx.app import runtime
    from lrponnx.app.cli import main

    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert runtime.providers_for(None) is None and runtime.providers_for("cpu") == ["CPUExecutionProvider"]
    _linear_model(tmp_path / "lin.onnx")
    np.save(tmp_path / "x.npy", np.zeros((2, C, H, W), np.float32))
    assert main(["evaluate", str(tmp_path / "lin.onnx"), str(tmp_path / "x.npy"), "--provider", "cuda",
                 "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no CUDA provider" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime.providers_for("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]

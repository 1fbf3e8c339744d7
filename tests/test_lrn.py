"""LRN relevance (Binder et al. 2016, /work/shared/docs/lrp-rules.md, "Local renormalisation layers").

The explainer is checked against a float64 reference of the contract's formulas written here
with plain numpy and explicit windows (one term ``z_ic`` per centre ``c`` and input ``i``, the
relevance scattered back over exactly the pairs with ``i in N(c)``); it imports nothing from
lrponnx. Decomposed LRN chains (torch.onnx's export of ``nn.LocalResponseNorm``) are checked
against the same model built with an ONNX ``LRN`` node, or against the reference with torch's
window for even sizes.

ORT's CPU ``LRN`` kernel refuses an even ``size`` (``size % 2 == 1``), so explainers of
even-size ONNX ``LRN`` nodes run with that one forward node swapped for standard ops that
compute the ONNX definition (:func:`_swap_even_lrn`); the relevance subgraph is untouched.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrponnx
from lrponnx.compiler import lrn_match
from lrponnx.errors import UnsupportedModelError
from lrponnx.compiler.lrn_ops import LrnSpec, ensure_lrn_function, make_within_channel_lrn
from lrponnx.compiler.load import prepare
from lrponnx.compiler.units import build_units
from lrponnx.compiler.view import ModelView
from explainer_feeds import with_target

OPSET = 17
TOL = 1e-5  # relative L2 against the float64 reference


# =============================================================================== float64 reference

def _stab_div(R: np.ndarray, d: np.ndarray, eps: float) -> np.ndarray:
    """R / stab(d), stab(d) = d + eps * sign0(d), sign0(0) = +1; a zero denominator gives 0."""
    den = d + eps * np.where(d >= 0, 1.0, -1.0) if eps > 0 else d
    safe = np.where(den == 0, 1.0, den)
    return np.where(den == 0, 0.0, R / safe)


def reference(x, R, *, region: str, n: int, alpha: float, beta: float, k: float, lo: int, hi: int,
              eps: float = 1e-6, denominator: str = "sum") -> dict:
    """The contract's LRN rule, float64, with explicit windows.

    ``N(c)`` is ``[c - lo, c + hi]`` clipped to the channels (across) or the ``n x n`` square
    ``[h - lo, h + hi] x [w - lo, w + hi]`` clipped to the image (within). Returns the forward
    output ``y``, ``D`` (the sum of the Taylor terms), ``R_in``, and the most positive neighbour
    term ``z_ic`` (i != c) that reached each input (``-inf`` where none did).
    """
    x = np.asarray(x, dtype=np.float64)
    R = np.asarray(R, dtype=np.float64)
    if region == "across":
        a = alpha / n
        C = x.shape[1]
        centres = [(c,) for c in range(C)]

        def window(p):
            return [(i,) for i in range(p[0] - lo, p[0] + hi + 1) if 0 <= i < C]

        def at(p):
            return (slice(None), p[0])
    else:
        a = alpha / n ** 2
        H, W = x.shape[2], x.shape[3]
        centres = [(h, w) for h in range(H) for w in range(W)]

        def window(p):
            return [(h, w) for h in range(p[0] - lo, p[0] + hi + 1) for w in range(p[1] - lo, p[1] + hi + 1)
                    if 0 <= h < H and 0 <= w < W]

        def at(p):
            return (slice(None), slice(None), p[0], p[1])

    y, D, R_in = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    top_neighbour = np.full_like(x, -np.inf)
    for c in centres:
        xc = x[at(c)]
        S = sum(x[at(i)] ** 2 for i in window(c))
        s = k + a * S
        y[at(c)] = xc * s ** (-beta)
        z = {}
        for i in window(c):
            if i == c:
                z[i] = xc * (k + a * xc ** 2) ** (-beta)
            else:
                z[i] = -2.0 * a * beta * xc * x[at(i)] ** 2 * s ** (-beta - 1.0)
        D[at(c)] = sum(z.values())
        q = _stab_div(R[at(c)], D[at(c)] if denominator == "sum" else y[at(c)], eps)
        for i, zi in z.items():
            R_in[at(i)] += zi * q
            if i != c:
                top_neighbour[at(i)] = np.maximum(top_neighbour[at(i)], zi)
    return {"y": y, "D": D, "R_in": R_in, "top_neighbour": top_neighbour}


def onnx_window(n: int) -> tuple[int, int]:
    """ONNX LRN: {c - floor((n-1)/2), ..., c + ceil((n-1)/2)}."""
    return (n - 1) // 2, n - 1 - (n - 1) // 2


def torch_window(n: int) -> tuple[int, int]:
    """torch F.local_response_norm: the channel axis padded by n//2 before, (n-1)//2 after."""
    return n // 2, (n - 1) // 2


def rel_l2(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


# ================================================================================ model helpers

def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _lrn(region, x, y, n, alpha, beta, k, name):
    if region == "across":
        return helper.make_node("LRN", [x], [y], name=name, size=n, alpha=alpha, beta=beta, bias=k)
    assert k == 1.0, "WithinChannelLRN has k = 1"
    return make_within_channel_lrn(x, y, n, alpha, beta, name=name)


def _model(nodes, inputs, outputs, inits):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", OPSET)])
    if any(n.op_type == "WithinChannelLRN" for n in nodes):
        ensure_lrn_function(m)
    onnx.checker.check_model(m)
    return m


def readout_model(shape, region, n, alpha, beta, k, *, relu=False, W=None, seed=0):
    """x -> [Relu] -> LRN 'lrn' -> Flatten -> Gemm -> logits: the LRN with a linear readout."""
    rng = np.random.default_rng(seed)
    feat = int(np.prod(shape[1:]))
    W = rng.standard_normal((5, feat)) if W is None else W
    nodes, src = [], "x"
    if relu:
        nodes.append(helper.make_node("Relu", ["x"], ["h"], name="relu"))
        src = "h"
    nodes += [_lrn(region, src, "y", n, alpha, beta, k, "lrn"),
              helper.make_node("Flatten", ["y"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "W"], ["logits"], name="fc", transB=1)]
    return _model(nodes, [_vi("x", list(shape))], [_vi("logits", [shape[0], W.shape[0]])],
                  [numpy_helper.from_array(W.astype(np.float32), "W")])


def conv_net(region, n, alpha, beta, k, *, seed=0, C=8, size=10, lrn2=None):
    """conv -> relu ('h') -> LRN 'lrn' -> conv -> relu -> [LRN 'lrn2'] -> maxpool -> flatten -> fc."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (C, 3, 3, 3))
    b1 = rng.normal(0, 0.5, C)
    w2 = rng.normal(0, 0.3, (6, C, 3, 3))
    half = size // 2
    wf = rng.normal(0, 0.3, (5, 6 * half * half))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["h"], name="relu1"),
             _lrn(region, "h", "y", n, alpha, beta, k, "lrn"),
             helper.make_node("Conv", ["y", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["h2"], name="relu2")]
    last = "h2"
    if lrn2 is not None:
        nodes.append(_lrn(lrn2[0], "h2", "y2", *lrn2[1:], "lrn2"))
        last = "y2"
    nodes += [helper.make_node("MaxPool", [last], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "wf"], ["logits"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(v.astype(np.float32), name)
             for name, v in (("w1", w1), ("b1", b1), ("w2", w2), ("wf", wf))]
    return _model(nodes, [_vi("x", [2, 3, size, size])], [_vi("logits", [2, 5])], inits)


def _swap_even_lrn(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every even-size ONNX LRN node by standard ops computing the ONNX definition
    (window [c - floor((n-1)/2), c + ceil((n-1)/2)]): ORT's CPU kernel refuses even sizes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = []
    for node in m.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if node.op_type != "LRN" or a["size"] % 2 == 1:
            out.append(node)
            continue
        n, (lo, hi) = a["size"], onnx_window(a["size"])
        x, y, p = node.input[0], node.output[0], f"swap/{node.name}/"
        consts = {"ax": np.array([1], np.int64), "pads": np.array([0, 0, lo, 0, 0, 0, 0, hi, 0, 0], np.int64),
                  "alpha": np.array(a.get("alpha", 1e-4), np.float32), "bias": np.array(a.get("bias", 1.0), np.float32),
                  "beta": np.array(a.get("beta", 0.75), np.float32)}
        for name, v in consts.items():
            m.graph.initializer.append(numpy_helper.from_array(v, p + name))
        out += [helper.make_node("Mul", [x, x], [p + "sq"]),
                helper.make_node("Unsqueeze", [p + "sq", p + "ax"], [p + "u"]),
                helper.make_node("Pad", [p + "u", p + "pads"], [p + "pad"]),
                helper.make_node("AveragePool", [p + "pad"], [p + "avg"], kernel_shape=[n, 1, 1]),
                helper.make_node("Squeeze", [p + "avg", p + "ax"], [p + "S"]),
                helper.make_node("Mul", [p + "S", p + "alpha"], [p + "aS"]),
                helper.make_node("Add", [p + "aS", p + "bias"], [p + "s"]),
                helper.make_node("Pow", [p + "s", p + "beta"], [p + "sb"]),
                helper.make_node("Div", [x, p + "sb"], [y])]
    del m.graph.node[:]
    m.graph.node.extend(out)
    return m


def run(model: onnx.ModelProto, feeds: dict, extra=()) -> dict:
    """Run with ORT (1 thread); ``extra`` intermediate tensors become outputs too."""
    m = _swap_even_lrn(model)
    for name in extra:
        m.graph.output.append(_vi(name, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feeds = {k: v if np.asarray(v).dtype.kind in "iu" else np.asarray(v, np.float32) for k, v in feeds.items()}
    return dict(zip(names, sess.run(None, with_target(sess, feeds))))


def explain(model, x, extra=(), **options) -> dict:
    options.setdefault("layer_relevance", True)
    return run(lrponnx.convert(model, **options), {"x": x}, extra)


def _scale(alpha, k):
    """An input scale where alpha * sum x^2 is about k: the renormalisation matters."""
    return float(np.sqrt(k / alpha))


# ============================================================================= the reference itself

@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_reference_forward_is_ort_lrn(n):
    """The reference's ONNX window reproduces ORT's LRN kernel (odd n; ORT refuses even n)."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((2, 9, 3, 4)) * 10
    m = _model([helper.make_node("LRN", ["x"], ["y"], size=n, alpha=0.05, beta=0.6, bias=1.5)],
               [_vi("x", [2, 9, 3, 4])], [_vi("y", [2, 9, 3, 4])], [])
    got = run(m, {"x": x})["y"]
    ref = reference(x.astype(np.float32), np.zeros_like(x), region="across", n=n, alpha=0.05, beta=0.6, k=1.5,
                    lo=onnx_window(n)[0], hi=onnx_window(n)[1])["y"]
    assert rel_l2(got, ref) <= 1e-6


def test_reference_forward_is_within_channel_function():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 6, 5)) * 30
    m = _model([make_within_channel_lrn("x", "y", 3, 5e-3, 0.75)], [_vi("x", [2, 3, 6, 5])],
               [_vi("y", [2, 3, 6, 5])], [])
    got = run(m, {"x": x})["y"]
    ref = reference(x.astype(np.float32), np.zeros_like(x), region="within", n=3, alpha=5e-3, beta=0.75, k=1.0,
                    lo=1, hi=1)["y"]
    assert rel_l2(got, ref) <= 1e-6


def test_even_size_swap_matches_reference():
    """_swap_even_lrn (used to run even-size explainers) computes the ONNX definition."""
    x = np.random.default_rng(2).standard_normal((2, 7, 3, 3)) * 5
    for n in (2, 4, 6):
        m = _model([helper.make_node("LRN", ["x"], ["y"], size=n, alpha=0.2, beta=0.75, bias=1.0)],
                   [_vi("x", [2, 7, 3, 3])], [_vi("y", [2, 7, 3, 3])], [])
        lo, hi = onnx_window(n)
        ref = reference(x.astype(np.float32), np.zeros_like(x), region="across", n=n, alpha=0.2, beta=0.75, k=1.0,
                        lo=lo, hi=hi)["y"]
        assert rel_l2(run(m, {"x": x})["y"], ref) <= 1e-6


# ======================================================================= the rule against the reference

ISOLATED = [
    # region, n, alpha, beta, k, sign
    ("across", 1, 0.2, 0.75, 1.0, "mixed"),
    ("across", 3, 1e-4, 0.75, 1.0, "positive"),
    ("across", 4, 1e-2, 0.75, 1.0, "positive"),
    ("across", 5, 1e-4, 0.75, 2.0, "mixed"),
    ("across", 5, 0.5, 0.6, 1.0, "positive"),
    ("across", 6, 0.3, 1.0, 0.5, "mixed"),
    ("across", 9, 2e-3, 0.75, 1.0, "mixed"),
    ("across", 3, 0.1, 0.5, 1.0, "positive"),
    ("within", 3, 5e-5, 0.75, 1.0, "positive"),
    ("within", 3, 0.5, 0.9, 1.0, "mixed"),
    ("within", 5, 1e-2, 0.75, 1.0, "mixed"),
]


@pytest.mark.parametrize("target_runtime", ["any", "webgpu"])
@pytest.mark.parametrize("region,n,alpha,beta,k,sign", ISOLATED)
def test_isolated_lrn_matches_reference(region, n, alpha, beta, k, sign, target_runtime):
    """lrp_in of the LRN unit equals the reference applied to its input and its lrp_out, with
    either form of the window sum (3-D pool; banded 1x1 Conv for WebGPU)."""
    shape = [2, 11, 3, 4] if region == "across" else [2, 3, 6, 5]
    rng = np.random.default_rng(n * 7 + len(sign))
    x = rng.standard_normal(shape) * _scale(alpha, k)
    if sign == "positive":
        x = np.abs(x)
    x = x.astype(np.float32)
    out = explain(readout_model(shape, region, n, alpha, beta, k), x, composite="epsilon-plus",
                  target_runtime=target_runtime)
    R, R_in = out["lrp_out/lrn"], out["lrp_in/lrn/x"]
    lo, hi = onnx_window(n) if region == "across" else ((n - 1) // 2, (n - 1) // 2)
    ref = reference(x, R, region=region, n=n, alpha=alpha, beta=beta, k=k, lo=lo, hi=hi)
    assert rel_l2(R_in, ref["R_in"]) <= TOL
    np.testing.assert_array_equal(out["relevance"], R_in)  # the input is the LRN's input


CONV = [("across", 5, 1e-4, 0.75, 1.0), ("across", 4, 1e-3, 0.75, 2.0), ("within", 3, 1e-3, 0.75, 1.0)]


def _conv_input(seed=0):
    return (np.random.default_rng(seed).standard_normal((2, 3, 10, 10)) * 30).astype(np.float32)


@pytest.mark.parametrize("target_runtime", ["any", "webgpu"])
@pytest.mark.parametrize("region,n,alpha,beta,k", CONV)
def test_lrn_inside_conv_net_matches_reference(region, n, alpha, beta, k, target_runtime):
    """The recomputed forward LRN (y) and the rule, from either form of the window sum."""
    x = _conv_input()
    out = explain(conv_net(region, n, alpha, beta, k), x, extra=["h", "y"], target_runtime=target_runtime)
    lo, hi = onnx_window(n) if region == "across" else ((n - 1) // 2, (n - 1) // 2)
    ref = reference(out["h"], out["lrp_out/lrn"], region=region, n=n, alpha=alpha, beta=beta, k=k, lo=lo, hi=hi)
    assert np.abs(ref["y"]).max() > 0
    assert rel_l2(out["y"], ref["y"]) <= 1e-6
    assert rel_l2(out["lrp_in/lrn/h"], ref["R_in"]) <= TOL


@pytest.mark.parametrize("region,n,alpha,beta,k", CONV)
def test_conservation_with_epsilon_zero(region, n, alpha, beta, k):
    """With lrn_epsilon = 0 the LRN's input relevance sums to its output relevance."""
    x = _conv_input(1)
    out = explain(conv_net(region, n, alpha, beta, k), x, extra=["h"], lrn_epsilon=0.0)
    R_out = out["lrp_out/lrn"].astype(np.float64).reshape(2, -1).sum(1)
    R_in = out["lrp_in/lrn/h"].astype(np.float64).reshape(2, -1).sum(1)
    assert np.all(np.abs(R_in - R_out) <= 1e-6 * np.abs(R_out)), (R_in, R_out)
    ref = reference(out["h"], out["lrp_out/lrn"], region=region, n=n, alpha=alpha, beta=beta, k=k,
                    lo=onnx_window(n)[0] if region == "across" else 1,
                    hi=onnx_window(n)[1] if region == "across" else 1, eps=0.0)
    assert rel_l2(out["lrp_in/lrn/h"], ref["R_in"]) <= TOL
    # After a ReLU every neighbour term is <= 0 (LRN's inhibition).
    assert out["h"].min() >= 0
    assert np.all(ref["top_neighbour"] <= 0)


@pytest.mark.parametrize("region,n,window", [("across", 5, (2, 2)), ("across", 4, (1, 2)), ("across", 6, (2, 3)),
                                             ("within", 3, (1, 1))])
def test_neighbours_get_negative_relevance_after_relu(region, n, window):
    """One unit of relevance at one output: the centre gets it (D > 0), its window's other
    inputs get <= 0 (< 0 where x > 0), everything else exactly 0. Checks the window (even n)."""
    shape = [1, 9, 3, 3]
    feat = int(np.prod(shape[1:]))
    x = (np.random.default_rng(3).standard_normal(shape) * 20).astype(np.float32)
    m = readout_model(shape, region, n, 0.02, 0.75, 1.0, relu=True, W=np.eye(feat))
    c, hh, ww = 4, 1, 1
    x[0, :, hh, ww] = np.abs(x[0, :, hh, ww]) + 1.0  # the centre's window (across or within) is
    x[0, c] = np.abs(x[0, c]) + 1.0                    # positive after the ReLU
    target = np.ravel_multi_index((c, hh, ww), shape[1:])
    ex = lrponnx.convert(m, composite="epsilon-plus", seed="one", layer_relevance=True)
    out = run(ex, {"x": x, "target": np.array([target], np.int64)})
    R_out = out["lrp_out/lrn"]
    assert R_out[0, c, hh, ww] == pytest.approx(1.0, abs=1e-5)  # y / (y + eps) of the identity readout
    assert np.count_nonzero(R_out) == 1
    R_in = out["lrp_in/lrn/h"][0]
    lo, hi = window
    if region == "across":
        inside = {(i, hh, ww) for i in range(c - lo, c + hi + 1)}
    else:
        inside = {(c, i, j) for i in range(hh - lo, hh + hi + 1) for j in range(ww - lo, ww + hi + 1)}
    for idx in np.ndindex(R_in.shape):
        if idx == (c, hh, ww):
            assert R_in[idx] > 0
        elif idx in inside:
            assert R_in[idx] < 0, idx
        else:
            assert R_in[idx] == 0, idx
    ref = reference(np.maximum(x, 0), R_out, region=region, n=n, alpha=0.02, beta=0.75, k=1.0, lo=lo, hi=hi)
    assert rel_l2(R_in, ref["R_in"][0]) <= TOL


FORWARD = [("across", 5, 1e-4, 0.75, 1.0), ("across", 4, 1e-3, 0.5, 2.0), ("across", 3, 0.05, 1.0, 1.5),
           ("across", 5, 0.05, 0.6, 1.5), ("within", 3, 1e-3, 0.75, 1.0), ("within", 3, 5e-3, 0.9, 1.0)]


@pytest.mark.parametrize("region,n,alpha,beta,k", FORWARD)
@pytest.mark.parametrize("lrn_rule", ["taylor", "identity"])
def test_recomputed_forward_lrn_matches_reference(region, n, alpha, beta, k, lrn_rule):
    """By default the explainer computes the LRN output itself (plain ops shared with the rule):
    no LRN node is left, y matches the float64 formula, and so do the predictions the model's."""
    x = _conv_input(5) * (1.0 if alpha < 1e-2 else 0.1)
    model = conv_net(region, n, alpha, beta, k)
    explainer = lrponnx.convert(model, lrn_rule=lrn_rule, layer_relevance=True)
    assert not [nd for nd in explainer.graph.node if nd.op_type in ("LRN", "WithinChannelLRN")]
    assert json.loads({m.key: m.value for m in explainer.metadata_props}["lrponnx.forward_recomputed"]) == ["y"]
    out = run(explainer, {"x": x}, extra=["h", "y"])
    lo, hi = onnx_window(n) if region == "across" else ((n - 1) // 2, (n - 1) // 2)
    ref = reference(out["h"], np.zeros_like(out["h"]), region=region, n=n, alpha=alpha, beta=beta, k=k, lo=lo, hi=hi)
    assert rel_l2(out["y"], ref["y"]) <= 1e-6
    assert rel_l2(out["logits"], run(model, {"x": x})["logits"]) <= 1e-6


def test_exact_forward_keeps_the_model_lrn_node():
    x = _conv_input(6)
    model = conv_net("across", 5, 1e-4, 0.75, 1.0, lrn2=("within", 3, 1e-3, 0.75, 1.0))
    exact = lrponnx.convert(model, exact_forward=True)
    assert sorted(nd.op_type for nd in exact.graph.node if nd.op_type in ("LRN", "WithinChannelLRN")) == \
        ["LRN", "WithinChannelLRN"]
    assert {m.key: m.value for m in exact.metadata_props}["lrponnx.forward_recomputed"] == "[]"
    got, want = run(exact, {"x": x}), run(model, {"x": x})
    np.testing.assert_array_equal(got["logits"], want["logits"])
    fast = run(lrponnx.convert(model), {"x": x})
    assert rel_l2(fast["relevance"], got["relevance"]) <= 1e-5


def test_identity_rule_hands_relevance_through():
    x = _conv_input(2)
    for options in ({"lrn_rule": "identity"}, {"rules": ["lrn=identity"]}):
        out = explain(conv_net("across", 5, 1e-4, 0.75, 1.0), x, **options)
        np.testing.assert_array_equal(out["lrp_in/lrn/h"], out["lrp_out/lrn"])


@pytest.mark.parametrize("region,n,alpha,beta,k", CONV)
def test_denominator_output_divides_by_y(region, n, alpha, beta, k):
    x = _conv_input(3)
    out = explain(conv_net(region, n, alpha, beta, k), x, extra=["h"], lrn_denominator="output")
    lo, hi = onnx_window(n) if region == "across" else (1, 1)
    ref = reference(out["h"], out["lrp_out/lrn"], region=region, n=n, alpha=alpha, beta=beta, k=k, lo=lo, hi=hi,
                    denominator="output")
    assert rel_l2(out["lrp_in/lrn/h"], ref["R_in"]) <= TOL
    ref_sum = reference(out["h"], out["lrp_out/lrn"], region=region, n=n, alpha=alpha, beta=beta, k=k, lo=lo,
                        hi=hi)
    assert rel_l2(out["lrp_in/lrn/h"], ref_sum["R_in"]) > 1e-3  # a different rule, visibly


def test_per_node_overrides():
    """A net with an across LRN 'lrn' and a within LRN 'lrn2': overrides by name and by op type."""
    x = _conv_input(4)
    m = conv_net("across", 5, 1e-3, 0.75, 1.0, lrn2=("within", 3, 1e-2, 0.75, 1.0))
    out = explain(m, x, extra=["h", "h2"], rules=["lrn=identity"])
    np.testing.assert_array_equal(out["lrp_in/lrn/h"], out["lrp_out/lrn"])
    ref2 = reference(out["h2"], out["lrp_out/lrn2"], region="within", n=3, alpha=1e-2, beta=0.75, k=1.0, lo=1, hi=1)
    assert rel_l2(out["lrp_in/lrn2/h2"], ref2["R_in"]) <= TOL  # the other LRN keeps taylor

    out = explain(m, x, extra=["h", "h2"], rules=["LRN=taylor:epsilon=0"])
    for name, t, region, n, alpha, (lo, hi) in (("lrn", "h", "across", 5, 1e-3, (2, 2)),
                                                ("lrn2", "h2", "within", 3, 1e-2, (1, 1))):
        R_in, R_out = out[f"lrp_in/{name}/{t}"], out[f"lrp_out/{name}"]
        ref = reference(out[t], R_out, region=region, n=n, alpha=alpha, beta=0.75, k=1.0, lo=lo, hi=hi, eps=0.0)
        assert rel_l2(R_in, ref["R_in"]) <= TOL
        s_in, s_out = R_in.astype(np.float64).sum(), R_out.astype(np.float64).sum()
        assert abs(s_in - s_out) <= 1e-6 * abs(s_out)

    plan = lrponnx.plan(m, rules=["lrn2=identity", "LRN=taylor:denominator=output"])
    rules = {u.name: str(u.rule) for u in plan.units if u.kind == "LRN"}
    assert rules == {"lrn": "taylor:epsilon=1e-06,denominator=output",
                     "lrn2": "taylor:epsilon=1e-06,denominator=output"}  # later overrides win


# =================================================================== D (the Taylor sum) against y

def _emitter_tensor(explainer: onnx.ModelProto, prefix: str) -> str:
    names = [o for n in explainer.graph.node for o in n.output if o.startswith(prefix)]
    assert len(names) == 1, names
    return names[0]


def test_taylor_sum_close_to_output_on_realistic_data(shared_data):
    """D_c (the sum of the Taylor terms) against y_c for alpha = 1e-4, beta = 0.75, n = 5, k = 1
    on post-ReLU conv1 activations of a CaffeNet-shaped first layer (96 filters 11x11 stride 4,
    Caffe's init N(0, 0.01), no bias) applied to the two real photos in Caffe units (BGR,
    0-255 minus the mean), 227x227. Activations reach ~67 at most (see docs/lrn.md)."""
    from PIL import Image

    imgs = []
    for name in ("cat.jpg", "fish-bike.jpg"):
        im = Image.open(shared_data / "images" / name).convert("RGB").resize((227, 227), Image.BILINEAR)
        bgr = np.asarray(im, np.float32)[..., ::-1].transpose(2, 0, 1)
        imgs.append(bgr - np.array([104.0, 117.0, 123.0], np.float32).reshape(3, 1, 1))
    x = np.stack(imgs)
    w = np.random.default_rng(0).normal(0.0, 0.01, (96, 3, 11, 11)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1", strides=[4, 4]),
             helper.make_node("Relu", ["c"], ["h"], name="relu1"),
             helper.make_node("LRN", ["h"], ["y"], name="norm1", size=5, alpha=1e-4, beta=0.75, bias=1.0),
             helper.make_node("GlobalAveragePool", ["y"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["logits"], name="flat")]
    m = _model(nodes, [_vi("x", [2, 3, 227, 227])], [_vi("logits", [2, 96])], [numpy_helper.from_array(w, "w")])
    ex = lrponnx.convert(m, layer_relevance=True)
    D_name = _emitter_tensor(ex, "lrp/lrn_D")
    out = run(ex, {"x": x}, extra=["h", "y", D_name])
    h, y, D = out["h"], out["y"].astype(np.float64), out[D_name].astype(np.float64)
    ref = reference(h, np.zeros_like(h), region="across", n=5, alpha=1e-4, beta=0.75, k=1.0, lo=2, hi=2)
    assert rel_l2(D, ref["D"]) <= TOL  # the emitter's D is the contract's D
    assert rel_l2(y, ref["y"]) <= 1e-6
    assert 30 < h.max() < 100  # the magnitude this test is about
    on = y > 1e-3 * y.max()
    dev = np.abs(D[on] / y[on] - 1)
    # Layer level: the Taylor terms sum to the layer's output within 5 % (per sample).
    for b in range(2):
        assert abs(D[b].sum() / y[b].sum() - 1) <= 0.05
    # Per element: within 5 % for 99 % of the active outputs, 1 % on average.
    assert np.quantile(dev, 0.99) <= 0.05
    assert dev.mean() <= 0.01


def test_taylor_sum_follows_the_closed_form():
    """D_c / y_c = (1 + u)^beta - 2 beta u / (1 + u) with u = a (S_c - x_c^2) / (k + a x_c^2):
    first order in the neighbours' share u, so D_c tracks y_c to 5 % only while u <= ~0.077
    (beta = 0.75). Checked on the emitter's D over u from 1e-3 to 10."""
    C, n, alpha, beta, k = 3, 3, 1.0, 0.75, 1.0
    a = alpha / n
    u = np.geomspace(1e-3, 10.0, 24)
    # centre channel 1 with x_c = 1, neighbours 0 and 2 share the energy u (k + a) / a equally
    nb = np.sqrt(u * (k + a) / a / 2)
    x = np.ones((1, C, 1, len(u)), np.float32)
    x[0, 0, 0, :] = x[0, 2, 0, :] = nb
    m = readout_model(list(x.shape), "across", n, alpha, beta, k)
    ex = lrponnx.convert(m, composite="epsilon-plus", layer_relevance=True)
    D_name = _emitter_tensor(ex, "lrp/lrn_D")
    out = run(ex, {"x": x}, extra=["y", D_name])
    ratio = out[D_name][0, 1, 0].astype(np.float64) / out["y"][0, 1, 0]
    u_act = a * (x[0, 0, 0].astype(np.float64) ** 2 + x[0, 2, 0].astype(np.float64) ** 2) / (k + a)
    np.testing.assert_allclose(ratio, (1 + u_act) ** beta - 2 * beta * u_act / (1 + u_act), rtol=1e-5)
    assert np.all(np.abs(ratio[u_act <= 0.06] - 1) <= 0.05)
    assert np.all(np.abs(ratio[(u_act >= 0.1) & (u_act <= 0.6)] - 1) > 0.05)


# ========================================================================= decomposed LRN (torch)

torch = pytest.importorskip("torch")


class _TorchNet(torch.nn.Module):
    def __init__(self, n, alpha, beta, k, C=8, size=6):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, C, 3, padding=1)
        self.lrn = torch.nn.LocalResponseNorm(n, alpha=alpha, beta=beta, k=k)
        self.fc = torch.nn.Linear(C * size * size, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.lrn(torch.relu(self.conv(x))), 1))


def _torch_net(n, alpha=1e-3, beta=0.75, k=2.0):
    torch.manual_seed(n)
    net = _TorchNet(n, alpha, beta, k).eval()
    with torch.no_grad():
        net.conv.weight.mul_(20.0)  # activations of tens: the renormalisation matters
    return net


def _export(net, dynamo: bool, dynamic_batch: bool = False) -> onnx.ModelProto:
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            kw = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamic_batch else {}
            return torch.onnx.export(net, (x,), dynamo=True, input_names=["x"], **kw).model_proto
        f = io.BytesIO()
        kw = {"dynamic_axes": {"x": {0: "batch"}}} if dynamic_batch else {}
        torch.onnx.export(net, (x,), f, dynamo=False, input_names=["x"], **kw)
        return onnx.load_from_string(f.getvalue())


def _as_onnx_lrn(net) -> onnx.ModelProto:
    """The same network written with an ONNX LRN node (odd n: the windows agree)."""
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    lrn = net.lrn
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["h"], name="relu"),
             helper.make_node("LRN", ["h"], ["y"], name="lrn", size=lrn.size, alpha=lrn.alpha, beta=lrn.beta,
                              bias=lrn.k),
             helper.make_node("Flatten", ["y"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(sd[s], d) for s, d in (("conv.weight", "cw"), ("conv.bias", "cb"),
                                                             ("fc.weight", "fw"), ("fc.bias", "fb"))]
    return _model(nodes, [_vi("x", [2, 3, 6, 6])], [_vi("logits", [2, 4])], inits)


@pytest.fixture(scope="module")
def exported():
    """{(n, exporter): (net, ModelProto)} for n = 5 and 4, both exporters of torch 2.14."""
    out = {}
    for n in (5, 4):
        net = _torch_net(n)
        for exporter in ("torchscript", "dynamo"):
            out[n, exporter] = (net, _export(net, dynamo=exporter == "dynamo"))
    return out


def _lrn_units(model):
    view = ModelView(prepare(model))
    return view, [u for u in build_units(view) if u.kind == "LRN"]


def _relu_output(model) -> str:
    return next(n.output[0] for n in model.graph.node if n.op_type == "Relu")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("n", [5, 4])
def test_decomposed_chain_is_one_lrn_unit(exported, exporter, n):
    net, model = exported[n, exporter]
    view, units = _lrn_units(model)
    assert len(units) == 1
    u = units[0]
    lo, hi = torch_window(n)
    assert u.op_type == "LocalResponseNorm"
    assert (u.info.region, u.info.size, u.info.lo, u.info.hi) == ("across", n, lo, hi)
    assert u.info.alpha == pytest.approx(1e-3, rel=1e-6) and u.info.beta == pytest.approx(0.75)
    assert u.info.k == pytest.approx(2.0)
    assert u.inputs == [_relu_output(model)]
    assert view.producer[u.output].op_type == "Div" and u.name == view.producer[u.output].name
    # every dynamic node between the ReLU and the readout belongs to the unit
    claimed = {m.name for m in u.nodes}
    order = [m.name for m in view.graph.node]
    first, last = min(order.index(m) for m in claimed), order.index(u.name)
    between = [m for m in view.graph.node[first:last + 1] if any(i in view.dynamic for i in m.input)]
    assert {m.name for m in between} <= claimed
    if exporter == "torchscript":
        assert {"If", "Shape", "Gather", "Equal"} <= {m.op_type for m in u.nodes}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_decomposed_odd_matches_onnx_lrn(exported, exporter):
    """Exported nn.LocalResponseNorm(5) explains exactly like the same net with an ONNX LRN."""
    net, model = exported[5, exporter]
    x = (np.random.default_rng(5).standard_normal((2, 3, 6, 6))).astype(np.float32)
    with torch.no_grad():
        logits_torch = net(torch.from_numpy(x)).numpy()
    for options in ({}, {"lrn_epsilon": 0.0}, {"composite": "epsilon-alpha2-beta1"}):
        a = run(lrponnx.convert(model, **options), {"x": x})
        b = run(lrponnx.convert(_as_onnx_lrn(net), **options), {"x": x})
        logits = next(v for key, v in a.items() if key != "relevance")
        assert rel_l2(logits, logits_torch) <= 1e-5
        assert rel_l2(a["relevance"], b["relevance"]) <= TOL


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_decomposed_even_matches_reference_with_torch_window(exported, exporter):
    net, model = exported[4, exporter]
    x = (np.random.default_rng(6).standard_normal((2, 3, 6, 6))).astype(np.float32)
    view, (u,) = _lrn_units(model)
    h = u.inputs[0]
    out = explain(model, x, extra=[h])
    R_out, R_in = out[f"lrp_out/{u.name}"], out[f"lrp_in/{u.name}/{h}"]
    lo, hi = torch_window(4)
    ref = reference(out[h], R_out, region="across", n=4, alpha=net.lrn.alpha, beta=0.75, k=2.0, lo=lo, hi=hi)
    with torch.no_grad():
        y_torch = net.lrn(torch.from_numpy(out[h])).numpy()
    assert rel_l2(y_torch, ref["y"]) <= 1e-6  # the reference's torch window is torch's
    gain = ref["y"][out[h] > 0] / out[h][out[h] > 0]
    assert gain.max() - gain.min() > 0.05  # the renormalisation varies: not a constant scaling here
    assert rel_l2(R_in, ref["R_in"]) <= TOL
    # ONNX's window for n = 4 would be a different rule: the test can tell them apart
    other = reference(out[h], R_out, region="across", n=4, alpha=net.lrn.alpha, beta=0.75, k=2.0,
                      lo=onnx_window(4)[0], hi=onnx_window(4)[1])
    assert rel_l2(R_in, other["R_in"]) > 1e-3
    # per-node override by the chain's name and by an inner node's name
    pool = next(m.name for m in u.nodes if m.op_type == "AveragePool")
    for rule in (f"{u.name}=identity", f"{pool}=identity", "LocalResponseNorm=identity"):
        o = explain(model, x, rules=[rule])
        np.testing.assert_array_equal(o[f"lrp_in/{u.name}/{h}"], o[f"lrp_out/{u.name}"])


def test_decomposed_dynamic_batch_torchscript():
    """With a dynamic batch the TorchScript exporter computes the Reshape targets from Shape(x):
    the loader folds them into constants (lrponnx.compiler.shapes, 0 = keep the batch dim), the chain is
    still one unit, and any batch size runs."""
    net = _torch_net(5)
    model = _export(net, dynamo=False, dynamic_batch=True)
    assert "Concat" in {m.op_type for m in model.graph.node}
    view, units = _lrn_units(model)
    assert len(units) == 1
    reshapes = [m for m in units[0].nodes if m.op_type == "Reshape"]
    assert reshapes and all(view.is_const(m.input[1]) for m in reshapes)
    x = np.random.default_rng(7).standard_normal((3, 3, 6, 6)).astype(np.float32)
    ex = lrponnx.convert(model)
    a = run(ex, {"x": x})["relevance"]
    ref_ex = lrponnx.convert(_as_onnx_lrn(net))  # batch 2: explain samples 0-1, then 1-2
    b = np.concatenate([run(ref_ex, {"x": x[:2]})["relevance"], run(ref_ex, {"x": x[1:]})["relevance"][1:]])
    assert rel_l2(a, b) <= TOL


class _PlainLrn(torch.nn.Module):
    def __init__(self, n, shape):
        super().__init__()
        self.lrn = torch.nn.LocalResponseNorm(n, alpha=0.05, beta=0.75, k=1.0)
        self.fc = torch.nn.Linear(int(np.prod(shape[1:])), 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.lrn(torch.relu(x)), 1))


@pytest.mark.parametrize("shape,exporter", [((2, 7, 3, 4, 5), "torchscript"), ((2, 7, 9), "dynamo")])
def test_decomposed_other_ranks(shape, exporter):
    """5-D and 3-D inputs (the rule's window sums view a 5-D input as [N, C, D, H*W])."""
    torch.manual_seed(0)
    net = _PlainLrn(4, shape).eval()
    x = torch.randn(*shape)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            model = torch.onnx.export(net, (x,), dynamo=True, input_names=["x"]).model_proto
        else:
            f = io.BytesIO()
            torch.onnx.export(net, (x,), f, dynamo=False, input_names=["x"])
            model = onnx.load_from_string(f.getvalue())
    view, (u,) = _lrn_units(model)
    assert (u.info.size, u.info.lo, u.info.hi) == (4, *torch_window(4))
    h = u.inputs[0]
    xs = (np.random.default_rng(1).standard_normal(shape) * 6).astype(np.float32)
    out = explain(model, xs, extra=[h], composite="epsilon-plus")
    ref = reference(out[h], out[f"lrp_out/{u.name}"], region="across", n=4, alpha=0.05, beta=0.75, k=1.0,
                    lo=torch_window(4)[0], hi=torch_window(4)[1])
    assert rel_l2(out[f"lrp_in/{u.name}/{h}"], ref["R_in"]) <= TOL


# ==================================================================== decomposed LRN (hand-built)

def _chain(shape=(2, 6, 4, 5), *, n=3, lo=None, alpha=0.05, beta=0.75, k=1.0, square=("Mul",), pad_value=None,
           pool_pads=False, include_pad=1, reshape=None, sq_output=False, form="div"):
    """x -> Relu 'h' -> a hand-written LRN chain (Div 'div') -> Flatten -> Gemm.

    ``square``: ("Mul",) x*x, ("Pow", e) x^e, ("MulOther",) x*sigmoid(x) (another tensor).
    ``lo``: padding before (after = n-1-lo); ``pool_pads``: pads on the AveragePool instead of a
    Pad; ``reshape``: the 5-D view of x^2 (default [N, 1, C, H, W]).
    """
    N, C, H, W = shape
    lo = (n - 1) // 2 if lo is None else lo
    hi = n - 1 - lo
    inits = {"alpha": np.array(alpha, np.float32), "k": np.array(k, np.float32), "beta": np.array(beta, np.float32),
             "shape5": np.array(reshape or [N, 1, C, H, W], np.int64), "shape4": np.array(shape, np.int64),
             "pads": np.array([0, 0, lo, 0, 0, 0, 0, hi, 0, 0], np.int64),
             "fw": np.random.default_rng(0).standard_normal((3, C * H * W)).astype(np.float32)}
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu")]
    if square[0] == "Mul":
        nodes.append(helper.make_node("Mul", ["h", "h"], ["sq"], name="sq"))
    elif square[0] == "Pow":
        inits["e"] = np.array(square[1], np.float32)
        nodes.append(helper.make_node("Pow", ["h", "e"], ["sq"], name="sq"))
    else:
        nodes += [helper.make_node("Sigmoid", ["x"], ["z"], name="sigmoid"),
                  helper.make_node("Mul", ["h", "z"], ["sq"], name="sq")]
    nodes.append(helper.make_node("Reshape", ["sq", "shape5"], ["v"], name="view"))
    if pool_pads:
        nodes.append(helper.make_node("AveragePool", ["v"], ["avg"], name="pool", kernel_shape=[n, 1, 1],
                                      pads=[lo, 0, 0, hi, 0, 0], count_include_pad=include_pad))
    else:
        pad_in = ["v", "pads"]
        if pad_value is not None:
            inits["pv"] = np.array(pad_value, np.float32)
            pad_in.append("pv")
        nodes += [helper.make_node("Pad", pad_in, ["vp"], name="pad"),
                  helper.make_node("AveragePool", ["vp"], ["avg"], name="pool", kernel_shape=[n, 1, 1])]
    nodes.append(helper.make_node("Reshape", ["avg", "shape4"], ["S"], name="back"))
    if form == "div":
        nodes += [helper.make_node("Mul", ["S", "alpha"], ["aS"], name="scale"),
                  helper.make_node("Add", ["aS", "k"], ["s"], name="shift"),
                  helper.make_node("Pow", ["s", "beta"], ["sb"], name="pow"),
                  helper.make_node("Div", ["h", "sb"], ["y"], name="div")]
    else:
        inits["inv_alpha"] = np.array(1.0 / alpha, np.float32)
        inits["neg_beta"] = np.array(-beta, np.float32)
        nodes += [helper.make_node("Div", ["S", "inv_alpha"], ["aS"], name="scale"),
                  helper.make_node("Add", ["k", "aS"], ["s"], name="shift"),
                  helper.make_node("Pow", ["s", "neg_beta"], ["sb"], name="pow"),
                  helper.make_node("Mul", ["sb", "h"], ["y"], name="div")]
    nodes += [helper.make_node("Flatten", ["y"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "fw"], ["logits"], name="fc", transB=1)]
    outputs = [_vi("logits", [N, 3])] + ([_vi("sq", list(shape))] if sq_output else [])
    return _model(nodes, [_vi("x", list(shape))], outputs,
                  [numpy_helper.from_array(v, name) for name, v in inits.items()])


def _matches(model, monkeypatch=None, verify=True):
    view = ModelView(prepare(model))
    if not verify:
        monkeypatch.setattr(lrn_match, "verify_chain", lambda *a, **kw: True)
    return lrn_match.find_decomposed_lrn(view)


@pytest.mark.parametrize("n,lo,form", [(3, 1, "div"), (4, 1, "div"), (4, 2, "div"), (5, 2, "mul"), (6, 3, "mul")])
def test_hand_built_chain_window_from_pads(n, lo, form):
    """The window comes from the pads (ONNX's even-n window as well as torch's), the constants
    from Mul/Div/Add in either operand order, x * s^-beta as well as x / s^beta; the explainer
    equals the reference with that window."""
    model = _chain(n=n, lo=lo, form=form)
    (u,) = _matches(model)
    assert (u.info.size, u.info.lo, u.info.hi) == (n, lo, n - 1 - lo)
    assert (u.info.alpha, u.info.beta, u.info.k) == pytest.approx((0.05, 0.75, 1.0), rel=1e-6)
    assert u.name == "div" and u.inputs == ["h"] and len(u.nodes) == 9
    x = (np.random.default_rng(n).standard_normal((2, 6, 4, 5)) * 5).astype(np.float32)
    out = explain(model, x, extra=["h"], composite="epsilon-plus")
    ref = reference(out["h"], out["lrp_out/div"], region="across", n=n, alpha=0.05, beta=0.75, k=1.0, lo=lo,
                    hi=n - 1 - lo)
    assert rel_l2(out["lrp_in/div/h"], ref["R_in"]) <= TOL


def test_inlined_within_channel_function_is_matched():
    """The body of WithinChannelLRN written out as plain nodes is one within-channel LRN."""
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Mul", ["h", "h"], ["sq"], name="sq"),
             helper.make_node("AveragePool", ["sq"], ["avg"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              count_include_pad=1),
             helper.make_node("Mul", ["avg", "alpha"], ["aS"], name="scale"),
             helper.make_node("Add", ["aS", "one"], ["s"], name="shift"),
             helper.make_node("Pow", ["s", "beta"], ["sb"], name="pow"),
             helper.make_node("Div", ["h", "sb"], ["y"], name="div"),
             helper.make_node("Flatten", ["y"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fw"], ["logits"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(np.array(v, np.float32), name)
             for name, v in (("alpha", 0.02), ("one", 1.0), ("beta", 0.75))]
    inits.append(numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 90)).astype(np.float32), "fw"))
    model = _model(nodes, [_vi("x", [2, 2, 5, 9])], [_vi("logits", [2, 3])], inits)
    (u,) = _matches(model)
    assert u.info == LrnSpec.within(3, u.info.alpha, 0.75) and u.info.alpha == pytest.approx(0.02)
    x = (np.random.default_rng(9).standard_normal((2, 2, 5, 9)) * 8).astype(np.float32)
    out = explain(model, x, extra=["h"], composite="epsilon-plus")
    ref = reference(out["h"], out["lrp_out/div"], region="within", n=3, alpha=0.02, beta=0.75, k=1.0, lo=1, hi=1)
    assert rel_l2(out["lrp_in/div/h"], ref["R_in"]) <= TOL


@pytest.mark.parametrize("case", ["x_times_other", "cube", "pad_value"])
def test_near_miss_rejected_by_structure(case, monkeypatch):
    kw = {"x_times_other": {"square": ("MulOther",)}, "cube": {"square": ("Pow", 3.0)},
          "pad_value": {"pad_value": 0.5}}[case]
    model = _chain(**kw)
    assert _matches(model, monkeypatch, verify=False) == []
    with pytest.raises(UnsupportedModelError):
        lrponnx.convert(model)


@pytest.mark.parametrize("case", ["exclude_pad", "scrambled_view"])
def test_near_miss_rejected_by_numbers(case, monkeypatch):
    """Chains the structure accepts but that compute something else: the numerical check
    (chain run in ORT against the fused formula) is what rejects them."""
    kw = {"exclude_pad": {"pool_pads": True, "include_pad": 0},
          "scrambled_view": {"reshape": [2, 1, 4, 6, 5]}}[case]  # x^2 [2,6,4,5] viewed as [2,1,4,6,5]
    model = _chain(**kw)
    assert _matches(model) == []
    with pytest.raises(UnsupportedModelError):
        lrponnx.convert(model)
    assert len(_matches(model, monkeypatch, verify=False)) == 1  # structurally it looked like LRN


def test_chain_with_leaking_tensor_is_not_matched():
    """An intermediate of the chain read outside it (here a graph output) cannot be hidden in a unit."""
    assert _matches(_chain(sq_output=True)) == []


def test_verify_chain_rejects_a_wrong_spec():
    view = ModelView(prepare(_chain(n=5, lo=2)))
    (u,) = lrn_match.find_decomposed_lrn(view)
    s = u.info
    assert lrn_match.verify_chain(view, u.nodes, "h", u.output, s)
    for wrong in (LrnSpec("across", 5, s.alpha, s.beta, s.k, 1, 3), LrnSpec("across", 5, s.alpha, 0.7, s.k, 2, 2),
                  LrnSpec("across", 5, s.alpha * 1.01, s.beta, s.k, 2, 2),
                  LrnSpec("across", 5, s.alpha, s.beta, 1.01, 2, 2)):
        assert not lrn_match.verify_chain(view, u.nodes, "h", u.output, wrong), wrong


@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 6, 3, 4, 2)], ids=["rank3", "rank5"])
def test_recomputed_forward_runs_lrn_of_other_ranks(shape):
    """ORT's LRN kernel takes 4-D inputs only; the explainer's plain ops take any rank."""
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    model = readout_model(shape, "across", 3, 0.1, 0.75, 1.0, relu=True)
    explainer = lrponnx.convert(model, layer_relevance=True)
    used = {i for nd in explainer.graph.node for i in nd.input}
    assert not [t.name for t in explainer.graph.initializer if t.name not in used and t.name != "target"]
    out = run(explainer, {"x": x}, extra=["h", "y"])
    ref = reference(out["h"], out["lrp_out/lrn"], region="across", n=3, alpha=0.1, beta=0.75, k=1.0, lo=1, hi=1)
    assert rel_l2(out["y"], ref["y"]) <= 1e-6
    assert rel_l2(out["lrp_in/lrn/h"], ref["R_in"]) <= TOL

"""compiler/geometry.py's pooling arithmetic against ONNX Runtime, on random geometries: output
sizes (ceil_mode, dilations, asymmetric pads, auto_pad), average pooling's divisors
(count_include_pad, ceil-mode windows that reach past the end padding), and the floor-mode pads
and output_padding the explainer's Conv/ConvTranspose over the same windows use."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from lrponnx.compiler.geometry import pool_geometry, pool_output_size
from ort_ops import run_op as _run


def _window_sums(x: np.ndarray, geo) -> np.ndarray:
    """Each window's sum of x [N, C, *spatial] in plain numpy: per axis a [out, size] matrix that
    counts how often a window reads each input position (positions in the padding read nothing)."""
    y = x.astype(np.float64)
    for i in range(geo.rank):
        pos = geo.window_positions(i)  # [out, kernel]
        A = np.zeros([geo.out[i], geo.spatial[i]])
        for o in range(geo.out[i]):
            for p in pos[o]:
                if 0 <= p < geo.spatial[i]:
                    A[o, p] += 1
        y = np.moveaxis(np.tensordot(y, A, axes=([2 + i], [1])), -1, 2 + i)
    return y


def _random_geometry(rng, same: bool = False):
    n = int(rng.integers(1, 4))
    while True:
        k = rng.integers(1, 5, n)
        d = np.ones(n, int) if same else rng.integers(1, 4, n)
        s = rng.integers(1, 5, n)
        if same:
            s = np.minimum(s, k)  # ORT pools SAME with pads that go negative when the stride exceeds the kernel
        size = rng.integers(1, 13, n)
        pads = np.concatenate([rng.integers(0, k), rng.integers(0, k)])  # ORT: each pad < kernel
        extent = (k - 1) * d + 1
        if same or np.all(size + pads[:n] + pads[n:] >= extent):
            break
    attrs = dict(kernel_shape=k.tolist(), strides=s.tolist(), ceil_mode=int(rng.integers(0, 2)))
    if same:
        attrs["auto_pad"] = str(rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID"]))
        if attrs["auto_pad"] == "VALID" and np.any(size < extent):
            size = np.maximum(size, extent)
    else:
        attrs.update(pads=pads.tolist(), dilations=d.tolist())
    return [int(v) for v in size], attrs


@pytest.mark.parametrize("seed", range(6))
def test_average_pool_sizes_and_divisors_match_onnxruntime(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        size, attrs = _random_geometry(rng, same=seed >= 4)
        attrs["count_include_pad"] = int(rng.integers(0, 2))
        x = rng.standard_normal([2, 3] + size).astype(np.float32)
        want = _run("AveragePool", x, **attrs)
        geo = pool_geometry(size, attrs)
        assert list(want.shape[2:]) == list(geo.out), (size, attrs)
        got = _window_sums(x, geo) / geo.average_divisor(bool(attrs["count_include_pad"]))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{size} {attrs}")


@pytest.mark.parametrize("seed", range(4))
def test_max_pool_sizes_and_the_floor_windows_match_onnxruntime(seed):
    """MaxPool's output size; a floor-mode Conv with floor_pads over ones kernels gives the pool's
    window sums, and a ConvTranspose with transpose_output_padding maps back onto the input size."""
    rng = np.random.default_rng(100 + seed)
    for _ in range(30):
        size, attrs = _random_geometry(rng, same=seed >= 3)
        x = rng.standard_normal([1, 2] + size).astype(np.float32)
        geo = pool_geometry(size, attrs)
        assert list(_run("MaxPool", x, opset=12, **attrs).shape[2:]) == list(geo.out), (size, attrs)
        conv = dict(kernel_shape=list(geo.kernel), strides=list(geo.strides), dilations=list(geo.dilations),
                    pads=geo.floor_pads(), group=2)
        ones = np.ones([2, 1] + list(geo.kernel), np.float32)
        sums = _run("Conv", x, [ones], opset=17, **conv)
        np.testing.assert_allclose(sums, _window_sums(x, geo), rtol=1e-5, atol=1e-5, err_msg=f"{size} {attrs}")
        back = _run("ConvTranspose", sums, [ones], opset=17, output_padding=geo.transpose_output_padding(), **conv)
        assert list(back.shape[2:]) == size, (size, attrs)


def test_global_pool_is_one_window_over_the_plane():
    geo = pool_geometry([5, 7], {}, global_pool=True)
    assert geo.out == (1, 1) and geo.average_divisor(False).tolist() == [[35.0]]


def test_ceil_mode_drops_a_last_window_that_starts_in_the_end_padding():
    # size 5, kernel 2, stride 2, end pad 1: floor 3 windows; ceil would give a 4th starting at
    # position 6 = size + head pad, wholly in the padding: ONNX Runtime drops it
    assert pool_output_size(5, 2, 2, 1, 0, 1, ceil_mode=False) == 3
    assert pool_output_size(5, 2, 2, 1, 0, 1, ceil_mode=True) == 3
    assert pool_output_size(6, 3, 2, 1, 0, 0, ceil_mode=True) == 3
    x = np.zeros([1, 1, 5], np.float32)
    assert _run("AveragePool", x, kernel_shape=[2], strides=[2], pads=[0, 1], ceil_mode=1).shape[2] == 3


@pytest.mark.parametrize("ceil_mode", [0, 1])
def test_convert_creates_no_onnxruntime_session_for_a_model_without_constant_subgraphs(monkeypatch, ceil_mode):
    """Pooling's output sizes and divisors (and every other convert-time constant of this model)
    come from numpy: a Conv / AveragePool / MaxPool / Gemm model converts without an ONNX Runtime
    session for its constants."""
    import lrponnx

    rng = np.random.default_rng(0)
    init = lambda name, shape: onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("AveragePool", ["r"], ["a"], name="avg", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1], ceil_mode=ceil_mode, count_include_pad=0),
             helper.make_node("MaxPool", ["a"], ["m"], name="max", kernel_shape=[2, 2], strides=[2, 2],
                              ceil_mode=ceil_mode),
             helper.make_node("Flatten", ["m"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [init("w", [4, 3, 3, 3]), init("b", [4]), init("fc", [5, 36 if ceil_mode else 16]), init("fb", [5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    created = []
    real = ort.InferenceSession.__init__

    def counting(self, *args, **kwargs):
        created.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", counting)
    for composite in COMPOSITES_WITHOUT_SESSIONS:
        explainer = lrponnx.convert(model, composite, low=-3.0, high=3.0)  # zbox's bounds
        allowed = LOAD_MEASURES_CEIL_SHAPES if ceil_mode else 0
        assert len(created) <= allowed, f"{composite}: {len(created)} onnxruntime session(s) at convert time"
        created.clear()
    monkeypatch.undo()
    x = rng.standard_normal([2, 3, 9, 9]).astype(np.float32)  # the explainer runs (and is not trivial)
    sess = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    r = sess.run(["relevance"], {"x": x, "target": np.array([-1, 2], np.int64)})[0]
    assert r.shape == x.shape and np.abs(r).sum() > 0


#: the linear rules' convert-time constants (flat's denominators, zbox's bounds) are numpy too
COMPOSITES_WITHOUT_SESSIONS = ("epsilon-plus", "epsilon-plus-flat", "epsilon-gamma-box")
#: compiler/load.py (prepare) still runs a model with a ceil_mode pool once in ONNX Runtime to
#: measure its shapes (onnx's inference keeps a window ORT drops): one session, not one per constant.
LOAD_MEASURES_CEIL_SHAPES = 1

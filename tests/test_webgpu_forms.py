"""The graph forms for ``target_runtime="webgpu"`` (issue 15, part B), checked on the CPU.

onnxruntime-web's WebGPU provider refuses 3-D pooling (the LRN window sum), Conv nodes without
``kernel_shape`` and MaxPool's ``Indices`` output. With ``target_runtime="webgpu"`` the explainer
writes the LRN window sum as a banded 1x1 Conv (or a 2-D pool when the channel count is
symbolic) and winner-take-all without ``Indices``; every target states every Conv and pool
attribute. The forms are checked here against the same references as today's forms: the float64
LRN reference of tests/test_lrn.py and torch autograd for max pooling (tests/test_maxpool_wta.py),
with ties, ceil mode, padding and dilation. Running them in WebGPU itself is tests/test_runtimes.py.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrponnx
from explainer_feeds import with_target
from lrponnx.app.cli import main
from lrponnx.errors import RuleError
from test_lrn import ISOLATED, TOL, readout_model, reference, rel_l2, run
from test_maxpool_wta import pool_model, torch_wta

CONV_ATTRS = ("kernel_shape", "strides", "pads", "dilations", "group")
POOL_ATTRS = ("kernel_shape", "strides", "pads")


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def missing_attributes(model: onnx.ModelProto) -> list[str]:
    """Every Conv/ConvTranspose/pool node of the main graph that leaves out a geometry attribute."""
    bad = []
    for n in model.graph.node:
        wanted = CONV_ATTRS if n.op_type in ("Conv", "ConvTranspose") else \
            POOL_ATTRS + (("dilations",) if n.op_type == "MaxPool" else ()) \
            if n.op_type in ("AveragePool", "MaxPool") else ()
        have = _attrs(n)
        lacking = [a for a in wanted if a not in have]
        if lacking:
            bad.append(f"{n.op_type} {n.name}: {lacking}")
    return bad


def webgpu_refusals(model: onnx.ModelProto) -> list[str]:
    """The nodes WebGPU's provider refuses: pools over more than two axes, MaxPool with Indices."""
    bad = []
    for n in model.graph.node:
        if n.op_type in ("AveragePool", "MaxPool") and len(_attrs(n)["kernel_shape"]) > 2:
            bad.append(f"{n.name}: {n.op_type} over {len(_attrs(n)['kernel_shape'])} axes")
        if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]:
            bad.append(f"{n.name}: MaxPool with Indices")
    return bad


def session_outputs(model: onnx.ModelProto, feeds: dict) -> dict:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, with_target(sess, feeds))))


# ============================================================================ attributes everywhere

@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory):
    """The zoo models: the bundled cifar10-lrn always, the others when ../shared/data is there."""
    from conftest import SHARED_DATA
    from lrponnx.model_zoo import registry

    models = {"cifar10-lrn": registry.default_model_path()}
    if SHARED_DATA.is_dir():
        out = tmp_path_factory.mktemp("zoo")
        for name in ("cifar10-full-caffe", "bvlc-googlenet"):
            models[name] = registry.build(name, out, log=lambda *a, **k: None)
    return models


@pytest.mark.parametrize("target_runtime", ["any", "webgpu"])
@pytest.mark.parametrize("composite", ["epsilon-plus-flat", "epsilon-gamma-box"])
def test_zoo_explainers_state_every_attribute(zoo_models, composite, target_runtime):
    if len(zoo_models) == 1:
        print("only cifar10-lrn: ../shared/data is absent")
    for name, path in zoo_models.items():
        for exact in (False, True) if name.startswith("cifar10") else (False,):  # within-channel LRN functions
            ex = lrponnx.convert(str(path), composite=composite, target_runtime=target_runtime, exact_forward=exact)
            assert missing_attributes(ex) == [], (name, exact)
            assert {p.key: p.value for p in ex.metadata_props}["lrponnx.target_runtime"] == target_runtime
            refused = webgpu_refusals(ex)
            if target_runtime == "webgpu":
                assert refused == [], (name, exact)
            else:  # the CPU forms are kept for "any": the test can tell the two apart
                assert any("Indices" in r for r in refused), name


def test_model_convolutions_without_attributes_get_them_stated():
    """A model whose Conv and pool give only what ONNX requires: the explainer states the rest,
    and computes the same."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    F = rng.standard_normal((5, 4 * 3 * 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),  # no attribute at all
             helper.make_node("Relu", ["c"], ["h"], name="relu"),
             helper.make_node("MaxPool", ["h"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("AveragePool", ["p"], ["a"], name="avg", kernel_shape=[1, 1]),
             helper.make_node("Flatten", ["a"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "F"], ["logits"], name="fc", transB=1)]
    model = helper.make_model(helper.make_graph(
        nodes, "bare", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(F, "F")]), opset_imports=[helper.make_opsetid("", 17)])
    assert missing_attributes(model)  # the test model really leaves them out
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = session_outputs(model, {"x": x})["logits"]
    for target_runtime in ("any", "webgpu"):
        ex = lrponnx.convert(model, target_runtime=target_runtime)
        assert missing_attributes(ex) == []
        conv = next(n for n in ex.graph.node if n.name == "conv")
        assert _attrs(conv) == dict(kernel_shape=[3, 3], strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
        np.testing.assert_array_equal(session_outputs(ex, {"x": x})["logits"], before)


# ============================================================================ LRN, the banded form

def _uses_banded_conv(explainer: onnx.ModelProto) -> bool:
    return any(n.op_type == "Conv" and "lrn_window" in n.output[0] for n in explainer.graph.node)


@pytest.mark.parametrize("region,n,alpha,beta,k,sign", ISOLATED)
def test_webgpu_lrn_form(region, n, alpha, beta, k, sign):
    """Across channels the window sum is the banded 1x1 Conv; nothing WebGPU refuses. (The numbers
    of both forms are checked against the float64 reference in tests/test_lrn.py.)"""
    shape = [2, 11, 3, 4] if region == "across" else [2, 3, 6, 5]
    model = readout_model(shape, region, n, alpha, beta, k)
    ex = lrponnx.convert(model, composite="epsilon-plus", layer_relevance=True, target_runtime="webgpu")
    assert _uses_banded_conv(ex) == (region == "across") and webgpu_refusals(ex) == []


@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 6, 3, 4, 2)], ids=["rank3", "rank5"])
@pytest.mark.parametrize("symbolic_channels", [False, True], ids=["static", "symbolicC"])
def test_webgpu_lrn_of_other_ranks_and_symbolic_channels(shape, symbolic_channels):
    """Any rank, and a symbolic channel count (then a 2-D pool on the [N, 1, C, L] view)."""
    x = (np.random.default_rng(len(shape)).standard_normal(shape) * 3).astype(np.float32)
    model = readout_model(shape, "across", 3, 0.1, 0.75, 1.0, relu=True)
    if symbolic_channels:
        for v in list(model.graph.input) + list(model.graph.value_info):
            dims = v.type.tensor_type.shape.dim
            if len(dims) == len(shape):
                dims[1].ClearField("dim_value")
                dims[1].dim_param = "C"
    ex = lrponnx.convert(model, composite="epsilon-plus", layer_relevance=True, target_runtime="webgpu")
    assert webgpu_refusals(ex) == [] and _uses_banded_conv(ex) != symbolic_channels
    out = run(ex, {"x": x}, extra=["h", "y"])
    ref = reference(out["h"], out["lrp_out/lrn"], region="across", n=3, alpha=0.1, beta=0.75, k=1.0, lo=1, hi=1)
    assert rel_l2(out["y"], ref["y"]) <= 1e-6
    assert rel_l2(out["lrp_in/lrn/h"], ref["R_in"]) <= TOL


# ============================================================================ max pooling, no Indices
# (the windowed pools of both forms against torch autograd: tests/test_maxpool_wta.py)

@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_webgpu_global_max_pool_is_the_gradient(ties):
    shape = (2, 3, 5, 4)
    rng = np.random.default_rng(3)
    x = (rng.integers(-1, 2, shape) if ties else rng.standard_normal(shape)).astype(np.float32)
    W = rng.standard_normal((4, 3)).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("GlobalMaxPool", ["x"], ["y"], name="pool"),
         helper.make_node("Flatten", ["y"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "W"], ["logits"], name="fc", transB=1)], "gmp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 4])], [numpy_helper.from_array(W, "W")]),
        opset_imports=[helper.make_opsetid("", 17)])
    ex = lrponnx.convert(model, composite="epsilon-plus", layer_relevance=True, target_runtime="webgpu")
    assert webgpu_refusals(ex) == [] and "ScatterElements" not in [n.op_type for n in ex.graph.node]
    out = session_outputs(ex, {"x": x})
    R_out = out["lrp_out/pool"]
    _, ref = torch_wta(x.astype(np.float64), R_out.astype(np.float64), shape[2:], (1, 1), (0, 0, 0, 0), 0, (1, 1))
    np.testing.assert_allclose(out["lrp_in/pool/x"], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


# ============================================================================ the zoo, option, CLI

def test_webgpu_forms_agree_with_the_cpu_forms_on_the_zoo(zoo_models):
    """Both forms are exact: the zoo explainers' relevance agrees to float rounding (1e-6)."""
    for name, path in zoo_models.items():
        for composite in ("epsilon-plus-flat", "epsilon-gamma-box"):
            r = {}
            for tr in ("any", "webgpu"):
                ex = lrponnx.convert(str(path), composite=composite, target_runtime=tr)
                inp = ex.graph.input[0]
                shape = [2] + [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
                x = (np.random.default_rng(0).standard_normal(shape) * 50).astype(np.float32)
                r[tr] = session_outputs(ex, {inp.name: x, "target": np.array([3, -1], np.int64)})["relevance"]
            err = rel_l2(r["webgpu"], r["any"])
            print(f"{name} {composite}: webgpu vs any rel. L2 {err:.1e}")
            assert 0 < np.abs(r["any"]).max() and err <= 1e-6, (name, composite, err)


def test_unknown_target_runtime_is_refused():
    with pytest.raises(RuleError, match="target_runtime must be one of any, webgpu"):
        lrponnx.convert(pool_model((1, 2, 4, 4), (2, 2), (2, 2), (0, 0, 0, 0), 0, (1, 1)), target_runtime="cuda")


def test_cli_target_runtime(tmp_path, capsys):
    src = tmp_path / "pool.onnx"
    onnx.save(pool_model((1, 2, 6, 6), (3, 3), (1, 1), (1, 1, 1, 1), 0, (1, 1)), str(src))
    for tr in ("webgpu", None):
        out = tmp_path / f"{tr}.onnx"
        assert main(["convert", str(src), "-o", str(out)] + (["--target-runtime", tr] if tr else [])) == 0
        ex = onnx.load(str(out))
        assert {p.key: p.value for p in ex.metadata_props}["lrponnx.target_runtime"] == (tr or "any")
        assert bool(webgpu_refusals(ex)) == (tr is None)
    with pytest.raises(SystemExit) as e:
        main(["convert", str(src), "-o", str(tmp_path / "x.onnx"), "--target-runtime", "cuda"])
    assert e.value.code == 2 and not (tmp_path / "x.onnx").exists()
    assert "invalid choice: 'cuda'" in capsys.readouterr().err

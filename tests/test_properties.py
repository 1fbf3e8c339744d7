"""Properties of the explainer that hold whatever the rule details: LRP-0 = gradient x input,
conservation, unchanged predictions, ORT optimisation levels, targets, batch sizes, old opsets,
external data, DAGs, Softmax at the output, a valid model with its metadata."""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import lrponnx

from explainer_feeds import with_target
from reference import (Net, act, add, avgpool, concat, linear, max_rel_l2_per_sample, maxpool, randomize_bn,
                       reshape, single_thread)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Constant folding:UserWarning")]

TOL = 1e-5
LRP0 = ["Conv=epsilon:epsilon=0", "Gemm=epsilon:epsilon=0", "Add=norm:epsilon=0", "AveragePool=norm:epsilon=0"]
X_SHAPE = (3, 3, 8, 8)


# ------------------------------------------------------------------------------------ helpers

COMPOSITE_RULES = {  # (first layer, other convs, dense) of the reference, as the contract's table says
    "epsilon-plus-flat": ("flat", "zplus", ("epsilon", {"epsilon": 1e-6})),
    "epsilon-plus": ("zplus", "zplus", ("epsilon", {"epsilon": 1e-6})),
    "epsilon-alpha2-beta1": (("alpha-beta", {"alpha": 2.0, "beta": 1.0}),) * 2 + (("epsilon", {"epsilon": 1e-6}),),
}


def dag(seed: int = 0, bias: bool = True, composite: str = "epsilon-plus-flat") -> Net:
    """conv - relu - maxpool (overlapping) - residual block (Add) - inception (Concat of a 1x1 conv,
    a padded 3x3 conv and a max-pool branch) - avgpool - flatten - linear - relu - linear.
    The reference's rules are those of ``composite`` (c1 is the only first layer)."""
    first, conv, dense = COMPOSITE_RULES[composite]
    torch.manual_seed(seed)
    net = Net([
        linear("c1", "input", nn.Conv2d(3, 4, 3, padding=1, bias=bias), first),
        act("r1", "c1", nn.ReLU()),
        maxpool("p1", "r1", nn.MaxPool2d(3, stride=2, padding=1)),
        linear("c2", "p1", nn.Conv2d(4, 4, 3, padding=1, bias=bias), conv),
        act("r2", "c2", nn.ReLU()),
        linear("c3", "r2", nn.Conv2d(4, 4, 3, padding=1, bias=bias), conv),
        add("res", ["c3", "p1"]),
        act("r3", "res", nn.ReLU()),
        linear("b1", "r3", nn.Conv2d(4, 2, 1, bias=bias), conv),
        linear("b2", "r3", nn.Conv2d(4, 3, 3, padding=1, bias=bias), conv),
        maxpool("b3", "r3", nn.MaxPool2d(3, stride=1, padding=1)),
        concat("cat", ["b1", "b2", "b3"]),
        act("r4", "cat", nn.ReLU()),
        avgpool("ap", "r4", nn.AvgPool2d(2)),
        reshape("f", "ap"),
        linear("d1", "f", nn.Linear(9 * 2 * 2, 12, bias=bias), dense),
        act("r5", "d1", nn.ReLU()),
        linear("d2", "r5", nn.Linear(12, 5, bias=bias), dense),
    ])
    return net


def x_mixed(shape=X_SHAPE, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def export(net: Net, x: np.ndarray, *, opset: int = 17, dynamic_batch: bool = False) -> onnx.ModelProto:
    f = io.BytesIO()
    kw = dict(dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}) if dynamic_batch else {}
    torch.onnx.export(copy.deepcopy(net).float().eval(), (torch.as_tensor(x),), f, dynamo=False,
                      opset_version=opset, input_names=["input"], output_names=["output"], **kw)
    return onnx.load_from_string(f.getvalue())


def session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, x: np.ndarray, target=None, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    sess = session(model, level)
    feeds = with_target(sess, {"input": x}, target)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def grad_x_input(net: Net, x: np.ndarray, target) -> np.ndarray:
    with single_thread():
        n64 = copy.deepcopy(net).double().eval()
        xt = torch.as_tensor(x, dtype=torch.float64).requires_grad_(True)
        logits = n64.activations(xt)[n64.logits]
        sel = logits.gather(1, torch.as_tensor(np.asarray(target), dtype=torch.int64)[:, None]).sum()
        (g,) = torch.autograd.grad(sel, xt)
        return (g * xt).detach().numpy()


def rel(a, b) -> float:
    return max_rel_l2_per_sample(np.asarray(a).reshape(len(b), -1), np.asarray(b).reshape(len(b), -1))


# ------------------------------------------------------------------------------ LRP-0, conservation

@pytest.mark.parametrize("seed", ["logit", "one"])
def test_lrp0_equals_gradient_times_input(seed):
    net = dag()
    x = x_mixed()
    model = export(net, x)
    out = run(lrponnx.convert(model, composite="epsilon-plus", rules=LRP0, seed=seed), x)
    target = out["output"].argmax(1)
    gxi = grad_x_input(net, x, target)
    if seed == "one":  # R = onehot: every relevance is divided by the target logit
        gxi = gxi / net.output64(x)[np.arange(len(x)), target].reshape(-1, 1, 1, 1)
    err = rel(out["relevance"], gxi)
    assert err <= TOL, f"LRP-0 vs gradient x input: {err:.2e}"


def test_lrp0_gradient_times_input_on_mlp_with_given_targets():
    torch.manual_seed(3)
    net = Net([reshape("f", "input"), linear("d1", "f", nn.Linear(12, 20), "epsilon"), act("r", "d1", nn.ReLU()),
               linear("d2", "r", nn.Linear(20, 6), "epsilon")])
    x = x_mixed((4, 3, 2, 2), seed=4)
    out = run(lrponnx.convert(export(net, x), rules=["Gemm=epsilon:epsilon=0"]), x, target=[5, 0, 3, 3])
    assert rel(out["relevance"], grad_x_input(net, x, [5, 0, 3, 3])) <= TOL


@pytest.mark.parametrize("seed", ["logit", "one"])
def test_conservation_without_biases(seed):
    """epsilon with a tiny eps, no biases, pass / norm / winner-take-all ops: sum R = seeded logit."""
    net = dag(seed=7, bias=False)
    x = x_mixed(seed=8)
    # without biases torch exports the dense layers as MatMul
    tiny = ["Conv=epsilon:epsilon=1e-9", "MatMul=epsilon:epsilon=1e-9", "Add=norm:epsilon=1e-9",
            "AveragePool=norm:epsilon=1e-9"]
    target = [1, -1, 4]
    out = run(lrponnx.convert(export(net, x), composite="epsilon-plus", rules=tiny, seed=seed), x, target=target)
    y = net.output64(x)
    t = np.where(np.asarray(target) < 0, y.argmax(1), target)
    want = y[np.arange(len(x)), t] if seed == "logit" else np.ones(len(x))
    got = out["relevance"].astype(np.float64).reshape(len(x), -1).sum(1)
    np.testing.assert_allclose(got, want, rtol=TOL, atol=0)


# --------------------------------------------------------------------------- predictions, ORT levels

def test_explainer_outputs_equal_model_outputs():
    net = dag(seed=11)
    x = x_mixed(seed=12)
    model = export(net, x)
    explainer = lrponnx.convert(model)
    y_model = run(model, x)["output"]
    out = run(explainer, x)
    assert [o.name for o in explainer.graph.output][:2] == ["output", "relevance"]
    assert rel(out["output"], y_model) <= 1e-6


def test_same_numbers_at_every_ort_optimisation_level():
    g = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    net = Net([
        linear("c1", "input", nn.Conv2d(3, 4, 3, padding=1), ("zbox", {"low": -3.0, "high": 3.0}),
               bn=randomize_bn(nn.BatchNorm2d(4), g)),
        act("r1", "c1", nn.ReLU()),
        linear("c2", "r1", nn.Conv2d(4, 4, 3, padding=1), ("gamma", {"gamma": 0.25})),
        act("r2", "c2", nn.ReLU()),
        add("res", ["r2", "r1"]),
        avgpool("ap", "res", nn.AvgPool2d(2)),
        maxpool("mp", "ap", nn.MaxPool2d(2), "proportional"),
        reshape("f", "mp"),
        linear("d", "f", nn.Linear(16, 5), ("epsilon", {"epsilon": 1e-6})),
    ])
    x = x_mixed(seed=14)
    f = io.BytesIO()
    torch.onnx.export(copy.deepcopy(net).eval(), (torch.as_tensor(x),), f, dynamo=False, do_constant_folding=False,
                      input_names=["input"], output_names=["output"])
    explainer = lrponnx.convert(onnx.load_from_string(f.getvalue()), composite="epsilon-gamma-box", low=-3, high=3,
                                rules=["MaxPool=proportional"])
    levels = [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL]
    results = [run(explainer, x, level=lv) for lv in levels]
    base = results[0]
    for lv, r in zip(levels[1:], results[1:]):
        assert rel(r["output"], base["output"]) <= 1e-6, lv
        assert rel(r["relevance"], base["relevance"]) <= 1e-6, lv
    # and it is the reference's answer at every level
    assert rel(base["relevance"], net.relevance(x)) <= TOL


# ------------------------------------------------------------------------------------ targets, batch

def test_target_per_sample_and_argmax_default():
    net = dag(seed=21)
    x = x_mixed((4, 3, 8, 8), seed=22)
    explainer = lrponnx.convert(export(net, x))
    absent = run(explainer, x)
    y = absent["output"]
    argmax = y.argmax(1)
    minus = run(explainer, x, target=[-1, -1, -1, -1])
    explicit = run(explainer, x, target=argmax)
    np.testing.assert_array_equal(absent["relevance"], minus["relevance"])
    np.testing.assert_array_equal(absent["relevance"], explicit["relevance"])
    # a different class per sample: each sample explains its own target
    other = (argmax + 1 + np.arange(4)) % y.shape[1]
    other[2] = -1
    mixed = run(explainer, x, target=other)
    for i in range(4):
        t = other[i] if other[i] >= 0 else argmax[i]
        single = run(explainer, x, target=np.full(4, t))
        np.testing.assert_allclose(mixed["relevance"][i], single["relevance"][i], rtol=0, atol=0)
    assert not np.allclose(mixed["relevance"][0], absent["relevance"][0])
    assert rel(mixed["relevance"], net.relevance(x, target=other)) <= TOL


def test_dynamic_and_fixed_batch():
    net = dag(seed=31)
    x5 = x_mixed((5, 3, 8, 8), seed=32)
    dyn = lrponnx.convert(export(net, x5[:2], dynamic_batch=True))
    assert dyn.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    r5 = run(dyn, x5, target=[0, 1, 2, 3, -1])
    assert r5["relevance"].shape == x5.shape
    assert rel(r5["relevance"], net.relevance(x5, target=[0, 1, 2, 3, -1])) <= TOL
    for i in (0, 4):
        r1 = run(dyn, x5[i:i + 1], target=[[0, 1, 2, 3, -1][i]])
        assert r1["relevance"].shape == (1, 3, 8, 8)
        assert rel(r1["relevance"], r5["relevance"][i:i + 1]) <= 1e-6
    fixed = lrponnx.convert(export(net, x5))
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 5
    assert rel(run(fixed, x5, target=[0, 1, 2, 3, -1])["relevance"], r5["relevance"]) <= 1e-6


# -------------------------------------------------------------------------------------- old opsets

def test_torch_export_at_opset_9_is_upgraded():
    net = dag(seed=41, composite="epsilon-plus")
    x = x_mixed(seed=42)
    model = export(net, x, opset=9)
    assert model.opset_import[0].version == 9
    explainer = lrponnx.convert(model, composite="epsilon-plus")
    assert max(o.version for o in explainer.opset_import if o.domain in ("", "ai.onnx")) >= 17
    out = run(explainer, x)
    assert rel(out["output"], run(model, x)["output"]) <= 1e-6
    assert rel(out["relevance"], net.relevance(x)) <= TOL


@pytest.mark.parametrize("opset", [7, 9])
def test_handbuilt_old_opset_gemm_relu_conv(opset):
    """A Caffe-era graph (Conv, BatchNormalization, Relu, MaxPool, Dropout, Flatten, Gemm) at opset 7/9."""
    rng = np.random.default_rng(50 + opset)
    W1, b1 = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    sc, bi, mu, var = rng.uniform(0.5, 2, 4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    W2, b2 = rng.standard_normal((6, 16)), rng.standard_normal(6)
    W3, b3 = rng.standard_normal((3, 6)), rng.standard_normal(3)
    inits = {"W1": W1, "b1": b1, "sc": sc, "bi": bi, "mu": mu, "var": var, "W2": W2, "b2": b2, "W3": W3, "b3": b3}
    dropout = helper.make_node("Dropout", ["mp"], ["dr"], name="drop", **({"is_test": 1} if opset < 7 else {}))
    nodes = [helper.make_node("Conv", ["input", "W1", "b1"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "sc", "bi", "mu", "var"], ["bn"], name="bn", epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["mp"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             dropout,
             helper.make_node("Flatten", ["dr"], ["fl"], name="flatten", axis=1),
             helper.make_node("Gemm", ["fl", "W2", "b2"], ["g"], name="fc1", transB=1),
             helper.make_node("Relu", ["g"], ["gr"], name="relu2"),
             helper.make_node("Gemm", ["gr", "W3", "b3"], ["output"], name="fc2", transB=1)]
    # IR 3: every initializer is also listed as a graph input (as old exporters wrote them)
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 2, 6, 6])]
                              + [helper.make_tensor_value_info(k, TensorProto.FLOAT, np.shape(v)) for k, v in inits.items()],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    # the same network for the reference, from the same float32 numbers
    conv, bn, fc1, fc2 = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, eps=1e-3).eval(), nn.Linear(16, 6), nn.Linear(6, 3)
    f32 = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in inits.items()}
    with torch.no_grad():
        conv.weight.copy_(f32["W1"]), conv.bias.copy_(f32["b1"])
        bn.weight.copy_(f32["sc"]), bn.bias.copy_(f32["bi"])
        bn.running_mean.copy_(f32["mu"]), bn.running_var.copy_(f32["var"])
        fc1.weight.copy_(f32["W2"]), fc1.bias.copy_(f32["b2"]), fc2.weight.copy_(f32["W3"]), fc2.bias.copy_(f32["b3"])
    net = Net([linear("conv", "input", conv, "flat", bn=bn), act("relu", "conv", nn.ReLU()),
               maxpool("pool", "relu", nn.MaxPool2d(2)), reshape("flatten", "pool"),
               linear("fc1", "flatten", fc1, ("epsilon", {"epsilon": 1e-6})), act("relu2", "fc1", nn.ReLU()),
               linear("fc2", "relu2", fc2, ("epsilon", {"epsilon": 1e-6}))])
    x = x_mixed((2, 2, 6, 6), seed=opset)
    explainer = lrponnx.convert(model)  # default composite: first layer flat
    out = run(explainer, x)
    assert rel(out["output"], net.output64(x)) <= TOL
    assert rel(out["relevance"], net.relevance(x)) <= TOL


# ---------------------------------------------------------------------------------- external data

def test_external_data_model(tmp_path):
    net = dag(seed=61)
    x = x_mixed(seed=62)
    model = export(net, x)
    path = tmp_path / "model.onnx"
    onnx.save(copy.deepcopy(model), str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.data",
              size_threshold=0)
    assert (tmp_path / "model.data").stat().st_size > 0
    assert path.stat().st_size < len(model.SerializeToString())
    from_file = run(lrponnx.convert(path), x)
    from_str = run(lrponnx.convert(str(path)), x)
    in_memory = run(lrponnx.convert(model), x)
    np.testing.assert_array_equal(from_file["relevance"], in_memory["relevance"])
    np.testing.assert_array_equal(from_str["relevance"], in_memory["relevance"])


# ------------------------------------------------------------------------------------- Softmax

@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_at_the_output_is_removed(op):
    net = dag(seed=71)
    x = x_mixed(seed=72)
    logits_model = export(net, x)
    model = copy.deepcopy(logits_model)
    last = model.graph.node[-1]
    last.output[0] = "logits"
    model.graph.node.append(helper.make_node(op, ["logits"], ["output"], name="prob", axis=1))
    explainer = lrponnx.convert(model)
    onnx.checker.check_model(explainer, full_check=True)
    out = run(explainer, x, target=[0, -1, 2])
    y = net.output64(x)
    soft = np.exp(y - y.max(1, keepdims=True))
    soft = soft / soft.sum(1, keepdims=True)
    want = soft if op == "Softmax" else np.log(soft)
    assert rel(out["output"], want) <= TOL
    assert rel(out["output"], run(model, x)["output"]) <= 1e-6
    ref = run(lrponnx.convert(logits_model), x, target=[0, -1, 2])
    np.testing.assert_allclose(out["relevance"], ref["relevance"], rtol=1e-6, atol=1e-7 * np.abs(ref["relevance"]).max())
    meta = {p.key: p.value for p in explainer.metadata_props}
    assert meta["lrponnx.logits"] == "logits"


# -------------------------------------------------------------------------------- checker, metadata

def test_checker_and_metadata():
    net = dag(seed=81)
    x = x_mixed(seed=82)
    model = export(net, x)
    plain = lrponnx.convert(model)
    onnx.checker.check_model(plain, full_check=True)
    assert [o.name for o in plain.graph.output] == ["output", "relevance"]
    assert [i.name for i in plain.graph.input] == ["input", "target"]
    explainer = lrponnx.convert(model, "epsilon-alpha2-beta1", rules=["MaxPool=proportional", "#0=flat"],
                                layer_relevance=True)
    onnx.checker.check_model(explainer, full_check=True)
    meta = {p.key: p.value for p in explainer.metadata_props}
    assert meta["lrponnx.version"] == lrponnx.__version__
    assert meta["lrponnx.composite"] == "epsilon-alpha2-beta1"
    rules = json.loads(meta["lrponnx.rules"])
    by_op = {}
    for node in model.graph.node:
        if node.name in rules:
            by_op.setdefault(node.op_type, set()).add(rules[node.name].split(":")[0])
    first_conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    assert rules[first_conv].startswith("flat")
    assert by_op["Conv"] == {"flat", "alpha-beta"}
    assert any("alpha=2" in r and "beta=1" in r for r in rules.values())
    assert by_op["Gemm"] == {"epsilon"}
    assert by_op["MaxPool"] == {"proportional"}
    assert by_op["Relu"] == {"pass"} and by_op["Add"] == {"norm"}
    # the model's own inputs and outputs come first, unchanged; layer relevance is exposed
    assert [i.name for i in explainer.graph.input][:1] == ["input"]
    names = [o.name for o in explainer.graph.output]
    assert names[0] == "output" and "relevance" in names
    assert any(n.startswith("lrp_out/") for n in names) and any(n.startswith("lrp_in/") for n in names)
    # the caller's model is not modified
    assert all(not n.startswith("lrp") for n in (o.name for o in model.graph.output))

"""The explainer's float32 relevance against the float64 reference (tests/reference.py), rule by rule.

Each case builds a small random network (fixed seeds) from torch modules, exports it to ONNX
(or builds the ONNX by hand with onnx.helper), compiles the explainer with ``rules=[...]``
overrides that reach the rule under test, and requires a relative L2 error <= 1e-5 per sample.
The largest error per rule is printed as a table at the end of the module.
"""
from __future__ import annotations

import copy
import io
from collections import defaultdict

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import lrponnx

from explainer_feeds import with_target
from reference import (Net, act, add, avgpool, concat, linear, max_rel_l2_per_sample, maxpool, pad,
                       randomize_bn, reshape, transpose)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Constant folding:UserWarning")]

TOL = 1e-5
ERRORS: dict[str, float] = defaultdict(float)


@pytest.fixture(scope="module", autouse=True)
def _error_table(request):
    yield
    lines = ["", "max relative L2 error per sample, explainer (float32) vs reference (float64):"]
    width = max((len(k) for k in ERRORS), default=10)
    for k, v in sorted(ERRORS.items()):
        lines.append(f"  {k:<{width}}  {v:.2e}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n".join(lines))
    else:
        print("\n".join(lines))


# --------------------------------------------------------------------------------- harness

def gen(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def inputs(shape, kind: str, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "mixed":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "positive":
        return rng.uniform(0.0, 1.0, shape).astype(np.float32)
    raise ValueError(kind)


def to_onnx(net: Net, x: np.ndarray, *, opset: int = 17, dynamo: bool = False, fold: bool = True,
            dynamic_batch: bool = False) -> onnx.ModelProto:
    net32 = copy.deepcopy(net).float().eval()
    xt = torch.as_tensor(x)
    if dynamo:
        prog = torch.onnx.export(net32, (xt,), dynamo=True, opset_version=max(opset, 18),
                                 input_names=["input"], output_names=["output"], verbose=False)
        return prog.model_proto
    f = io.BytesIO()
    kw = dict(dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}) if dynamic_batch else {}
    torch.onnx.export(net32, (xt,), f, dynamo=False, opset_version=opset, do_constant_folding=fold,
                      input_names=["input"], output_names=["output"], **kw)
    return onnx.load_from_string(f.getvalue())


def run_explainer(explainer: onnx.ModelProto, x: np.ndarray, target=None) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # tiny graphs; spinning thread pools only slow a shared machine down
    sess = ort.InferenceSession(explainer.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = with_target(sess, {sess.get_inputs()[0].name: x.astype(np.float32)}, target)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def check(label: str, net: Net, x: np.ndarray, model: onnx.ModelProto | None = None, *, target=None,
          seed: str = "logit", export: dict | None = None, **convert_kw) -> float:
    """Compile, run, compare outputs and relevance with the reference; record the error."""
    if model is None:
        model = to_onnx(net, x, **(export or {}))
    explainer = lrponnx.convert(model, seed=seed, **convert_kw)
    out = run_explainer(explainer, x, target)
    first_output = explainer.graph.output[0].name
    y_ref = net.output64(x)
    y_err = max_rel_l2_per_sample(out[first_output], y_ref)
    assert y_err <= TOL, f"{label}: the model's forward differs from the reference network ({y_err:.2e})"
    R_ref = net.relevance(x, target=target, seed=seed)
    assert out["relevance"].shape == x.shape
    assert np.all(np.isfinite(out["relevance"]))
    err = max_rel_l2_per_sample(out["relevance"], R_ref)
    ERRORS[label] = max(ERRORS[label], err)
    assert err <= TOL, f"{label}: relative L2 error {err:.2e} > {TOL}"
    return err


# ------------------------------------------------------------------------------- networks

def cnn(rules: dict, seed: int = 0, bias: bool = True) -> Net:
    """conv(pad 1) - relu - conv(stride 2) - relu - flatten - linear - relu - linear. Input [N, 3, 8, 8]."""
    gen(seed)
    return Net([
        linear("c1", "input", nn.Conv2d(3, 6, 3, padding=1, bias=bias), rules.get("c1", "epsilon")),
        act("r1", "c1", nn.ReLU()),
        linear("c2", "r1", nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=bias), rules.get("c2", "epsilon")),
        act("r2", "c2", nn.ReLU()),
        reshape("f", "r2"),
        linear("d1", "f", nn.Linear(8 * 4 * 4, 16, bias=bias), rules.get("d1", "epsilon")),
        act("r3", "d1", nn.ReLU()),
        linear("d2", "r3", nn.Linear(16, 5, bias=bias), rules.get("d2", "epsilon")),
    ])


X_CNN = (3, 3, 8, 8)
EPS = ("epsilon", {"epsilon": 1e-6})


@pytest.mark.parametrize("kind", ["mixed", "positive"])
def test_epsilon(kind):
    net = cnn({})
    check("epsilon", net, inputs(X_CNN, kind), composite="epsilon-plus", rules=["Conv=epsilon", "Gemm=epsilon"])


@pytest.mark.parametrize("kind", ["mixed", "positive"])
def test_epsilon_zero_is_lrp0(kind):
    e0 = ("epsilon", {"epsilon": 0.0})
    net = cnn({"c1": e0, "c2": e0, "d1": e0, "d2": e0})
    check("epsilon (eps=0)", net, inputs(X_CNN, kind), composite="epsilon-plus",
          rules=["Conv=epsilon:epsilon=0", "Gemm=epsilon:epsilon=0"])


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "alpha-beta", "gamma"])
def test_zero_denominators_with_eps_zero(rule):
    """No biases and a zero block in the input: some denominators are exactly 0 and, with eps = 0,
    must give zero relevance (never NaN)."""
    params = {"epsilon": 0.0, **({"alpha": 2.0, "beta": 1.0} if rule == "alpha-beta" else {})}
    r = (rule, params)
    net = cnn({"c1": r, "c2": r, "d1": ("epsilon", {"epsilon": 0.0}), "d2": ("epsilon", {"epsilon": 0.0})},
              seed=4, bias=False)
    x = inputs(X_CNN, "mixed")
    x[:, :, :5, :5] = 0.0
    extra = ",alpha=2,beta=1" if rule == "alpha-beta" else ""
    err = check(f"{rule} (eps=0, exact zero denominators)", net, x, composite="epsilon-plus",
                rules=[f"Conv={rule}:epsilon=0{extra}", "MatMul=epsilon:epsilon=0"])
    assert err <= TOL


def test_epsilon_large_and_dense_epsilon_option():
    big = ("epsilon", {"epsilon": 0.5})
    net = cnn({"c1": big, "c2": big, "d1": ("epsilon", {"epsilon": 0.1}), "d2": ("epsilon", {"epsilon": 0.1})})
    check("epsilon (eps=0.5/0.1)", net, inputs(X_CNN, "mixed"), composite="epsilon-plus", epsilon=0.1,
          rules=["Conv=epsilon:epsilon=0.5"])


@pytest.mark.parametrize("kind", ["mixed", "positive"])
def test_zplus_composite_epsilon_plus(kind):
    net = cnn({"c1": "zplus", "c2": "zplus"})
    check("zplus", net, inputs(X_CNN, kind), composite="epsilon-plus")


@pytest.mark.parametrize("kind", ["mixed", "positive"])
def test_alpha2_beta1_composite(kind):
    ab = ("alpha-beta", {"alpha": 2.0, "beta": 1.0})
    net = cnn({"c1": ab, "c2": ab})
    check("alpha-beta (2,1)", net, inputs(X_CNN, kind), composite="epsilon-alpha2-beta1")


def test_alpha_beta_other_values_on_dense():
    ab = ("alpha-beta", {"alpha": 1.5, "beta": 0.5})
    net = cnn({"c1": ab, "c2": ab, "d1": ab, "d2": ab})
    check("alpha-beta (1.5,0.5)", net, inputs(X_CNN, "mixed"), composite="epsilon-plus",
          rules=["Conv=alpha-beta:alpha=1.5,beta=0.5", "Gemm=alpha-beta:alpha=1.5,beta=0.5"])


def test_alpha2_beta1_flat_composite():
    ab = ("alpha-beta", {"alpha": 2.0, "beta": 1.0})
    net = cnn({"c1": "flat", "c2": ab})
    check("flat", net, inputs(X_CNN, "mixed"), composite="epsilon-alpha2-beta1-flat")


@pytest.mark.parametrize("kind", ["mixed", "positive"])
@pytest.mark.parametrize("g", [0.25, 1.0, 0.02])  # 0.02: below GAMMA_SHORTCUT, n by its own conv
def test_gamma(kind, g):
    gm = ("gamma", {"gamma": g})
    net = cnn({"c1": gm, "c2": gm, "d1": gm})
    rules = ["Conv=gamma"] if g == 0.25 else [f"Conv=gamma:gamma={g}"]
    # put the first dense layer on gamma too, by its node name
    model = to_onnx(net, inputs(X_CNN, kind))
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    check("gamma", net, inputs(X_CNN, kind), model, composite="epsilon-plus",
          rules=rules + [f"{gemms[0]}=gamma:gamma={g}"])


def test_gamma_composite_option():
    """epsilon-gamma-box with gamma=0.5: first conv zbox, other conv gamma(0.5), dense epsilon."""
    gm = ("gamma", {"gamma": 0.5})
    net = cnn({"c1": ("zbox", {"low": -3.0, "high": 3.0}), "c2": gm})
    check("gamma", net, inputs(X_CNN, "mixed"), composite="epsilon-gamma-box", gamma=0.5, low=-3.0, high=3.0)


def _uniform(shape, lo, hi, seed=3):
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


def test_zbox_scalar_by_position():
    net = cnn({"c1": ("zbox", {"low": -1.0, "high": 2.0}), "c2": "zplus"})
    x = _uniform(X_CNN, -1.0, 2.0)
    model = to_onnx(net, x)
    assert model.graph.node[0].op_type == "Conv"
    check("zbox (scalar)", net, x, model, composite="epsilon-plus", rules=["#0=zbox:low=-1,high=2"])


def test_zbox_per_channel():
    lo, hi = [-1.0, -2.0, -0.5], [1.0, 2.0, 3.0]
    net = cnn({"c1": ("zbox", {"low": lo, "high": hi}), "c2": "zplus"})
    x = np.stack([_uniform((3, 1, 8, 8), a, b, seed=i) for i, (a, b) in enumerate(zip(lo, hi))], 1)[:, :, 0]
    check("zbox (per channel)", net, x, composite="epsilon-plus",
          rules=["#0=zbox:low=-1/-2/-0.5,high=1/2/3"])


@pytest.mark.parametrize("per_channel", [False, True])
def test_zbox_raw_units_through_normalisation(per_channel):
    """Bounds in raw input units, mapped through (x - mean) / std in front of the first conv."""
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    raw_lo, raw_hi = ([0.0, -0.1, 0.1], [1.0, 1.2, 0.9]) if per_channel else (0.0, 1.0)
    lo64 = (torch.as_tensor(raw_lo, dtype=torch.float64).reshape(-1) - mean.double().reshape(-1)) / std.double().reshape(-1)
    hi64 = (torch.as_tensor(raw_hi, dtype=torch.float64).reshape(-1) - mean.double().reshape(-1)) / std.double().reshape(-1)
    gen(5)
    net = Net([
        act("sub", "input", lambda t: t - mean.to(t.dtype)),
        act("div", "sub", lambda t: t / std.to(t.dtype)),
        linear("c1", "div", nn.Conv2d(3, 6, 3, padding=1), ("zbox", {"low": lo64.numpy(), "high": hi64.numpy()})),
        act("r1", "c1", nn.ReLU()),
        linear("c2", "r1", nn.Conv2d(6, 8, 3, stride=2, padding=1), ("gamma", {"gamma": 0.25})),
        act("r2", "c2", nn.ReLU()),
        reshape("f", "r2"),
        linear("d1", "f", nn.Linear(8 * 4 * 4, 5), EPS),
    ])
    x = _uniform(X_CNN, 0.0, 1.0)
    model = to_onnx(net, x)
    assert [n.op_type for n in model.graph.node if n.op_type != "Constant"][:3] == ["Sub", "Div", "Conv"]
    check("zbox (raw units via Sub/Div)", net, x, model, composite="epsilon-gamma-box", low=raw_lo, high=raw_hi)


@pytest.mark.parametrize("kind", ["mixed", "positive"])
def test_wsquare(kind):
    net = cnn({"c1": "wsquare", "c2": "wsquare", "d1": "wsquare"})
    model = to_onnx(net, inputs(X_CNN, kind))
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    check("wsquare", net, inputs(X_CNN, kind), model, composite="epsilon-plus",
          rules=["Conv=wsquare", f"{gemms[0]}=wsquare"])


@pytest.mark.parametrize("kind", ["mixed", "positive"])
def test_flat_default_composite(kind):
    """epsilon-plus-flat (the default): first conv flat (padding does not count), other conv zplus."""
    net = cnn({"c1": "flat", "c2": "zplus"})
    check("flat", net, inputs(X_CNN, kind))


def test_flat_on_first_dense_layer():
    gen(7)
    net = Net([
        reshape("f", "input"),
        linear("d1", "f", nn.Linear(12, 10), "flat"),
        act("r1", "d1", nn.ReLU()),
        linear("d2", "r1", nn.Linear(10, 4), EPS),
    ])
    check("flat", net, inputs((4, 3, 2, 2), "mixed"))


# -- geometry: ConvTranspose, Conv1d, Conv3d, groups, dilation, stride remainders -------------

CT_RULES = ["epsilon", "zplus", "alpha-beta", "gamma", "wsquare", "flat"]


def _rule_tuple(name):
    return {"alpha-beta": ("alpha-beta", {"alpha": 2.0, "beta": 1.0})}.get(name, (name, {}))


@pytest.mark.parametrize("rule", CT_RULES)
def test_convtranspose(rule):
    g = gen(11)
    net = Net([
        linear("c1", "input", nn.Conv2d(3, 4, 3, stride=2, padding=1), "zplus"),
        act("r1", "c1", nn.ReLU()),
        linear("ct", "r1", nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
               _rule_tuple(rule), bn=randomize_bn(nn.BatchNorm2d(6), g)),
        act("r2", "ct", nn.ReLU()),
        linear("c3", "r2", nn.Conv2d(6, 2, 3, stride=2), "zplus"),
        reshape("f", "c3"),
        linear("d", "f", nn.Linear(2 * 3 * 3, 4), EPS),
    ])
    x = inputs((2, 3, 7, 7), "mixed")
    model = to_onnx(net, x, fold=False)
    assert "BatchNormalization" in [n.op_type for n in model.graph.node]
    check(f"{rule} (ConvTranspose+BN)", net, x, model, composite="epsilon-plus", rules=[f"ConvTranspose={rule}"])


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "alpha-beta", "gamma", "flat", "wsquare"])
def test_conv1d_groups_dilation(rule):
    gen(12)
    net = Net([
        linear("c1", "input", nn.Conv1d(2, 4, 3, dilation=2, padding=2), _rule_tuple(rule)),
        act("r1", "c1", nn.LeakyReLU(0.1)),
        linear("c2", "r1", nn.Conv1d(4, 6, 3, stride=2, groups=2), _rule_tuple(rule)),  # 12 -> 5: remainder
        act("r2", "c2", nn.Tanh()),
        reshape("f", "r2"),
        linear("d", "f", nn.Linear(30, 3), EPS),
    ])
    check(f"{rule} (Conv1d)", net, inputs((3, 2, 12), "mixed"), composite="epsilon-plus", rules=[f"Conv={rule}"])


@pytest.mark.parametrize("rule", ["zplus", "gamma", "flat"])
def test_conv3d(rule):
    gen(13)
    net = Net([
        linear("c1", "input", nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(0, 1, 1)), _rule_tuple(rule)),
        act("r1", "c1", nn.Sigmoid()),
        reshape("f", "r1"),
        linear("d", "f", nn.Linear(3 * 2 * 3 * 5, 3), EPS),
    ])
    check(f"{rule} (Conv3d)", net, inputs((2, 2, 3, 4, 4), "mixed"), composite="epsilon-plus",
          rules=[f"Conv={rule}"])


# -- BatchNorm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mixed", "positive"])
def test_batchnorm_folded_and_elsewhere(kind):
    g = gen(21)
    net = Net([
        act("bn0", "input", randomize_bn(nn.BatchNorm2d(3), g)),            # BN elsewhere: pass
        linear("c1", "bn0", nn.Conv2d(3, 6, 3, padding=1), "zplus", bn=randomize_bn(nn.BatchNorm2d(6), g)),
        act("r1", "c1", nn.ReLU()),
        act("bn1", "r1", randomize_bn(nn.BatchNorm2d(6), g)),              # after a ReLU: pass
        linear("c2", "bn1", nn.Conv2d(6, 4, 3, stride=2, bias=False), "zplus",
               bn=randomize_bn(nn.BatchNorm2d(4), g)),
        act("r2", "c2", nn.ReLU()),
        reshape("f", "r2"),
        linear("d1", "f", nn.Linear(4 * 3 * 3, 8), EPS, bn=randomize_bn(nn.BatchNorm1d(8), g)),
        act("r3", "d1", nn.ReLU()),
        linear("d2", "r3", nn.Linear(8, 4), EPS),
    ])
    x = inputs(X_CNN, kind)
    model = to_onnx(net, x, fold=False)
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 5
    check("BN folded + BN elsewhere (pass)", net, x, model, composite="epsilon-plus")


# -- pooling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cip,ceil", [(False, False), (False, True), (True, False), (True, True)])
def test_average_pool(cip, ceil):
    """Padding with count_include_pad 0/1, ceil_mode (10 -> 6: the last window starts in the input
    and runs past the padding; 6 -> 4 likewise, its window covers one pad cell and one beyond)."""
    gen(31)
    net = Net([
        linear("c1", "input", nn.Conv2d(3, 4, 3, padding=1), "epsilon"),
        act("r1", "c1", nn.ReLU()),
        avgpool("p1", "r1", nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=cip, ceil_mode=ceil)),
        linear("c2", "p1", nn.Conv2d(4, 4, 3, padding=1), "epsilon"),
        act("t", "c2", nn.Tanh()),
        avgpool("p2", "t", nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=cip, ceil_mode=ceil)),
        avgpool("gap", "p2", nn.AdaptiveAvgPool2d(1)),
        reshape("f", "gap"),
        linear("d", "f", nn.Linear(4, 3), EPS),
    ])
    x = inputs((3, 3, 10, 10), "mixed")
    model = to_onnx(net, x)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("AveragePool") == 2 and "GlobalAveragePool" in ops
    check(f"avgpool norm (cip={int(cip)}, ceil={int(ceil)})", net, x, model, composite="epsilon-plus",
          rules=["Conv=epsilon"])


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_ceil_mode_window_starting_in_padding(pool):
    gen(34)
    m = (nn.AvgPool2d(2, stride=2, padding=1, ceil_mode=True) if pool == "avg"
         else nn.MaxPool2d(2, stride=2, padding=1, ceil_mode=True))
    step = avgpool("p", "r1", m) if pool == "avg" else maxpool("p", "r1", m)
    net = Net([
        linear("c1", "input", nn.Conv2d(3, 4, 2), "epsilon"),
        act("r1", "c1", nn.ReLU()),
        step,
        linear("c2", "p", nn.Conv2d(4, 2, 2), "epsilon"),
        reshape("f", "c2"),
        linear("d", "f", nn.Linear(2 * 2 * 2, 3), EPS),
    ])
    check(f"{pool}pool ceil_mode, window starting in padding", net, inputs((2, 3, 6, 6), "mixed"),
          composite="epsilon-plus", rules=["Conv=epsilon"])


@pytest.mark.parametrize("rule", ["winner-take-all", "proportional"])
@pytest.mark.parametrize("kind", ["mixed", "positive"])
def test_max_pool(rule, kind):
    """Overlapping windows with padding, ceil_mode, GlobalMaxPool. Winner-take-all after a LeakyReLU
    (no ties); proportional after a ReLU (its window sums are then well conditioned: with mixed
    signs a window sum near zero amplifies rounding, and even a float32 reference is off by ~5e-5)."""
    gen(32)
    a = nn.LeakyReLU(0.2) if rule == "winner-take-all" else nn.ReLU()
    net = Net([
        linear("c1", "input", nn.Conv2d(3, 4, 3, padding=1), "zplus"),
        act("r1", "c1", a),
        maxpool("p1", "r1", nn.MaxPool2d(3, stride=2, padding=1), rule),           # overlapping windows
        linear("c2", "p1", nn.Conv2d(4, 5, 2), "zplus"),
        act("r2", "c2", copy.deepcopy(a)),
        maxpool("p2", "r2", nn.MaxPool2d(2, stride=2, ceil_mode=True), rule),      # ceil mode: 5x5 -> 3x3
        maxpool("gmp", "p2", nn.AdaptiveMaxPool2d(1), rule),                        # GlobalMaxPool
        reshape("f", "gmp"),
        linear("d", "f", nn.Linear(5, 3), EPS),
    ])
    x = inputs((3, 3, 11, 11), kind)
    model = to_onnx(net, x)
    # torch exports AdaptiveMaxPool2d(1) as a MaxPool over the whole map: make it GlobalMaxPool
    last = [n for n in model.graph.node if n.op_type == "MaxPool"][-1]
    last.op_type = "GlobalMaxPool"
    del last.attribute[:]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MaxPool") == 2 and "GlobalMaxPool" in ops, ops
    rules = [] if rule == "winner-take-all" else ["MaxPool=proportional", "GlobalMaxPool=proportional"]
    check(f"maxpool {rule}", net, x, model, composite="epsilon-plus", rules=rules)


def test_max_pool_dilation_proportional():
    gen(33)
    net = Net([
        linear("c1", "input", nn.Conv2d(2, 3, 3), "zplus"),
        maxpool("p1", "c1", nn.MaxPool2d(3, stride=2, padding=1, dilation=2), "proportional"),
        reshape("f", "p1"),
        linear("d", "f", nn.Linear(3 * 3 * 3, 3), EPS),
    ])
    check("maxpool proportional", net, inputs((2, 2, 9, 9), "positive"), composite="epsilon-plus",
          rules=["MaxPool=proportional"])


# -- DAG ops: Add, Concat, Pad, Reshape ----------------------------------------------------------

def dag_net(seed=41) -> Net:
    gen(seed)
    return Net([
        linear("c1", "input", nn.Conv2d(3, 4, 3, padding=1), "zplus"),
        act("r1", "c1", nn.ReLU()),
        # residual block
        linear("c2", "r1", nn.Conv2d(4, 4, 3, padding=1), "zplus"),
        act("r2", "c2", nn.ReLU()),
        linear("c3", "r2", nn.Conv2d(4, 4, 3, padding=1), "epsilon"),
        add("res", ["c3", "r1"]),
        act("r3", "res", nn.ReLU()),
        # inception: 1x1, padded 3x3, max-pool branch
        linear("b1", "r3", nn.Conv2d(4, 2, 1), "zplus"),
        pad("pd", "r3", [1, 2, 0, 1]),
        linear("b2", "pd", nn.Conv2d(4, 3, (2, 4)), "zplus"),
        maxpool("b3", "r3", nn.MaxPool2d(3, stride=1, padding=1)),
        concat("cat", ["b1", "b2", "b3"], dim=1),
        act("r4", "cat", nn.ReLU()),
        # e1 + e2 + e2: torch exports two binary Adds, so the reference has two norm steps
        linear("e1", "r4", nn.Conv2d(9, 3, 1), "epsilon"),
        linear("e2", "r4", nn.Conv2d(9, 3, 1), "epsilon"),
        add("s1", ["e1", "e2"]),
        add("s2", ["s1", "e2"]),
        reshape("f", "s2", lambda t: t.reshape(t.shape[0], -1)),
        linear("d", "f", nn.Linear(3 * 6 * 6, 4), EPS),
    ])


def siblings_net(seed=43) -> Net:
    """Four convolutions reading the same tensor (an inception block's stem): three 1x1 with
    different rules, one padded 3x3; their VJPs into r1 are merged by geometry."""
    gen(seed)
    return Net([
        linear("c1", "input", nn.Conv2d(3, 5, 3, padding=1), "zplus"),
        act("r1", "c1", nn.ReLU()),
        linear("a", "r1", nn.Conv2d(5, 4, 1), "zplus"),
        linear("b", "r1", nn.Conv2d(5, 3, 1), ("gamma", {"gamma": 0.25})),
        linear("c", "r1", nn.Conv2d(5, 2, 1), "epsilon"),
        linear("d", "r1", nn.Conv2d(5, 3, 3, padding=1), "zplus"),
        concat("cat", ["a", "b", "c", "d"], dim=1),
        act("r2", "cat", nn.ReLU()),
        reshape("f", "r2", lambda t: t.reshape(t.shape[0], -1)),
        linear("fc", "f", nn.Linear(12 * 6 * 6, 4), EPS),
    ])


@pytest.mark.parametrize("kind", ["mixed", "positive"])
def test_sibling_vjps_merged(kind):
    net = siblings_net()
    x = inputs((2, 3, 6, 6), kind)
    model = to_onnx(net, x)
    conv = {w: n.name for n in model.graph.node if n.op_type == "Conv" for w in n.input[1:2]}
    by_step = {}
    for t in model.graph.initializer:
        for step in "abcd":
            if numpy_helper.to_array(t).tobytes() == net.mods[step].weight.detach().float().numpy().tobytes():
                by_step[step] = conv[t.name]
    rules = [f"{by_step['a']}=zplus", f"{by_step['b']}=gamma:gamma=0.25", f"{by_step['c']}=epsilon",
             f"{by_step['d']}=zplus"]
    explainer = lrponnx.convert(model, composite="epsilon-plus", rules=rules)
    merged = [n for n in explainer.graph.node if n.output[0].startswith("lrp/vjp_merged")]
    assert len(merged) == 1  # a, b (both halves) and c: five W^T q in one convolution
    check("VJPs merged across sibling layers", net, x, model, composite="epsilon-plus", rules=rules)


def _constant_pads(model: onnx.ModelProto, pads: list[int]) -> onnx.ModelProto:
    """torch exports F.pad's pads as a small constant subgraph (ConstantOfShape, Slice, ...);
    replace it by an initializer so that shape inference sees the Pad's output shape."""
    node = next(n for n in model.graph.node if n.op_type == "Pad")
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(pads, np.int64), "pads_const"))
    node.input[1] = "pads_const"
    return model


@pytest.mark.parametrize("kind", ["mixed", "positive"])
def test_add_concat_pad_reshape(kind):
    net = dag_net()
    x = inputs((2, 3, 6, 6), kind)
    # torch pads (W: 1, 2; H: 0, 1) as ONNX begins [N, C, H, W] then ends
    model = _constant_pads(to_onnx(net, x), [0, 0, 0, 1, 0, 0, 1, 2])
    ops = [n.op_type for n in model.graph.node]
    assert {"Add", "Concat", "Pad", "Reshape"} <= set(ops), ops
    rules = [f"{n.name}=epsilon" for n in model.graph.node if n.op_type == "Conv"
             and n.output[0] in _conv_outputs_named(model, net, ["c3", "e1", "e2"])]
    check("add norm + concat + pad + reshape", net, x, model, composite="epsilon-plus", rules=rules)


def _conv_outputs_named(model, net, names):
    """Outputs of the Conv nodes that come from the reference steps ``names`` (matched by weight)."""
    weights = {numpy_helper.to_array(t).tobytes(): t.name for t in model.graph.initializer}
    wanted = set()
    for nm in names:
        w = net.mods[nm].weight.detach().float().numpy().tobytes()
        wanted.add(weights[w])
    return {n.output[0] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in wanted}


def test_pad_with_torch_exported_pads():
    net = dag_net()
    x = inputs((2, 3, 6, 6), "mixed")
    model = to_onnx(net, x)  # pads come from torch's constant subgraph, folded by lrponnx
    assert "ConstantOfShape" in {n.op_type for n in model.graph.node}
    rules = [f"{n.name}=epsilon" for n in model.graph.node if n.op_type == "Conv"
             and n.output[0] in _conv_outputs_named(model, net, ["c3", "e1", "e2"])]
    check("add norm + concat + pad + reshape", net, x, model, composite="epsilon-plus", rules=rules)


def _insert_after(model: onnx.ModelProto, tensor: str, chain: list) -> onnx.ModelProto:
    """Insert a chain of single-input nodes ``[(op_type, attrs), ...]`` behind ``tensor``; its
    readers read the chain's end instead."""
    g = model.graph
    readers = [n for n in g.node if tensor in n.input]
    new, src = [], tensor
    for i, (op, attrs) in enumerate(chain):
        dst = f"{tensor}_{op.lower()}_{i}"
        new.append(helper.make_node(op, [src], [dst], name=f"inserted_{op}_{i}", **attrs))
        src = dst
    for n in readers:
        for k, name in enumerate(n.input):
            if name == tensor:
                n.input[k] = src
    at = next(i for i, n in enumerate(g.node) if tensor in n.output) + 1
    for k, n in enumerate(new):
        g.node.insert(at + k, n)
    return model


def test_pass_ops():
    """PRelu, Elu, Clip, Mul/Add/Sub/Div by constants, Transpose, Unsqueeze, Squeeze, Sigmoid, Flatten,
    plus Identity, Dropout and Cast inserted by hand: all pass the relevance (permuted/reshaped back)."""
    gen(81)
    net = Net([
        linear("c1", "input", nn.Conv2d(3, 4, 3, padding=1), "zplus"),
        act("pr", "c1", nn.PReLU(4, init=0.1)),
        act("el", "pr", nn.ELU()),
        act("cl", "el", nn.Hardtanh(-1.5, 2.0)),
        act("mul", "cl", lambda t: t * 0.5),
        act("addc", "mul", lambda t: t + 0.25),
        act("subc", "addc", lambda t: t - 0.125),
        act("divc", "subc", lambda t: t / 0.75),
        transpose("tr", "divc", [0, 1, 3, 2]),
        linear("c2", "tr", nn.Conv2d(4, 5, (3, 2)), "zplus"),          # non-square: the transpose matters
        act("sg", "c2", nn.Sigmoid()),
        reshape("us", "sg", lambda t: t.unsqueeze(2)),
        reshape("sq", "us", lambda t: t.squeeze(2)),
        reshape("f", "sq"),
        linear("d", "f", nn.Linear(5 * 6 * 7, 3), EPS),
    ])
    x = inputs(X_CNN, "mixed")
    model = to_onnx(net, x)
    sig = next(n for n in model.graph.node if n.op_type == "Sigmoid").output[0]
    _insert_after(model, sig, [("Identity", {}), ("Dropout", {}), ("Cast", {"to": TensorProto.FLOAT})])
    ops = {n.op_type for n in model.graph.node}
    want = {"PRelu", "Elu", "Clip", "Mul", "Add", "Sub", "Div", "Transpose", "Unsqueeze", "Squeeze", "Sigmoid",
            "Flatten", "Identity", "Dropout", "Cast"}
    assert want <= ops, want - ops
    check("pass ops (PRelu/Elu/Clip/affine/Transpose/...)", net, x, model, composite="epsilon-plus")


@pytest.mark.parametrize("composite", ["epsilon-plus", "epsilon-plus-flat"])
def test_sum_with_constant_input(composite):
    """Sum(a, b, constant): norm over all three; the constant is a bias and receives nothing.
    Both branches read the input directly, so under epsilon-plus-flat both are first layers (flat)."""
    rng = np.random.default_rng(82)
    W1, W2, W3 = (rng.standard_normal(s).astype(np.float32) for s in ((5, 6), (5, 6), (3, 5)))
    c = rng.standard_normal(5).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["input", "W1"], ["h1"], name="g1", transB=1),
             helper.make_node("Gemm", ["input", "W2"], ["h2"], name="g2", transB=1),
             helper.make_node("Sum", ["h1", "h2", "c"], ["s"], name="sum"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W3"], ["output"], name="g3", transB=1)]
    model = _model(nodes, {"W1": W1, "W2": W2, "W3": W3, "c": c}, [4, 6], [4, 3])
    mods = []
    for W in (W1, W2, W3):
        m = nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.as_tensor(W))
        mods.append(m)
    first = EPS if composite == "epsilon-plus" else "flat"
    net = Net([linear("g1", "input", mods[0], first), linear("g2", "input", mods[1], first),
               add("sum", ["g1", "g2"], const=c), act("relu", "sum", nn.ReLU()), linear("g3", "relu", mods[2], EPS)])
    check("Sum norm with a constant input", net, inputs((4, 6), "mixed"), model, composite=composite)


# -- seeds, targets, softmax -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["logit", "one"])
@pytest.mark.parametrize("target", [None, [2, 0, -1], [4, 4, 1]])
def test_seed_and_target(seed, target):
    net = cnn({"c1": "flat", "c2": "zplus"}, seed=51)
    label = f"seed={seed}, target={'argmax' if target is None else 'given'}"
    check(label, net, inputs(X_CNN, "mixed"), seed=seed, target=target)


def test_softmax_output_is_removed():
    net = cnn({"c1": "flat", "c2": "zplus"}, seed=52)
    net = Net(net.steps, softmax=True)
    x = inputs(X_CNN, "mixed")
    model = to_onnx(net, x)
    assert model.graph.node[-1].op_type == "Softmax"
    check("softmax removed (explains logits)", net, x, model, target=[1, -1, 3])


def test_dynamo_export():
    g = gen(61)
    net = Net([
        linear("c1", "input", nn.Conv2d(3, 4, 3, padding=1), "flat", bn=randomize_bn(nn.BatchNorm2d(4), g)),
        act("r1", "c1", nn.ReLU()),
        maxpool("p1", "r1", nn.MaxPool2d(2)),
        linear("c2", "p1", nn.Conv2d(4, 6, 3), "zplus"),
        act("r2", "c2", nn.ReLU()),
        reshape("f", "r2"),
        linear("d", "f", nn.Linear(6 * 2 * 2, 4), EPS),
    ])
    x = inputs(X_CNN, "mixed")
    model = to_onnx(net, x, dynamo=True)
    check("dynamo export (flat/zplus/wta/epsilon)", net, x, model)


# -- hand-built ONNX: Gemm attributes, MatMul + Add -------------------------------------------------

def _model(nodes, inits, x_shape, y_shape, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "gamma", "alpha-beta", "wsquare", "flat"])
def test_gemm_attributes_and_matmul(rule):
    """Gemm with alpha, beta, transB=0 and a [1, M] bias; MatMul followed by Add of a bias."""
    rng = np.random.default_rng(71)
    B1 = rng.standard_normal((6, 5)).astype(np.float32)        # [K, M] (transB=0)
    C1 = rng.standard_normal((1, 5)).astype(np.float32)
    W2 = rng.standard_normal((5, 3)).astype(np.float32)        # MatMul weight [K, M]
    b2 = rng.standard_normal(3).astype(np.float32)
    alpha, beta = 0.5, 2.0
    nodes = [helper.make_node("Gemm", ["input", "B1", "C1"], ["h"], name="gemm", alpha=alpha, beta=beta),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "W2"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "b2"], ["output"], name="bias")]
    model = _model(nodes, {"B1": B1, "C1": C1, "W2": W2, "b2": b2}, [4, 6], [4, 3])
    l1, l2 = nn.Linear(6, 5), nn.Linear(5, 3)
    with torch.no_grad():  # the reference's own reading of Gemm/MatMul semantics
        l1.weight.copy_(torch.as_tensor(alpha * B1.astype(np.float64).T))
        l1.bias.copy_(torch.as_tensor(beta * C1.astype(np.float64).reshape(-1)))
        l2.weight.copy_(torch.as_tensor(W2.astype(np.float64).T))
        l2.bias.copy_(torch.as_tensor(b2.astype(np.float64)))
    net = Net([linear("gemm", "input", l1.double(), _rule_tuple(rule)), act("relu", "gemm", nn.ReLU()),
               linear("matmul", "relu", l2.double(), _rule_tuple(rule))])
    check(f"{rule} (Gemm alpha/beta/transB=0, MatMul+Add)", net, inputs((4, 6), "mixed"), model,
          composite="epsilon-plus", rules=[f"Gemm={rule}", f"MatMul={rule}"])

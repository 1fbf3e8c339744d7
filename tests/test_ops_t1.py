"""Issue 13 (T1): reductions, elementwise activations, gating products, choosing the explained
output, float64 models.

Each model is a small ONNX graph written with ``onnx.helper`` (random weights, fixed seeds), so every
op arrives exactly as named. The reference is computed here in float64 with torch, independently of
lrponnx's emitter: the forward pass op by op, and the relevance layer by layer with the contract's
formulas (``../shared/docs/lrp-rules.md``): the epsilon rule ``x ⊙ Aᵀ(R / stab(A x + b))`` with the
vector-Jacobian product ``Aᵀ`` from torch autograd, for linear layers *and* for the reductions (a mean
or sum over axes is a linear map without bias: AveragePool's `norm`), ``R_in = R_out`` for the
elementwise activations, and ``R_signal = R_out`` (the gate gets nothing) for gated products.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import lrponnx  # noqa: E402
from lrponnx.errors import InvalidModelError, RuleError, UnsupportedModelError  # noqa: E402

F64 = torch.float64
TOL = 1e-5  # relative L2 per sample


# -- float64 reference --------------------------------------------------------------------------------

def stab(d, eps):
    return d + eps * torch.where(d >= 0, torch.ones_like(d), -torch.ones_like(d))


def eps_rule(fn, x, R, eps):
    """``x ⊙ Aᵀ(R / stab(fn(x)))`` for an affine ``fn`` (bias included in ``fn(x)``)."""
    x = x.detach().clone().requires_grad_(True)
    z = fn(x)
    c, = torch.autograd.grad(z, x, grad_outputs=(R / stab(z.detach(), eps)))
    return (x * c).detach()


def rel_l2(a, b):
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-300)


def seed_relevance(logits, target, seed="logit"):
    onehot = torch.nn.functional.one_hot(torch.as_tensor(target), logits.shape[1]).to(F64)
    onehot = onehot.reshape(logits.shape)
    return onehot * logits if seed == "logit" else onehot


# -- graph helpers ------------------------------------------------------------------------------------

class G:
    """A tiny ONNX graph writer: ``g.node(op, inputs, **attrs)`` returns the output name."""

    def __init__(self, seed=0):
        self.nodes, self.inits, self.k = [], [], 0
        self.rng = np.random.default_rng(seed)

    def name(self, hint):
        self.k += 1
        return f"{hint}_{self.k}"

    def const(self, value, hint="c", dtype=np.float32):
        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def node(self, op, *inputs, outputs=1, **attrs):
        outs = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name("n_" + op), **attrs))
        return outs[0] if outputs == 1 else outs

    def model(self, inputs, outputs, opset=18):
        graph = helper.make_graph(self.nodes, "t1", inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def run(model, feeds, names=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def explain(model, x, target, **kw):
    ex = lrponnx.convert(model, **kw)
    out_names = [o.name for o in ex.graph.output]
    values = run(ex, {"x": x, "target": np.asarray(target, np.int64)})
    return ex, dict(zip(out_names, values))


# -- a conv stem and a dense head shared by the models below -----------------------------------------------

C, K, H, W = 4, 5, 6, 5
#: the dense layer epsilon 1e-6; the conv epsilon 0.05, so that conv outputs near 0 do not make the
#: float32 explainer ill-conditioned (the rules under test come after the conv)
CONV_EPS = 0.05


class Stem:
    """x [N,3,H,W] -> Conv 3x3 (W0, b0) -> ``body`` -> GlobalAveragePool-like ReduceMean -> Gemm."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.W0 = rng.standard_normal((C, 3, 3, 3)).astype(np.float32) * 0.4
        self.b0 = rng.standard_normal(C).astype(np.float32) * 0.1
        self.W1 = rng.standard_normal((K, C)).astype(np.float32)
        self.b1 = rng.standard_normal(K).astype(np.float32) * 0.1

    def conv(self, g, x):
        return g.node("Conv", x, g.const(self.W0, "W0"), g.const(self.b0, "b0"), pads=[1, 1, 1, 1])

    def head(self, g, h):
        pooled = g.node("ReduceMean", h, g.const([2, 3], "axes", np.int64), keepdims=0)
        return g.node("Gemm", pooled, g.const(self.W1, "W1"), g.const(self.b1, "b1"), transB=1)

    def t_conv(self, x):
        return torch.nn.functional.conv2d(x, torch.from_numpy(self.W0).to(F64), torch.from_numpy(self.b0).to(F64),
                                          padding=1)

    def t_head(self, h):
        return self.t_dense(h.mean((2, 3)))

    def t_dense(self, p):
        return p @ torch.from_numpy(self.W1).to(F64).T + torch.from_numpy(self.b1).to(F64)

    def r_head(self, h, R, eps=1e-6, eps_reduce=1e-6):
        """Relevance at h from R at the logits: Gemm epsilon, then ReduceMean norm."""
        p = h.mean((2, 3))
        Rp = eps_rule(self.t_dense, p, R, eps)
        return eps_rule(lambda t: t.mean((2, 3)), h, Rp, eps_reduce)

    def r_conv(self, x, R, eps=CONV_EPS):
        return eps_rule(self.t_conv, x, R, eps)


def inputs(seed=1, n=3):
    return np.random.default_rng(seed).standard_normal((n, 3, H, W)).astype(np.float32)


EPS_ALL = dict(composite="epsilon-plus", rules=[f"Conv=epsilon:epsilon={CONV_EPS}"])


# -- reductions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op,keepdims,opset,symbolic", [
    ("ReduceMean", 1, 18, False), ("ReduceMean", 0, 18, True), ("ReduceMean", 1, 17, False),
    ("ReduceSum", 0, 17, False), ("ReduceSum", 1, 18, True),
])
def test_reductions_are_average_pooling_norm(op, keepdims, opset, symbolic):
    s = Stem(3)
    g = G()
    # symbolic spatial sizes: the mean's count comes from the input's shape at run time (a Conv with
    # symbolic sizes is refused by the linear rules, so that model starts at the ReLU)
    h = g.node("Relu", "x" if symbolic else s.conv(g, "x"))
    if op == "ReduceMean" and opset < 18:
        red = g.node(op, h, axes=[3, -2], keepdims=keepdims)
    else:
        red = g.node(op, h, g.const([-1, 2], "axes", np.int64), keepdims=keepdims)
    flat = g.node("Flatten", red)
    logits = g.node("Gemm", flat, g.const(s.W1, "W1"), g.const(s.b1, "b1"), transB=1)
    shape = ["N", C, "H", "W"] if symbolic else ["N", 3, H, W]
    model = g.model([vi("x", shape)], [vi(logits, ["N", K])], opset=opset)
    x = inputs(4) if not symbolic else np.random.default_rng(4).standard_normal((3, C, 7, 9)).astype(np.float32)
    target = [-1, 2, 0]
    _, out = explain(model, x, target, **(dict(composite="epsilon-plus") if symbolic else EPS_ALL))

    reduce = (lambda t: t.mean((2, 3))) if op == "ReduceMean" else (lambda t: t.sum((2, 3)))
    xt = torch.from_numpy(x).to(F64)
    hh = torch.relu(xt if symbolic else s.t_conv(xt))
    z = s.t_dense(reduce(hh))
    np.testing.assert_allclose(out[logits], z.numpy(), rtol=1e-4, atol=1e-5)
    t = np.where(np.array(target) < 0, z.argmax(1).numpy(), target)
    R = seed_relevance(z, t)
    Rh = eps_rule(reduce, hh, eps_rule(s.t_dense, reduce(hh), R, 1e-6), 1e-6)
    ref = Rh if symbolic else s.r_conv(xt, Rh)
    err = rel_l2(out["relevance"], ref.numpy())
    assert np.all(err <= TOL), err


def test_reduction_epsilon_is_the_rules_stabiliser():
    """``--rule ReduceMean=norm:epsilon=E`` reaches the reduction (and only it)."""
    s = Stem(5)
    g = G()
    h = s.conv(g, "x")  # no ReLU: mixed signs, so the stabiliser matters
    logits = s.head(g, h)
    model = g.model([vi("x", ["N", 3, H, W])], [vi(logits, ["N", K])])
    x = inputs(6)
    _, out = explain(model, x, [1, 1, 1], composite="epsilon-plus",
                     rules=[f"Conv=epsilon:epsilon={CONV_EPS}", "ReduceMean=norm:epsilon=0.5"])
    xt = torch.from_numpy(x).to(F64)
    hh = s.t_conv(xt)
    R = seed_relevance(s.t_head(hh), [1, 1, 1])
    ref = s.r_conv(xt, s.r_head(hh, R, eps_reduce=0.5))
    default = s.r_conv(xt, s.r_head(hh, R))
    assert np.all(rel_l2(ref.numpy(), default.numpy()) > 100 * TOL)  # the option changes the heatmap
    assert np.all(rel_l2(out["relevance"], ref.numpy()) <= TOL)


def test_reduction_over_the_batch_axis_is_refused():
    g = G()
    y = g.node("ReduceMean", "x", g.const([0], "axes", np.int64), keepdims=1)
    logits = g.node("Flatten", y)
    model = g.model([vi("x", [2, 3])], [vi(logits, [1, 3])], opset=18)
    with pytest.raises(UnsupportedModelError, match="batch axis"):
        lrponnx.convert(model)


# -- elementwise activations: identity -----------------------------------------------------------------------

def _t_act(op, attrs):
    F = torch.nn.functional
    return {
        "HardSigmoid": lambda t: torch.clamp(attrs.get("alpha", 0.2) * t + attrs.get("beta", 0.5), 0, 1),
        "HardSwish": F.hardswish,
        "Gelu": F.gelu,
        "Softplus": F.softplus,
        "Softsign": F.softsign,
        "Selu": F.selu,
        "Celu": lambda t: F.celu(t, alpha=1.0),
        "Mish": F.mish,
        "ThresholdedRelu": lambda t: torch.where(t > 1.0, t, torch.zeros_like(t)),
        "Elu": F.elu,
        "LeakyRelu": lambda t: F.leaky_relu(t, 0.01),
        "Sigmoid": torch.sigmoid,
        "Tanh": torch.tanh,
        "Clip": lambda t: torch.clamp(t, 0.0, 6.0),
        "PRelu": lambda t: torch.where(t >= 0, t, 0.25 * t),
    }[op]


ACTS = ["HardSigmoid", "HardSwish", "Gelu", "Softplus", "Softsign", "Selu", "Celu", "Mish", "ThresholdedRelu",
        "Elu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "PRelu"]


@pytest.mark.parametrize("op", ACTS)
def test_elementwise_activations_pass_relevance_unchanged(op):
    s = Stem(7)
    g = G()
    h = s.conv(g, "x")
    if op == "Clip":
        a = g.node("Clip", h, g.const(0.0, "lo"), g.const(6.0, "hi"))
    elif op == "PRelu":
        a = g.node("PRelu", h, g.const(np.full([C, 1, 1], 0.25), "slope"))
    else:
        a = g.node(op, h)
    logits = s.head(g, a)
    model = g.model([vi("x", ["N", 3, H, W])], [vi(logits, ["N", K])], opset=20)
    plan = lrponnx.plan(model)
    unit = next(u for u in plan.units if u.op_type == op)
    assert unit.rule.name == "pass" and not plan.offenders
    x = inputs(8)
    _, out = explain(model, x, [-1, 0, 3], **EPS_ALL)
    xt = torch.from_numpy(x).to(F64)
    hh = s.t_conv(xt)
    aa = _t_act(op, {})(hh)
    z = s.t_head(aa)
    np.testing.assert_allclose(out[logits], z.numpy(), rtol=1e-4, atol=1e-5)
    t = np.where(np.array([-1, 0, 3]) < 0, z.argmax(1).numpy(), [-1, 0, 3])
    Ra = s.r_head(aa, seed_relevance(z, t))
    ref = s.r_conv(xt, Ra)  # the activation hands Ra to the conv's output unchanged
    assert np.all(rel_l2(out["relevance"], ref.numpy()) <= TOL)


# -- gating: signal takes all ------------------------------------------------------------------------------------

def _se_gate(g, s, h, rng):
    """squeeze-excitation: Sigmoid(Conv(Relu(Conv(ReduceMean(h)))))"""
    Wa = rng.standard_normal((2, C, 1, 1)).astype(np.float32)
    Wb = rng.standard_normal((C, 2, 1, 1)).astype(np.float32)
    p = g.node("ReduceMean", h, g.const([2, 3], "axes", np.int64), keepdims=1)
    q = g.node("Relu", g.node("Conv", p, g.const(Wa, "Wa")))
    gate = g.node("Sigmoid", g.node("Conv", q, g.const(Wb, "Wb")))

    def t_gate(t):
        pp = t.mean((2, 3), keepdim=True)
        qq = torch.relu(torch.nn.functional.conv2d(pp, torch.from_numpy(Wa).to(F64)))
        return torch.sigmoid(torch.nn.functional.conv2d(qq, torch.from_numpy(Wb).to(F64)))
    return gate, t_gate


GATINGS = ["se", "se-gate-first", "silu", "hardswish-written", "hardsigmoid-clip", "gelu-erf", "layer-scale"]


@pytest.mark.parametrize("kind", GATINGS)
def test_gated_products_signal_takes_all(kind):
    s = Stem(11)
    g = G()
    rng = np.random.default_rng(12)
    h = s.conv(g, "x")
    F = torch.nn.functional
    if kind in ("se", "se-gate-first"):
        gate, t_gate = _se_gate(g, s, h, rng)
        y = g.node("Mul", gate, h) if kind == "se-gate-first" else g.node("Mul", h, gate)
        t_y = lambda t: t * t_gate(t)  # noqa: E731
        signal, via = h, "Sigmoid"
    elif kind == "silu":
        y = g.node("Mul", h, g.node("Sigmoid", h))
        t_y, signal, via = F.silu, h, "Sigmoid"
    elif kind == "hardswish-written":
        y = g.node("Mul", g.node("HardSigmoid", h, alpha=1 / 6, beta=0.5), h)
        t_y, signal, via = F.hardswish, h, "HardSigmoid"
    elif kind == "hardsigmoid-clip":  # x * Clip(x + 3, 0, 6) / 6
        c = g.node("Clip", g.node("Add", h, g.const(3.0, "three")), g.const(0.0, "lo"), g.const(6.0, "hi"))
        y = g.node("Mul", h, g.node("Div", c, g.const(6.0, "six")))
        t_y, signal, via = F.hardswish, h, "Clip"
    elif kind == "gelu-erf":  # torch's TorchScript export of GELU
        e = g.node("Erf", g.node("Div", h, g.const(np.sqrt(2.0), "sqrt2")))
        y = g.node("Mul", g.node("Mul", h, g.node("Add", e, g.const(1.0, "one"))), g.const(0.5, "half"))
        t_y, signal, via = F.gelu, h, "Erf"
    else:  # layer scale: a product with a constant [C, 1, 1]
        gamma = rng.uniform(0.1, 2.0, (C, 1, 1)).astype(np.float32)
        y = g.node("Mul", g.const(gamma, "gamma"), h)
        t_y, signal, via = (lambda t: t * torch.from_numpy(gamma).to(F64)), h, None
    logits = s.head(g, y)
    model = g.model([vi("x", ["N", 3, H, W])], [vi(logits, ["N", K])])

    plan = lrponnx.plan(model)
    assert not plan.offenders
    muls = [u for u in plan.units if u.op_type == "Mul" and len(u.inputs) == 2]
    if via is None:
        assert not muls and [u.rule.name for u in plan.units if u.op_type == "Mul"] == ["pass"]
    else:
        assert [u.rule.name for u in muls] == ["signal-takes-all"]
        note = " ".join(muls[0].notes)
        assert f"signal {signal!r}" in note and f"through {via}" in note, note

    x = inputs(13)
    target = [-1, 4, 1]
    _, out = explain(model, x, target, **EPS_ALL)
    xt = torch.from_numpy(x).to(F64)
    hh = s.t_conv(xt)
    yy = t_y(hh)
    z = s.t_head(yy)
    np.testing.assert_allclose(out[logits], z.numpy(), rtol=1e-4, atol=1e-5)
    t = np.where(np.array(target) < 0, z.argmax(1).numpy(), target)
    Ry = s.r_head(yy, seed_relevance(z, t))
    ref = s.r_conv(xt, Ry)  # R_h = R_y: the gate (and its SE branch) gets nothing
    assert np.all(rel_l2(out["relevance"], ref.numpy()) <= TOL)


def test_inspect_shows_the_gate_decision(tmp_path):
    s = Stem(1)
    g = G()
    h = s.conv(g, "x")
    y = g.node("Mul", g.node("Sigmoid", h), h)
    model = g.model([vi("x", ["N", 3, H, W])], [vi(s.head(g, y), ["N", K])])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    r = subprocess.run([sys.executable, "-m", "lrponnx.app.cli", "inspect", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "signal-takes-all" in ln)
    assert f"signal {h!r}" in line and "gets no relevance" in line
    # the gate's branch receives no relevance, so it is not listed on the relevance path
    rows = r.stdout.split("explained output")[0].splitlines()[1:]
    assert [row.split()[2] for row in rows if row.strip()] == ["Conv", "Mul", "ReduceMean", "Gemm"], r.stdout


def test_products_without_a_gate_are_refused_by_name():
    s = Stem(2)
    g = G()
    h = s.conv(g, "x")
    a = g.node("Relu", h)
    b = g.node("Tanh", h)  # Tanh is no gate
    y = g.node("Mul", a, b)
    sq = g.node("Mul", y, y)
    model = g.model([vi("x", ["N", 3, H, W])], [vi(s.head(g, sq), ["N", K])])
    with pytest.raises(UnsupportedModelError) as e:
        lrponnx.convert(model)
    msg = str(e.value)
    assert "square of an activation" in msg


def test_both_gates_refused():
    s = Stem(2)
    g = G()
    h = s.conv(g, "x")
    y = g.node("Mul", g.node("Sigmoid", h), g.node("HardSigmoid", h))
    model = g.model([vi("x", ["N", 3, H, W])], [vi(s.head(g, y), ["N", K])])
    with pytest.raises(UnsupportedModelError, match="both operands are gates"):
        lrponnx.convert(model)
    g = G()
    h = s.conv(g, "x")
    y = g.node("Mul", g.node("Relu", h), g.node("Tanh", h))
    model = g.model([vi("x", ["N", 3, H, W])], [vi(s.head(g, y), ["N", K])])
    with pytest.raises(UnsupportedModelError, match="neither is a gate"):
        lrponnx.convert(model)


def test_rule_overrides_per_op_type():
    s = Stem(4)
    g = G()
    h = s.conv(g, "x")
    y = g.node("Mul", h, g.node("Sigmoid", h))
    a = g.node("HardSwish", y)
    model = g.model([vi("x", ["N", 3, H, W])], [vi(s.head(g, a), ["N", K])])
    lrponnx.convert(model, rules=["Mul=signal-takes-all", "HardSwish=pass", "ReduceMean=norm"])
    with pytest.raises(UnsupportedModelError, match="use signal-takes-all"):
        lrponnx.convert(model, rules=["Mul=pass"])
    with pytest.raises(RuleError, match="allowed: pass"):
        lrponnx.convert(model, rules=["HardSwish=zplus"])
    with pytest.raises(RuleError, match="allowed: norm"):
        lrponnx.convert(model, rules=["ReduceMean=pass"])


# -- choosing the output -------------------------------------------------------------------------------------

def _heads_model(softmax_prob=True, class_map=False):
    """MTCNN-like: a shared trunk and three heads: box [N,4], landmarks [N,10], prob [N,2]."""
    s = Stem(21)
    g = G()
    h = g.node("Relu", s.conv(g, "x"))
    p = g.node("ReduceMean", h, g.const([2, 3], "axes", np.int64), keepdims=0)
    rng = np.random.default_rng(22)
    outs = {}
    for name, k in (("box", 4), ("landmarks", 10), ("prob", 2)):
        Wk = rng.standard_normal((k, C)).astype(np.float32)
        z = g.node("Gemm", p, g.const(Wk, "W" + name), transB=1)
        outs[name] = (z, Wk)
    nodes_out = {n: z for n, (z, _) in outs.items()}
    if softmax_prob:
        g.nodes.append(helper.make_node("Softmax", [nodes_out["prob"]], ["prob"], axis=1, name="prob_softmax"))
    else:
        g.nodes.append(helper.make_node("Identity", [nodes_out["prob"]], ["prob"], name="prob_id"))
    for n in ("box", "landmarks"):
        g.nodes.append(helper.make_node("Identity", [nodes_out[n]], [n], name=n + "_id"))
    model = g.model([vi("x", ["N", 3, H, W])], [vi("box", ["N", 4]), vi("landmarks", ["N", 10]),
                                                 vi("prob", ["N", 2])])
    return model, s, outs


def _heads_reference(s, Wk, x, target):
    xt = torch.from_numpy(x).to(F64)
    hh = torch.relu(s.t_conv(xt))
    p = hh.mean((2, 3))
    Wt = torch.from_numpy(Wk).to(F64)
    z = p @ Wt.T
    t = np.where(np.array(target) < 0, z.argmax(1).numpy(), target)
    Rp = eps_rule(lambda v: v @ Wt.T, p, seed_relevance(z, t), 1e-6)
    Rh = eps_rule(lambda v: v.mean((2, 3)), hh, Rp, 1e-6)
    return z.numpy(), s.r_conv(xt, Rh).numpy(), t


def test_default_output_is_the_only_softmax_head():
    model, s, outs = _heads_model()
    x = inputs(30)
    ex, out = explain(model, x, [-1, 0, 1], **EPS_ALL)
    meta = {p.key: p.value for p in ex.metadata_props}
    assert meta["lrponnx.output"] == "prob" and meta["lrponnx.logits"] == outs["prob"][0]
    assert meta["lrponnx.class_count"] == "2"
    z, ref, _ = _heads_reference(s, outs["prob"][1], x, [-1, 0, 1])
    assert np.all(rel_l2(out["relevance"], ref) <= TOL)
    # the Explainer reports the class of the explained head, not of the first output
    res = lrponnx.Explainer(ex).explain(x)
    np.testing.assert_array_equal(res.target, z.argmax(1))


@pytest.mark.parametrize("name", ["box", "landmarks"])
def test_output_chosen_by_name(name, tmp_path):
    model, s, outs = _heads_model()
    x = inputs(31)
    target = [-1, 3, 2]
    ex, out = explain(model, x, target, output=name, **EPS_ALL)
    assert {p.key: p.value for p in ex.metadata_props}["lrponnx.output"] == name
    z, ref, t = _heads_reference(s, outs[name][1], x, target)
    assert np.all(rel_l2(out["relevance"], ref) <= TOL)
    res = lrponnx.Explainer(model, output=name, **EPS_ALL).explain(x, target=target)
    np.testing.assert_array_equal(res.target, t)
    assert np.all(rel_l2(res.relevance, ref) <= TOL)
    # the CLI flag
    src, dst = tmp_path / "m.onnx", tmp_path / "e.onnx"
    onnx.save(model, str(src))
    r = subprocess.run([sys.executable, "-m", "lrponnx.app.cli", "convert", str(src), "-o", str(dst),
                        "--explain-output", name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = {p.key: p.value for p in onnx.load(str(dst)).metadata_props}
    assert meta["lrponnx.output"] == name and meta["lrponnx.class_count"] == str(outs[name][1].shape[0])


def test_several_outputs_without_a_softmax_head_are_refused_with_the_list(tmp_path):
    model, _, _ = _heads_model(softmax_prob=False)
    with pytest.raises(RuleError) as e:
        lrponnx.convert(model)
    msg = str(e.value)
    assert "box [N, 4]" in msg and "landmarks [N, 10]" in msg and "prob [N, 2]" in msg and "--explain-output" in msg
    with pytest.raises(RuleError, match="not an output of the model"):
        lrponnx.convert(model, output="nope")
    src, dst = tmp_path / "m.onnx", tmp_path / "e.onnx"
    onnx.save(model, str(src))
    r = subprocess.run([sys.executable, "-m", "lrponnx.app.cli", "convert", str(src), "-o", str(dst)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and not dst.exists()
    assert r.stderr.startswith("lrponnx: error: the model has 3 outputs") and len(r.stderr.splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "lrponnx.app.cli", "inspect", str(src), "--explain-output", "prob"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "explained output: prob" in r.stdout


@pytest.mark.parametrize("softmax", [False, True])
def test_class_map_n_k_1_1(softmax):
    """Class scores as a [N, K, 1, 1] map (Caffe's fully convolutional heads), optionally followed by a
    Softmax over the channels: explained like [N, K]."""
    s = Stem(41)
    g = G()
    h = g.node("Relu", s.conv(g, "x"))
    p = g.node("ReduceMean", h, g.const([2, 3], "axes", np.int64), keepdims=1)
    Wc = s.W1.reshape(K, C, 1, 1)
    z = g.node("Conv", p, g.const(Wc, "Wc"), g.const(s.b1, "bc"))
    if softmax:
        g.nodes.append(helper.make_node("Softmax", [z], ["prob"], axis=1, name="sm"))
        out = "prob"
    else:
        out = z
    model = g.model([vi("x", ["N", 3, H, W])], [vi(out, ["N", K, 1, 1])])
    x = inputs(42)
    target = [-1, 1, 4]
    ex, res = explain(model, x, target, **EPS_ALL)
    assert {p.key: p.value for p in ex.metadata_props}["lrponnx.logits"] == z
    xt = torch.from_numpy(x).to(F64)
    hh = torch.relu(s.t_conv(xt))
    zz = s.t_dense(hh.mean((2, 3)))
    t = np.where(np.array(target) < 0, zz.argmax(1).numpy(), target)
    # the class map is a 1x1 Conv: it gets the Conv override's epsilon too
    Rh = eps_rule(lambda v: v.mean((2, 3)), hh,
                  eps_rule(s.t_dense, hh.mean((2, 3)), seed_relevance(zz, t), CONV_EPS), 1e-6)
    ref = s.r_conv(xt, Rh)
    assert np.all(rel_l2(res["relevance"], ref.numpy()) <= TOL)
    exp = lrponnx.Explainer(ex).explain(x, target=target)
    np.testing.assert_array_equal(exp.target, t)


def test_spatial_map_output_is_refused_clearly():
    s = Stem(1)
    g = G()
    h = s.conv(g, "x")
    model = g.model([vi("x", ["N", 3, H, W])], [vi(h, ["N", C, H, W])])
    with pytest.raises(UnsupportedModelError, match=r"\[batch, classes, 1, \.\.\., 1\]"):
        lrponnx.convert(model)


# -- float64 -----------------------------------------------------------------------------------------------

def test_float64_model_is_refused_plainly(tmp_path):
    g = G()
    Wd = g.const(np.ones((3, 2)), "W", np.float64)
    y = g.node("MatMul", "x", Wd)
    model = g.model([vi("x", ["N", 3], TensorProto.DOUBLE)], [vi(y, ["N", 2], TensorProto.DOUBLE)])
    with pytest.raises(InvalidModelError, match="float64 models are not supported.*float32"):
        lrponnx.convert(model)
    src, dst = tmp_path / "m.onnx", tmp_path / "e.onnx"
    onnx.save(model, str(src))
    r = subprocess.run([sys.executable, "-m", "lrponnx.app.cli", "convert", str(src), "-o", str(dst)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and not dst.exists() and "float64 models are not supported" in r.stderr
    assert "invalid explainer" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_float64_inside_a_float32_model_is_refused_but_shape_maths_in_float64_is_not():
    s = Stem(3)
    g = G()
    h = s.conv(g, "x")
    d = g.node("Relu", g.node("Cast", h, to=TensorProto.DOUBLE))
    back = g.node("Cast", d, to=TensorProto.FLOAT)
    model = g.model([vi("x", ["N", 3, H, W])], [vi(s.head(g, back), ["N", K])])
    with pytest.raises(InvalidModelError, match="float64 models are not supported"):
        lrponnx.convert(model)
    # the shape of x computed in float64 (as exporters do for resize scales) is no float64 data
    g = G()
    h = s.conv(g, "x")
    shape = g.node("Cast", g.node("Cast", g.node("Shape", h), to=TensorProto.DOUBLE), to=TensorProto.INT64)
    same = g.node("Reshape", h, shape)
    model = g.model([vi("x", ["N", 3, H, W])], [vi(s.head(g, same), ["N", K])])
    lrponnx.convert(model)


# -- conservation ---------------------------------------------------------------------------------------------

def test_conservation_through_the_new_rules():
    """No biases, epsilon -> 0, only pass/norm/signal-takes-all: the input relevance sums to the logit."""
    rng = np.random.default_rng(50)
    g = G()
    W0 = rng.standard_normal((C, 3, 3, 3)).astype(np.float32)
    h = g.node("Conv", "x", g.const(W0, "W0"), pads=[1, 1, 1, 1])
    h = g.node("Mul", h, g.node("Sigmoid", h))                      # SiLU
    gate, _ = _se_gate(g, None, h, rng)
    h = g.node("Mul", h, gate)                                       # squeeze-excitation
    h = g.node("Gelu", g.node("HardSwish", h))
    h = g.node("Mul", h, g.const(rng.uniform(0.5, 2, (C, 1, 1)), "ls"))  # layer scale
    p = g.node("ReduceSum", h, g.const([2, 3], "axes", np.int64), keepdims=0)
    logits = g.node("MatMul", p, g.const(rng.standard_normal((C, K)), "W1"))
    model = g.model([vi("x", ["N", 3, H, W])], [vi(logits, ["N", K])], opset=20)
    x = inputs(51)
    _, out = explain(model, x, [-1, -1, -1], composite="epsilon-plus", epsilon=1e-9,
                     rules=["Conv=epsilon:epsilon=1e-9", "ReduceSum=norm:epsilon=1e-9"])
    z = out[logits].astype(np.float64)
    picked = z[np.arange(3), z.argmax(1)]
    sums = out["relevance"].reshape(3, -1).astype(np.float64).sum(1)
    np.testing.assert_allclose(sums, picked, rtol=1e-4)


def test_metadata_rules_name_the_new_rules():
    s = Stem(1)
    g = G()
    h = s.conv(g, "x")
    y = g.node("Mul", h, g.node("Sigmoid", h))
    model = g.model([vi("x", ["N", 3, H, W])], [vi(s.head(g, y), ["N", K])])
    ex = lrponnx.convert(model)
    rules = json.loads({p.key: p.value for p in ex.metadata_props}["lrponnx.rules"])
    assert sorted(set(rules.values()) & {"signal-takes-all", "norm:epsilon=1e-06"}) == \
        ["norm:epsilon=1e-06", "signal-takes-all"]

"""Parity with Zennit 0.5.1: the same weights, the same composite, the same heatmap.

For each net of :mod:`torch_nets` (VGG-style with BatchNorm, ResNet-style with residual Adds,
inception-style with Concat and AvgPool branches, one with less common conv/pool shapes, an MLP),
each of the five composites (epsilon-gamma-box with scalar and per-channel bounds) and both seeds,
the explainer that lrponnx compiles from the ``torch.onnx.export(..., dynamo=False)`` model must
give the relevance that Zennit computes on the torch model (in float64) to a relative L2 error
of at most 1e-4 per sample.

Zennit set-up (see docs/zennit-parity.md):

- canonizer: :class:`ExactSequentialMergeBatchNorm`, i.e. Zennit's ``SequentialMergeBatchNorm``
  that also sets the neutralised BatchNorm's ``eps`` to 0 while merged. Stock Zennit 0.5.1 leaves
  ``eps`` in place, so each merged BN still divides by ``sqrt(1 + eps)`` and the canonized model
  is not the model (see :func:`test_stock_merge_changes_the_model`);
- residual Adds run as ``zennit.layer.Sum`` modules (:func:`torch_nets.use_zennit_sum`), so
  they get Zennit's ``Norm`` rule like lrponnx's Add;
- seeds: ``attr_output = onehot(target)`` is lrponnx ``seed="one"``,
  ``onehot(target) * logits`` is ``seed="logit"``.

``python tests/test_zennit_parity.py`` prints the table of measured errors for the docs.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("zennit")
ort = pytest.importorskip("onnxruntime")

from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_nets  # noqa: E402

import lrponnx  # noqa: E402

TOL = 1e-4          # relative L2 error per sample, never loosened
BATCH, SIZE, CLASSES = 3, 32, 10
NETS = ("vgg_bn", "resnet", "inception", "mixed", "mlp")
FIRST = {"mlp": ("fc.0", "Gemm")}   # the first layer of each net (module, ONNX op): conv0.0 / Conv if absent
COMPOSITES = ("epsilon-plus", "epsilon-plus-flat", "epsilon-alpha2-beta1", "epsilon-alpha2-beta1-flat",
              "epsilon-gamma-box")
ZENNIT = {"epsilon-plus": EpsilonPlus, "epsilon-plus-flat": EpsilonPlusFlat,
          "epsilon-alpha2-beta1": EpsilonAlpha2Beta1, "epsilon-alpha2-beta1-flat": EpsilonAlpha2Beta1Flat,
          "epsilon-gamma-box": EpsilonGammaBox}
#: zbox bounds in model input units: scalars, and one value per channel
BOUNDS = {"scalar": (-3.0, 3.0), "per-channel": ([-2.5, -2.0, -3.0], [2.0, 3.0, 2.5])}
SEEDS = ("logit", "one")


#: Zennit's BatchNorm merge with the merged BN an exact identity (see torch_nets.exact_merge_batchnorm)
ExactSequentialMergeBatchNorm = torch_nets.exact_merge_batchnorm()


# -- the two sides ----------------------------------------------------------------------------------

class Case:
    """One net: the torch model, its ONNX export, inputs, targets (with -1 = argmax)."""

    def __init__(self, name: str, seed: int = 0):
        self.name = name
        self.model = torch_nets.make_net(name, seed=seed, num_classes=CLASSES, size=SIZE)
        self.onnx = torch_nets.export_onnx(self.model, size=SIZE)
        rng = np.random.default_rng(100 + seed)
        self.x = rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
        self.model64 = copy.deepcopy(self.model).double().eval()
        torch_nets.use_zennit_sum(self.model64, True)
        with torch.no_grad():
            self.logits64 = self.model64(torch.from_numpy(self.x).double()).numpy()
        top2 = np.sort(self.logits64, axis=1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > 1e-3), "argmax too close to a tie for a fair comparison"
        # sample 0: argmax via -1; sample 1: the least likely class (negative logit); sample 2: the
        # runner-up. Not a fixed class: with seed="one" the heatmap scales like 1/logit, and a logit
        # near 0 makes any float32 run ill-conditioned (Zennit's own float32 run included).
        order = np.argsort(self.logits64, axis=1)
        self.target = np.array([-1, order[1, 0], order[2, -2]], dtype=np.int64)[:BATCH]
        self.resolved = np.where(self.target < 0, self.logits64.argmax(axis=1), self.target)
        picked = np.abs(self.logits64[np.arange(BATCH), self.resolved])
        assert np.all(picked >= 0.05 * np.abs(self.logits64).max()), "a target logit is too close to 0"


_CASES: dict[str, Case] = {}


def get_case(name: str) -> Case:
    if name not in _CASES:
        _CASES[name] = Case(name)
    return _CASES[name]


def _session(model: onnx.ModelProto):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def lrponnx_relevance(case: Case, composite: str, seed: str, low=None, high=None, **params):
    kw = dict(low=low, high=high) if composite == "epsilon-gamma-box" else {}
    kw.update(params)
    explainer = lrponnx.convert(onnx.load_from_string(case.onnx), composite, seed=seed, **kw)
    logits, relevance = _session(explainer).run(["logits", "relevance"], {"input": case.x, "target": case.target})
    return logits, relevance


def zennit_relevance(case: Case, composite: str, seed: str, low=None, high=None, canonizer=None, **params):
    canonizers = [(canonizer or ExactSequentialMergeBatchNorm)()]
    if composite == "epsilon-gamma-box":
        def as_tensor(v):
            t = torch.tensor(v, dtype=torch.float64)
            return t.view(1, -1, 1, 1) if t.ndim else t
        comp = ZENNIT[composite](low=as_tensor(low), high=as_tensor(high), canonizers=canonizers, **params)
    else:
        comp = ZENNIT[composite](canonizers=canonizers, **params)
    x = torch.from_numpy(case.x).double().requires_grad_()
    with comp.context(case.model64) as modified:
        out = modified(x)
        onehot = torch.nn.functional.one_hot(torch.from_numpy(case.resolved), out.shape[1]).double()
        attr_output = onehot if seed == "one" else onehot * out.detach()
        relevance, = torch.autograd.grad(out, x, grad_outputs=attr_output)
    return out.detach().numpy(), relevance.numpy()


def relative_errors(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    a = ours.reshape(len(ours), -1).astype(np.float64)
    b = ref.reshape(len(ref), -1).astype(np.float64)
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def _variants():
    for composite in COMPOSITES:
        for bounds in (BOUNDS if composite == "epsilon-gamma-box" else [None]):
            yield composite, bounds


VARIANTS = [pytest.param(c, b, id=c + (f"-{b}" if b else "")) for c, b in _variants()]


# -- tests ------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These nets are tiny: one thread is several times faster than two on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("net", NETS)
def test_nets_exercise_what_they_claim(net):
    """The ops each net is meant to cover reach lrponnx, and both tools see the same first layer."""
    case = get_case(net)
    model = onnx.load_from_string(case.onnx)
    ops = {n.op_type for n in model.graph.node}
    expected = {"vgg_bn": {"Conv", "MaxPool", "BatchNormalization", "Gemm", "Flatten"},
                "resnet": {"Conv", "Add", "MaxPool", "GlobalAveragePool", "Gemm"},
                "inception": {"Conv", "Concat", "AveragePool", "MaxPool", "GlobalAveragePool", "Gemm"},
                "mixed": {"Conv", "ConvTranspose", "BatchNormalization", "AveragePool", "Gemm"},
                "mlp": {"Gemm", "BatchNormalization", "Flatten"}}[net]
    assert expected <= ops, f"{net}: missing {expected - ops}"
    module, op = FIRST.get(net, ("conv0.0", "Conv"))
    # lrponnx: exactly one first layer
    plan = lrponnx.plan(model, "epsilon-plus-flat")
    firsts = [u for u in plan.units if u.first]
    assert len(firsts) == 1 and firsts[0].op_type == op and firsts[0].name.endswith(f"/{module}/{op}"), \
        [u.name for u in firsts]
    # BatchNorm after a linear layer is folded into it; only VGG's BN after a max pool stays (pass)
    kept = [u for u in plan.units if u.op_type == "BatchNormalization"]
    folded = [u for u in plan.units if any("BatchNormalization" in n for n in u.notes)]
    assert len(kept) == (1 if net == "vgg_bn" else 0) and all(u.rule.name == "pass" for u in kept)
    assert len(folded) == (ops_count(model, "BatchNormalization") - len(kept))
    # Zennit: the first Linear/Conv module in module order
    linear = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)
    assert next(n for n, m in case.model.named_modules() if isinstance(m, linear)) == module


def ops_count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("composite,bounds", VARIANTS)
@pytest.mark.parametrize("net", NETS)
def test_matches_zennit(net, composite, bounds, seed):
    case = get_case(net)
    low, high = BOUNDS[bounds] if bounds else (None, None)
    logits, ours = lrponnx_relevance(case, composite, seed, low, high)
    z_logits, ref = zennit_relevance(case, composite, seed, low, high)
    # the canonized Zennit model is the model (and the explainer keeps the model's outputs)
    np.testing.assert_allclose(z_logits, case.logits64, rtol=0, atol=1e-12)
    assert np.max(np.abs(logits - case.logits64)) <= 1e-5 * np.max(np.abs(case.logits64))
    assert ours.shape == case.x.shape and np.all(np.isfinite(ours))
    err = relative_errors(ours, ref)
    assert np.all(err <= TOL), f"{net} {composite} {bounds or ''} seed={seed}: relative L2 errors {err}"


@pytest.mark.parametrize("composite,params", [
    ("epsilon-plus-flat", {"epsilon": 0.25}),
    ("epsilon-gamma-box", {"epsilon": 0.05, "gamma": 0.5}),
], ids=["epsilon", "epsilon-gamma"])
def test_rule_parameters_mean_the_same(composite, params):
    """lrponnx's ``epsilon`` (dense layers' epsilon rule) and ``gamma`` are Zennit's composite arguments."""
    case = get_case("resnet")
    low, high = BOUNDS["scalar"]
    _, ours = lrponnx_relevance(case, composite, "logit", low, high, **params)
    _, ref = zennit_relevance(case, composite, "logit", low, high, **params)
    _, default = zennit_relevance(case, composite, "logit", low, high)
    assert np.all(relative_errors(default, ref) > 100 * TOL)   # the parameters do change the heatmap
    err = relative_errors(ours, ref)
    assert np.all(err <= TOL), err


def test_stock_merge_changes_the_model():
    """Why we do not use stock SequentialMergeBatchNorm: its 'identity' BN divides by sqrt(1 + eps)."""
    case = get_case("vgg_bn")
    stock, _ = zennit_relevance(case, "epsilon-plus", "one", canonizer=SequentialMergeBatchNorm)
    exact, _ = zennit_relevance(case, "epsilon-plus", "one")
    scale = np.max(np.abs(case.logits64))
    assert np.max(np.abs(exact - case.logits64)) <= 1e-12 * scale
    assert np.max(np.abs(stock - case.logits64)) > 1e-6 * scale


class Normalized(torch.nn.Module):
    """``net((x - mean) / std)``: constant input normalisation inside the model."""

    def __init__(self, net):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.net = net

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


@pytest.mark.parametrize("composite", ["epsilon-gamma-box", "epsilon-plus-flat"])
def test_normalisation_inside_the_model(composite):
    """A convention difference: lrponnx passes relevance through ``(x - mean) / std`` (contract:
    Sub/Div by a constant is ``pass``), Zennit takes the gradient, i.e. divides by ``std``. zbox
    bounds are given to lrponnx in raw input units and mapped; Zennit gets them in conv0's units."""
    case = Case.__new__(Case)
    case.model = Normalized(torch_nets.make_net("vgg_bn", seed=1)).eval()
    case.onnx = torch_nets.export_onnx(case.model, size=SIZE)
    case.x = np.random.default_rng(7).uniform(0, 1, (BATCH, 3, SIZE, SIZE)).astype(np.float32)
    case.model64 = copy.deepcopy(case.model).double().eval()
    case.target = np.array([2, 5, 9], dtype=np.int64)
    case.resolved = case.target
    std = case.model64.std.numpy()
    mean = case.model64.mean.numpy()
    low, high = 0.0, 1.0
    _, ours = lrponnx_relevance(case, composite, "one", low, high)
    _, ref = zennit_relevance(case, composite, "one", ((low - mean) / std).reshape(-1).tolist(),
                              ((high - mean) / std).reshape(-1).tolist())
    assert np.all(relative_errors(ours, ref) > 0.5)          # they differ by the factor 1/std
    err = relative_errors(ours, ref * std)
    assert np.all(err <= TOL), err


# -- the table in docs/zennit-parity.md -------------------------------------------------------------

def _table() -> None:  # pragma: no cover - run by hand
    print("| net | composite | zbox bounds | max rel. L2 error, seed=logit | seed=one | "
          "with stock SequentialMergeBatchNorm (max over seeds) |")
    print("|---|---|---|---|---|---|")
    for net in NETS:
        case = get_case(net)
        for composite, bounds in _variants():
            low, high = BOUNDS[bounds] if bounds else (None, None)
            errs, stock = {}, 0.0
            for seed in SEEDS:
                _, ours = lrponnx_relevance(case, composite, seed, low, high)
                errs[seed] = relative_errors(ours, zennit_relevance(case, composite, seed, low, high)[1]).max()
                ref = zennit_relevance(case, composite, seed, low, high, canonizer=SequentialMergeBatchNorm)[1]
                stock = max(stock, relative_errors(ours, ref).max())
            print(f"| {net} | {composite} | {bounds or '-'} | {errs['logit']:.1e} | {errs['one']:.1e} | "
                  f"{stock:.1e} |")


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(1)
    _table()

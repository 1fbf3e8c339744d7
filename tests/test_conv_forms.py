"""The speed forms of ``lrponnx/ops/conv_forms.py`` against the float64 reference (tests/reference.py).

- ``negative_magnitude``: ``x-`` as ``relu(-x)`` through a BatchNormalization with scale -1, the rule
  then using ``-W-``; checked exactly in ONNX Runtime, and through z+ / alpha-beta on mixed-sign
  inputs for convolutions of every geometry (strides 2 and 3, groups, depthwise, dilation, odd sizes,
  asymmetric padding, ConvTranspose) and dense layers (which keep ``Min``).
- ``relu_factored_quotient``: a residual sum followed by a ReLU (ResNet) divided without a sign test;
  relevance vs the reference with eps > 0 and eps = 0, and no sign test left on that sum. Where the
  sum has another reader the plain divide must stay (also checked against the reference).
"""
from __future__ import annotations

import copy
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

import lrponnx
from lrponnx.compiler.builder import GraphBuilder
from lrponnx.ops.conv_forms import negative_magnitude

from explainer_feeds import with_target
from reference import Net, act, add, linear, max_rel_l2_per_sample, pad, reshape, single_thread

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Constant folding:UserWarning")]

TOL = 1e-5


def _run(model: onnx.ModelProto, feeds: dict) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = with_target(sess, feeds)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _export(net: Net, x: np.ndarray) -> onnx.ModelProto:
    f = io.BytesIO()
    torch.onnx.export(copy.deepcopy(net).float().eval(), (torch.as_tensor(x),), f, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    return onnx.load_from_string(f.getvalue())


def _check(net: Net, x: np.ndarray, **convert_kw) -> onnx.ModelProto:
    """The explainer's relevance within TOL of the float64 reference; returns the explainer."""
    explainer = lrponnx.convert(_export(net, x), seed="logit", **convert_kw)
    out = _run(explainer, {"input": x})
    with single_thread():
        ref = net.relevance(x, seed="logit")
    assert np.all(np.isfinite(out["relevance"]))
    err = max_rel_l2_per_sample(out["relevance"], ref)
    assert err <= TOL, f"relative L2 error {err:.2e} > {TOL}"
    return explainer


# -- negative_magnitude ------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [5, None])
def test_negative_magnitude_is_exact(channels):
    """``s * m`` equals ``min(x, 0)`` bit for bit (zeros, tiny and huge values included), and ``m >= 0``."""
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 3, 4])],
                              [])
    g = GraphBuilder(graph)
    m, s = negative_magnitude(g, "x", channels)
    graph.output.append(helper.make_tensor_value_info(m, TensorProto.FLOAT, None))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((2, 5, 3, 4)).astype(np.float32)
    x.flat[:6] = [0.0, -0.0, 1e-38, -1e-38, 3e38, -3e38]
    got = _run(model, {"x": x})[m]
    assert s == (-1.0 if channels else 1.0)
    assert np.array_equal(s * got, np.minimum(x, 0)) and np.all(s * got <= 0)
    ops = [n.op_type for n in model.graph.node]
    assert ops == (["BatchNormalization", "Relu"] if channels else ["Min"])


# Conv geometries on a mixed-sign input [N, 4, 11, 9] (odd sizes; the first layer sees the raw input).
GEOMETRIES = {
    "stride 2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "stride 3, 2x4 kernel": lambda: nn.Conv2d(4, 6, (2, 4), stride=3, padding=(1, 2)),
    "groups 2": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise stride 2": lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),
    "depthwise 5x5 stride 2": lambda: nn.Conv2d(4, 8, 5, stride=2, padding=2, groups=4),
    "dilation 2": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2),
    "convtranspose stride 2": lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
}


def _mixed_net(layer: nn.Module, rule, asym_pad: bool = False) -> Net:
    """[pad] - layer (the rule) - tanh (mixed sign again) - conv 1x1 (the rule) - flatten - linear."""
    torch.manual_seed(0)
    x_shape = (2, 4, 11, 9)
    steps = [pad("p", "input", (1, 0, 2, 1))] if asym_pad else []
    steps += [linear("c1", steps[-1].out if steps else "input", layer, rule), act("t1", "c1", nn.Tanh())]
    with torch.no_grad():
        h = layer(torch.nn.functional.pad(torch.zeros(x_shape), (1, 0, 2, 1)) if asym_pad else torch.zeros(x_shape))
    c = h.shape[1]
    steps += [linear("c2", "t1", nn.Conv2d(c, 5, 1), rule), reshape("f", "c2"),
              linear("d", "f", nn.Linear(5 * h.shape[2] * h.shape[3], 7), "epsilon")]
    return Net(steps)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_zplus_on_mixed_inputs(geometry):
    net = _mixed_net(GEOMETRIES[geometry](), "zplus")
    x = np.random.default_rng(1).standard_normal((2, 4, 11, 9)).astype(np.float32)
    explainer = _check(net, x, composite="epsilon-plus")
    # the form is in use: negated inputs by BatchNormalization, no Min left on the convolutions' inputs
    ops = [n.op_type for n in explainer.graph.node]
    assert ops.count("BatchNormalization") == 2 and "Min" not in ops


def test_zplus_asymmetric_padding():
    """Asymmetric zero padding in front of a strided convolution (exported as Pad + Conv)."""
    net = _mixed_net(nn.Conv2d(4, 6, 3, stride=2), "zplus", asym_pad=True)
    x = np.random.default_rng(2).standard_normal((2, 4, 11, 9)).astype(np.float32)
    _check(net, x, composite="epsilon-plus")


@pytest.mark.parametrize("geometry", ["stride 2", "depthwise 5x5 stride 2", "convtranspose stride 2"])
def test_alpha2_beta1_on_mixed_inputs(geometry):
    """alpha-beta evaluates both parts, each with the other sign's weights on the negated input."""
    ab = ("alpha-beta", {"alpha": 2.0, "beta": 1.0})
    net = _mixed_net(GEOMETRIES[geometry](), ab)
    x = np.random.default_rng(3).standard_normal((2, 4, 11, 9)).astype(np.float32)
    _check(net, x, composite="epsilon-alpha2-beta1")


def test_dense_mixed_input_keeps_min():
    """A dense layer's input has no channel axis for BatchNormalization: Min, same relevance."""
    torch.manual_seed(0)
    net = Net([linear("d1", "input", nn.Linear(10, 8), "zplus"), act("t", "d1", nn.Tanh()),
               linear("d2", "t", nn.Linear(8, 4), "zplus")])
    x = np.random.default_rng(4).standard_normal((3, 10)).astype(np.float32)
    explainer = _check(net, x, composite="epsilon-plus", rules=["Gemm=zplus"])
    ops = [n.op_type for n in explainer.graph.node]
    assert ops.count("Min") == 2 and "BatchNormalization" not in ops


# -- relu_factored_quotient --------------------------------------------------------------------------

def _residual_net(eps: float, second_reader: bool = False) -> Net:
    """conv - relu (y0) - conv (a) - a + y0 - relu - conv - flatten - linear: ResNet's block end.
    ``second_reader``: the sum also feeds a 1x1 conv whose output is added to the last conv's."""
    torch.manual_seed(0)
    steps = [linear("c1", "input", nn.Conv2d(3, 6, 3, padding=1), "zplus"), act("y0", "c1", nn.ReLU()),
             linear("c2", "y0", nn.Conv2d(6, 6, 3, padding=1), "zplus"), add("s", ["c2", "y0"], epsilon=eps),
             act("y", "s", nn.ReLU()), linear("c3", "y", nn.Conv2d(6, 4, 3, stride=2, padding=1), "zplus")]
    last = "c3"
    if second_reader:
        steps += [linear("c4", "s", nn.Conv2d(6, 4, 1, stride=2), "zplus"), add("s2", ["c3", "c4"], epsilon=eps)]
        last = "s2"
    steps += [reshape("f", last), linear("d", "f", nn.Linear(4 * 4 * 4, 5), "epsilon")]
    return Net(steps)


def _sign_tests_on(explainer: onnx.ModelProto, tensor: str) -> list:
    return [n.op_type for n in explainer.graph.node
            if tensor in n.input and n.op_type in ("GreaterOrEqual", "Where", "Equal", "Less", "Greater")]


@pytest.mark.parametrize("eps", [1e-6, 0.0, 0.5])
def test_residual_sum_before_relu(eps):
    net = _residual_net(eps)
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    explainer = _check(net, x, composite="epsilon-plus", rules=[f"Add=norm:epsilon={eps}"])
    sums = [n.output[0] for n in explainer.graph.node if n.op_type == "Add" and not n.name.startswith("lrp")]
    assert len(sums) == 1
    assert _sign_tests_on(explainer, sums[0]) == []
    # the quotient reads the ReLU's output, not the sum
    assert not any(sums[0] in n.input for n in explainer.graph.node if n.op_type == "Div")


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_residual_sum_with_another_reader_keeps_the_sign_test(eps):
    """The relevance of the sum is not a product with its ReLU: the general divide, same numbers."""
    net = _residual_net(eps, second_reader=True)
    x = np.random.default_rng(6).standard_normal((2, 3, 8, 8)).astype(np.float32)
    explainer = _check(net, x, composite="epsilon-plus", rules=[f"Add=norm:epsilon={eps}"])
    first_sum = [n.output[0] for n in explainer.graph.node if n.op_type == "Add" and not n.name.startswith("lrp")][0]
    assert _sign_tests_on(explainer, first_sum)

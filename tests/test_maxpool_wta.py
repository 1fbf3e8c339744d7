"""Max-pool winner-take-all against torch autograd (float64): the gradient of max pooling.

Winner-take-all (a scatter; MaxUnpool where windows never overlap) must equal the gradient of
torch's max pooling with the relevance at the pool's output as the output gradient, including the tie-break (the first maximum in scan order), which
integer inputs exercise on purpose, for 1-D, 2-D and 3-D pools with any kernel, stride, padding,
ceil mode and dilation.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import lrponnx
from explainer_feeds import with_target

# (spatial input size, kernel, strides, pads [begin..., end...], ceil_mode, dilations)
CASES = [
    ((9, 9), (3, 3), (1, 1), (1, 1, 1, 1), 0, (1, 1)),       # inception branch pool
    ((9, 9), (3, 3), (2, 2), (0, 0, 0, 0), 1, (1, 1)),       # Caffe pool, ceil mode
    ((10, 10), (3, 3), (2, 2), (0, 0, 0, 0), 1, (1, 1)),     # ceil adds a partial window
    ((10, 10), (3, 3), (2, 2), (0, 0, 0, 0), 0, (1, 1)),     # floor drops the last column
    ((8, 8), (2, 2), (2, 2), (0, 0, 0, 0), 0, (1, 1)),       # non-overlapping
    ((7, 9), (3, 2), (1, 2), (1, 0, 1, 1), 0, (1, 1)),       # asymmetric kernel, stride, pads
    ((11, 6), (5, 1), (3, 1), (2, 0, 2, 0), 1, (1, 1)),      # k=5, s=3, one axis only
    ((12,), (4,), (3,), (1, 2), 0, (1,)),                    # 1-D
    ((5, 6, 7), (3, 2, 3), (2, 1, 2), (1, 0, 1, 1, 1, 0), 0, (1, 1, 1)),  # 3-D
    ((9, 9), (1, 1), (2, 2), (0, 0, 0, 0), 0, (1, 1)),      # kernel < stride: subsampling
    ((9, 9), (3, 3), (1, 1), (2, 2, 2, 2), 0, (2, 2)),      # dilation
    ((12, 12), (9, 9), (1, 1), (0, 0, 0, 0), 0, (1, 1)),    # large kernel
    ((9, 7), (2, 2), (2, 2), (0, 1, 0, 0), 1, (1, 1)),       # disjoint windows (MaxUnpool), ceil, pads
    ((10, 9), (2, 2), (3, 3), (0, 0, 0, 0), 0, (2, 1)),      # disjoint with dilation
    ((4, 6, 6), (2, 2, 2), (2, 2, 2), (0, 0, 0, 0, 0, 0), 0, (1, 1, 1)),  # disjoint 3-D
]


def pool_model(shape, kernel, strides, pads, ceil, dilations, seed=0):
    """x -> MaxPool 'pool' -> Flatten -> Gemm -> logits."""
    attrs = dict(kernel_shape=list(kernel), strides=list(strides), pads=list(pads), ceil_mode=ceil,
                 dilations=list(dilations))
    probe = helper.make_model(helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y"], **attrs)], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)])
    y_shape = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros(shape, np.float32)})[0].shape
    W = np.random.default_rng(seed).standard_normal((4, int(np.prod(y_shape[1:])))).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y"], name="pool", **attrs),
         helper.make_node("Flatten", ["y"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "W"], ["logits"], name="fc", transB=1)],
        "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], 4])],
        [numpy_helper.from_array(W, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def torch_wta(x, R, kernel, strides, pads, ceil, dilations):
    """d(sum(R * maxpool(x)))/dx in float64, with the padding applied by hand (-inf) so that
    asymmetric pads work; returns (pooled output, gradient)."""
    n = len(kernel)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch_pad = []
    for i in reversed(range(n)):  # F.pad lists the last axis first
        torch_pad += [pads[i], pads[n + i]]
    xp = F.pad(xt, torch_pad, value=float("-inf"))
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
    y = pool(xp, kernel, strides, 0, dilations, ceil_mode=bool(ceil))
    (grad,) = torch.autograd.grad(y, xt, torch.tensor(R, dtype=torch.float64))
    return y.detach().numpy(), grad.numpy()


@pytest.mark.parametrize("target_runtime", ["any", "webgpu"])
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[1]}s{c[2]}p{c[3]}c{c[4]}d{c[5]}")
def test_winner_take_all_is_the_max_pool_gradient(case, ties, target_runtime):
    """Both forms: MaxPool Indices + scatter (MaxUnpool for disjoint windows) and, for WebGPU,
    one-hot unfold + ArgMax (first maximum) + ConvTranspose, with no Indices."""
    size, kernel, strides, pads, ceil, dilations = case
    shape = (2, 3) + size
    rng = np.random.default_rng(len(size) * 100 + sum(kernel))
    x = rng.integers(-2, 3, shape) if ties else rng.standard_normal(shape)  # integers: many equal maxima
    x = x.astype(np.float32)
    model = pool_model(shape, kernel, strides, pads, ceil, dilations)
    explainer = lrponnx.convert(model, composite="epsilon-plus", layer_relevance=True, target_runtime=target_runtime)
    disjoint = all((k - 1) * d + 1 <= st for k, st, d in zip(kernel, strides, dilations))
    ops = {n.op_type for n in explainer.graph.node}
    if target_runtime == "any":
        assert ("MaxUnpool" in ops) == disjoint and ("ScatterElements" in ops) != disjoint
    else:
        assert "ScatterElements" not in ops and "MaxUnpool" not in ops and "ArgMax" in ops
        assert not any(n.op_type == "MaxPool" and len(n.output) > 1 for n in explainer.graph.node)

    sess = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, with_target(sess, {"x": x}))))
    R_out, R_in = out["lrp_out/pool"], out["lrp_in/pool/x"]
    assert np.abs(R_out).max() > 0

    y_ref, ref = torch_wta(x.astype(np.float64), R_out.astype(np.float64), kernel, strides, pads, ceil, dilations)
    assert y_ref.shape == R_out.shape  # the reference pools the same windows as ORT
    np.testing.assert_allclose(R_in, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    # conservation: every output's relevance lands on exactly one input
    np.testing.assert_allclose(R_in.sum(), R_out.astype(np.float64).sum(), rtol=1e-5)



def test_winner_take_all_with_unknown_spatial_sizes():
    """The input's channel and spatial sizes are symbolic: the scatter then works on the flat tensor."""
    shape = (2, 3, 9, 9)
    model = pool_model(shape, (3, 3), (2, 2), (0, 0, 0, 0), 1, (1, 1))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(dims, ["N", "C", "H", "W"]):
        d.ClearField("dim_value")
        d.dim_param = name
    x = np.random.default_rng(5).integers(-2, 3, shape).astype(np.float32)
    explainer = lrponnx.convert(model, composite="epsilon-plus", layer_relevance=True)
    axes = [a.i for n in explainer.graph.node if n.op_type == "ScatterElements" for a in n.attribute if a.name == "axis"]
    assert axes == [0]  # one flat scatter (with static sizes it scatters rows, axis 1)
    sess = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, with_target(sess, {"x": x}))))
    _, ref = torch_wta(x.astype(np.float64), out["lrp_out/pool"].astype(np.float64), (3, 3), (2, 2), (0, 0, 0, 0), 1,
                       (1, 1))
    np.testing.assert_allclose(out["lrp_in/pool/x"], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())

"""Routing ops, LayerNorm, MatMul by a constant, static-shape folding and --input-shape (issue 13, T2).

Every rule is checked against a float64 reference written here with numpy or torch autograd (never
lrponnx's emitter): each op sits in a tiny ONNX model between the input and a dense layer, the
explainer exposes the relevance at the op's output (``--layer-relevance``), and the reference
computes the relevance at its input from that and the input values. End-to-end, with every rule at
epsilon 0 the relevance of a bias-free piecewise-linear net is gradient x input (the LayerNorm's σ
held constant), which torch autograd computes in float64 for models exported with both PyTorch
exporters.
"""
from __future__ import annotations

import io
import math
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from lrponnx.compiler.emit import convert, plan
from lrponnx.errors import LrpOnnxError, UnsupportedModelError

RNG_SEED = 1234
TOL = 1e-5          # relative L2 per sample, float32 explainer vs float64 reference
WORST: dict[str, float] = {}


def rel_l2(a, ref) -> float:
    a, ref = np.asarray(a, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(a - ref) / den) if den > 0 else float(np.linalg.norm(a))


def check(name: str, got, ref, tol: float = TOL) -> None:
    err = max(rel_l2(got[i], ref[i]) for i in range(len(ref)))
    WORST[name] = max(err, WORST.get(name, 0.0))
    assert err <= tol, f"{name}: relative L2 error {err:.3g} > {tol:g}"


# -- tiny ONNX models: x -> OP -> ... -> Flatten -> Gemm -> logits -------------------------------

def model_with(nodes, inits: dict, x_shape, head_in: str, head_features: int, classes: int = 5,
               opset: int = 17, seed: int = RNG_SEED) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = dict(inits)
    inits["head_W"] = rng.standard_normal((classes, head_features)).astype(np.float32)
    inits["head_b"] = (0.1 * rng.standard_normal(classes)).astype(np.float32)
    nodes = list(nodes) + [
        helper.make_node("Flatten", [head_in], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "head_W", "head_b"], ["logits"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "t2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, classes])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def explain_layers(model, x: np.ndarray, rules=(), target=(1, 3), **kw) -> dict:
    ex = convert(model, layer_relevance=True, rules=list(rules), **kw)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(ex.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feeds = {"x": x, "target": np.array(target[:len(x)], np.int64)}
    out = dict(zip(names, sess.run(None, feeds)))
    plain = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(out["logits"], plain.run(None, {"x": x})[0])  # the prediction is the model's
    return out


def data(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def conserved(R_in, R_out, tol=1e-5) -> None:
    a = np.asarray(R_in, np.float64).reshape(len(R_in), -1).sum(1)
    b = np.asarray(R_out, np.float64).reshape(len(R_out), -1).sum(1)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


# -- Split with several outputs -------------------------------------------------------------------

@pytest.mark.parametrize("used", ["all", "last two", "first and last", "second only"])
def test_split_every_used_output_hands_back(used):
    x = data((2, 7, 3, 2))
    sizes = [2, 4, 1]
    outs = ["s0", "s1", "s2"]
    keep = {"all": [0, 1, 2], "last two": [1, 2], "first and last": [0, 2], "second only": [1]}[used]
    nodes = [helper.make_node("Split", ["x", "sizes"], outs, name="split", axis=1)]
    order = list(reversed(keep))  # concatenated in another order: routing must follow the tensors
    nodes.append(helper.make_node("Concat", [outs[k] for k in order], ["cat"], name="cat", axis=1))
    feat = sum(sizes[k] for k in keep) * 3 * 2
    model = model_with(nodes, {"sizes": np.array(sizes, np.int64)}, [None, 7, 3, 2], "cat", feat)
    out = explain_layers(model, x)
    R_cat = out["lrp_out/cat"]
    # reference: each output's relevance is its block of the Concat's; unused outputs get zeros
    parts, start = {}, 0
    for k in order:
        parts[k] = R_cat[:, start:start + sizes[k]]
        start += sizes[k]
    ref = np.concatenate([parts.get(k, np.zeros((2, sizes[k], 3, 2))) for k in range(3)], axis=1)
    check("Split", out["lrp_in/split/x"], ref)
    conserved(out["lrp_in/split/x"], R_cat)


# -- Slice ----------------------------------------------------------------------------------------

SLICES = [  # (starts, ends, axes, steps) and the numpy index of the same slice on [N, 6, 5, 7]
    ([1], [4], [1], [1], (slice(None), slice(1, 4))),
    ([0, -3], [6, 100], [1, 3], [2, 1], (slice(None), slice(0, 6, 2), slice(None), slice(-3, None))),
    ([4, 6], [0, -100], [2, 3], [-1, -2], (slice(None), slice(None), slice(4, 0, -1), slice(6, None, -2))),
    ([-2], [-1], [-1], [1], (slice(None), slice(None), slice(None), slice(-2, -1))),
    ([0, 1], [2**63 - 1, 3], [0, 2], [1, 1], (slice(None), slice(None), slice(1, 3))),  # all of the batch axis
]


@pytest.mark.parametrize("case", range(len(SLICES)))
def test_slice_scatters_back(case):
    starts, ends, axes, steps, index = SLICES[case]
    x = data((2, 6, 5, 7), case)
    y = x[index]
    inits = {"st": np.array(starts, np.int64), "en": np.array(ends, np.int64), "ax": np.array(axes, np.int64),
             "sp": np.array(steps, np.int64)}
    nodes = [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"], name="slice")]
    model = model_with(nodes, inits, [None, 6, 5, 7], "y", int(np.prod(y.shape[1:])))
    out = explain_layers(model, x)
    R_y = out["lrp_out/slice"]
    ref = np.zeros(x.shape)
    ref[index] = R_y  # float64 scatter of the output's relevance to where each value came from
    check("Slice", out["lrp_in/slice/x"], ref)
    conserved(out["lrp_in/slice/x"], R_y)


# -- Gather with constant indices --------------------------------------------------------------------

GATHERS = [  # (indices, axis)
    (np.array(0), 1),                       # x[:, 0]: a class token
    (np.array([2, 0, 2, -1]), 2),           # repeats and a negative index: copies add up
    (np.array([[1, 3], [3, 0]]), 3),        # 2-D indices
]


@pytest.mark.parametrize("case", range(len(GATHERS)))
def test_gather_scatter_adds_back(case):
    idx, axis = GATHERS[case]
    x = data((2, 3, 4, 5), case)
    y = np.take(x, idx, axis=axis)
    nodes = [helper.make_node("Gather", ["x", "idx"], ["y"], name="gather", axis=axis)]
    model = model_with(nodes, {"idx": idx.astype(np.int64)}, [None, 3, 4, 5], "y", int(np.prod(y.shape[1:])))
    out = explain_layers(model, x)
    R_y = out["lrp_out/gather"].astype(np.float64)
    ref = np.zeros(x.shape)
    moved = np.moveaxis(ref, axis, 0)  # a view: np.add.at adds repeated indices
    R_moved = np.moveaxis(R_y.reshape(x.shape[:axis] + (idx.size,) + x.shape[axis + 1:]), axis, 0)
    np.add.at(moved, np.where(idx < 0, idx + x.shape[axis], idx).reshape(-1), R_moved)
    check("Gather", out["lrp_in/gather/x"], ref)
    conserved(out["lrp_in/gather/x"], R_y)


def test_gather_with_indices_computed_at_run_time_on_a_flat_tensor():
    """The dynamo exporter's ``as_strided`` with a dynamic batch: a flattened tensor read at
    positions computed from its size (here reversed), scattered back at run time."""
    x = data((2, 3, 2, 2), 5)
    nodes = [
        helper.make_node("Reshape", ["x", "minus1"], ["flatx"], name="flatten_all"),
        helper.make_node("Shape", ["flatx"], ["n1"], name="size"),
        helper.make_node("Squeeze", ["n1"], ["n"], name="n"),
        helper.make_node("Sub", ["n", "one"], ["last"], name="last"),
        helper.make_node("Range", ["zero_s", "n", "one"], ["up"], name="range"),
        helper.make_node("Sub", ["last", "up"], ["rev"], name="reverse"),
        helper.make_node("Gather", ["flatx", "rev"], ["g"], name="gather", axis=0),
        helper.make_node("Shape", ["x"], ["xs"], name="shape"),
        helper.make_node("Reshape", ["g", "xs"], ["y"], name="back"),
    ]
    inits = {"minus1": np.array([-1], np.int64), "one": np.array(1, np.int64), "zero_s": np.array(0, np.int64)}
    model = model_with(nodes, inits, [None, 3, 2, 2], "y", 12)
    out = explain_layers(model, x)
    R_g = out["lrp_out/gather"].astype(np.float64)
    ref = R_g[::-1].reshape(x.shape)  # position k of the output came from position n-1-k
    np.testing.assert_allclose(out["lrp_in/gather/flatx"].reshape(x.shape), ref, rtol=1e-6, atol=1e-9)


# -- Expand, Tile -------------------------------------------------------------------------------------

def test_expand_sums_back_over_the_broadcast_axes():
    x = data((2, 3, 1, 4))
    nodes = [helper.make_node("Expand", ["x", "shape"], ["y"], name="expand")]
    model = model_with(nodes, {"shape": np.array([1, 3, 5, 4], np.int64)}, [None, 3, 1, 4], "y", 60)
    out = explain_layers(model, x)
    R_y = out["lrp_out/expand"]
    xt = torch.from_numpy(x).double().requires_grad_()
    (ref,) = torch.autograd.grad(xt.expand(2, 3, 5, 4), xt, torch.from_numpy(R_y).double())  # copies add up
    check("Expand", out["lrp_in/expand/x"], ref.numpy())
    conserved(out["lrp_in/expand/x"], R_y)


def test_tile_sums_back_over_the_tiles():
    x = data((2, 3, 2, 2))
    reps = [1, 2, 1, 3]
    nodes = [helper.make_node("Tile", ["x", "reps"], ["y"], name="tile")]
    model = model_with(nodes, {"reps": np.array(reps, np.int64)}, [None, 3, 2, 2], "y", 6 * 2 * 6)
    out = explain_layers(model, x)
    R_y = out["lrp_out/tile"].astype(np.float64)
    xt = torch.from_numpy(x).double().requires_grad_()
    (ref,) = torch.autograd.grad(xt.repeat(*reps), xt, torch.from_numpy(R_y))  # the VJP of the copies
    check("Tile", out["lrp_in/tile/x"], ref.numpy())
    conserved(out["lrp_in/tile/x"], R_y)


# -- Where with a constant condition ------------------------------------------------------------------

def test_where_routes_each_position_to_its_branch():
    x = data((2, 3, 4))
    cond = np.random.default_rng(3).random((1, 3, 4)) > 0.5
    nodes = [helper.make_node("Mul", ["x", "three"], ["b"], name="scale"),
             helper.make_node("Where", ["cond", "x", "b"], ["y"], name="where")]
    model = model_with(nodes, {"cond": cond, "three": np.array(3.0, np.float32)}, [None, 3, 4], "y", 12)
    out = explain_layers(model, x)
    R_y = out["lrp_out/where"].astype(np.float64)
    check("Where", out["lrp_in/where/x"], np.where(cond, R_y, 0.0))
    check("Where", out["lrp_in/where/b"], np.where(cond, 0.0, R_y))
    conserved(out["lrp_in/where/x"] + out["lrp_in/where/b"], R_y)


def test_where_with_a_computed_condition_is_refused():
    nodes = [helper.make_node("Greater", ["x", "zero"], ["c"], name="gt"),
             helper.make_node("Where", ["c", "x", "zero"], ["y"], name="where")]
    model = model_with(nodes, {"zero": np.array(0.0, np.float32)}, [None, 3, 4], "y", 12)
    with pytest.raises(UnsupportedModelError, match="condition computed from activations"):
        convert(model)


# -- Pad reflect / edge / wrap ------------------------------------------------------------------------

@pytest.mark.parametrize("mode,torch_mode", [("reflect", "reflect"), ("edge", "replicate"), ("wrap", "circular")])
def test_pad_copies_hand_back_to_the_copied_values(mode, torch_mode):
    x = data((2, 3, 4, 5))
    pads = [0, 0, 1, 3, 0, 0, 2, 1]  # H: 1 before, 2 after; W: 3 before, 1 after
    nodes = [helper.make_node("Pad", ["x", "pads"], ["y"], name="pad", mode=mode)]
    model = model_with(nodes, {"pads": np.array(pads, np.int64)}, [None, 3, 4, 5], "y", 3 * 7 * 9, opset=19)
    out = explain_layers(model, x)
    R_y = out["lrp_out/pad"].astype(np.float64)
    xt = torch.from_numpy(x).double().requires_grad_()
    y = F.pad(xt, (3, 1, 1, 2), mode=torch_mode)  # torch: (W before, W after, H before, H after)
    assert np.allclose(y.detach().numpy(), np.pad(x, [(0, 0), (0, 0), (1, 2), (3, 1)],
                                                   mode={"edge": "edge", "reflect": "reflect", "wrap": "wrap"}[mode]))
    (ref,) = torch.autograd.grad(y, xt, torch.from_numpy(R_y))
    check(f"Pad {mode}", out["lrp_in/pad/x"], ref.numpy())
    conserved(out["lrp_in/pad/x"], R_y)


# -- LayerNormalization --------------------------------------------------------------------------------

def ln_reference(x: np.ndarray, R_y: np.ndarray, axes: tuple, gamma, beta, ln_eps: float, eps: float) -> np.ndarray:
    """The contract's LN rule by torch autograd, float64: σ detached, the epsilon rule on the
    remaining linear map, ``R_x = x ⊙ ∂/∂x Σ (s ⊙ y)`` with ``s = R_y / stab(y)`` held fixed."""
    xt = torch.from_numpy(x).double().requires_grad_()
    mean = xt.mean(dim=axes, keepdim=True)
    sigma = torch.sqrt(((xt - mean) ** 2).mean(dim=axes, keepdim=True) + ln_eps).detach()
    g = torch.from_numpy(np.asarray(gamma, np.float64)) if gamma is not None else 1.0
    b = torch.from_numpy(np.asarray(beta, np.float64)) if beta is not None else 0.0
    y = (xt - mean) / sigma * g + b
    yd = y.detach()
    den = yd + eps * torch.where(yd >= 0, 1.0, -1.0)
    s = torch.from_numpy(R_y).double() / den if eps > 0 else torch.where(yd == 0, 0.0, torch.from_numpy(R_y).double() / torch.where(yd == 0, 1.0, yd))
    (grad,) = torch.autograd.grad((y * s).sum(), xt)
    return (xt * grad).detach().numpy()


@pytest.mark.parametrize("axis", [-1, 2])
@pytest.mark.parametrize("eps", [1e-2, 0.0])
def test_layer_normalization_op(axis, eps):
    rng = np.random.default_rng(7)
    x = data((2, 3, 4, 6), 1) * 2 + 0.5
    norm_shape = (4, 6) if axis == 2 else (6,)
    gamma = rng.standard_normal(norm_shape).astype(np.float32)
    beta = rng.standard_normal(norm_shape).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], name="ln", axis=axis,
                              epsilon=1e-5)]
    model = model_with(nodes, {"gamma": gamma, "beta": beta}, [None, 3, 4, 6], "y", 72)
    out = explain_layers(model, x, rules=[f"LayerNormalization=epsilon:epsilon={eps}"])
    axes = (2, 3) if axis == 2 else (3,)
    ref = ln_reference(x, out["lrp_out/ln"].astype(np.float64), axes, gamma, beta, 1e-5, eps)
    check("LayerNormalization", out["lrp_in/ln/x"], ref, tol=1e-5)


def test_layer_normalization_conserves_without_beta():
    x = data((2, 5, 8), 2)
    gamma = np.random.default_rng(8).standard_normal(8).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma"], ["y"], name="ln")]
    model = model_with(nodes, {"gamma": gamma}, [None, 5, 8], "y", 40)
    out = explain_layers(model, x, rules=["LayerNormalization=epsilon:epsilon=0"])
    conserved(out["lrp_in/ln/x"], out["lrp_out/ln"], tol=1e-4)
    out = explain_layers(model, x, rules=["ln=pass"])  # by node name: the identity
    np.testing.assert_array_equal(out["lrp_in/ln/x"], out["lrp_out/ln"])


def decomposed_ln_nodes(x: str, axes: list[int], pow_form: bool, recip: bool, affine: bool) -> list:
    nodes = [
        helper.make_node("ReduceMean", [x], ["mu"], name="mean", axes=axes, keepdims=1),
        helper.make_node("Sub", [x, "mu"], ["d"], name="sub"),
        helper.make_node("Pow", ["d", "two"], ["sq"], name="pow") if pow_form else
        helper.make_node("Mul", ["d", "d"], ["sq"], name="sq"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="var", axes=axes, keepdims=1),
        helper.make_node("Add", ["var", "lneps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
    ]
    if recip:
        nodes += [helper.make_node("Reciprocal", ["sd"], ["inv"], name="inv"),
                  helper.make_node("Mul", ["d", "inv"], ["n"], name="normed")]
    else:
        nodes.append(helper.make_node("Div", ["d", "sd"], ["n"], name="normed"))
    if affine:
        nodes += [helper.make_node("Mul", ["n", "gamma"], ["ng"], name="scale"),
                  helper.make_node("Add", ["ng", "beta"], ["y"], name="shift")]
    else:
        nodes.append(helper.make_node("Identity", ["n"], ["y"], name="same"))
    return nodes


@pytest.mark.parametrize("pow_form,recip,affine", [(True, False, True), (False, True, True), (True, False, False)])
def test_decomposed_layer_norm_over_channels(pow_form, recip, affine):
    """ConvNeXt's channels-first LayerNorm written out: ``(x - u) / sqrt(s + eps) * w + b`` over axis 1."""
    rng = np.random.default_rng(11)
    x = data((2, 4, 3, 3), 3) + 0.3
    gamma = rng.standard_normal((4, 1, 1)).astype(np.float32)
    beta = rng.standard_normal((4, 1, 1)).astype(np.float32)
    inits = {"two": np.array(2.0, np.float32), "lneps": np.array(1e-6, np.float32), "gamma": gamma, "beta": beta}
    model = model_with(decomposed_ln_nodes("x", [1], pow_form, recip, affine), inits, [None, 4, 3, 3], "y", 36)
    p = plan(model)
    ln = [u for u in p.units if u.kind == "LayerNorm"]
    assert len(ln) == 1 and ln[0].info.axes == [1]
    name = ln[0].name
    out = explain_layers(model, x, rules=["LayerNorm=epsilon:epsilon=0.01"])
    ref = ln_reference(x, out[f"lrp_out/{name}"].astype(np.float64), (1,), gamma if affine else None,
                       beta if affine else None, 1e-6, 0.01)
    check("LayerNorm (decomposed)", out[f"lrp_in/{name}/x"], ref)


def test_decomposed_layer_norm_is_not_matched_when_a_part_is_read_elsewhere():
    inits = {"two": np.array(2.0, np.float32), "lneps": np.array(1e-6, np.float32),
             "gamma": np.ones((4, 1, 1), np.float32), "beta": np.zeros((4, 1, 1), np.float32)}
    nodes = decomposed_ln_nodes("x", [1], True, False, True)
    nodes.append(helper.make_node("Add", ["y", "d"], ["y2"], name="reuse"))  # the centred x leaks out
    model = model_with(nodes, inits, [None, 4, 3, 3], "y2", 36)
    p = plan(model)
    assert not [u for u in p.units if u.kind == "LayerNorm"]
    assert p.offenders  # Div of two activations etc.: refused, never explained wrongly


# -- MatMul by a constant ---------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right rank 3"])
def test_matmul_by_a_constant(side):
    rng = np.random.default_rng(5)
    x = data((2, 4, 6), 4)
    if side == "left":
        C = rng.standard_normal((5, 4)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["C", "x"], ["y"], name="mm")]
        feat = 5 * 6
    else:
        C = rng.standard_normal((1, 6, 3)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "C"], ["y"], name="mm")]
        feat = 4 * 3
    model = model_with(nodes, {"C": C}, [None, 4, 6], "y", feat)
    eps = 0.05
    out = explain_layers(model, x, rules=[f"MatMul=epsilon:epsilon={eps}"])
    R_y = torch.from_numpy(out["lrp_out/mm"].astype(np.float64))
    xt = torch.from_numpy(x).double().requires_grad_()
    Ct = torch.from_numpy(C).double()
    y = Ct @ xt if side == "left" else xt @ Ct
    s = R_y / (y.detach() + eps * torch.where(y.detach() >= 0, 1.0, -1.0))
    (grad,) = torch.autograd.grad((y * s).sum(), xt)
    check("MatMul by a constant", out["lrp_in/mm/x"], (xt * grad).detach().numpy())


def test_gemm_with_a_per_sample_constant_addend():
    """Gemm with C [N, M] (a fixed batch): not a bias, so not a linear unit; the epsilon rule on
    ``y = x Wᵀ + C``, C keeping its share."""
    rng = np.random.default_rng(6)
    x = data((2, 6), 6)
    W = rng.standard_normal((4, 6)).astype(np.float32)
    Cc = rng.standard_normal((2, 4)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=1, alpha=0.5)]
    model = model_with(nodes, {"W": W, "C": Cc}, [2, 6], "y", 4)
    out = explain_layers(model, x, rules=["gemm=epsilon:epsilon=0.05"])
    R_y = torch.from_numpy(out["lrp_out/gemm"].astype(np.float64))
    xt = torch.from_numpy(x).double().requires_grad_()
    y = 0.5 * xt @ torch.from_numpy(W).double().T + torch.from_numpy(Cc).double()
    s = R_y / (y.detach() + 0.05 * torch.where(y.detach() >= 0, 1.0, -1.0))
    (grad,) = torch.autograd.grad((y * s).sum(), xt)
    check("Gemm by a constant", out["lrp_in/gemm/x"], (xt * grad).detach().numpy())


def test_matmul_left_on_a_2d_input_would_mix_samples_and_is_refused():
    C = np.ones((3, 2), np.float32)
    nodes = [helper.make_node("MatMul", ["C", "x"], ["y"], name="mm")]
    model = model_with(nodes, {"C": C}, [2, 4], "y", 4)
    with pytest.raises(UnsupportedModelError, match="mm"):
        convert(model)


# -- end to end: torch models from both exporters, gradient x input at epsilon 0 ------------------------

class Shuffle(nn.Module):
    """A ShuffleNet-v2-like stage (channel split, shuffle via view/transpose/view), a ConvNeXt-like
    LayerNorm over channels (permute + LayerNorm), a token pick ``x[:, :, 0]``, a strided slice and an
    expand, all bias-free so that LRP-0 is gradient x input."""

    def __init__(self, detach_sigma: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(RNG_SEED)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.branch = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.ln = nn.LayerNorm(8, elementwise_affine=True, bias=False)
        self.fc = nn.Linear(8 * 3 + 8 * 4, 5, bias=False)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (0.2 if p.ndim == 1 else 0.0))
        self.detach_sigma = detach_sigma

    def layer_norm(self, t):
        if not self.detach_sigma:
            return self.ln(t)
        mean = t.mean(-1, keepdim=True)
        sigma = torch.sqrt(((t - mean) ** 2).mean(-1, keepdim=True) + self.ln.eps).detach()
        return (t - mean) / sigma * self.ln.weight

    def forward(self, x):
        x = F.relu(self.conv1(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, F.relu(self.branch(b))], dim=1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        x = self.layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        pick = x[:, :, 0]                     # Gather / Slice+Squeeze: [N, 8, W]
        strided = x[:, :, 1::2, ::2]          # [N, 8, H/2, W/2]
        feats = torch.cat([pick[:, :, :3].flatten(1), strided[:, :, :2, :2].flatten(1)], dim=1)
        return self.fc(feats)


def export(model: nn.Module, dynamo: bool, size: int = 8, dynamic_hw: bool = False, opset: int = 17) -> onnx.ModelProto:
    x = torch.randn(2, 3, size, size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: torch.export.Dim("N", min=1, max=64)}
            prog = torch.onnx.export(model, (x,), None, input_names=["x"], output_names=["logits"],
                                     dynamic_shapes={"x": dims}, verbose=False)
            return prog.model_proto
        axes = {0: "N", 2: "H", 3: "W"} if dynamic_hw else {0: "N"}
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": axes, "logits": {0: "N"}})
    return onnx.load_from_string(buf.getvalue())


def gradient_times_input(model: nn.Module, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    m = model.double()
    xt = torch.from_numpy(x).double().requires_grad_()
    y = m(xt)
    (grad,) = torch.autograd.grad(y[torch.arange(len(x)), torch.from_numpy(target)].sum(), xt)
    return (xt * grad).detach().numpy()


LRP0 = ["Conv=epsilon:epsilon=0"]  # LayerNorm and MatMul take --epsilon (0 here) by default


@pytest.mark.parametrize("dynamo,opset", [(False, 17), (False, 16), (True, 18)],
                         ids=["torchscript", "torchscript-opset16-decomposed-layernorm", "dynamo"])
def test_end_to_end_lrp0_is_gradient_times_input(dynamo, opset):
    torch.manual_seed(0)
    net = Shuffle().eval()
    model = export(net, dynamo, opset=opset)
    kinds = {u.kind for u in plan(model).units}
    assert ("LayerNorm" if opset == 16 else "LayerNormalization") in kinds  # opset 16: written out
    ref_net = Shuffle(detach_sigma=True).eval()
    ref_net.load_state_dict(net.state_dict())
    x = data((3, 3, 8, 8), 9)   # a batch size the export never saw
    target = np.array([0, 4, 2])
    dense = [u.op_type for u in plan(model).units if u.kind == "Linear" and u.op_type in ("Gemm", "MatMul")]
    ex = convert(model, epsilon=0.0, seed="logit", rules=LRP0 + [f"{t}=epsilon:epsilon=0" for t in set(dense)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(ex.SerializeToString(), so, providers=["CPUExecutionProvider"])
    logits, R = sess.run(None, {"x": x, "target": target})
    np.testing.assert_allclose(logits, net(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert np.isfinite(R).all()
    check("end to end (GI)", R, gradient_times_input(ref_net, x, target), tol=1e-4)


# -- static shapes --------------------------------------------------------------------------------------

def test_torchscript_channel_shuffle_is_folded_and_keeps_a_dynamic_batch():
    from lrponnx.compiler.load import prepare

    torch.manual_seed(0)
    net = Shuffle().eval()
    model = export(net, dynamo=False)
    assert any(n.op_type == "Shape" for n in model.graph.node)  # the reshape targets come from Shape(x)
    prepared = prepare(model)
    assert not [n for n in prepared.graph.node if n.op_type in ("Shape", "Size")]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for batch in (1, 4):
        x = data((batch, 3, 8, 8), batch)
        a = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
        b = ort.InferenceSession(prepared.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_array_equal(a[0], b[0])  # folding changes no number
    inp = prepared.graph.input[0].type.tensor_type.shape.dim
    assert inp[0].dim_param and not inp[0].HasField("dim_value")  # still any batch


def test_symbolic_spatial_size_asks_for_input_shape_and_converts_with_it(tmp_path):
    torch.manual_seed(0)
    net = Shuffle().eval()
    model = export(net, dynamo=False, dynamic_hw=True)
    with pytest.raises(UnsupportedModelError, match="--input-shape"):
        convert(model)
    ex = convert(model, input_shape="N,3,8,8")
    dims = ex.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 8, 8] and not dims[0].HasField("dim_value")
    x = data((2, 3, 8, 8))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    out = ort.InferenceSession(ex.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "target": np.array([-1, -1])})
    np.testing.assert_allclose(out[0], net(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    # the CLI: convert and inspect take it too; a wrong one is one line, exit 2
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    run = lambda *a: subprocess.run([sys.executable, "-m", "lrponnx.app.cli", *a], capture_output=True, text=True)
    r = run("inspect", str(path), "--input-shape", "N,3,8,8")
    assert r.returncode == 0, r.stderr
    r = run("convert", str(path), "-o", str(tmp_path / "e.onnx"), "--input-shape", "1,3,8,8")
    assert r.returncode == 0, r.stderr
    assert onnx.load(str(tmp_path / "e.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    for bad, msg in (("N,3,8", "gives 3 dims"), ("N,4,8,8", "fixed size 3"), ("N,3,0,8", "between 1"),
                     ("N,3,x,8", "not a positive integer"), ("img:N,3,8,8", "no input 'img'")):
        r = run("convert", str(path), "-o", str(tmp_path / "bad.onnx"), "--input-shape", bad)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad.onnx").exists()


class PadSame(nn.Module):
    """TensorFlow-style "same" padding computed from the input's size (as timm's ``pad_same``):
    the exporters write the pads as a computation on ``Shape(x)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 4, 3, stride=2, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        ih, iw = x.size()[-2:]
        pad_h = max((math.ceil(ih / 2) - 1) * 2 + 3 - ih, 0)
        pad_w = max((math.ceil(iw / 2) - 1) * 2 + 3 - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


@pytest.mark.parametrize("dynamic_hw", [False, True])
def test_pads_computed_from_the_input_size_are_folded(dynamic_hw):
    net = PadSame().eval()
    model = export(net, dynamo=False, dynamic_hw=dynamic_hw)
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    assert not any(t.name == pad.input[1] for t in model.graph.initializer)  # computed at run time
    kw = {}
    if dynamic_hw:
        with pytest.raises(UnsupportedModelError, match="pads computed at run time.*--input-shape"):
            convert(model)
        kw = {"input_shape": "N,3,8,8"}
    out = explain_layers(model, data((2, 3, 8, 8), 4), **kw)
    with torch.no_grad():
        ref = net(torch.from_numpy(data((2, 3, 8, 8), 4))).numpy()
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-5, atol=1e-6)
    name = next(k for k in out if k.startswith("lrp_out/") and "Pad" in k)
    R_y = out[name].astype(np.float64)
    ref_x = R_y[:, :, 0:8, 0:8]  # "same" padding for 8 -> 4 at stride 2: one zero row/column after
    assert R_y.shape[2:] == (9, 9)
    check("Pad (run-time pads, folded)", out[name.replace("lrp_out/", "lrp_in/") + "/x"], ref_x)


def test_the_hint_is_not_given_when_the_input_is_already_static():
    from lrponnx.ops.layernorm import LayerNormSpec  # noqa: F401  (module loads)
    from lrponnx.compiler.shapes import static_hint
    from lrponnx.compiler.view import ModelView

    nodes = [helper.make_node("Identity", ["x"], ["y"], name="same")]
    static = ModelView(model_with(nodes, {}, [1, 3, 2, 2], "y", 12))
    symbolic = ModelView(model_with(nodes, {}, ["N", 3, "H", "W"], "y", 12))
    assert "--input-shape" not in static_hint(static)
    assert "--input-shape N,3,SIZE,SIZE" in static_hint(symbolic)


def test_worst_errors_are_reported():
    """Prints the largest error per rule (collected by the tests above in this process)."""
    if WORST:
        print("\nlargest relative L2 error vs the float64 references:")
        for k, v in sorted(WORST.items()):
            print(f"  {k:28s} {v:.2e}")

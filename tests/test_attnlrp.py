"""The AttnLRP rules (issue 14) on small hand-built graphs, each against a float64 numpy reference
written from the contract's formulas (``../shared/docs/lrp-rules.md``, "Beyond Caffe-era CNNs"),
not from the emitter's helpers; and the ``attnlrp`` composite's rule choice and overrides."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrponnx
from lrponnx.errors import RuleError, UnsupportedModelError

RNG = np.random.default_rng(14)


def _init(name, a, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(a, dtype=dtype), name)


def _model(nodes, inputs, output_shape, inits, opset=17):
    graph = helper.make_graph(nodes, "attn", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                      output_shape)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _explain(model, x, target, **kw):
    ex = lrponnx.Explainer(lrponnx.convert(model, composite="attnlrp", **kw))
    return ex.explain(x, target=np.asarray(target))


def _seed(z, target):
    """R at the logits: the target logit, zero elsewhere."""
    R = np.zeros_like(z)
    R[np.arange(len(z)), target] = z[np.arange(len(z)), target]
    return R


def _eps0(R, z):
    """R / z with 0 where z == 0 (the epsilon rule with eps = 0)."""
    return np.divide(R, z, out=np.zeros_like(R), where=z != 0)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# -- Softmax -------------------------------------------------------------------------------------------

def _softmax_net(N=3, K=7, M=4, mask=False):
    W1, b1 = RNG.standard_normal((K, K)), RNG.standard_normal(K)
    W2, b2 = RNG.standard_normal((M, K)), RNG.standard_normal(M)
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1, name="fc1")]
    inits = [_init("W1", W1), _init("b1", b1), _init("W2", W2), _init("b2", b2)]
    src = "h"
    if mask:
        maskv = np.where(np.arange(K) % 3 == 0, -np.inf, 0.0)
        nodes.append(helper.make_node("Add", ["h", "mask"], ["hm"], name="add_mask"))
        inits.append(_init("mask", maskv))
        src = "hm"
    nodes += [helper.make_node("Softmax", [src], ["s"], axis=-1, name="softmax"),
              helper.make_node("Gemm", ["s", "W2", "b2"], ["logits"], transB=1, name="fc2")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, K])], [N, M], inits)
    return m, (W1, b1, W2, b2, maskv if mask else None)


@pytest.mark.parametrize("mask", [False, True])
def test_softmax_rule_matches_the_formula(mask):
    m, (W1, b1, W2, b2, maskv) = _softmax_net(mask=mask)
    x = RNG.standard_normal((3, 7)).astype(np.float32)
    target = np.array([0, 3, 1])
    out = _explain(m, x, target)
    X = x.astype(np.float64)
    h = X @ W1.T + b1
    hm = h + maskv if mask else h
    s = _softmax(hm)
    z = s @ W2.T + b2
    R_s = s * (_eps0(_seed(z, target), z) @ W2)                      # epsilon-0 on fc2, b2 keeps its share
    R_hm = np.nan_to_num(hm * (R_s - s * R_s.sum(-1, keepdims=True)), nan=0.0, posinf=0.0, neginf=0.0)
    R_h = h * _eps0(R_hm, hm) if mask else R_hm                     # the mask keeps its share
    R_x = X * (_eps0(R_h, h) @ W1)
    assert np.all(np.isfinite(out.relevance))
    np.testing.assert_allclose(out.relevance, R_x, rtol=2e-4, atol=1e-5 * np.abs(R_x).max())
    # not conservative: the softmax rule does not keep the sum (the contract says so)
    assert not np.allclose(R_x.sum(1), z[np.arange(3), target], rtol=1e-3)


# -- a product of two activations ----------------------------------------------------------------------

def _matmul_net(N=2, T=5, D=4, M=3):
    Wq, Wk, Wv = (RNG.standard_normal((D, D)) for _ in range(3))
    Wo, bo = RNG.standard_normal((M, T * D)), RNG.standard_normal(M)
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v"),
             helper.make_node("Transpose", ["k"], ["kT"], perm=[0, 2, 1], name="kT"),
             helper.make_node("MatMul", ["q", "kT"], ["S"], name="qk"),
             helper.make_node("Softmax", ["S"], ["A"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["A", "v"], ["O"], name="av"),
             helper.make_node("Flatten", ["O"], ["f"], axis=1, name="flat"),
             helper.make_node("Gemm", ["f", "Wo", "bo"], ["logits"], transB=1, name="head")]
    inits = [_init("Wq", Wq), _init("Wk", Wk), _init("Wv", Wv), _init("Wo", Wo), _init("bo", bo)]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, T, D])], [N, M], inits)
    return m, (Wq, Wk, Wv, Wo, bo)


def attention_reference(X, Wq, Wk, Wv, Wo, bo, target):
    """float64 AttnLRP of the net above, step by step from the contract's formulas."""
    q, k, v = X @ Wq, X @ Wk, X @ Wv
    S = q @ k.transpose(0, 2, 1)
    A = _softmax(S)
    O = A @ v
    f = O.reshape(len(X), -1)
    z = f @ Wo.T + bo
    R_O = (f * (_eps0(_seed(z, target), z) @ Wo)).reshape(O.shape)
    t = _eps0(R_O, O) / 2                                              # uniform: each factor half
    R_A = A * (t @ v.transpose(0, 2, 1))
    R_v = v * (A.transpose(0, 2, 1) @ t)
    R_S = S * (R_A - A * R_A.sum(-1, keepdims=True))                   # softmax rule
    tS = _eps0(R_S, S) / 2
    R_q = q * (tS @ k)
    R_kT = k.transpose(0, 2, 1) * (q.transpose(0, 2, 1) @ tS)
    R_k = R_kT.transpose(0, 2, 1)
    R_x = sum(X * (_eps0(R, X @ W) @ W.T) for R, W in ((R_q, Wq), (R_k, Wk), (R_v, Wv)))
    return R_x, (R_O, R_A, R_v, R_q, R_k)


def test_uniform_rule_on_qk_and_av():
    m, W = _matmul_net()
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    target = np.array([2, 0])
    out = _explain(m, x, target)
    R_x, (R_O, R_A, R_v, R_q, R_k) = attention_reference(x.astype(np.float64), *W, target)
    np.testing.assert_allclose(out.relevance, R_x, rtol=1e-3, atol=1e-5 * np.abs(R_x).max())
    # the uniform rule splits A V's relevance in halves (up to the eps-0 zero guard)
    np.testing.assert_allclose(R_A.sum((1, 2)) + R_v.sum((1, 2)), R_O.sum((1, 2)), rtol=1e-9)


def test_uniform_rule_equals_lxt_gradient_split():
    """The net effect the contract states: 1/4, 1/4, 1/2 of input x gradient at q, k, v (the gradient
    through the softmax unchanged), by torch autograd in float64."""
    torch = pytest.importorskip("torch")
    _, (Wq, Wk, Wv, Wo, bo) = _matmul_net()
    X = torch.tensor(RNG.standard_normal((2, 5, 4)), dtype=torch.float64)
    target = np.array([1, 2])
    tq, tk, tv = (torch.tensor(a) for a in (Wq, Wk, Wv))
    q, k, v = (X @ tq).requires_grad_(), (X @ tk).requires_grad_(), (X @ tv).requires_grad_()
    z = (torch.softmax(q @ k.transpose(1, 2), -1) @ v).reshape(2, -1) @ torch.tensor(Wo).T + torch.tensor(bo)
    z[torch.arange(2), torch.tensor(target)].sum().backward()
    _, (_, _, R_v, R_q, R_k) = attention_reference(X.numpy(), Wq, Wk, Wv, Wo, bo, target)
    np.testing.assert_allclose(R_q, (q * q.grad).detach().numpy() / 4, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(R_k, (k * k.grad).detach().numpy() / 4, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(R_v, (v * v.grad).detach().numpy() / 2, rtol=1e-9, atol=1e-12)


def test_uniform_rule_zero_output_gives_zero_not_nan():
    m, W = _matmul_net()
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    x[0, :, :] = 0.0  # q = k = v = 0: every product is 0
    out = _explain(m, x, [0, 1])
    assert np.all(np.isfinite(out.relevance)) and np.all(out.relevance[0] == 0)


def test_two_activation_matmul_refused_outside_attnlrp():
    m, _ = _matmul_net()
    with pytest.raises(UnsupportedModelError) as info:
        lrponnx.convert(m)
    why = {o.node: o.why for o in info.value.offenders}
    assert "attnlrp" in why["qk"] and "attnlrp" in why["av"] and "attnlrp" in why["softmax"]
    # per-node overrides turn the rules on in any composite
    ex = lrponnx.convert(m, rules=["qk=uniform", "av=uniform", "Softmax=attnlrp-softmax"])
    assert ex is not None


def test_override_with_a_rule_that_does_not_apply():
    m, _ = _matmul_net()
    with pytest.raises(RuleError, match="allowed"):
        lrponnx.convert(m, composite="attnlrp", rules=["softmax=uniform"])


# -- embedding lookups, shape-only values, constant addends -----------------------------------------

def _embedding_net(N=2, T=6, V=11, D=4, M=3, shape_mask=True):
    E, P = RNG.standard_normal((V, D)), RNG.standard_normal((T, D))
    W, b = RNG.standard_normal((M, D)), RNG.standard_normal(M)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], axis=0, name="embed"),
             helper.make_node("Add", ["e", "P"], ["h"], name="add_pos")]
    src = "h"
    if shape_mask:  # zeros made from the input's shape at run time, added: carries no relevance
        nodes += [helper.make_node("Shape", ["h"], ["hs"], name="shape"),
                  helper.make_node("ConstantOfShape", ["hs"], ["zeros"], name="zeros",
                                   value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
                  helper.make_node("Add", ["h", "zeros"], ["hz"], name="add_zeros")]
        src = "hz"
    nodes += [helper.make_node("ReduceMean", [src, "axes"], ["pooled"], keepdims=0, name="pool"),
              helper.make_node("Gemm", ["pooled", "W", "b"], ["logits"], transB=1, name="head")]
    inits = [_init("E", E), _init("P", P), _init("W", W), _init("b", b), _init("axes", [1], np.int64)]
    m = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [N, T])], [N, M], inits, opset=18)
    return m, (E, P, W, b)


@pytest.mark.parametrize("shape_mask", [False, True])
def test_token_relevance_from_an_embedding_lookup(shape_mask):
    m, (E, P, W, b) = _embedding_net(shape_mask=shape_mask)
    ids = RNG.integers(0, 11, (2, 6)).astype(np.int64)
    target = np.array([1, 2])
    out = _explain(m, ids, target)
    e = E[ids]
    h = e + P
    pooled = h.mean(1)
    z = pooled @ W.T + b
    R_pool = pooled * (_eps0(_seed(z, target), z) @ W)
    R_h = h * _eps0(R_pool, pooled)[:, None, :] / h.shape[1]        # the mean: linear, eps 0
    R_e = e * _eps0(R_h, h)                                          # P keeps its share
    R_tok = R_e.sum(-1)
    assert out.relevance.shape == ids.shape and out.relevance.dtype == np.float32
    np.testing.assert_allclose(out.relevance, R_tok, rtol=1e-4, atol=1e-6 * np.abs(R_tok).max())


def test_constant_addend_keeps_its_share_only_in_attnlrp():
    m, (E, P, W, b) = _embedding_net(shape_mask=False)
    ids = RNG.integers(0, 11, (2, 6)).astype(np.int64)
    eps = lrponnx.Explainer(lrponnx.convert(m, composite="attnlrp")).explain(ids, target=np.array([0, 0]))
    plain = lrponnx.Explainer(lrponnx.convert(m, composite="attnlrp", rules=["add_pos=pass"])).explain(
        ids, target=np.array([0, 0]))
    assert not np.allclose(eps.relevance, plain.relevance)
    meta = {p.key: p.value for p in lrponnx.convert(m, composite="attnlrp").metadata_props}
    assert '"add_pos": "norm:epsilon=0"' in meta["lrponnx.rules"]
    assert '"head": "epsilon:epsilon=0"' in meta["lrponnx.rules"]


def test_embedding_lookup_by_float_table_index_is_refused():
    """A Gather of a constant table by run-time ids is only an input layer when the table is 2-D."""
    E = RNG.standard_normal((4, 5, 3))
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], axis=0, name="embed"),
             helper.make_node("Flatten", ["e"], ["f"], axis=1, name="flat"),
             helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1, name="head")]
    m = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 2])], [2, 3],
               [_init("E", E), _init("W", RNG.standard_normal((3, 30)))])
    with pytest.raises(UnsupportedModelError, match="2-D table"):
        lrponnx.convert(m, composite="attnlrp")


# -- token and patch views ------------------------------------------------------------------------------

def test_token_html_colours_follow_the_relevance():
    from lrponnx.app.render import colormap
    from lrponnx.app.render_text import token_html, token_terminal

    tokens = ["the", "<b>good</b>", "film", "&"]
    rel = np.array([0.0, 2.0, -2.0, 1.0])
    page = token_html(tokens, rel, title="t")
    lut = colormap("coldnhot")
    top, bottom, mid = lut[255], lut[0], lut[127]
    assert f"background:rgb({top[0]},{top[1]},{top[2]})" in page.split("&lt;b&gt;good")[0].rsplit("<span", 1)[1]
    assert f"background:rgb({bottom[0]},{bottom[1]},{bottom[2]})" in page.split(">film<")[0].rsplit("<span", 1)[1]
    assert f"background:rgb({mid[0]},{mid[1]},{mid[2]})" in page.split(">the<")[0].rsplit("<span", 1)[1]
    assert "<b>good</b>" not in page and "&lt;b&gt;good&lt;/b&gt;" in page  # escaped
    assert 'title="+2"' in page and 'title="-2"' in page
    line = token_terminal(tokens, rel)
    assert line.count("\x1b[0m") == 4 and f"48;2;{top[0]};{top[1]};{top[2]}m <b>good</b> " in line
    with pytest.raises(ValueError, match="3 tokens but 4"):
        token_html(tokens[:3], rel)
    with pytest.raises(ValueError, match="NaN"):
        token_terminal(tokens, [0, np.nan, 1, 2])


def test_patch_relevance_sums_blocks():
    from lrponnx.app.render_text import patch_relevance

    r = RNG.standard_normal((3, 8, 12))
    p = patch_relevance(r, 4)
    assert p.shape == (2, 3)
    np.testing.assert_allclose(p[1, 2], r[:, 4:8, 8:12].sum())
    np.testing.assert_allclose(p.sum(), r.sum())
    with pytest.raises(ValueError, match="patches"):
        patch_relevance(r, 5)


# -- the fused Attention op (opset 23) ----------------------------------------------------------------

def _fused_net(N=2, T=5, H=2, d=3, M=3, mask=True, rank=3):
    D = H * d
    Wq, Wk, Wv = (RNG.standard_normal((D, D)) for _ in range(3))
    Wo, bo = RNG.standard_normal((M, T * D)), RNG.standard_normal(M)
    maskv = np.where(RNG.random((T, T)) < 0.3, -np.inf, RNG.standard_normal((T, T)))
    np.fill_diagonal(maskv, 0.0)
    nodes = [helper.make_node("MatMul", ["x", n], [n.lower()], name=n.lower()) for n in ("Wq", "Wk", "Wv")]
    inits = [_init("Wq", Wq), _init("Wk", Wk), _init("Wv", Wv), _init("Wo", Wo), _init("bo", bo)]
    attn_in = ["wq", "wk", "wv"]
    if rank == 4:
        inits.append(_init("heads", [0, T, H, d], np.int64))
        for n in ("wq", "wk", "wv"):
            nodes += [helper.make_node("Reshape", [n, "heads"], [n + "_r"]),
                      helper.make_node("Transpose", [n + "_r"], [n + "_4"], perm=[0, 2, 1, 3])]
        attn_in = ["wq_4", "wk_4", "wv_4"]
    if mask:
        inits.append(_init("mask", maskv))
        attn_in.append("mask")
    kw = dict(q_num_heads=H, kv_num_heads=H) if rank == 3 else {}
    nodes.append(helper.make_node("Attention", attn_in, ["y"], name="attention", scale=0.7, **kw))
    if rank == 4:
        inits.append(_init("merge", [0, T, D], np.int64))
        nodes += [helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["yt", "merge"], ["y3"])]
    nodes += [helper.make_node("Flatten", ["y3" if rank == 4 else "y"], ["f"], axis=1, name="flat"),
              helper.make_node("Gemm", ["f", "Wo", "bo"], ["logits"], transB=1, name="head")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, T, D])], [N, M], inits, opset=23)
    m.ir_version = 10
    return m, (Wq, Wk, Wv, Wo, bo, maskv if mask else np.zeros((T, T)), H, 0.7)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("mask", [False, True])
def test_fused_attention_op(rank, mask):
    m, (Wq, Wk, Wv, Wo, bo, maskv, H, scale) = _fused_net(mask=mask, rank=rank)
    x = RNG.standard_normal((2, 5, 6)).astype(np.float32)
    target = np.array([1, 2])
    out = _explain(m, x, target)
    X = x.astype(np.float64)
    N, T, D = X.shape
    split = lambda a: a.reshape(N, T, H, -1).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(X @ Wq), split(X @ Wk), split(X @ Wv)
    P = q @ k.transpose(0, 1, 3, 2)
    Ss = scale * P
    S = Ss + maskv
    A = _softmax(S)
    O = A @ v
    f = O.transpose(0, 2, 1, 3).reshape(N, -1)
    z = f @ Wo.T + bo
    R_O = split((f * (_eps0(_seed(z, target), z) @ Wo)).reshape(N, T, D))
    t = _eps0(R_O, O) / 2
    R_A = A * (t @ v.transpose(0, 1, 3, 2))
    R_v = v * (A.transpose(0, 1, 3, 2) @ t)
    with np.errstate(invalid="ignore"):
        R_S = np.where(np.isinf(S), 0.0, S * (R_A - A * R_A.sum(-1, keepdims=True)))
    R_Ss = Ss * _eps0(R_S, S)                                         # the mask keeps its share
    tP = _eps0(R_Ss, P) / 2                                           # the scale passes
    R_q = q * (tP @ k)
    R_k = k * (tP.transpose(0, 1, 3, 2) @ q)
    merge = lambda a: a.transpose(0, 2, 1, 3).reshape(N, T, D)  # noqa: E731
    R_x = sum(X * (_eps0(merge(R), X @ W) @ W.T) for R, W in ((R_q, Wq), (R_k, Wk), (R_v, Wv)))
    assert np.all(np.isfinite(out.relevance))
    np.testing.assert_allclose(out.relevance, R_x, rtol=1e-3, atol=1e-5 * np.abs(R_x).max())


def test_fused_attention_refusals():
    m, _ = _fused_net(mask=False)
    with pytest.raises(UnsupportedModelError, match="attnlrp"):
        lrponnx.convert(m)
    att = next(n for n in m.graph.node if n.op_type == "Attention")
    att.attribute.append(helper.make_attribute("is_causal", 1))
    with pytest.raises(UnsupportedModelError, match="causal"):
        lrponnx.convert(m, composite="attnlrp")

"""AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-wise Relevance Propagation for
Transformers", ICML 2024): the rules for attention, as LXT 2.1 implements them (``lxt.efficient``).

Equation numbers are the paper's, as LXT's own docstrings cite them (``lxt/explicit``).

- **Softmax** inside the network, rule ``attnlrp-softmax`` (paper, Proposition 3.1: Taylor
  decomposition at ``x`` with the bias term; LXT ``explicit.functional.softmax``):
  ``R_x = x ⊙ (R_s − s ⊙ Σ_j R_s,j)`` with ``x`` the Softmax's own input (after scaling and mask),
  ``s`` its output, the sum over the softmax axis. This is input × gradient through the softmax,
  which is what LXT's efficient mode computes there (it leaves the softmax's gradient untouched).
  Not conservative: the bias term of the Taylor expansion keeps its share.
- **Product of two activations** ``O = A B`` (MatMul: ``S = Q Kᵀ``, ``O = A V``), rule ``uniform``
  (paper, Proposition 3.3: the ε rule, Eq. 8, then the uniform rule, Eq. 7): each factor gets half,
  ``t = R_O / (2 O)``, ``R_A = A ⊙ (t Bᵀ)``, ``R_B = B ⊙ (Aᵀ t)`` (``O = 0`` gives 0). Chained
  through the softmax this is LXT's ``divide_gradient`` of ¼, ¼, ½ at q, k, v.
- **Embedding lookup** ``Gather(table, ids)`` with a constant table and ids read from a model
  input (int64 token ids): the input layer. The relevance of the looked-up rows summed over the
  hidden axis is the token's relevance, ``[N, T]`` (LXT: ``(inputs_embeds * grad).sum(-1)``).
  A lookup by ids made only from the input's *shape* (position ids, token types of zeros) is a
  constant addend: it carries no relevance.
- **Shape-only values** (anything computed from ``Shape``/``Size`` of activations and
  constants: masks, position ids, expanded class tokens) carry no relevance: see
  :func:`shape_only`; the compiler gives them none.

Other rules of the ``attnlrp`` composite live with their op: linear layers and Adds are the
epsilon / norm rules with ε = 0 (:mod:`.linear`, :mod:`.structural`), LayerNorm with σ held
constant (:mod:`.layernorm`), GELU/Tanh the identity (:mod:`.activations`).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from lrponnx.compiler.units import Unit
from lrponnx.compiler.view import ModelView
from lrponnx.ops.context import Ctx, Unsupported
from lrponnx.ops.registry import HANDLERS, handler
from lrponnx.ops import linear, matmul, routing  # noqa: F401  (registered first: their MatMul and Gather are wrapped here)

#: ops whose output never depends on the *values* of their input
_SHAPE_READERS = ("Shape", "Size")


def value_dependent(view: ModelView) -> set[str]:
    """Tensors whose values depend on the values (not only the shapes) of a model input."""
    memo = view.__dict__.get("_value_dependent")
    if memo is not None:
        return memo
    dep = set(view.inputs)
    for node in view.graph.node:  # topological order
        if node.op_type in _SHAPE_READERS and node.domain in ("", "ai.onnx"):
            continue
        if any(i in dep for i in node.input if i):
            dep.update(o for o in node.output if o)
    view.__dict__["_value_dependent"] = dep
    return dep


def shape_only(view: ModelView, name: str) -> bool:
    """A tensor computed at run time from the input's shape only (a mask, position ids, a class
    token expanded to the batch): it carries no relevance."""
    return name in view.dynamic and name not in value_dependent(view)


def _rank(ctx: Ctx, name: str) -> int:
    shape = ctx.view.shape(name)
    if shape is None:
        raise Unsupported(f"needs the rank of {name!r}")
    return len(shape)


# -- Softmax -----------------------------------------------------------------------------------------

_MASK_MAKERS = ("Add", "Sub", "Where", "Sum")


@handler("Softmax", rules=("attnlrp-softmax",))
def softmax_rule(ctx: Ctx, unit: Unit, R: str) -> dict:
    if unit.rule is None:
        raise Unsupported("Softmax inside the network: the AttnLRP softmax rule applies with --composite attnlrp "
                          "(or --rule NODE=attnlrp-softmax)")
    node = unit.nodes[0]
    x, s = node.input[0], unit.output
    rank = _rank(ctx, x)
    opset = next((o.version for o in ctx.view.model.opset_import if o.domain in ("", "ai.onnx")), 13)
    axis = int(unit.info.get("axis", -1 if opset >= 13 else 1))
    axis = axis + rank if axis < 0 else axis
    if opset < 13 and axis != rank - 1:
        raise Unsupported("a Softmax before opset 13 over more than the last axis (it flattens from `axis` on)")
    if axis == 0:
        raise Unsupported("a Softmax over the batch axis")
    g = ctx.g
    total = g.op("ReduceSum", R, g.ints([axis]), keepdims=1, hint="r_softmax_sum")
    inner = g.op("Sub", R, g.op("Mul", s, total, hint="r_softmax_share"), hint="r_softmax_diff")
    r = g.op("Mul", x, inner, hint="r_softmax")
    producer = ctx.view.producer.get(x)
    if producer is not None and producer.op_type in _MASK_MAKERS:
        # a mask of -inf: s = 0 and R_s = 0 there, and x * 0 would be NaN; those positions get 0
        r = g.op("Where", g.op("IsInf", x, hint="masked"), g.const(0.0), r, hint="r_softmax_masked")
    return {x: r}


# -- products of two activations -------------------------------------------------------------------

def _swap_last(g, name: str, rank: int, hint: str) -> str:
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return g.op("Transpose", name, perm=perm, hint=hint)


def uniform_matmul(ctx: Ctx, unit: Unit, R: str) -> dict:
    """``O = A B`` of two activations: each factor gets half of the ε-0 decomposition."""
    node = unit.nodes[0]
    a, b, o = node.input[0], node.input[1], unit.output
    ra, rb = _rank(ctx, a), _rank(ctx, b)
    if ra < 2 or rb < 2:
        raise Unsupported("a MatMul of two activations with a 1-D operand")
    g = ctx.g
    eps = 0.0  # the uniform rule has no stabiliser: the eps-0 decomposition
    t = g.op("Mul", ctx.stab_div(R, o, eps, hint="q_uniform"), g.const(0.5), hint="t_uniform")
    out = {}
    o_shape, a_shape, b_shape = ctx.view.shape(o), ctx.view.shape(a), ctx.view.shape(b)
    known = o_shape is not None and a_shape is not None and b_shape is not None
    if a in ctx.view.dynamic and not shape_only(ctx.view, a):
        ga = g.op("MatMul", t, _swap_last(g, b, rb, "bT"), hint="g_uniform_a")  # [.., M, K] like A, batch of O
        out[a] = ctx.unbroadcast(g.op("Mul", a, ga, hint="r_uniform_a"), a, o_shape[:-2] + a_shape[-2:] if known else None)
    if b in ctx.view.dynamic and not shape_only(ctx.view, b):
        gb = g.op("MatMul", _swap_last(g, a, ra, "aT"), t, hint="g_uniform_b")  # [.., K, N] like B
        rb_ = ctx.unbroadcast(g.op("Mul", b, gb, hint="r_uniform_b"), b, o_shape[:-2] + b_shape[-2:] if known else None)
        out[b] = g.op("Add", out[b], rb_, hint="r_uniform_same") if b in out else rb_  # x @ x: both halves
    return out


_previous_matmul = HANDLERS.get("MatMul")


def _two_activations(ctx: Ctx, unit: Unit) -> bool:
    node = unit.nodes[0]
    return len(node.input) == 2 and all(i in ctx.view.dynamic for i in node.input)


@handler("MatMul", rules=(tuple(_previous_matmul.rules) if _previous_matmul else ()) + ("uniform",), replace=True)
def matmul(ctx: Ctx, unit: Unit, R: str) -> dict:
    if _two_activations(ctx, unit):
        if unit.rule is None or unit.rule.name != "uniform":
            raise Unsupported("a product of two activations (attention's Q Kᵀ or A V): the AttnLRP uniform rule "
                              "applies with --composite attnlrp (or --rule NODE=uniform)")
        return uniform_matmul(ctx, unit, R)
    if _previous_matmul is not None:
        return _previous_matmul.fn(ctx, unit, R)
    raise Unsupported("its weight or bias is computed at run time; LRP needs constant weights")


# -- embedding lookups -------------------------------------------------------------------------------

_previous_gather = HANDLERS.get("Gather")


@handler("Gather", rules=tuple(_previous_gather.rules) if _previous_gather else ("pass",), replace=True)
def gather(ctx: Ctx, unit: Unit, R: str) -> dict:
    node = unit.nodes[0]
    table, ids = node.input[0], node.input[1]
    view = ctx.view
    if view.is_const(table) and ids in view.dynamic:
        if shape_only(view, ids):
            return {}  # position ids, zeros as token types: a constant addend of the embedding sum
        shape = view.shape(table)
        axis = int(unit.info.get("axis", 0))
        if shape is None or len(shape) != 2 or axis not in (0, -2):
            raise Unsupported("an embedding lookup needs a 2-D table [vocabulary, hidden] gathered along axis 0")
        if view.elem_type(ids) not in (TensorProto.INT64, TensorProto.INT32):
            raise Unsupported("an embedding lookup by non-integer ids")
        return {ids: ctx.g.op("ReduceSum", R, ctx.g.ints([-1]), keepdims=0, hint="r_token")}
    if _previous_gather is not None:
        return _previous_gather.fn(ctx, unit, R)
    raise Unsupported("no LRP rule for this Gather")


# -- the fused Attention op (opset 23; PyTorch's dynamo exporter writes scaled_dot_product_attention so) --

def _heads_4d(g, t: str, heads: int, hint: str) -> str:
    """[B, S, H * d] -> [B, H, S, d]."""
    split = g.op("Reshape", t, g.ints([0, 0, heads, -1]), hint=f"{hint}_heads")
    return g.op("Transpose", split, perm=[0, 2, 1, 3], hint=hint)


def _heads_3d(g, t: str, hint: str) -> str:
    """[B, H, S, d] -> [B, S, H * d]."""
    return g.op("Reshape", g.op("Transpose", t, perm=[0, 2, 1, 3]), g.ints([0, 0, -1]), hint=hint)


@handler("Attention", rules=("attnlrp",))
def fused_attention(ctx: Ctx, unit: Unit, R: str) -> dict:
    """``Y = softmax(scale · Q Kᵀ + mask) V`` in one op: the same rules as its decomposed form
    (uniform on ``A V`` and ``Q Kᵀ``, the softmax rule, the mask keeps its share), with ``scale · Q Kᵀ``
    and the softmax recomputed in the relevance graph (the op does not output them)."""
    if unit.rule is None:
        raise Unsupported("a fused Attention: the AttnLRP rules apply with --composite attnlrp "
                          "(or --rule NODE=attnlrp)")
    node, view, g = unit.nodes[0], ctx.view, ctx.g
    ins = list(node.input) + [""] * 7
    q, k, v, mask = ins[0], ins[1], ins[2], ins[3]
    if any(ins[4:7]):
        raise Unsupported("an Attention with a key/value cache or padding lengths (past_key, past_value, "
                          "nonpad_kv_seqlen)")
    if any(o and view.consumers.get(o) for o in list(node.output)[1:]):
        raise Unsupported("an Attention whose present_key/value or qk_matmul_output is used")
    a = unit.info
    if int(a.get("is_causal", 0)):
        raise Unsupported("a causal Attention (is_causal=1)")
    if float(a.get("softcap", 0.0)) != 0.0:
        raise Unsupported("an Attention with softcap")
    q_shape, k_shape = view.shape(q), view.shape(k)
    if q_shape is None or k_shape is None or len(q_shape) not in (3, 4):
        raise Unsupported("an Attention needs the ranks of Q and K (3 or 4)")
    rank = len(q_shape)
    if rank == 3:
        hq, hk = int(a.get("q_num_heads", 0)), int(a.get("kv_num_heads", 0))
        if not hq or hq != hk:
            raise Unsupported("a 3-D Attention needs q_num_heads == kv_num_heads (grouped queries are not supported)")
        if q_shape[2] is None:
            raise Unsupported("a 3-D Attention needs the static hidden size")
        head = q_shape[2] // hq
        Q, K, V = (_heads_4d(g, t, hq, f"attn_{n}") for t, n in ((q, "q"), (k, "k"), (v, "v")))
        Y, RY = _heads_4d(g, unit.output, hq, "attn_y"), _heads_4d(g, R, hq, "attn_ry")
    else:
        if q_shape[1] is not None and k_shape[1] is not None and q_shape[1] != k_shape[1]:
            raise Unsupported("grouped-query Attention (fewer K/V heads than Q heads)")
        if q_shape[3] is None:
            raise Unsupported("an Attention needs the static head size")
        head = q_shape[3]
        Q, K, V, Y, RY = q, k, v, unit.output, R
    scale = float(a["scale"]) if "scale" in a else 1.0 / float(np.sqrt(head))
    KT = g.op("Transpose", K, perm=[0, 1, 3, 2], hint="attn_kT")
    P = g.op("MatMul", Q, KT, hint="attn_qk")                          # Q Kᵀ
    Ss = g.op("Mul", P, g.const(scale), hint="attn_scaled")
    S = Ss
    if mask:
        if not (view.is_const(mask) or shape_only(view, mask)):
            raise Unsupported("an Attention mask computed from activations")
        if view.elem_type(mask) == TensorProto.BOOL:
            m = g.op("Where", mask, g.const(0.0), g.const(float("-inf")), hint="attn_mask")
        else:
            m = mask if view.elem_type(mask) == TensorProto.FLOAT else g.op("Cast", mask, to=TensorProto.FLOAT)
        S = g.op("Add", Ss, m, hint="attn_masked")
    A = g.op("Softmax", S, axis=-1, hint="attn_probs")
    # O = A V: uniform
    t = g.op("Mul", ctx.stab_div(RY, Y, 0.0, hint="q_attn_av"), g.const(0.5), hint="t_attn_av")
    R_A = g.op("Mul", A, g.op("MatMul", t, g.op("Transpose", V, perm=[0, 1, 3, 2])), hint="r_attn_a")
    R_V = g.op("Mul", V, g.op("MatMul", g.op("Transpose", A, perm=[0, 1, 3, 2]), t), hint="r_attn_v")
    # softmax rule at S; a mask keeps its share (eps 0), -inf positions give 0
    total = g.op("ReduceSum", R_A, g.ints([-1]), keepdims=1)
    R_S = g.op("Mul", S, g.op("Sub", R_A, g.op("Mul", A, total)), hint="r_attn_s")
    if mask:
        R_S = g.op("Where", g.op("IsInf", S), g.const(0.0), R_S)
        R_S = g.op("Mul", Ss, ctx.stab_div(R_S, S, 0.0, hint="q_attn_mask"), hint="r_attn_unmasked")
    # P = Q Kᵀ: uniform (the scale passes relevance unchanged)
    tP = g.op("Mul", ctx.stab_div(R_S, P, 0.0, hint="q_attn_qk"), g.const(0.5), hint="t_attn_qk")
    R_Q = g.op("Mul", Q, g.op("MatMul", tP, K), hint="r_attn_q")
    R_K = g.op("Mul", K, g.op("MatMul", g.op("Transpose", tP, perm=[0, 1, 3, 2]), Q), hint="r_attn_k")
    if rank == 3:
        R_Q, R_K, R_V = _heads_3d(g, R_Q, "r_attn_q3"), _heads_3d(g, R_K, "r_attn_k3"), _heads_3d(g, R_V, "r_attn_v3")
    out = {}
    for name, r in ((q, R_Q), (k, R_K), (v, R_V)):
        if name in view.dynamic and not shape_only(view, name):
            out[name] = g.op("Add", out[name], r) if name in out else r
    return out

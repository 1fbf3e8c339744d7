"""Recognising LRN that arrives decomposed into elementary ops (e.g. torch.onnx's export of
``nn.LocalResponseNorm``), so it is explained with the LRN rule instead of being refused.

What the two exporters of torch 2.14 write for ``LocalResponseNorm(size, alpha, beta, k)``
(``F.local_response_norm``: ``x / (k + alpha * avgpool_size(x^2)) ** beta`` with the channel
axis zero-padded by ``size//2`` before and ``(size-1)//2`` after)::

    dynamo=True :  Mul(x,x) Reshape|Unsqueeze Pad AveragePool Squeeze [Reshape] Mul Add Pow Div(x, .)
    dynamo=False:  Mul(x,x) Reshape|Unsqueeze Pad AveragePool If(Squeeze|Identity) [Reshape] Mul Add Pow Div(x, .)
                   + a constant subgraph for the pads (ConstantOfShape/Concat/Slice/Transpose/Cast)
                   + Shape/Gather helpers (the If's condition; with a dynamic batch also the
                     Reshape targets, computed from Shape(x))

The matcher does not compare node sequences. It anchors at ``Div(x, Pow(s, beta))`` (or
``Mul(x, Pow(s, -beta))``), walks back through ops that only move data (Reshape, Squeeze,
Unsqueeze, Flatten, Identity, an ``If`` whose branches only do those) and scalar affine ops
(Mul/Div/Add/Sub by a constant, giving ``s = k + alpha * avg``) to one AveragePool, through an
optional constant Pad to ``Mul(x, x)`` or ``Pow(x, 2)`` of the *same* ``x``. The pool's kernel
and the pads give the window: one kernel axis > 1 is ``across`` (size ``n``, ``lo``/``hi`` from
the padding before/after), an ``n x n`` kernel on a rank-4 input is ``within``.

The structure only proposes an :class:`~lrponnx.compiler.lrn_ops.LrnSpec`; the numbers decide. The chain's
subgraph (every node of the unit, constants as initializers, ``x`` as the only input) runs in
ONNX Runtime on random inputs, positive and mixed-sign, at a scale where ``alpha * sum x^2`` is
as large as ``k``; the fused formula (numpy, float64, from the spec) must reproduce it, or there
is no match. Nodes that compute shapes from ``x`` (Shape/Gather/Concat/Equal feeding a Reshape or
the If) join the unit when nothing outside the chain reads them; their outputs are integers, so
they never carry relevance.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lrponnx.compiler.lrn_ops import LrnSpec
from lrponnx.compiler.unit import Unit
from lrponnx.compiler.view import ModelView, attrs_of

log = logging.getLogger(__name__)

#: ops that move data without changing values (the window reshapes of the exporters)
MOVE_OPS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")
#: ops allowed in the shape helpers of a chain (their outputs must not be floating point)
HELPER_OPS = ("Shape", "Size", "Gather", "GatherElements", "Unsqueeze", "Squeeze", "Concat", "Cast", "Equal",
              "Slice", "Reshape", "Identity", "ConstantOfShape", "Add", "Sub", "Mul", "Div", "Greater", "Less",
              "Not", "And", "Or", "Where", "Range", "ReduceProd", "Min", "Max", "If", "Constant")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16)
#: agreement the numerical check asks of chain (float32) and fused formula (float64)
CHECK_RTOL = 1e-4
CHECK_ATOL = 1e-5  # times max |y|


def find_decomposed_lrn(view: ModelView) -> list[Unit]:
    """Units for every decomposed LRN chain in the graph that passes the numerical check."""
    units: list[Unit] = []
    taken: set[str] = set()
    order = {n.name: i for i, n in enumerate(view.graph.node)}
    implicit = _implicit_consumers(view.graph)
    for node in view.graph.node:
        if node.op_type not in ("Div", "Mul") or node.domain not in ("", "ai.onnx"):
            continue
        found = _match_at(view, node)
        if found is None:
            continue
        x, main, spec = found
        y = node.output[0]
        helpers = _shape_helpers(view, main, x)
        if helpers is None:
            continue
        nodes = main + helpers
        if any(n.name in taken for n in nodes):
            continue
        nodes = _close(view, main, helpers, y, implicit)
        if nodes is None:
            continue
        nodes.sort(key=lambda n: order[n.name])
        if not verify_chain(view, nodes, x, y, spec):
            log.info("decomposed LRN candidate at %r rejected: the chain is not %s", node.name, spec)
            continue
        taken.update(n.name for n in nodes)
        units.append(Unit(kind="LRN", name=node.name, op_type="LocalResponseNorm", nodes=nodes, inputs=[x],
                          output=y, info=spec,
                          notes=[f"decomposed LRN of {len(nodes)} nodes ({spec.region}, size {spec.size}, "
                                 f"window [-{spec.lo}, +{spec.hi}])"]))
    return units


# -- structure -----------------------------------------------------------------------------------

def _scalar(view: ModelView, name: str) -> float | None:
    """The value of a constant scalar (any shape with one element), else None."""
    if not name or not view.is_const(name):
        return None
    try:
        v = np.asarray(view.value(name))
    except Exception:  # a constant we cannot evaluate: not ours to match
        return None
    if v.size != 1 or not np.issubdtype(v.dtype, np.number):
        return None
    return float(v.reshape(()))


def _producer(view: ModelView, name: str) -> onnx.NodeProto | None:
    node = view.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _match_at(view: ModelView, end: onnx.NodeProto):
    """(x, main nodes, spec) if ``end`` closes a chain shaped like LRN, else None."""
    cands = []
    if end.op_type == "Div":
        cands.append((end.input[0], end.input[1], 1.0))
    else:  # Mul(x, Pow(s, -beta)) in either order
        cands += [(end.input[0], end.input[1], -1.0), (end.input[1], end.input[0], -1.0)]
    for x, p, sign in cands:
        if x not in view.dynamic or p not in view.dynamic or x == p:
            continue
        pw = _producer(view, p)
        if pw is None or pw.op_type != "Pow":
            continue
        e = _scalar(view, pw.input[1])
        if e is None or pw.input[0] not in view.dynamic:
            continue
        beta = sign * e
        found = _walk_to_square(view, pw.input[0], x)
        if found is None:
            continue
        steps, scale, offset, pool, pad, square = found
        spec = _spec(view, pool, pad, scale, offset, beta, view.shape(x))
        if spec is None:
            continue
        return x, [end, pw] + steps + [square], spec
    return None


def _walk_to_square(view: ModelView, s: str, x: str):
    """From ``s`` back to ``x*x``: (steps, scale, offset, pool, pad, square) with s = offset + scale*avg."""
    steps: list[onnx.NodeProto] = []
    scale, offset = 1.0, 0.0
    t = s
    while True:  # s side of the pool: data moves and scalar affine maps
        n = _producer(view, t)
        if n is None:
            return None
        steps.append(n)
        if n.op_type == "AveragePool":
            pool = n
            break
        if n.op_type in MOVE_OPS:
            t = n.input[0]
        elif n.op_type == "If":
            t = _if_passthrough(n)
            if t is None:
                return None
        elif n.op_type in ("Mul", "Add", "Sub", "Div"):
            dyn = [i for i in n.input if i in view.dynamic]
            if len(dyn) != 1:
                return None
            other = n.input[1] if n.input[0] == dyn[0] else n.input[0]
            c = _scalar(view, other)
            if c is None:
                return None
            first = n.input[0] == dyn[0]
            # s = scale * out + offset, out = op(t, c): rewrite in terms of t
            if n.op_type == "Mul":
                scale *= c
            elif n.op_type == "Add":
                offset += scale * c
            elif n.op_type == "Sub":
                if first:
                    offset -= scale * c
                else:
                    offset += scale * c
                    scale = -scale
            else:  # Div
                if not first or c == 0:
                    return None
                scale /= c
            t = dyn[0]
        else:
            return None
    # x^2 side of the pool: data moves and at most one Pad
    t = pool.input[0]
    pad = None
    first_step = True
    while True:
        n = _producer(view, t)
        if n is None:
            return None
        if n.op_type == "Pad" and pad is None and first_step:
            pad = n
            steps.append(n)
            t = n.input[0]
        elif n.op_type in MOVE_OPS:
            steps.append(n)
            t = n.input[0]
        elif n.op_type == "Mul" and n.input[0] == n.input[1] == x:
            return steps, scale, offset, pool, pad, n
        elif n.op_type == "Pow" and n.input[0] == x and _scalar(view, n.input[1]) == 2.0:
            return steps, scale, offset, pool, pad, n
        else:
            return None
        first_step = False


def _if_passthrough(node: onnx.NodeProto) -> str | None:
    """The outer tensor an If hands on in both branches through data moves only (torch's
    ``squeeze(1)`` export), else None."""
    outer = set()
    for a in node.attribute:
        if a.name not in ("then_branch", "else_branch"):
            continue
        g = a.g
        if len(g.output) != 1:
            return None
        inner = {o: n for n in g.node for o in n.output}
        t = g.output[0].name
        while t in inner:
            n = inner[t]
            if n.op_type not in MOVE_OPS:
                return None
            for extra in n.input[1:]:  # axes / shape: must be made inside the branch by Constant
                if extra and (extra not in inner or inner[extra].op_type != "Constant"):
                    return None
            t = n.input[0]
        outer.add(t)
    return outer.pop() if len(outer) == 1 else None


def _ints(attrs: dict, key: str, default: list[int]) -> list[int]:
    return [int(v) for v in attrs.get(key, default)]


def _spec(view: ModelView, pool: onnx.NodeProto, pad: onnx.NodeProto | None, scale: float, offset: float,
          beta: float, x_shape) -> LrnSpec | None:
    """The LrnSpec the pool's window and the affine constants describe, or None."""
    a = attrs_of(pool)
    kernel = _ints(a, "kernel_shape", [])
    m = len(kernel)
    if m == 0:
        return None
    auto_pad = a.get("auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID"):
        return None
    if any(v != 1 for v in _ints(a, "strides", [1] * m)) or any(v != 1 for v in _ints(a, "dilations", [1] * m)):
        return None
    pads = _ints(a, "pads", [0] * 2 * m)
    begin, end = pads[:m], pads[m:]
    if pad is not None:
        pa = attrs_of(pad)
        mode = pa.get("mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            return None
        if len(pad.input) < 2 or not view.is_const(pad.input[1]):
            return None
        if len(pad.input) > 2 and pad.input[2]:
            v = _scalar(view, pad.input[2])
            if v is None or v != 0.0:
                return None
        try:
            p = [int(v) for v in np.asarray(view.value(pad.input[1])).reshape(-1)]
        except Exception:
            return None
        r = m + 2
        if len(pad.input) > 3 and pad.input[3]:  # axes
            if not view.is_const(pad.input[3]):
                return None
            axes = [int(v) % r for v in np.asarray(view.value(pad.input[3])).reshape(-1)]
        else:
            axes = list(range(r))
        if len(p) != 2 * len(axes):
            return None
        full = [0] * (2 * r)
        for j, ax in enumerate(axes):
            full[ax], full[r + ax] = p[j], p[len(axes) + j]
        if any(full[i] != 0 for i in (0, 1, r, r + 1)):
            return None
        begin = [b + full[2 + i] for i, b in enumerate(begin)]
        end = [e + full[r + 2 + i] for i, e in enumerate(end)]
    if any(v < 0 for v in begin + end):
        return None
    wide = [i for i, kk in enumerate(kernel) if kk > 1 or begin[i] or end[i]]
    if len(wide) <= 1:  # across channels: one window axis (the channel axis, after the reshapes)
        if not wide:
            return LrnSpec("across", 1, scale, beta, offset, 0, 0)
        i = wide[0]
        n = kernel[i]
        if begin[i] + end[i] != n - 1:
            return None
        return LrnSpec("across", n, scale, beta, offset, begin[i], end[i])
    # within a channel: an n x n window over both spatial axes of the rank-4 input itself
    n = kernel[0]
    if (m != 2 or x_shape is None or len(x_shape) != 4 or n % 2 != 1 or kernel != [n, n]
            or begin != [(n - 1) // 2] * 2 or end != [(n - 1) // 2] * 2):
        return None
    return LrnSpec("within", n, scale, beta, offset, (n - 1) // 2, (n - 1) // 2)


def _shape_helpers(view: ModelView, main: list[onnx.NodeProto], x: str) -> list[onnx.NodeProto] | None:
    """The nodes that compute the chain's non-data operands from ``x`` or the chain (shapes,
    the If's condition). None when an operand depends on another input of the graph."""
    made = {o for n in main for o in n.output}
    helpers: dict[str, onnx.NodeProto] = {}
    data_in = {x} | made

    def visit(t: str) -> bool:
        if not t or t in data_in or view.is_const(t):
            return True
        n = view.producer.get(t)
        if n is None:  # another graph input
            return False
        if n.name in helpers:
            return True
        if n.op_type not in HELPER_OPS or any(view.elem_type(o) in _FLOAT_TYPES for o in n.output if o):
            return False
        helpers[n.name] = n
        return all(visit(i) for i in n.input) and all(visit(i) for i in _implicit_inputs(n))

    main_names = {n.name for n in main}
    for n in main:
        for i in list(n.input) + _implicit_inputs(n):
            if not visit(i):
                return None
    return [n for name, n in helpers.items() if name not in main_names]


def _close(view: ModelView, main, helpers, y: str, implicit: dict) -> list[onnx.NodeProto] | None:
    """The unit's nodes: ``main`` must hand nothing but ``y`` outside; a helper read from outside
    stays outside (it computes integers: no relevance reaches it)."""
    def readers(t: str) -> list[str]:
        return [c.name for c in view.consumers.get(t, [])] + implicit.get(t, [])

    keep = list(helpers)
    while True:
        names = {n.name for n in main} | {n.name for n in keep}
        leaky = [h for h in keep if any(o in view.outputs or any(r not in names for r in readers(o))
                                        for o in h.output if o)]
        if not leaky:
            break
        keep = [h for h in keep if h not in leaky]
    for n in main:
        for o in n.output:
            if not o or o == y:
                continue
            if o in view.outputs or any(r not in names for r in readers(o)):
                return None
    return list(main) + keep


def _implicit_inputs(node: onnx.NodeProto) -> list[str]:
    """Outer-scope tensors a node's subgraphs read."""
    out: list[str] = []
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                defined.update(n.output)
            for n in g.node:
                for i in list(n.input) + _implicit_inputs(n):
                    if i and i not in defined and i not in out:
                        out.append(i)
    return out


def _implicit_consumers(graph: onnx.GraphProto) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for n in graph.node:
        for t in _implicit_inputs(n):
            users.setdefault(t, []).append(n.name)
    return users


# -- the numerical check ---------------------------------------------------------------------------

def lrn_reference(x: np.ndarray, spec: LrnSpec) -> np.ndarray:
    """``y = x (k + a S)^-beta`` in float64 from the spec (window sums by shifted slices)."""
    x = np.asarray(x, dtype=np.float64)
    x2 = x * x
    S = np.zeros_like(x2)
    if spec.region == "across":
        C = x.shape[1]
        for d in range(-spec.lo, spec.hi + 1):  # S_c += x_{c+d}^2
            lo_c, hi_c = max(0, -d), min(C, C - d)
            if lo_c < hi_c:
                S[:, lo_c:hi_c] += x2[:, lo_c + d:hi_c + d]
    else:
        H, W = x.shape[2], x.shape[3]
        for dh in range(-spec.lo, spec.hi + 1):
            for dw in range(-spec.lo, spec.hi + 1):
                h0, h1, w0, w1 = max(0, -dh), min(H, H - dh), max(0, -dw), min(W, W - dw)
                if h0 < h1 and w0 < w1:
                    S[:, :, h0:h1, w0:w1] += x2[:, :, h0 + dh:h1 + dh, w0 + dw:w1 + dw]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return x * (spec.k + spec.a * S) ** (-spec.beta)


def _chain_model(view: ModelView, nodes: list[onnx.NodeProto], x: str, y: str, x_shape: list[int]):
    made = {o for n in nodes for o in n.output if o}
    needed: list[str] = []
    for n in nodes:
        for i in list(n.input) + _implicit_inputs(n):
            if i and i != x and i not in made and i not in needed:
                needed.append(i)
    inits = []
    for name in needed:
        if not view.is_const(name):
            return None
        inits.append(numpy_helper.from_array(np.asarray(view.value(name)), name))
    elem = view.elem_type(x)
    graph = helper.make_graph(list(nodes), "lrn_chain", [helper.make_tensor_value_info(x, elem, x_shape)],
                              [helper.make_tensor_value_info(y, elem, None)], inits)
    model = helper.make_model(graph, opset_imports=list(view.model.opset_import),
                              ir_version=view.model.ir_version)
    model.functions.extend(view.model.functions)
    return model


def verify_chain(view: ModelView, nodes: list[onnx.NodeProto], x: str, y: str, spec: LrnSpec,
                 seed: int = 0) -> bool:
    """Run the chain on random inputs and compare with the fused formula of ``spec``."""
    shape = view.shape(x)
    if shape is None or len(shape) < 2:
        return False
    shape = [d if d is not None else 2 for d in shape]
    if view.elem_type(x) not in _FLOAT_TYPES:
        return False
    try:
        import onnxruntime as ort

        model = _chain_model(view, nodes, x, y, shape)
        if model is None:
            return False
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # the chain does not even run on its own: not an LRN we can vouch for
        log.info("decomposed LRN check could not run the chain: %s", e)
        return False
    dtype = helper.tensor_dtype_to_np_dtype(view.elem_type(x))
    rng = np.random.default_rng(seed)
    # A scale where alpha * sum x^2 is as large as k, so every parameter moves the output.
    big = np.sqrt(max(abs(spec.k), 1e-3) / abs(spec.alpha)) if spec.alpha else 1.0
    big = float(np.clip(big, 1e-3, 1e4))
    trials = [rng.standard_normal(shape) * big, np.abs(rng.standard_normal(shape)) * big,
              rng.standard_normal(shape)]
    for xv in trials:
        xv = xv.astype(dtype)
        try:
            got = np.asarray(sess.run(None, {x: xv})[0], dtype=np.float64)
        except Exception as e:
            log.info("decomposed LRN check failed to run: %s", e)
            return False
        want = lrn_reference(xv, spec)
        if got.shape != want.shape:
            return False
        finite = np.isfinite(want)
        if not np.array_equal(finite, np.isfinite(got)):
            return False
        scale = np.abs(want[finite]).max() if finite.any() else 0.0
        if not np.allclose(got[finite], want[finite], rtol=CHECK_RTOL, atol=CHECK_ATOL * scale):
            return False
    return True

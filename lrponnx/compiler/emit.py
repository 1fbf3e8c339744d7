"""The explainer compiler: a model in, the model plus its relevance graph out.

1. :func:`lrponnx.compiler.load.prepare` reads, checks, upgrades and shape-infers the model.
2. :func:`lrponnx.compiler.units.build_units` groups its nodes into units (linear layers with their
   folded bias/BatchNorm, LRNs, single ops) without changing the forward graph.
3. :func:`lrponnx.rules.composites.assign_rules` gives each unit a rule.
4. :func:`emit_relevance` walks the units from the logits back to the inputs and appends each
   unit's relevance subgraph (from the handler table in :mod:`lrponnx.ops`).
5. The result is checked with ``onnx.checker.check_model(full_check=True)``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from lrponnx.version import __version__
from lrponnx.compiler.builder import GraphBuilder, state_spatial_attributes
from lrponnx.rules.composites import RuleOptions, assign_rules, parse_override
from lrponnx.errors import InvalidModelError, Offender, RuleError, UnsupportedModelError, shorten
from lrponnx.compiler.load import first_line, prepare, read_model, skeleton
from lrponnx.ops import TARGET_RUNTIMES, Ctx, Unsupported, combine, load_handlers
from lrponnx.ops.activations import gate_source
from lrponnx.ops.attention import shape_only
from lrponnx.ops.registry import UNKNOWN
from lrponnx.compiler.units import Unit, build_units
from lrponnx.compiler.view import ModelView
from lrponnx import metadata as M
from lrponnx.metadata import FORMAT, TARGET_INPUT  # noqa: F401  (re-exported: the format and input name)

SEEDS = ("logit", "one")


@dataclass
class Plan:
    """What the compiler would do: the units with their rules, and what it cannot explain."""

    model: onnx.ModelProto
    view: ModelView
    units: list[Unit]
    logits: str
    offenders: list[Offender]
    output: str = ""     # the graph output explained (``logits`` itself, or the Softmax made from it)


def _options(composite, epsilon, gamma, low, high, rules, lrn_rule, lrn_epsilon, lrn_denominator) -> RuleOptions:
    overrides = [parse_override(r) if isinstance(r, str) else r for r in (rules or [])]
    return RuleOptions(composite=composite, epsilon=float(epsilon), gamma=float(gamma), low=low, high=high,
                       lrn_rule=lrn_rule, lrn_epsilon=float(lrn_epsilon), lrn_denominator=lrn_denominator,
                       overrides=overrides)


def find_logits(view: ModelView, output: str | None = None) -> str:
    """The tensor to explain (the class scores): see :func:`choose_output`."""
    return choose_output(view, output)[1]


def _terminal_softmax_input(view: ModelView, out: str) -> str | None:
    """The input of a Softmax/LogSoftmax over the class axis that produces graph output ``out``."""
    node = view.producer.get(out)
    if node is None or node.op_type not in ("Softmax", "LogSoftmax") or node.domain not in ("", "ai.onnx"):
        return None
    shape = view.shape(node.input[0])
    axis = int(next((a.i for a in node.attribute if a.name == "axis"), -1))
    if shape is None:
        return node.input[0] if axis in (1, -1) else None
    rank = len(shape)
    axis = axis + rank if axis < 0 else axis
    # axis 1: over the classes of [N, K] or [N, K, 1, ..., 1]; the last axis of [N, K] is the same
    if axis == 1 or (axis == rank - 1 and rank == 2):
        return node.input[0]
    # opset < 13 flattens from `axis` on: axis 1 over [N, K, 1, 1] is also over the classes
    return None


def _class_scores(view: ModelView, name: str) -> bool:
    """Shape [N, K] or [N, K, 1, ..., 1] with a static K."""
    shape = view.shape(name)
    return shape is not None and len(shape) >= 2 and shape[1] is not None and all(d == 1 for d in shape[2:])


def _describe(view: ModelView, name: str) -> str:
    shape = view.shape(name)
    dims = "?" if shape is None else "[" + ", ".join("N" if k == 0 and d is None else str(d if d is not None
                                                                                         else "?")
                                                     for k, d in enumerate(shape)) + "]"
    soft = " (Softmax)" if _terminal_softmax_input(view, name) is not None else ""
    return f"{shorten(name)} {dims}{soft}"


def choose_output(view: ModelView, output: str | None = None) -> tuple[str, str]:
    """(graph output, tensor to explain). The tensor is the output itself, or the input of the
    Softmax/LogSoftmax (over the classes) that produces it: the class scores.

    ``output``: the graph output to explain (or the class scores feeding a terminal Softmax). By
    default: the only output; with several, the only one made by a terminal Softmax/LogSoftmax;
    otherwise a :class:`RuleError` lists the candidates."""
    if not view.outputs:
        raise InvalidModelError("the model has no outputs")
    if output is not None:
        if output in view.outputs:
            return output, _terminal_softmax_input(view, output) or output
        for out in view.outputs:  # the logits that a terminal Softmax turns into an output
            if _terminal_softmax_input(view, out) == output:
                return out, output
        listed = ", ".join(_describe(view, o) for o in view.outputs)
        raise RuleError(f"output {shorten(output)!r} is not an output of the model; its outputs: {listed}")
    if len(view.outputs) == 1:
        out = view.outputs[0]
        return out, _terminal_softmax_input(view, out) or out
    soft = [o for o in view.outputs if _terminal_softmax_input(view, o) is not None
            and _class_scores(view, _terminal_softmax_input(view, o))]
    if len(soft) == 1:
        return soft[0], _terminal_softmax_input(view, soft[0])
    listed = ", ".join(_describe(view, o) for o in view.outputs)
    raise RuleError(f"the model has {len(view.outputs)} outputs and none is clearly the class scores: {listed}; "
                    "choose one with --explain-output NAME (Python: output=NAME)")


def check_float32(view: ModelView) -> None:
    """float64 activations or weights: refused plainly (the explainer graph is float32)."""
    doubles = [n for n in list(view.inputs) + list(view.outputs)
               if view.elem_type(n) == TensorProto.DOUBLE]
    # values computed from the input's data (not from its shape only: Shape/Size cut the chain)
    data = set(view.inputs)
    for node in view.graph.node:
        if node.op_type not in ("Shape", "Size") and any(i in data for i in node.input if i):
            data.update(o for o in node.output if o)
    doubles += [n for n in view.graph.node for n in n.output
                if n in data and view.elem_type(n) == TensorProto.DOUBLE]
    if doubles:
        raise InvalidModelError(
            f"float64 models are not supported (tensor {shorten(doubles[0])!r} is float64); export the model "
            "in float32 (PyTorch: model.float() before torch.onnx.export) and convert that")


# The rule knobs' defaults are the rules' own, read through RuleOptions (never repeated here).
_D = RuleOptions


def plan(model, composite: str = _D.composite, *, epsilon: float = _D.epsilon, gamma: float = _D.gamma,
         low=None, high=None, rules=(), lrn_rule: str = _D.lrn_rule, lrn_epsilon: float = _D.lrn_epsilon,
         lrn_denominator: str = _D.lrn_denominator, lazy_weights: bool = False, output: str | None = None,
         input_shape=None) -> Plan:
    """Prepare the model, assign rules and list what cannot be explained, without emitting the
    explainer (``lrponnx inspect``). ``lazy_weights``, ``output``, ``input_shape``: see :func:`convert`."""
    p = _plan(model, composite, epsilon=epsilon, gamma=gamma, low=low, high=high, rules=rules, lrn_rule=lrn_rule,
              lrn_epsilon=lrn_epsilon, lrn_denominator=lrn_denominator, lazy_weights=lazy_weights, output=output,
              input_shape=input_shape)
    p.offenders = check_support(p.view, p.units, p.logits)
    return p


def _plan(model, composite: str, *, epsilon, gamma, low, high, rules, lrn_rule, lrn_epsilon, lrn_denominator,
          lazy_weights, output, input_shape) -> Plan:
    """:func:`plan` without the support check (``convert`` finds the offenders while emitting)."""
    model = prepare(model, lazy_weights, input_shape)
    view = ModelView(model)
    check_float32(view)
    explained, logits = choose_output(view, output)
    units = build_units(view)
    opts = _options(composite, epsilon, gamma, low, high, rules, lrn_rule, lrn_epsilon, lrn_denominator)
    if opts.low is None and opts.high is None and opts.composite == "epsilon-gamma-box":
        opts.low, opts.high = _bounds_from_metadata(model)
    assign_rules(units, view.inputs, opts)
    return Plan(model, view, units, logits, [], explained)


def check_support(view: ModelView, units: list[Unit], logits: str, target_runtime: str = "any") -> list[Offender]:
    """Every unit on the relevance path that cannot be explained, without emitting the explainer:
    those without a handler, and those whose handler's ``supports`` check refuses them. It walks the
    units as :func:`emit_relevance` does (from the logits back, only units relevance reaches). A
    handler without a ``supports`` check (its refusals depend on what it reads while emitting) is
    run on its unit alone, into a scratch graph that is thrown away."""
    table = load_handlers()
    scratch: Ctx | None = None
    received, offenders = {logits}, []
    for u in reversed(units):
        internal = {i for m in u.nodes for i in m.input}
        extra = [o for n in u.nodes for o in n.output if o and o != u.output and o in received and o not in internal]
        if u.output not in received and not extra:
            continue
        h = table.get(u.kind)
        why, handed = None, None
        if extra and not (h is not None and h.multi_output):
            why = _extra_outputs(extra)
        elif shape_only(view, u.output):
            handed = []  # made from the input's shape only: no relevance
        elif h is None:
            why = _why_unsupported(u)
        else:
            why = h.supports(Ctx(None, view, target_runtime=target_runtime), u) if h.supports else UNKNOWN
        if why is UNKNOWN:  # only an emission can tell: this unit alone, into a scratch graph
            if scratch is None:
                graph = onnx.GraphProto()
                graph.input.extend(view.graph.input)
                scratch = Ctx(GraphBuilder(graph), view, target_runtime=target_runtime)
            why, handed = _emit_alone(scratch, h, u, u.output in received, extra)
        if why is not None:
            offenders.append(Offender(u.name, u.op_type, why))
            handed = [i for i in u.inputs if view.is_float(i)]
        elif handed is None:
            handed = [i for i in _receiving_inputs(view, u)
                      if view.is_float(i) or view.elem_type(i) == TensorProto.UNDEFINED]
        received.update(handed)
    return offenders


def _emit_alone(ctx: Ctx, h, u: Unit, has_relevance: bool, extra: list[str]) -> tuple[str | None, list]:
    """Run one handler on its unit with placeholder relevance: (its refusal or None, the inputs it hands to)."""
    R = ctx.g.fresh("dry_run_R")
    ctx.out_relevance = {o: R for o in extra} | {u.output: R if has_relevance else None} if h.multi_output else {}
    try:
        return None, list(h.fn(ctx, u, R if has_relevance else None))
    except Unsupported as e:
        return str(e), []


def _extra_outputs(extra: list[str]) -> str:
    return f"relevance arrives at output(s) {extra}; only the first output is explained"


def _bounds_from_metadata(model: onnx.ModelProto):
    """zbox bounds in model input units from the preprocessing metadata (pixel range mapped)."""
    meta = {p.key: p.value for p in model.metadata_props}
    if M.PREPROCESSING_KEY not in meta:
        return None, None
    pre = json.loads(meta[M.PREPROCESSING_KEY])
    if pre.get("embedded"):
        return 0.0, float(pre.get("pixel_scale", 255.0))
    mean = np.asarray(pre.get("mean", 0.0), dtype=np.float64)
    if mean.ndim > 1:  # a mean image: use its per-channel extremes conservatively
        mean_lo = mean.reshape(mean.shape[0], -1).max(axis=1)
        mean_hi = mean.reshape(mean.shape[0], -1).min(axis=1)
    else:
        mean_lo = mean_hi = mean
    std = np.asarray(pre.get("std", 1.0), dtype=np.float64)
    scale = float(pre.get("scale", 1.0))
    top = float(pre.get("pixel_scale", 255.0))
    low = (0.0 - mean_lo) / std * scale
    high = (top - mean_hi) / std * scale
    return np.atleast_1d(low).tolist(), np.atleast_1d(high).tolist()


def _relevance_path(view: ModelView, units: list[Unit], logits: str) -> list[Unit]:
    """Units whose output can carry relevance back from the logits (float data inputs only)."""
    by_output = {}
    for u in units:
        for n in u.nodes:
            for o in n.output:
                by_output[o] = u
    seen, stack, path = set(), [logits], []
    while stack:
        t = stack.pop()
        u = by_output.get(t)
        if u is None or id(u) in seen:
            continue
        seen.add(id(u))
        path.append(u)
        stack.extend(i for i in _receiving_inputs(view, u)
                     if view.is_float(i) or view.elem_type(i) == TensorProto.UNDEFINED)
    return path


def _receiving_inputs(view: ModelView, u: Unit) -> list[str]:
    """The inputs a unit hands relevance to: all but the gate of a ``signal-takes-all`` product."""
    if u.rule is not None and u.rule.name == "signal-takes-all" and len(u.inputs) == 2:
        gates = [i for i in u.inputs if gate_source(view, i) is not None]
        if len(gates) == 1:
            return [i for i in u.inputs if i != gates[0]]
    return list(u.inputs)


def _why_unsupported(u: Unit) -> str:
    node = u.nodes[0]
    if node.domain not in ("", "ai.onnx"):
        return f"op from domain {node.domain!r} has no LRP rule"
    if node.op_type in ("Softmax", "LogSoftmax"):
        return "Softmax inside the network (only a Softmax/LogSoftmax producing the output is removed)"
    return f"no LRP rule for op type {node.op_type}"


def convert(model, composite: str = _D.composite, *, epsilon: float = _D.epsilon, gamma: float = _D.gamma,
            low=None, high=None, rules=(), seed: str = "logit", layer_relevance: bool = False,
            lrn_rule: str = _D.lrn_rule, lrn_epsilon: float = _D.lrn_epsilon, lrn_denominator: str = _D.lrn_denominator,
            lazy_weights: bool = False, exact_forward: bool = False, target_runtime: str = "any",
            output: str | None = None, input_shape=None) -> onnx.ModelProto:
    """Compile ``model`` (a path or ModelProto) into an explainer ONNX model.

    The explainer keeps the model's inputs and outputs, adds a required int64 ``target`` input
    of shape [N] (one class per sample; -1 means the argmax) and one float32 relevance output per model input
    (``relevance``, or ``relevance_<input>`` for several inputs).

    ``lazy_weights`` (a path with external data only): leave the model's weights on disk; the
    explainer then refers to them there and must be written with :func:`lrponnx.files.save_model`,
    which copies them. This is how ``lrponnx convert`` keeps its memory below twice the model's size.

    ``exact_forward``: keep every forward node as it is, so the predictions are bit-identical to
    the model's. By default an ONNX ``LRN`` node is recomputed with the plain ops its rule shares
    (about twice as fast in ONNX Runtime; equal to float rounding), see ``ops/lrn.py``.

    ``target_runtime``: ``"any"`` (the fastest forms on ONNX Runtime's CPU provider, which every
    runtime but WebGPU runs) or ``"webgpu"`` (no 3-D pooling, no MaxPool ``Indices``: what
    onnxruntime-web's WebGPU provider runs; exact too, slower on the CPU). See ``docs/webgpu.md``.

    ``output``: the graph output whose class scores are explained (the input of a terminal
    Softmax/LogSoftmax when one makes it). Default: the only output, or the only output made by a
    terminal Softmax; a model with several outputs and no such choice is refused with the list.
    The scores must be ``[N, K]`` or ``[N, K, 1, ..., 1]``; recorded as ``lrponnx.logits``
    (the tensor) and ``lrponnx.output`` (the graph output).

    ``input_shape``: fix the model's input shape first, ``"N,3,224,224"`` (one input; ``N`` or ``?``
    keeps a dim symbolic), ``"name:1,3,224,224;other:..."`` or a dict ``{name: dims}``; for models
    whose spatial size is symbolic (see :mod:`lrponnx.compiler.shapes`). The explainer's input has that shape.
    """
    if seed not in SEEDS:
        raise RuleError(f"seed must be one of {', '.join(SEEDS)}, got {seed!r}")
    if target_runtime not in TARGET_RUNTIMES:
        raise RuleError(f"target_runtime must be one of {', '.join(TARGET_RUNTIMES)}, got {target_runtime!r}")
    p = _plan(model, composite, epsilon=epsilon, gamma=gamma, low=low, high=high, rules=rules,
              lrn_rule=lrn_rule, lrn_epsilon=lrn_epsilon, lrn_denominator=lrn_denominator,
              lazy_weights=lazy_weights, output=output, input_shape=input_shape)
    explainer = p.model  # prepare() made our own copy: extend it in place
    g = GraphBuilder(explainer.graph)
    ctx = Ctx(g, p.view, exact_forward=exact_forward, target_runtime=target_runtime)
    # One emission: every unsupported node is collected on the way and reported together (before a
    # problem with the explained output, as when the offenders came from a separate check)
    seed_problem = _seed_problem(g, p.view, p.logits)
    R0 = g.fresh("seed") if seed_problem else _emit_seed(g, p.view, p.logits, seed)
    exposed: list = [] if layer_relevance else None
    relevance, offenders = emit_relevance(ctx, p.units, p.logits, R0, exposed)
    if offenders:
        raise UnsupportedModelError(offenders)
    if seed_problem:
        raise seed_problem
    names = _emit_outputs(g, p.view, relevance)
    recomputed = g.apply_forward_replacements()  # after emission: the view reads the original forward nodes
    for name, tensor, shape in exposed or []:  # after the model's outputs and `relevance`
        g.identity(tensor, name)
        g.output(name, TensorProto.FLOAT, shape)
    prune_dead(explainer.graph, g.prefix)  # after every output is in place (--layer-relevance reads more)
    _write_metadata(explainer, p, composite, seed, names, recomputed)
    explainer.metadata_props.append(onnx.StringStringEntryProto(key=M.TARGET_RUNTIME_KEY, value=target_runtime))
    state_spatial_attributes(explainer)  # the model's own Convs and pools too (WebGPU reads them)
    _check(explainer, model)
    return explainer


def prune_dead(graph: onnx.GraphProto, prefix: str) -> None:
    """Remove emitted nodes (named ``prefix/...``) whose outputs nothing reads: ONNX Runtime runs dead
    nodes. They arise where a rule took ``f`` instead of ``R / x`` for a relevance ``R = x * f``."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if not (n.name.startswith(prefix + "/") and all(o not in used for o in n.output if o))]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    made = {o for n in graph.node for o in n.output}
    dead = [v for v in graph.value_info if v.name.startswith(prefix + "/") and v.name not in made]
    for v in dead:
        graph.value_info.remove(v)


def _check(explainer: onnx.ModelProto, original) -> None:
    """onnx's full check (with strict shape inference); if the *original* model already fails
    it (onnx's inference disagrees with ONNX Runtime on ceil_mode AveragePool windows that start
    in the padding), the structural check is the most that can pass, and the metadata says so."""
    sk, _ = skeleton(explainer)  # the same check, without serialising the weights
    try:
        onnx.checker.check_model(sk, full_check=True)
        return
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        error = e
    try:
        src = original if isinstance(original, onnx.ModelProto) else read_model(original, lazy_weights=True)
        onnx.checker.check_model(skeleton(src)[0], full_check=True)
        original_passes = True
    except Exception:
        original_passes = False
    if original_passes:  # our bug, not the user's: say so plainly
        raise RuntimeError(f"lrponnx built an invalid explainer (please report): {first_line(error)}") from error
    onnx.checker.check_model(sk)
    explainer.metadata_props.append(onnx.StringStringEntryProto(
        key=M.CHECK_KEY, value="structural only: the original model fails onnx's strict shape inference"))


def _seed_problem(g: GraphBuilder, view: ModelView, logits: str) -> Exception | None:
    """Why the relevance seed cannot be made for ``logits`` (the error to raise), or None."""
    shape = view.shape(logits)
    if shape is None or len(shape) < 2 or shape[1] is None or any(d != 1 for d in shape[2:]):
        return UnsupportedModelError([Offender(view.producer[logits].name if logits in view.producer else logits,
                                               "output", f"the explained output must be [batch, classes] or "
                                               f"[batch, classes, 1, ..., 1] with a static class count, got "
                                               f"shape {shape}; choose another with --explain-output NAME")])
    if TARGET_INPUT in {i.name for i in g.graph.input} | set(view.producer):
        return InvalidModelError(f"the model already has a tensor named {TARGET_INPUT!r}")
    return None


def _emit_seed(g: GraphBuilder, view: ModelView, logits: str, seed: str) -> str:
    shape = view.shape(logits)
    classes = shape[1]
    # an ordinary graph input (no initializer): every runtime lists it and takes the feed
    g.graph.input.append(helper.make_tensor_value_info(TARGET_INPUT, TensorProto.INT64, [_batch_dim(view)]))
    scores = logits if len(shape) == 2 else g.op("Reshape", logits, g.ints([0, classes]), hint="scores")
    argmax = g.op("ArgMax", scores, axis=1, keepdims=0, hint="argmax")
    target = g.op("Where", g.op("Less", TARGET_INPUT, g.const(0, dtype=np.int64)), argmax, TARGET_INPUT,
                  hint="target")
    hits = g.op("Equal", g.op("Unsqueeze", target, g.ints([1])),
                g.const(np.arange(classes).reshape(1, classes), hint="classes", dtype=np.int64))
    onehot = g.op("Cast", hits, to=TensorProto.FLOAT, hint="onehot")
    if len(shape) > 2:  # back to the scores' own shape [N, K, 1, ..., 1]
        onehot = g.op("Reshape", onehot, g.ints([0, classes] + [1] * (len(shape) - 2)), hint="onehot_kept")
    return onehot if seed == "one" else g.op("Mul", onehot, logits, hint="seed")


def _batch_dim(view: ModelView):
    """The first model input's batch dimension (its dim_param or value), for ``target``'s shape."""
    t = view.types.get(view.inputs[0]) if view.inputs else None
    dims = t.tensor_type.shape.dim if t is not None and t.tensor_type.HasField("shape") else []
    if not dims:
        return None
    d = dims[0]
    if d.HasField("dim_value"):
        return d.dim_value
    return d.dim_param or None


def emit_relevance(ctx: Ctx, units: list[Unit], logits: str, R0: str, exposed: list | None = None):
    """Walk the units from the logits to the inputs; returns ({tensor: relevance}, offenders).

    A tensor read by several units receives the sum of what each hands back. With ``exposed``
    (a list), the relevance at every unit's output and inputs is appended to it as
    ``(output name, tensor, shape)`` for ``--layer-relevance``.
    """
    g, table = ctx.g, load_handlers()

    incoming: dict[str, list[str]] = defaultdict(list)
    incoming[logits].append(R0)
    if logits in ctx.view.types:
        g.declare(R0, ctx.view.types[logits])
    offenders: list[Offender] = []

    def total(t: str) -> str | None:
        parts = incoming.get(t)
        if not parts:
            return None
        if len(parts) > 1 or not isinstance(parts[0], str):
            incoming[t] = [combine(g, parts, ctx.view.types.get(t) if ctx.view.is_float(t) else None)]
        return incoming[t][0]

    for u in reversed(units):
        R = total(u.output)
        extra = [o for n in u.nodes for o in n.output if o and o != u.output and incoming.get(o)
                 and o not in {i for m in u.nodes for i in m.input}]
        if R is None and not extra:
            continue
        h = table.get(u.kind)
        multi = h is not None and h.multi_output  # e.g. Split: every output's relevance goes back
        ctx.out_relevance = {o: total(o) for o in [u.output] + extra} if multi else {}
        try:
            if extra and not multi:
                raise Unsupported(_extra_outputs(extra))
            if shape_only(ctx.view, u.output):
                handed = {}  # made from the input's shape only (a mask, position ids): no relevance
            elif h is None:
                raise Unsupported(_why_unsupported(u))
            else:
                handed = h.fn(ctx, u, R)
        except Unsupported as e:
            offenders.append(Offender(u.name, u.op_type, str(e)))
            handed = {i: R or incoming[extra[0]][0] for i in u.inputs if ctx.view.is_float(i)}
        if exposed is not None:  # every relevance as a tensor of its own (no merging across units)
            handed = {t: r if isinstance(r, str) else combine(g, [r]) for t, r in handed.items()}
            if R is not None:
                exposed.append((f"lrp_out/{u.name}", R, ctx.view.shape(u.output)))
            if R is not None or ctx.out_relevance:  # a Split may get relevance at other outputs only
                exposed.extend((f"lrp_in/{u.name}/{i}", r, ctx.view.shape(i)) for i, r in handed.items())
        for t, r in handed.items():
            incoming[t].append(r)
            # relevance has the shape of its tensor (float32 also for int64 token ids)
            if isinstance(r, str) and t in ctx.view.types and ctx.view.is_float(t):
                g.declare(r, ctx.view.types[t])
    return {t: total(t) for t in ctx.view.inputs}, offenders


def _emit_outputs(g: GraphBuilder, view: ModelView, relevance: dict) -> dict:
    names = {}
    inputs = view.inputs
    for x in inputs:
        name = "relevance" if len(inputs) == 1 else f"relevance_{x}"
        R = relevance.get(x)
        if R is None:  # this input does not influence the explained output
            R = g.op("ConstantOfShape", g.op("Shape", x), value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))
        g.identity(R, name)
        shape = view.shape(x)
        g.graph.output.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, [_dim(view, x, k, d) for k, d in enumerate(shape)] if shape is not None else None))
        names[x] = name
    return names


def _dim(view: ModelView, x: str, k: int, d):
    if d is not None:
        return d
    t = view.types[x].tensor_type.shape.dim[k]
    return t.dim_param or None


def _write_metadata(model: onnx.ModelProto, p: Plan, composite: str, seed: str, names: dict,
                    recomputed: list) -> None:
    rules = {u.name: str(u.rule) for u in p.units if u.rule is not None}
    meta = {
        M.VERSION_KEY: __version__,
        M.FORMAT_KEY: FORMAT,
        M.COMPOSITE_KEY: composite,
        M.SEED_KEY: seed,
        M.LOGITS_KEY: p.logits,
        M.TARGET_INPUT_KEY: TARGET_INPUT,
        M.CLASS_COUNT_KEY: str(p.view.shape(p.logits)[1]),
        M.OUTPUT_KEY: p.output or p.logits,
        M.RELEVANCE_OUTPUTS_KEY: json.dumps(names),
        M.RULES_KEY: json.dumps(rules),
        M.FORWARD_RECOMPUTED_KEY: json.dumps(recomputed),  # forward tensors made by other ops
    }
    existing = {m.key: m for m in model.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))

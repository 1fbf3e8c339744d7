"""Static shapes: fold run-time shape computations whose result is fixed once the input shape is.

Exporters write ``x.view(n, groups, c // groups, h, w)`` as ``Shape(x) -> Gather -> Div -> Concat
-> Reshape`` (TorchScript), so a ShuffleNet's channel shuffle is a reshape "computed at run time"
even when every size but the batch is fixed: onnx's shape inference (its data propagation knows no
``Div``, and stops at scalar ``Gather``s) then loses every shape after it, and so do the rules that
need static sizes. onnxscript's constant folder folds ``Shape`` only when *every* dim is static
and ``Gather`` only with 1-D indices, so it does not fold these either (measured on the
TorchScript ShuffleNet v2; see docs/decisions.md).

:func:`fold_shape_computations` evaluates such subgraphs with each *value* tracked together with a
*mask* saying which elements depend on a symbolic dim (the batch): data-movement ops (Gather,
Concat, Slice, Unsqueeze, ...) move the mask with the values; elementwise ops (Div, Mul, Cast, ...)
mark an element unknown when any of its operands is. Only elements that do not depend on a
symbolic dim are ever used, so the folding is exact. Then

- a fully known value read by a node outside the shape computation (a Reshape's target, a
  Slice's starts, a Pad's pads, ...) becomes an initializer;
- a Reshape target known except for one element becomes a constant with ``0`` (copy the input's
  dim, where it is the same symbol at the same position) or ``-1`` there;

and onnx's shape inference runs again, until nothing changes. Integer shape arithmetic only: the
model's numbers do not change (the tests compare the outputs before and after).

:func:`apply_input_shape` fixes the model's input shape first (``--input-shape``), for models
whose spatial size is symbolic.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from lrponnx.errors import InvalidModelError, shorten

#: ops that only move elements: the mask is moved the same way (input 0 is the data; for Concat
#: every input). Their other inputs (indices, axes, starts...) must be fully known.
_MOVE = {"Gather", "Concat", "Slice", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten",
         "Transpose", "Expand", "Tile", "Split"}
#: elementwise ops (numpy broadcasting): an output element is unknown when an operand element is
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Floor", "Ceil", "Round", "Max", "Min",
                "Cast", "CastLike", "Sqrt", "Reciprocal", "Equal", "Less", "LessOrEqual", "Greater",
                "GreaterOrEqual", "Not", "And", "Or", "Where", "Sign", "Clip", "Pow"}
#: unary ops that keep a symbol's identity (the value is the same number)
_KEEPS_SYMBOL = {"Cast", "Identity", "CastLike"}
#: control flow keeps its computed condition: the decomposed-LRN matcher (lrn_match) reads the
#: TorchScript chain's ``If(Equal(Shape...))`` as part of the LRN unit
_KEEP_CONDITIONS = {"If", "Loop", "Scan"}
#: results larger than this are not evaluated at convert time (masks, ConstantOfShape of activations)
_MAX_ELEMENTS = 1 << 14
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _dims(vi) -> list | None:
    t = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if t is None or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


class _Symbols:
    def __init__(self):
        self.ids: dict[str, int] = {}

    def of(self, d) -> int:
        if d is None:  # an anonymous unknown dim: never equal to anything
            self.ids[f"__anon{len(self.ids)}"] = len(self.ids) + 1
            return len(self.ids)
        return self.ids.setdefault(d, len(self.ids) + 1)


def _evaluate(node, inputs: list, opset_imports) -> list[np.ndarray] | None:
    from lrponnx.compiler.constants import evaluate_node

    feeds = {}
    for name, v in zip(node.input, inputs):
        if name:
            feeds[name] = v
    try:
        return evaluate_node(node, feeds, opset_imports)
    except Exception:
        return None


def fold_shape_computations(sk: onnx.ModelProto, max_rounds: int = 64) -> int:
    """Fold the shape computations of ``sk`` (a shape-inferred skeleton) in place, re-running
    shape inference between rounds. Returns the number of inputs replaced by constants."""
    total = 0
    for _ in range(max_rounds):
        before = onnx.GraphProto()
        before.CopyFrom(sk.graph)
        try:
            changed = _fold_once(sk)
            if not changed:
                break
            inferred = onnx.shape_inference.infer_shapes(sk, check_type=True, strict_mode=False, data_prop=True)
        except Exception:  # never worse than not folding: keep the last graph that inferred cleanly
            sk.graph.CopyFrom(before)
            break
        total += changed
        sk.graph.CopyFrom(inferred.graph)
    return total


def _fold_once(sk: onnx.ModelProto) -> int:
    g = sk.graph
    inits = {t.name: t for t in g.initializer}
    shapes: dict[str, list] = {}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        d = _dims(v)
        if d is not None:
            shapes[v.name] = d
    data = {i.name for i in g.input if i.name not in inits}   # depends on a model input's values
    tracked: dict[str, tuple[np.ndarray, np.ndarray]] = {}     # name -> (value, mask)
    made_by: dict[str, onnx.NodeProto] = {}
    syms = _Symbols()
    const_cache: dict[str, np.ndarray] = {}

    def const(name):
        if name in const_cache:
            return const_cache[name]
        t = inits.get(name)
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
        if n > _MAX_ELEMENTS:
            return None
        const_cache[name] = numpy_helper.to_array(t)
        return const_cache[name]

    def operand(name):
        """(value, mask) of a tracked value or a small constant; None otherwise."""
        if name in tracked:
            return tracked[name]
        v = const(name)
        if v is None:
            return None
        return v, np.zeros(v.shape, dtype=np.int64)

    for node in g.node:
        ins = [i for i in node.input if i]
        outs = [o for o in node.output if o]
        if node.domain not in ("", "ai.onnx") or node.op_type in _RANDOM or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            if any(i in data or i in tracked for i in ins):
                data.update(outs)
            continue
        if node.op_type in ("Shape", "Size") and ins and ins[0] not in inits:
            dims = shapes.get(ins[0])
            if dims is None:
                continue  # rank unknown: nothing known about it
            if node.op_type == "Size":
                known = all(isinstance(d, int) for d in dims)
                val = np.array(int(np.prod([d if isinstance(d, int) else 1 for d in dims])), dtype=np.int64)
                tracked[outs[0]] = (val, np.array(0 if known else -1, dtype=np.int64))
            else:
                a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
                r = len(dims)
                start, end = int(a.get("start", 0)), int(a.get("end", r))
                start = min(max(start + r if start < 0 else start, 0), r)
                end = min(max(end + r if end < 0 else end, 0), r)
                part = dims[start:end]
                val = np.array([d if isinstance(d, int) else 1 for d in part], dtype=np.int64)
                mask = np.array([0 if isinstance(d, int) else syms.of(d) for d in part], dtype=np.int64)
                tracked[outs[0]] = (val, mask)
            made_by[outs[0]] = node
            continue
        if any(i in data for i in ins):
            data.update(outs)
            continue
        if not any(i in tracked for i in ins):
            continue  # a constant computation: the loader's own folding handles it
        operands = [operand(i) if i else None for i in node.input]
        result = _track(node, operands, sk.opset_import)
        if result is None:
            data.update(outs)  # not followed: treat as unknown from here on
            continue
        for o, r in zip(outs, result):
            tracked[o] = r
            made_by[o] = node

    return _rewrite(sk, tracked, made_by, shapes, syms)


def _track(node, operands, opset_imports):
    """(value, mask) of each output of ``node`` from its operands' (value, mask), or None."""
    op = node.op_type
    present = [o for o, name in zip(operands, node.input) if name]
    if any(o is None for o in present):
        return None
    if all(not np.any(m) for _, m in present):  # every operand known: just evaluate
        vals = _evaluate(node, [o[0] if o is not None else None for o in operands], opset_imports)
        if vals is None or any(v.size > _MAX_ELEMENTS for v in vals):
            return None
        return [(v, np.zeros(v.shape, dtype=np.int64)) for v in vals]
    if op in _MOVE:
        data_idx = set(range(len(operands))) if op == "Concat" else {0}
        if any(np.any(o[1]) for k, o in enumerate(operands) if o is not None and k not in data_idx):
            return None  # indices/axes that depend on a symbol
        vals = _evaluate(node, [o[0] if o is not None else None for o in operands], opset_imports)
        masks = _evaluate(node, [(o[1] if k in data_idx else o[0]) if o is not None else None
                                 for k, o in enumerate(operands)], opset_imports)
        if vals is None or masks is None:
            return None
        return [(v, np.asarray(m, dtype=np.int64)) for v, m in zip(vals, masks)]
    if op in _ELEMENTWISE:
        # unknown elements hold 1 (no division by zero); their results are masked anyway
        safe = [None if o is None else (np.where(o[1] != 0, np.ones_like(o[0]), o[0]), o[1]) for o in operands]
        vals = _evaluate(node, [o[0] if o is not None else None for o in safe], opset_imports)
        if vals is None:
            return None
        masks = [o[1] for o in present]
        if op in _KEEPS_SYMBOL and len(present) <= 2:
            mask = masks[0]
        else:
            any_unknown = np.zeros((), dtype=bool)
            for m in masks:
                any_unknown = np.logical_or(any_unknown, m != 0)
            mask = np.where(any_unknown, -1, 0).astype(np.int64)
        v = np.asarray(vals[0])
        return [(v, np.broadcast_to(mask, v.shape).copy())]
    return None


def _rewrite(sk, tracked, made_by, shapes, syms: _Symbols) -> int:
    g = sk.graph
    inside = {id(n) for n in made_by.values()}
    outputs = {o.name for o in g.output}
    taken = {t.name for t in g.initializer} | {n_out for n in g.node for n_out in n.output}
    new_inits: dict[tuple, str] = {}
    changed = 0

    def constant(value: np.ndarray, hint: str) -> str:
        key = (value.dtype.str, value.shape, value.tobytes())
        if key in new_inits:
            return new_inits[key]
        name = f"{hint}__static"
        k = 0
        while name in taken:
            k += 1
            name = f"{hint}__static{k}"
        taken.add(name)
        g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        new_inits[key] = name
        return name

    for node in g.node:
        if id(node) in inside or node.op_type in _KEEP_CONDITIONS:
            continue
        for k, name in enumerate(node.input):
            if name not in tracked or name in outputs:
                continue
            value, mask = tracked[name]
            if not np.any(mask):
                node.input[k] = constant(value, name)
                changed += 1
            elif node.op_type == "Reshape" and k == 1:
                target = _reshape_target(node, value, mask, shapes, syms)
                if target is not None:
                    node.input[k] = constant(target, name)
                    changed += 1
    if changed:
        _drop_dead(g)
    return changed


def _reshape_target(node, value, mask, shapes, syms: _Symbols) -> np.ndarray | None:
    """A Reshape target with its symbolic elements replaced by 0 (the input's same dim) or one -1."""
    allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
    value = np.asarray(value, dtype=np.int64).reshape(-1).copy()
    mask = np.asarray(mask).reshape(-1)
    known = value[mask == 0]
    if allowzero or np.any(known == 0) or value.ndim != 1:
        return None
    x_dims = shapes.get(node.input[0])
    open_ = []
    for i in np.nonzero(mask)[0]:
        if (mask[i] > 0 and x_dims is not None and i < len(x_dims) and isinstance(x_dims[i], str)
                and syms.ids.get(x_dims[i]) == mask[i]):  # the same symbol at the same position
            value[i] = 0
        else:
            open_.append(i)
    if len(open_) > 1 or (open_ and np.any(known == -1)):
        return None
    for i in open_:
        value[i] = -1
    return value


def _read_names(nodes) -> set[str]:
    """Every tensor name the nodes read, also from inside their subgraphs (If/Loop bodies)."""
    names = set()
    for n in nodes:
        names.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                names |= _read_names(sub.node) | {o.name for o in sub.output}
    return names


def _drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads (the shape computations just replaced)."""
    outputs = {o.name for o in g.output}
    while True:
        used = _read_names(g.node) | outputs
        keep = [n for n in g.node if any(o in used for o in n.output if o) or not any(n.output)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    used = _read_names(g.node) | outputs
    for i in reversed(range(len(g.initializer))):
        name = g.initializer[i].name
        if name.endswith("__static") or "__static" in name:
            if name not in used:
                del g.initializer[i]


def apply_input_shape(sk: onnx.ModelProto, spec, inputs: list[str]) -> None:
    """Fix the dims of the model's inputs: ``spec`` is ``"N,C,H,W"`` (the single input),
    ``"name:d,d,..."`` (several separated by ``;``), or a dict/list. A dim given as ``N``, ``?`` or
    ``-1`` keeps the model's own (symbolic) dim; a number fixes it."""
    wanted = parse_input_shape(spec, inputs)
    by_name = {i.name: i for i in sk.graph.input}
    for name, dims in wanted.items():
        vi = by_name[name]
        t = vi.type.tensor_type
        have = _dims(vi)
        if have is not None and len(have) != len(dims):
            raise InvalidModelError(f"--input-shape gives {len(dims)} dims for input {shorten(name)!r}, "
                                    f"which has {len(have)} ({_show(have)})")
        for k, d in enumerate(dims):
            if d is None:
                continue
            if have is not None and isinstance(have[k], int) and have[k] != d:
                raise InvalidModelError(f"--input-shape: input {shorten(name)!r} has the fixed size {have[k]} at "
                                        f"dim {k}, not {d}")
        if not t.HasField("shape"):
            t.shape.SetInParent()
        while len(t.shape.dim) < len(dims):
            t.shape.dim.add()
        for k, d in enumerate(dims):
            if d is not None:
                t.shape.dim[k].Clear()
                t.shape.dim[k].dim_value = d
    # the dims of the old value_info came from the symbolic shape: infer them again
    del sk.graph.value_info[:]


def _show(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


MAX_DIM = 2**31 - 1


def parse_input_shape(spec, inputs: list[str]) -> dict[str, list]:
    """``{input name: [dim or None]}`` from the forms :func:`apply_input_shape` accepts."""
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise InvalidModelError("--input-shape is empty; expected e.g. 1,3,224,224 or data:N,3,224,224")
        items = []
        for part in filter(None, (p.strip() for p in text.split(";"))):
            name, colon, dims = part.rpartition(":")
            if not colon:
                if len(inputs) != 1:
                    raise InvalidModelError(f"the model has {len(inputs)} inputs; give --input-shape as "
                                            f"NAME:DIMS for each ({', '.join(shorten(i) for i in inputs)})")
                name = inputs[0]
            items.append((name, dims.split(",")))
    else:
        if len(inputs) != 1:
            raise InvalidModelError(f"the model has {len(inputs)} inputs; give input_shape as a dict")
        items = [(inputs[0], list(spec))]
    out = {}
    for name, dims in items:
        if name not in inputs:
            raise InvalidModelError(f"--input-shape: the model has no input {shorten(str(name))!r} "
                                    f"(its inputs: {', '.join(shorten(i) for i in inputs)})")
        parsed = []
        for d in dims:
            s = str(d).strip() if d is not None else "?"
            if s in ("N", "n", "?", "-1", "None"):
                parsed.append(None)
                continue
            try:
                v = int(s)
            except ValueError:
                raise InvalidModelError(f"--input-shape: {shorten(s)!r} is not a positive integer (or N / ? "
                                        "for a dim left symbolic)") from None
            if v <= 0 or v > MAX_DIM:
                raise InvalidModelError(f"--input-shape: dims must be between 1 and {MAX_DIM}, got {v}")
            parsed.append(v)
        if not parsed:
            raise InvalidModelError(f"--input-shape: no dims given for {shorten(name)!r}")
        out[name] = parsed
    return out


def static_hint(view) -> str:
    """What to add to a "needs static sizes" refusal: the ``--input-shape`` option, but only when the
    model's input has symbolic sizes past the batch dim (otherwise fixing it would not help)."""
    symbolic = []
    for name in view.inputs:
        shape = view.shape(name)
        if shape is not None and any(d is None for d in shape[1:]):
            symbolic.append((name, shape))
    if not symbolic:
        return " (they stay unknown after shape inference although the input's shape is fixed)"
    name, shape = symbolic[0]
    dims = ",".join("N" if k == 0 and d is None else ("?" if d is None else str(d)) for k, d in enumerate(shape))
    return (f" (the model's input {shorten(name)!r} is [{dims}]: fix its sizes with --input-shape, e.g. "
            f"--input-shape {','.join('N' if k == 0 else (str(d) if d is not None else 'SIZE') for k, d in enumerate(shape))})")

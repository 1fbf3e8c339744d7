"""Loading an ONNX model the user gave us: validate, upgrade old opsets, infer shapes.

All user mistakes (missing file, truncated or non-ONNX bytes, a model that fails onnx's checker)
become :class:`InvalidModelError` with one line that says what is wrong.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import onnx
from google.protobuf.message import DecodeError
from onnx import version_converter

from .errors import InvalidModelError
from .lrn_ops import align_function_opset

#: The lowest default-domain opset the compiler emits. Older models are upgraded to it first
#: (many Caffe-era files are opset 7-9); newer ones are kept as they are.
MIN_OPSET = 17
#: Models with ceil_mode pooling are upgraded to this opset, whose shape inference is right.
CEIL_POOL_OPSET = 22


def read_model(src, lazy_weights: bool = False) -> onnx.ModelProto:
    """Read a path or take a ModelProto. External data is loaded from beside the file.

    ``lazy_weights``: leave external data on disk. Each external tensor then points at its file
    by absolute path; :func:`tensor_array` reads one when a rule needs its values, and
    :func:`lrponnx.files.save_model` copies the untouched ones file to file. A VGG16-sized model
    is then never held in memory as a whole (the ModelProto of such a model is only the graph).
    """
    if isinstance(src, onnx.ModelProto):
        return src
    path = Path(os.fspath(src))
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path}: the file is empty")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidModelError(f"{path}: not an ONNX model or truncated ({type(e).__name__}: {e})") from None
    if not model.graph.node and not model.graph.output:
        # protobuf parses many foreign byte strings into an empty message without complaint
        raise InvalidModelError(f"{path}: not an ONNX model (no graph found; is the file truncated?)")
    try:
        if lazy_weights:
            _pin_external_data(model, path.parent)
        else:
            onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise InvalidModelError(f"{path}: cannot read its external data ({e})") from None
    return model


def _pin_external_data(model: onnx.ModelProto, base: Path) -> None:
    """Point every external initializer at its file by absolute path, after checking that the
    file holds the bytes it should; external tensors elsewhere (rare) are loaded."""
    from onnx.external_data_helper import (ExternalDataInfo, _get_all_tensors, _open_external_data_fd,
                                           load_external_data_for_tensor)

    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = ExternalDataInfo(t)
        # onnx's own opener, as its eager loader uses it: the file must exist, and the location may
        # not be absolute or point outside the model's folder (a model must not make us copy other files).
        fd = _open_external_data_fd(str(base), info.location, t.name, True)
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        need = tensor_nbytes(t)
        offset = info.offset or 0
        length = info.length if info.length is not None else need
        if length != need or offset + length > size:
            raise ValueError(f"tensor {t.name!r}: {info.location!r} is too short or the wrong size "
                             f"(needs {need} bytes at offset {offset})")
        set_external_location(t, str((base / info.location).resolve()), offset, length)
    for t in _get_all_tensors(model):  # the rest (e.g. Constant attributes): load them
        if t.data_location == onnx.TensorProto.EXTERNAL and not os.path.isabs(ExternalDataInfo(t).location):
            load_external_data_for_tensor(t, str(base))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


def set_external_location(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Mark ``t`` as stored in file ``location`` (relative to the model, or absolute) at ``offset``."""
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its shape and type (nothing is read)."""
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def stored_dtype(t: onnx.TensorProto) -> np.dtype:
    """The numpy dtype of the tensor's bytes as ONNX stores them (raw data and external files are little-endian)."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """The value of an initializer, read from disk if it is external (see ``lazy_weights``).
    Unlike onnx's own helpers this never stores the data into the TensorProto."""
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo

    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = ExternalDataInfo(t)
    dtype = stored_dtype(t)
    count = tensor_nbytes(t) // dtype.itemsize
    arr = np.fromfile(info.location, dtype=dtype, count=count, offset=info.offset or 0)
    return arr.astype(dtype.newbyteorder("="), copy=False).reshape(tuple(t.dims))


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise InvalidModelError("the model imports no default-domain ('ai.onnx') opset")


def prepare(src, lazy_weights: bool = False) -> onnx.ModelProto:
    """Read, check, upgrade to at least :data:`MIN_OPSET`, infer shapes, name every node.

    All graph work runs on a skeleton without the large weights, so nothing here serialises
    them (a VGG16-sized model converts in seconds, and is held in memory once).
    """
    model = read_model(src, lazy_weights)
    if isinstance(src, onnx.ModelProto):  # never modify the caller's model
        model = onnx.ModelProto()
        model.CopyFrom(src)
    sk, fake = skeleton(model)
    try:
        onnx.checker.check_model(sk)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InvalidModelError(f"the model fails onnx's checker: {first_line(e)}") from None
    opset = default_opset(sk)
    wanted = max(opset, MIN_OPSET)
    if wanted < CEIL_POOL_OPSET and _has_ceil_pooling(sk):
        # onnx's shape inference before opset 22 keeps a last ceil_mode window that starts in the
        # end padding (ORT and Caffe drop it); every shape after such a pool would be wrong.
        wanted = CEIL_POOL_OPSET
    if opset < wanted:
        try:
            sk = version_converter.convert_version(sk, wanted)
        except Exception as e:  # the converter raises plain RuntimeError/IndexError on many inputs
            raise InvalidModelError(f"cannot upgrade the model from opset {opset} to {wanted}: {first_line(e)}") from None
    if sk.ir_version < 8:  # model-local functions (our WithinChannelLRN) need IR 8
        sk.ir_version = 8
    align_function_opset(sk)
    _fold_small_constants(sk)
    try:
        sk = onnx.shape_inference.infer_shapes(sk, check_type=True, strict_mode=False, data_prop=True)
    except Exception as e:
        raise InvalidModelError(f"onnx shape inference failed on the model: {first_line(e)}") from None
    _name_nodes(sk.graph)
    if _has_ceil_pooling(sk):
        _measure_shapes(sk, model)
    restore(model, sk, fake)
    return model


def _fold_small_constants(sk: onnx.ModelProto) -> None:
    """Replace nodes that only compute small constants (a Pad's pads built from ConstantOfShape,
    Slice, Concat... as torch exports them) by initializers, so shape inference sees the values.
    The values are computed by onnx's reference evaluator; the model's numbers do not change."""
    from onnx import numpy_helper

    from .evaluate import evaluate_node

    g = sk.graph
    known = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    keep = []
    for node in g.node:
        ins = [i for i in node.input if i]
        foldable = (node.domain in ("", "ai.onnx") and node.op_type not in _NEVER_FOLD
                    and all(i in known and i not in graph_inputs for i in ins)
                    and not any(o in graph_outputs for o in node.output)
                    and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                for a in node.attribute))
        if foldable:
            try:
                values = evaluate_node(node, {i: known[i] for i in dict.fromkeys(ins)}, sk.opset_import,
                                       sk.ir_version)
            except Exception:
                values = None
            if values is not None and all(v.nbytes <= SKELETON_BYTES for v in values):
                for o, v in zip([o for o in node.output if o], values):
                    t = numpy_helper.from_array(v, o)
                    g.initializer.append(t)
                    known[o] = t
                continue
        keep.append(node)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


#: ops whose result must not be frozen (random) or that have no value to fold
_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
               "Bernoulli", "If", "Loop", "Scan"}

#: Initializers above this size stay out of the skeleton that checks, upgrades and infers shapes.
SKELETON_BYTES = 1 << 16


def _is_large(t: onnx.TensorProto) -> bool:
    numel = 1
    for d in t.dims:
        numel *= d
    return t.data_location == onnx.TensorProto.EXTERNAL or numel * 4 > SKELETON_BYTES


def skeleton(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """The model without its large initializers, which become graph inputs of the same type and
    shape. Returns the skeleton and the names of the inputs added for them."""
    g = model.graph
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    sg = sk.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    listed = {i.name for i in g.input}
    fake = set()
    for t in g.initializer:
        if not _is_large(t):
            sg.initializer.append(t)
        elif t.name not in listed:
            sg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            fake.add(t.name)
    return sk, fake


def restore(model: onnx.ModelProto, sk: onnx.ModelProto, fake: set[str]) -> None:
    """Put the processed skeleton's graph back into ``model``, whose large weights stay in place."""
    g, sg = model.graph, sk.graph
    for i in reversed(range(len(g.initializer))):
        if not _is_large(g.initializer[i]):
            del g.initializer[i]
    g.initializer.extend(sg.initializer)
    for field in ("node", "input", "output", "value_info"):
        del getattr(g, field)[:]
    g.node.extend(sg.node)
    g.input.extend(i for i in sg.input if i.name not in fake)
    g.output.extend(sg.output)
    g.value_info.extend(sg.value_info)
    del model.opset_import[:]
    model.opset_import.extend(sk.opset_import)
    del model.functions[:]
    model.functions.extend(sk.functions)
    model.ir_version = sk.ir_version


def _measure_shapes(sk: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Replace inferred shapes by the ones ONNX Runtime really produces (batch 1).

    onnx's shape inference keeps a last ceil_mode AveragePool window that starts in the end
    padding, which ONNX Runtime (like Caffe and PyTorch) drops; every shape after it is then off.
    Shapes do not depend on weight values: the skeleton runs with zeros for its large weights.
    """
    import onnxruntime as ort

    g = sk.graph
    inits = {t.name for t in g.initializer}
    wanted = [v for v in g.value_info if v.type.HasField("tensor_type")]
    if not wanted:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(sk)
    del probe.graph.output[:]
    del probe.graph.value_info[:]  # the wrong shapes would make ORT refuse the probe
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, None)
                              for v in wanted)
    feeds = {}
    for i in g.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        feeds[i.name] = np.zeros(shape, dtype=dtype)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        values = sess.run([v.name for v in wanted], feeds)
    except Exception:
        return  # keep onnx's shapes; the model may need real inputs to run
    for v, arr in zip(wanted, values):
        dims = v.type.tensor_type.shape.dim
        if len(dims) != arr.ndim:
            continue
        for k, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value != arr.shape[k]:
                d.dim_value = arr.shape[k]


def _has_ceil_pooling(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("MaxPool", "AveragePool", "LpPool") and
               any(a.name == "ceil_mode" and a.i for a in n.attribute) for n in model.graph.node)


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes stable names so rules can be overridden by name and errors can name them."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

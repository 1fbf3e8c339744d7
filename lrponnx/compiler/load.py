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

from lrponnx.errors import InvalidModelError, shorten
from lrponnx.compiler.lrn_ops import align_function_opset

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
    check_text(model, str(path))
    try:
        if lazy_weights:
            _pin_external_data(model, path.parent)
        else:
            onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise InvalidModelError(f"{path}: cannot read its external data ({e})") from None
    check_tensor_sizes(model)
    return model


def check_text(msg, where: str = "the model") -> None:
    """Every string field of the model must be UTF-8 text. protobuf hands a name with other
    bytes back as ``bytes`` (or fails when it is read), far from where it came from.

    Only string and message fields are read: reading a tensor's ``raw_data`` would copy its bytes
    (0.1 s and a transient copy of the largest weight on CaffeNet, as ``ListFields`` did)."""
    from google.protobuf.descriptor import FieldDescriptor

    stack = [(msg, type(msg).__name__)]
    while stack:
        m, path = stack.pop()
        for fd in _text_fields(m.DESCRIPTOR):
            try:
                if _repeated(fd):
                    value = getattr(m, fd.name)
                elif m.HasField(fd.name):
                    value = [getattr(m, fd.name)]
                else:
                    continue
            except UnicodeDecodeError as e:
                raise InvalidModelError(f"{where}: a {path} field is not UTF-8 text ({e.reason} at byte {e.start})") from None
            if fd.type == FieldDescriptor.TYPE_STRING:
                for v in value:
                    if isinstance(v, bytes):
                        try:
                            v.decode("utf-8")
                        except UnicodeDecodeError as e:
                            text = v.decode("utf-8", "backslashreplace")
                            raise InvalidModelError(
                                f"{where}: {path}.{fd.name} '{shorten(text)}' is not UTF-8 text "
                                f"(byte {e.start} is 0x{v[e.start]:02x})") from None
            else:
                for v in value:
                    stack.append((v, _describe(v, fd.name)))


_TEXT_FIELDS: dict = {}


def _text_fields(desc) -> list:
    """The string and message fields of a message type (cached per type)."""
    from google.protobuf.descriptor import FieldDescriptor

    if desc.full_name not in _TEXT_FIELDS:
        _TEXT_FIELDS[desc.full_name] = [fd for fd in desc.fields if fd.type in (FieldDescriptor.TYPE_STRING,
                                                                                FieldDescriptor.TYPE_MESSAGE)]
    return _TEXT_FIELDS[desc.full_name]


def _repeated(fd) -> bool:
    try:
        return bool(fd.is_repeated)
    except AttributeError:  # older protobuf
        return fd.label == fd.LABEL_REPEATED


def _describe(m, field: str) -> str:
    kind = type(m).__name__.replace("Proto", "").lower() or field
    try:
        name = getattr(m, "name", None)
    except UnicodeDecodeError:
        name = None
    if isinstance(name, str) and name:
        return f"{kind} {shorten(name)!r}"
    return kind


def _held_elements(t: onnx.TensorProto) -> int | None:
    """How many elements an inline tensor holds (None: external or an unknown type)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    if t.HasField("raw_data"):
        try:
            size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            return None
        bits = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
        return len(t.raw_data) * 2 if t.data_type in bits else len(t.raw_data) // max(size, 1)
    for field in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"):
        n = len(getattr(t, field))
        if n:
            if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
                n //= 2
            return n
    return 0


def check_tensor_sizes(model: onnx.ModelProto) -> None:
    """Each initializer's declared shape must match the data it holds: a tensor declaring 2^40
    elements with no data would otherwise be allocated (and fail) deep inside the compiler."""
    for t in model.graph.initializer:
        numel = 1
        for d in t.dims:
            if d < 0:
                raise InvalidModelError(f"initializer {shorten(t.name)!r} has a negative dimension {list(t.dims)}")
            numel *= d
        held = _held_elements(t)
        if held is None or held == numel or t.data_type == onnx.TensorProto.STRING and held == numel:
            continue
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) and held in (numel, numel + 1):
            continue
        raise InvalidModelError(f"initializer {shorten(t.name)!r} is corrupt: its dimensions {list(t.dims)} "
                                f"declare {numel:,} elements, but it holds {held:,}")


def _pin_external_data(model: onnx.ModelProto, base: Path) -> None:
    """Point every external initializer at its file by absolute path, after checking that the
    file holds the bytes it should; external tensors elsewhere (rare) are loaded."""
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor

    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = ExternalDataInfo(t)
        file = external_file(base, info.location, t.name)
        size = file.stat().st_size
        need = tensor_nbytes(t)
        offset = info.offset or 0
        length = info.length if info.length is not None else need
        if length != need or offset + length > size:
            raise ValueError(f"tensor {t.name!r}: {info.location!r} is too short or the wrong size "
                             f"(needs {need} bytes at offset {offset})")
        set_external_location(t, str(file.resolve()), offset, length)
    for t in model_tensors(model):  # the rest (e.g. Constant attributes): load them
        if t.data_location == onnx.TensorProto.EXTERNAL and not os.path.isabs(ExternalDataInfo(t).location):
            load_external_data_for_tensor(t, str(base))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


def external_file(base: Path, location: str, name: str) -> Path:
    """The data file of external tensor ``name``, by the rules of onnx's own loader (which has no
    public function for them): a non-empty relative location inside the model's folder, a regular
    file and not a symbolic link, so that a model cannot make us read or copy any other file."""
    where = f"external data of tensor {shorten(name)!r}"
    if not location:
        raise ValueError(f"{where}: the location is empty")
    if os.path.isabs(location) or os.path.splitdrive(location)[0]:
        raise ValueError(f"{where}: the location {shorten(location)!r} is an absolute path; it must be "
                         "relative to the model's folder")
    parts = os.path.normpath(location).split(os.sep)
    path = base / os.path.normpath(location)
    folder = os.path.realpath(base)
    if parts[0] == ".." or os.path.commonpath([folder, os.path.realpath(path)]) != folder:
        raise ValueError(f"{where}: {shorten(location)!r} points outside the model's folder")
    if os.path.islink(path):
        raise ValueError(f"{where}: {shorten(location)!r} is a symbolic link")
    if not path.is_file():
        raise ValueError(f"{where}: {shorten(location)!r} does not exist or is not a regular file")
    return path


def model_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers and tensor attributes (Constant values), in
    subgraphs and model-local functions too (onnx's own walker is private)."""
    def graph(g):
        yield from g.initializer
        yield from nodes(g.node)

    A = onnx.AttributeProto

    def nodes(ns):
        for n in ns:
            for a in n.attribute:  # by type: reading an empty repeated field costs memory in protobuf's upb
                if a.type == A.TENSOR:
                    yield a.t
                elif a.type == A.TENSORS:
                    yield from a.tensors
                elif a.type == A.GRAPH:
                    yield from graph(a.g)
                elif a.type == A.GRAPHS:
                    for sub in a.graphs:
                        yield from graph(sub)

    yield from graph(model.graph)
    for f in model.functions:
        yield from nodes(f.node)


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


def prepare(src, lazy_weights: bool = False, input_shape=None) -> onnx.ModelProto:
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
    if input_shape is not None:  # --input-shape: fix the model's input dims (see lrponnx.compiler.shapes)
        from lrponnx.compiler.shapes import apply_input_shape

        apply_input_shape(sk, input_shape, [i.name for i in sk.graph.input if i.name not in fake and
                                            i.name not in {t.name for t in sk.graph.initializer}])
    _fold_small_constants(sk)
    try:
        sk = onnx.shape_inference.infer_shapes(sk, check_type=True, strict_mode=False, data_prop=True)
        from lrponnx.compiler.shapes import fold_shape_computations

        fold_shape_computations(sk)  # reshapes computed from shapes that are fixed: constants
    except InvalidModelError:
        raise
    except Exception as e:
        raise InvalidModelError(f"onnx shape inference failed on the model: {first_line(e)}") from None
    _name_nodes(sk.graph)
    if _has_ceil_pooling(sk):
        _measure_shapes(sk, model)
    check_geometry(sk)  # on the measured shapes: onnx's are wrong after a ceil_mode AveragePool
    restore(model, sk, fake)
    return model


def _fold_small_constants(sk: onnx.ModelProto) -> None:
    """Replace nodes that only compute small constants (a Pad's pads built from ConstantOfShape,
    Slice, Concat... as torch exports them) by initializers, so shape inference sees the values.
    The values are computed by onnx's reference evaluator; the model's numbers do not change."""
    from onnx import numpy_helper

    from lrponnx.compiler.constants import evaluate_node

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
    need = _activation_bytes(sk)
    if need > MEASURE_BYTES:
        # Running the model at its declared size would take that much memory (and more).
        if any(n.op_type == "AveragePool" and any(a.name == "ceil_mode" and a.i for a in n.attribute)
               for n in g.node):
            raise InvalidModelError(
                f"the model's declared input size is too large to convert: its ceil_mode AveragePool "
                f"output sizes must be measured by running it once, which needs about {need / 2**30:.1f} GiB "
                f"(limit {MEASURE_BYTES / 2**30:.0f} GiB); declare a smaller input size")
        return  # at opset 22 onnx's inference of ceil_mode MaxPool is right; only AveragePool needs it
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


def _known_shapes(model: onnx.ModelProto) -> dict:
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for v in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if v.name in shapes or not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            continue
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    return shapes


def check_geometry(model: onnx.ModelProto) -> None:
    """Weights whose shape cannot be the weight of their node (a corrupt file), and windows
    larger than their padded input, named plainly instead of failing later (or being reported
    as a weight "computed at run time")."""
    shapes = _known_shapes(model)
    weights = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        where = f"node {shorten(node.name)!r} ({node.op_type})"
        x = shapes.get(node.input[0]) if node.input else None
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in weights:
            w = shapes.get(node.input[1])
            if w is None:
                continue
            wname = shorten(node.input[1])
            if len(w) < 3 or (x is not None and len(x) != len(w)):
                rank = f"{len(x)}-D input" if x is not None else "input"
                raise InvalidModelError(f"{where}: weight {wname!r} has shape {w}, which cannot be the weight "
                                        f"of a {node.op_type} on a {rank} (corrupt dimensions?)")
            group = int(a.get("group", 1))
            c_in = w[1] * group if node.op_type == "Conv" else w[0]
            if x is not None and x[1] is not None and x[1] != c_in:
                raise InvalidModelError(f"{where}: weight {wname!r} has shape {w}, which takes {c_in} input "
                                        f"channels, but the input has {x[1]} (corrupt dimensions?)")
            if "kernel_shape" in a and list(a["kernel_shape"]) != w[2:]:
                raise InvalidModelError(f"{where}: weight {wname!r} has shape {w}, but kernel_shape is "
                                        f"{list(a['kernel_shape'])} (corrupt dimensions?)")
            if node.op_type == "Conv":
                _check_window(where, x, w[2:], a)
        elif node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in weights:
            w = shapes.get(node.input[1])
            if w is not None and len(w) != 2:
                raise InvalidModelError(f"{where}: weight {shorten(node.input[1])!r} has shape {w}; a Gemm "
                                        "weight has two dimensions (corrupt dimensions?)")
            k = None if w is None else (w[1] if a.get("transB", 0) else w[0])
            xk = None if x is None or len(x) != 2 else (x[0] if a.get("transA", 0) else x[1])
            if k is not None and xk is not None and k != xk:
                raise InvalidModelError(f"{where}: weight {shorten(node.input[1])!r} has shape {w}, which takes "
                                        f"{k} inputs, but the input has {xk} (corrupt dimensions?)")
        elif node.op_type in ("MaxPool", "AveragePool", "LpPool") and "kernel_shape" in a:
            _check_window(where, x, list(a["kernel_shape"]), a)


def _check_window(where: str, x, kernel: list, a: dict) -> None:
    if x is None or len(x) != len(kernel) + 2:
        return
    auto_pad = a.get("auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID", ""):
        return
    n = len(kernel)
    pads = list(a.get("pads", [0] * (2 * n)))
    dil = list(a.get("dilations", [1] * n))
    if len(pads) != 2 * n or len(dil) != n:
        return
    for i in range(n):
        size = x[2 + i]
        if size is None:
            continue
        span = (kernel[i] - 1) * dil[i] + 1
        if span > size + pads[i] + pads[n + i]:
            raise InvalidModelError(f"{where}: its window ({'x'.join(map(str, kernel))}) is larger than its "
                                    f"input ({'x'.join(str(d) for d in x[2:])}, padded by {pads})")


#: Running a model once to measure its shapes (see :func:`_measure_shapes`) may use this much for
#: its batch-1 activations; beyond it the declared input is too large to run at convert time.
MEASURE_BYTES = 1 << 30


def _activation_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every tensor of one batch-1 forward pass, from the inferred shapes."""
    total = 0
    for v in list(model.graph.input) + list(model.graph.value_info):
        t = v.type.tensor_type if v.type.HasField("tensor_type") else None
        if t is None or not t.HasField("shape"):
            continue
        n = 1
        for d in t.shape.dim:
            n *= d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
        try:
            n *= onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
        except (KeyError, TypeError, ValueError):
            n *= 4
        total += n
    return total


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

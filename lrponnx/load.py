"""Loading an ONNX model the user gave us: validate, upgrade old opsets, infer shapes.

All user mistakes (missing file, truncated or non-ONNX bytes, a model that fails onnx's checker)
become :class:`InvalidModelError` with one line that says what is wrong.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import version_converter

from .errors import InvalidModelError

#: The lowest default-domain opset the compiler emits. Older models are upgraded to it first
#: (many Caffe-era files are opset 7-9); newer ones are kept as they are.
MIN_OPSET = 17
#: Models with ceil_mode pooling are upgraded to this opset, whose shape inference is right.
CEIL_POOL_OPSET = 22


def read_model(src) -> onnx.ModelProto:
    """Read a path or take a ModelProto. External data is loaded from beside the file."""
    if isinstance(src, onnx.ModelProto):
        return src
    path = Path(os.fspath(src))
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a directory, expected an .onnx file")
    data = path.read_bytes()
    if not data:
        raise InvalidModelError(f"{path}: the file is empty")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidModelError(f"{path}: not an ONNX model or truncated ({type(e).__name__}: {e})") from None
    if not model.graph.node and not model.graph.output:
        # protobuf parses many foreign byte strings into an empty message without complaint
        raise InvalidModelError(f"{path}: not an ONNX model (no graph found; is the file truncated?)")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as e:
        raise InvalidModelError(f"{path}: cannot read its external data ({e})") from None
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise InvalidModelError("the model imports no default-domain ('ai.onnx') opset")


def prepare(src) -> onnx.ModelProto:
    """Read, check, upgrade to at least :data:`MIN_OPSET`, name every node, infer shapes."""
    model = read_model(src)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InvalidModelError(f"the model fails onnx's checker: {first_line(e)}") from None
    opset = default_opset(model)
    wanted = max(opset, MIN_OPSET)
    if wanted < CEIL_POOL_OPSET and _has_ceil_pooling(model):
        # onnx's shape inference before opset 22 keeps a last ceil_mode window that starts in the
        # end padding (ORT and Caffe drop it); every shape after such a pool would be wrong.
        wanted = CEIL_POOL_OPSET
    if opset < wanted:
        try:
            model = version_converter.convert_version(model, wanted)
        except Exception as e:  # the converter raises plain RuntimeError/IndexError on many inputs
            raise InvalidModelError(f"cannot upgrade the model from opset {opset} to {wanted}: {first_line(e)}") from None
    if model.ir_version < 8:  # model-local functions (our WithinChannelLRN) need IR 8
        model.ir_version = 8
    try:  # returns a new ModelProto: the caller's model is never modified
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False, data_prop=True)
    except Exception as e:
        raise InvalidModelError(f"onnx shape inference failed on the model: {first_line(e)}") from None
    _name_nodes(model.graph)
    if _has_ceil_pooling(model):
        _measure_shapes(model)
    return model


def _measure_shapes(model: onnx.ModelProto) -> None:
    """Replace inferred shapes by the ones ONNX Runtime really produces (batch 1).

    onnx's shape inference keeps a last ceil_mode AveragePool window that starts in the end
    padding, which ONNX Runtime (like Caffe and PyTorch) drops; every shape after it is then off.
    """
    import numpy as np
    import onnxruntime as ort

    g = model.graph
    inits = {t.name for t in g.initializer}
    wanted = [v for v in g.value_info if v.type.HasField("tensor_type")]
    if not wanted:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(wanted)
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
    finally:
        del probe
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

"""Caffe (``deploy.prototxt`` + ``.caffemodel``) to ONNX, without Caffe.

The prototxt is read with :mod:`google.protobuf.text_format` and the weights with protobuf's binary
parser, both against the schema of :mod:`.proto`. Layers are translated one by one, in prototxt
order, following Caffe's TEST-phase semantics (see ``docs/caffe.md`` for the table). Blob shapes are
tracked in Python the way Caffe computes them, which is what lets us check the caffemodel's blobs
and reproduce Caffe's pooling rounding with plain ONNX pooling ops.

Tensor naming: the graph input keeps the Caffe input blob's name; a Caffe blob's *final* value
(what ``net.blobs[name]`` holds after a forward pass) gets the blob's name; values that an in-place
layer later overwrites are called ``<blob>@<layer that wrote them>``. Nodes are named after layers.
"""
from __future__ import annotations

import json
import math
import re
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from lrponnx.errors import InvalidModelError, LrpOnnxError, Offender, UnsupportedModelError
from lrponnx.compiler.lrn_ops import ensure_lrn_function, make_within_channel_lrn

from lrponnx.converters.caffe import proto as cpb

__all__ = ["convert", "CaffeConversionWarning", "CaffeLayerError", "PREPROCESSING_KEY", "WEIGHTS_KEY",
           "random_caffemodel"]

PREPROCESSING_KEY = "lrponnx.preprocessing"
WEIGHTS_KEY = "lrponnx.weights"
MIN_OPSET = 13
PIXEL_SCALE = 255.0
MAX_PARAMS = (2**31 - 2**26) // 4  # float32 parameters that fit one ONNX file (protobuf's 2 GiB limit)


class CaffeConversionWarning(UserWarning):
    """Something was skipped or guessed during a Caffe conversion (the model is still produced)."""


class CaffeLayerError(UnsupportedModelError):
    """Layers the converter cannot convert, all of them, in Caffe's words and on one line:
    ``2 Caffe layer(s) cannot be converted: layer 'pool1' (Pooling): ...; layer 'x' (Foo): ...``.
    ``offenders`` keeps them as :class:`~lrponnx.errors.Offender` (layer name, type, why)."""

    def __init__(self, offenders: list[Offender]):
        self.offenders = list(offenders)
        parts = [f"layer {_shorten(o.node)!r} ({_shorten(o.op_type)}): {o.why}" for o in self.offenders]
        LrpOnnxError.__init__(self, f"{len(parts)} Caffe layer(s) cannot be converted: " + "; ".join(parts))


def _warn(msg: str) -> None:
    warnings.warn(msg, CaffeConversionWarning, stacklevel=3)


# Layers that only make sense while training (or feed data from a database): skipped with a warning.
DATA_LAYERS = {"Data", "ImageData", "HDF5Data", "WindowData", "MemoryData", "DummyData", "AnnotatedData",
               "VideoData"}


def _is_data_layer(L: "_Layer") -> bool:
    # a Python layer without bottoms feeds data (e.g. a custom input pipeline); with bottoms it computes
    return L.type in DATA_LAYERS or (L.type == "Python" and not L.bottoms)
TRAIN_ONLY = {"Accuracy", "HDF5Output"}
ALIAS_LAYERS = {"Split", "Dropout"}  # no ONNX node: their tops are the bottom (Dropout: at test time)


def _is_skipped(t: str) -> bool:
    return t in TRAIN_ONLY or t.endswith("Loss")


# --------------------------------------------------------------------------- small helpers

def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _canon_axis(axis: int, ndim: int, layer: "_Layer", what: str = "axis") -> int:
    a = axis + ndim if axis < 0 else axis
    if not 0 <= a < ndim:
        raise InvalidModelError(f"layer {_shorten(layer.name)!r} ({layer.type}): {what} {axis} is out of range for a "
                                f"{ndim}-D blob")
    return a


@dataclass
class _Layer:
    index: int
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    msg: object
    entry: int = -1  # position in net.layer / net.layers (what UnknownField.index refers to)

    def has(self, fld: str) -> bool:
        try:
            return self.msg.HasField(fld)
        except ValueError:  # the V1 message has no such field
            return False

    def param(self, fld: str):
        """The layer's ``<fld>`` sub-message (its defaults when unset or when the V1 format lacks it)."""
        try:
            return getattr(self.msg, fld)
        except AttributeError:
            return getattr(cpb.LayerParameter(), fld)

    def err(self, why: str) -> InvalidModelError:
        return InvalidModelError(f"layer {_shorten(self.name)!r} ({self.type}): {why}")

    def unsupported(self, why: str) -> UnsupportedModelError:
        return CaffeLayerError([Offender(self.name, self.type, why)])


@dataclass
class _Blob:
    """One parameter blob of a caffemodel: flat float32 data plus the shape it declares."""
    data: np.ndarray
    shape: tuple[int, ...]
    legacy: bool  # shape came from num/channels/height/width

    def matches(self, expected: Sequence[int]) -> bool:
        exp = tuple(int(d) for d in expected)
        if not self.legacy:
            return self.shape == exp
        # Caffe's Blob::ShapeEquals for legacy blobs: compare as 4-D, missing leading axes are 1.
        if len(exp) > 4:
            return False
        return self.shape == (1,) * (4 - len(exp)) + exp


# --------------------------------------------------------------------------- reading files

def _read_bytes(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise InvalidModelError(f"{what} {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise InvalidModelError(f"{what} {str(p)!r} is a directory, not a file") from None
    except OSError as e:
        raise InvalidModelError(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None


def _decode_prototxt(raw: bytes, name: str) -> str:
    """Prototxt bytes as text: UTF-8, else Latin-1 (old nets carry Latin-1 comments and names;
    Caffe's own parser reads bytes), with a warning. Bytes that are not text (NUL and other
    control characters) are refused as binary, saying where."""
    bad = re.search(rb"[\x00-\x08\x0e-\x1f\x7f]", raw)
    if bad is not None:
        line = raw.count(b"\n", 0, bad.start()) + 1
        raise InvalidModelError(f"{name} is not a text prototxt: byte {bad.start()} (line {line}) is the control "
                                f"character 0x{raw[bad.start()]:02x} (a binary file? a .caffemodel goes second)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        warnings.warn(f"{name} is not UTF-8 text (byte {e.start}, line {line}, is 0x{raw[e.start]:02x}); "
                      "read it as Latin-1")
        return raw.decode("latin-1")


def load_prototxt(path: str | os.PathLike):
    """The NetParameter of a text prototxt; InvalidModelError (one line) when it is not one.

    Fields the schema does not know are skipped here; :func:`convert` refuses those of the
    layers it converts (see :func:`_load_prototxt_checked`)."""
    return _load_prototxt_checked(path)[0]


def _load_prototxt_checked(path: str | os.PathLike):
    """``(net, unknown fields)`` of a text prototxt (:func:`proto.parse_prototxt_checked`)."""
    raw = _read_bytes(path, "prototxt")
    name = Path(path).name
    text = _decode_prototxt(raw, name)
    try:
        net, unknown = cpb.parse_prototxt_checked(text)
    except cpb.ProtoError as e:
        msg = " ".join(str(e).split())
        raise InvalidModelError(f"{name} is not a valid Caffe prototxt: {msg}") from None
    if not (len(net.layer) or len(net.layers)):
        raise InvalidModelError(f"{name} is not a Caffe net definition: it has no layer {{}} or layers {{}} entries")
    if len(net.layer) and len(net.layers):
        raise InvalidModelError(f"{name} mixes V2 'layer' and V1 'layers' entries; Caffe refuses that too")
    return net, unknown


#: BlobProto fields protobuf may keep aside that carry no forward-pass values: diff (6), double_diff (9).
_BLOB_GRADIENT_FIELDS = {6, 9}
_RAW_DTYPES = {0: np.dtype("<f8"), 1: np.dtype("<f4"), 2: np.dtype("<f2")}  # NVIDIA Caffe's Type enum


def _repeated_values(bp, number: int, container, dtype: str) -> np.ndarray:
    """A packed repeated float/double field of ``bp`` as an array, read from the message's own
    serialisation (one C call) instead of a Python float per value (12 s for AlexNet's 61 M)."""
    raw = bp.SerializeToString()
    i, n = 0, len(raw)

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            b = raw[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < n:
        key = varint()
        wire = key & 7
        if wire == 0:
            varint()
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size = varint()
            if key >> 3 == number:
                # copied as bytes first: a cast from an unaligned view is an element-by-element loop
                arr = np.frombuffer(raw, dtype=np.uint8, count=size, offset=i).copy().view(dtype)
                if arr.size == len(container):
                    return arr
                break
            i += size
        else:
            break
    return np.array(container, dtype=np.dtype(dtype).newbyteorder("="))  # not one packed run: the slow way


def _blob_from_proto(bp, where: str) -> _Blob:
    odd = [n for n in cpb.unknown_field_numbers(bp) if n not in _BLOB_GRADIENT_FIELDS]
    if odd:
        raise InvalidModelError(f"{where} has field number(s) {', '.join(map(str, odd))} that Caffe's BlobProto does "
                                "not define (a fork's storage?); refused rather than ignored")
    if bp.HasField("raw_data"):
        if len(bp.data) or len(bp.double_data):
            raise InvalidModelError(f"{where} holds both raw_data and data/double_data")
        if bp.raw_data_type not in _RAW_DTYPES:
            tname = cpb.BlobProto.DESCRIPTOR.fields_by_name["raw_data_type"].enum_type.values_by_number.get(
                bp.raw_data_type)
            raise InvalidModelError(f"{where}: raw_data of type {tname.name if tname else bp.raw_data_type} is not "
                                    "supported (FLOAT, FLOAT16 and DOUBLE are)")
        dt = _RAW_DTYPES[bp.raw_data_type]
        if len(bp.raw_data) % dt.itemsize:
            raise InvalidModelError(f"{where}: raw_data has {len(bp.raw_data)} bytes, not a whole number of "
                                    f"{dt.itemsize}-byte values")
        with np.errstate(over="ignore", invalid="ignore"):
            data = np.frombuffer(bp.raw_data, dtype=dt).astype(np.float32)
    elif len(bp.data):
        data = _repeated_values(bp, 5, bp.data, "<f4").astype(np.float32, copy=False)
    elif len(bp.double_data):
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: caught later
            data = _repeated_values(bp, 8, bp.double_data, "<f8").astype(np.float32)
    else:
        data = np.zeros(0, dtype=np.float32)
    if bp.HasField("shape"):
        shape, legacy = tuple(int(d) for d in bp.shape.dim), False
    else:
        shape, legacy = (int(bp.num), int(bp.channels), int(bp.height), int(bp.width)), True
    if any(d < 0 for d in shape):
        raise InvalidModelError(f"{where} has a negative dimension {list(shape)}")
    count = _prod(shape) if shape else 1
    if count != data.size:
        raise InvalidModelError(f"{where} holds {data.size} values but its shape {list(shape)} needs {count}")
    return _Blob(data, shape, legacy)


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _text(v) -> str:
    """A proto2 string field: protobuf hands back ``bytes`` when the stored value is not valid UTF-8."""
    return v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v


def load_caffemodel(path: str | os.PathLike) -> dict[str, list[_Blob]]:
    """Layer name -> parameter blobs, from a binary ``.caffemodel`` (V1 or V2 layers)."""
    return parse_caffemodel(_read_bytes(path, "caffemodel"), Path(path).name)


def parse_caffemodel(raw: bytes, name: str = "caffemodel") -> dict[str, list[_Blob]]:
    """:func:`load_caffemodel` on bytes; any malformed input gives :class:`InvalidModelError`."""
    if raw.startswith(HDF5_MAGIC):
        raise InvalidModelError(f"{name} is an HDF5 snapshot; only binary protobuf .caffemodel files are supported")
    if not raw:
        raise InvalidModelError(f"{name} is empty, not a Caffe .caffemodel")
    try:
        net = cpb.parse_binary_net(raw)
    except cpb.ProtoError as e:
        raise InvalidModelError(f"{name} is not a Caffe .caffemodel, or it is truncated "
                                f"(protobuf: {' '.join(str(e).split())})") from None
    entries = list(net.layer) + list(net.layers)
    if not entries:
        raise InvalidModelError(f"{name} is not a Caffe .caffemodel: it holds no layers")
    if len(net.layers) and not any(lp.name for lp in net.layers) and 1 in cpb.unknown_field_numbers(net.layers[0]):
        raise InvalidModelError(f"{name} is a V0-format caffemodel (layers {{ layer {{...}} }}); upgrade it with "
                                "Caffe's upgrade_net_proto_binary first")
    out: dict[str, list[_Blob]] = {}
    for i, lp in enumerate(entries):
        lname = _text(lp.name)
        if not lname:
            continue
        ltype = _text(lp.type) if isinstance(lp.type, (str, bytes)) else cpb.V1_TYPE_NAMES.get(lp.type, "")
        where = f"{name}: layer {_shorten(lname)!r}" + (f" ({_shorten(ltype)})" if ltype else "")
        blobs = [_blob_from_proto(b, f"{where} blob {j}") for j, b in enumerate(lp.blobs)]
        # Caffe copies from the first source layer with a given name; later duplicates are ignored.
        out.setdefault(lname, blobs)
    if not out:
        raise InvalidModelError(f"{name} is not a Caffe .caffemodel: none of its layers has a name")
    return out


def load_mean_file(path: str | os.PathLike) -> np.ndarray:
    """A mean from ``.npy`` (C x H x W, or C) or Caffe's ``.binaryproto`` (a BlobProto, 1 x C x H x W)."""
    p = Path(path)
    raw = _read_bytes(p, "mean file")
    if p.suffix.lower() == ".npy" or raw.startswith(b"\x93NUMPY"):
        import io
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - numpy raises many kinds
            raise InvalidModelError(f"mean file {p.name} is not a readable .npy file: {e}") from None
        arr = np.asarray(arr, dtype=np.float64)
    else:
        try:
            bp = cpb.parse_binary_blob(raw)
        except cpb.ProtoError as e:
            raise InvalidModelError(f"mean file {p.name} is not a .npy or Caffe .binaryproto file "
                                    f"(protobuf: {' '.join(str(e).split())})") from None
        blob = _blob_from_proto(bp, f"mean file {p.name}")
        if blob.data.size == 0:
            raise InvalidModelError(f"mean file {p.name} holds no values (not a Caffe .binaryproto?)")
        arr = blob.data.astype(np.float64).reshape(blob.shape)
        if arr.ndim == 4:
            if arr.shape[0] != 1:
                raise InvalidModelError(f"mean file {p.name} holds {arr.shape[0]} images; expected one")
            arr = arr[0]
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim not in (1, 3):
        raise InvalidModelError(f"mean file {p.name} has shape {list(arr.shape)}; expected C x H x W or C")
    if not np.all(np.isfinite(arr)):
        raise InvalidModelError(f"mean file {p.name} contains NaN or infinite values")
    return arr


# --------------------------------------------------------------------------- net structure

def _rule_met(rule, phase: int, level: int, stages: set[str]) -> bool:
    # Caffe's Net::StateMeetsRule
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def _layers_of(net) -> list[_Layer]:
    phase = 1  # TEST
    level = net.state.level if net.HasField("state") else 0
    stages = set(net.state.stage) if net.HasField("state") else set()
    out: list[_Layer] = []
    v1 = len(net.layers) > 0
    entries = net.layers if v1 else net.layer
    for i, lp in enumerate(entries):
        if lp.include and lp.exclude:
            name = lp.name or f"#{i}"
            raise InvalidModelError(f"layer {_shorten(name)!r} specifies both include and exclude rules; Caffe refuses that")
        if lp.include and not any(_rule_met(r, phase, level, stages) for r in lp.include):
            continue
        if lp.exclude and any(_rule_met(r, phase, level, stages) for r in lp.exclude):
            continue
        if not v1 and lp.HasField("phase") and lp.phase != phase:
            continue
        if v1:
            if lp.type == 0:
                raise InvalidModelError(
                    f"layer #{i} ({lp.name or 'unnamed'}) has no type: a V0-format net (layers {{ layer {{...}} }})? "
                    "Upgrade it with Caffe's upgrade_net_proto_text first")
            ltype = cpb.V1_TYPE_NAMES.get(lp.type, f"V1 type {lp.type}")
        else:
            ltype = lp.type
            if not ltype:
                raise InvalidModelError(f"layer #{i} ({lp.name or 'unnamed'}) has no type")
        out.append(_Layer(len(out), lp.name or f"layer{i}", ltype, list(lp.bottom), list(lp.top), lp, i))
    return out


#: Largest input dimension accepted (ONNX Runtime and most kernels index with 32-bit sizes per axis).
MAX_DIM = 2**31 - 1


def _shorten(text: str) -> str:
    from lrponnx.errors import shorten

    return shorten(text)


def _parse_input_shape(spec) -> tuple[list[int], bool]:
    """'1,3,227,227' or a sequence -> (dims, batch_is_symbolic). 'N', '?' or -1 as the first dim: symbolic."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not items:
        raise InvalidModelError("--input-shape is empty; expected e.g. 1,3,227,227")
    dims: list[int] = []
    symbolic = False
    for i, it in enumerate(items):
        if i == 0 and (it in ("N", "n", "?", "-1") or it == -1 or it is None):
            symbolic = True
            dims.append(1)
            continue
        try:
            d = int(it)
        except (TypeError, ValueError, OverflowError):
            raise InvalidModelError(f"--input-shape {_shorten(str(spec))!r}: {_shorten(str(it))!r} is not a positive "
                                    "integer") from None
        if d <= 0:
            raise InvalidModelError(f"--input-shape {_shorten(str(spec))!r}: dimensions must be positive")
        if d > MAX_DIM:
            raise InvalidModelError(f"--input-shape {_shorten(str(spec))!r}: {_shorten(str(d))} is too large "
                                    f"(at most {MAX_DIM:,} per dimension)")
        dims.append(d)
    return dims, symbolic


# --------------------------------------------------------------------------- the graph builder

class _Graph:
    def __init__(self, fixed_batch: bool, opset: int = 17):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[tuple[str, np.ndarray]] = []
        self.used: set[str] = set()
        self.reserved: set[str] = set()  # Caffe blob names: kept for the blobs' final values
        self.fixed_batch = fixed_batch
        self.needs_lrn_function = False

    def unique(self, base: str, allow_reserved: bool = False) -> str:
        name, k = base, 1
        while name in self.used or (not allow_reserved and name in self.reserved):
            name = f"{base}_{k}"
            k += 1
        self.used.add(name)
        return name

    def const(self, base: str, value: np.ndarray, dtype=np.float32) -> str:
        name = self.unique(base)
        self.inits.append((name, np.ascontiguousarray(np.asarray(value, dtype=dtype))))
        return name

    def write_initializers(self, graph: onnx.GraphProto) -> None:
        """Fill ``graph.initializer`` in place (one copy of the data, little-endian raw_data)."""
        for name, arr in self.inits:
            t = graph.initializer.add()
            t.name = name
            t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
            t.dims.extend(arr.shape)
            t.raw_data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str | None = None,
             **attrs) -> onnx.NodeProto:
        n = helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs)
        self.nodes.append(n)
        return n

    def add(self, n: onnx.NodeProto) -> None:
        self.nodes.append(n)

    def tmp(self, layer: _Layer, tag: str) -> str:
        return self.unique(f"{layer.name}#{tag}")


@dataclass
class _Ctx:
    """What a layer handler sees."""
    g: _Graph
    layer: _Layer
    xs: list[str]            # ONNX tensors of the bottoms
    shapes: list[list[int]]  # their Caffe shapes (batch placeholder in dim 0)
    outs: list[str]          # ONNX names for the tops
    blobs: list[np.ndarray]  # parameter blobs, already checked against the expected shapes
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.layer.name

    def reshape_target(self, in_shape: list[int], out_shape: list[int]) -> list[int]:
        """ONNX Reshape target for a Caffe reshape; keeps the batch axis symbolic when it can."""
        if self.g.fixed_batch:
            return list(out_shape)
        if out_shape and in_shape and out_shape[0] == in_shape[0] and _prod(out_shape[1:]) == _prod(in_shape[1:]):
            return [0] + list(out_shape[1:])
        raise self.layer.unsupported(
            f"reshapes {in_shape} to {out_shape} across the batch axis; give --input-shape with a fixed batch size")


# ----- expected parameter shapes (from the prototxt and the bottom shapes)

def _conv_geometry(layer: _Layer, nsp: int) -> dict:
    p = layer.param("convolution_param")

    def pick(rep: list[int], h_field: str, w_field: str, default: int, what: str) -> list[int]:
        has_hw = p.HasField(h_field) or p.HasField(w_field)
        if has_hw:
            if nsp != 2:
                raise layer.err(f"{h_field}/{w_field} can only be used for 2-D convolution")
            if rep:
                raise layer.err(f"either {what} or {h_field}/{w_field} may be given, not both")
            return [int(getattr(p, h_field)), int(getattr(p, w_field))]
        if not rep:
            return [default] * nsp
        if len(rep) == 1:
            return [int(rep[0])] * nsp
        if len(rep) == nsp:
            return [int(v) for v in rep]
        raise layer.err(f"{what} must be given once or {nsp} times, got {len(rep)}")

    if (p.HasField("kernel_h") or p.HasField("kernel_w")) and not (p.HasField("kernel_h") and p.HasField("kernel_w")):
        raise layer.err("kernel_h and kernel_w must be given together")
    if not list(p.kernel_size) and not p.HasField("kernel_h"):
        raise layer.err("no kernel_size (or kernel_h/kernel_w) given")
    kernel = pick(list(p.kernel_size), "kernel_h", "kernel_w", 0, "kernel_size")
    pad = pick(list(p.pad), "pad_h", "pad_w", 0, "pad")
    stride = pick(list(p.stride), "stride_h", "stride_w", 1, "stride")
    dil = list(p.dilation)
    if not dil:
        dilation = [1] * nsp
    elif len(dil) == 1:
        dilation = [int(dil[0])] * nsp
    elif len(dil) == nsp:
        dilation = [int(v) for v in dil]
    else:
        raise layer.err(f"dilation must be given once or {nsp} times, got {len(dil)}")
    if any(k <= 0 for k in kernel):
        raise layer.err(f"kernel size must be positive, got {kernel}")
    if any(s <= 0 for s in stride):
        raise layer.err(f"stride must be positive, got {stride}")
    if any(d <= 0 for d in dilation):
        raise layer.err(f"dilation must be positive, got {dilation}")
    if not p.HasField("num_output") or p.num_output <= 0:
        raise layer.err("num_output must be given and positive")
    group = int(p.group)
    if group <= 0:
        raise layer.err("group must be positive")
    return dict(kernel=kernel, pad=pad, stride=stride, dilation=dilation, group=group,
                num_output=int(p.num_output), bias=bool(p.bias_term))


def _expected_blob_shapes(layer: _Layer, shapes: list[list[int]]) -> list[tuple[str, list[int]]] | None:
    """(role, shape) of each parameter blob a layer must have, or None for parameter-free layers."""
    t = layer.type
    if t in ("Convolution", "Deconvolution"):
        s = shapes[0]
        if len(s) < 3:
            raise layer.err(f"needs an input with spatial axes, got shape {s}")
        geo = _conv_geometry(layer, len(s) - 2)
        c, g, n = s[1], geo["group"], geo["num_output"]
        if c % g or n % g:
            raise layer.err(f"group {g} must divide both the input channels ({c}) and num_output ({n})")
        w = [n, c // g, *geo["kernel"]] if t == "Convolution" else [c, n // g, *geo["kernel"]]
        return [("weight", w)] + ([("bias", [n])] if geo["bias"] else [])
    if t == "InnerProduct":
        p = layer.param("inner_product_param")
        if not p.HasField("num_output") or p.num_output <= 0:
            raise layer.err("num_output must be given and positive")
        s = shapes[0]
        axis = _canon_axis(p.axis, len(s), layer)
        k, n = _prod(s[axis:]), int(p.num_output)
        w = [k, n] if p.transpose else [n, k]
        return [("weight", w)] + ([("bias", [n])] if p.bias_term else [])
    if t == "BatchNorm":
        c = shapes[0][1] if len(shapes[0]) > 1 else 1
        return [("mean", [c]), ("variance", [c]), ("moving average factor", [1])]
    if t in ("Scale", "Bias"):
        if len(layer.bottoms) > 1:
            return None
        p = layer.param("scale_param" if t == "Scale" else "bias_param")
        s = shapes[0]
        axis = _canon_axis(p.axis, len(s), layer)
        if p.num_axes < -1:
            raise layer.err("num_axes must be >= -1")
        end = len(s) if p.num_axes == -1 else axis + p.num_axes
        if end > len(s):
            raise layer.err(f"axis {p.axis} + num_axes {p.num_axes} exceed the bottom's {len(s)} axes")
        pshape = s[axis:end]
        if t == "Scale":
            return [("scale", pshape)] + ([("bias", pshape)] if p.bias_term else [])
        return [("bias", pshape)]
    if t == "PReLU":
        p = layer.param("prelu_param")
        c = shapes[0][1] if len(shapes[0]) > 1 else 1
        return [("slope", [1] if p.channel_shared else [c])]
    return None


# ----- layer handlers: each emits ONNX nodes and returns the tops' Caffe shapes

def _h_conv(c: _Ctx) -> list[list[int]]:
    s = c.shapes[0]
    geo = _conv_geometry(c.layer, len(s) - 2)
    if _canon_axis(c.layer.param("convolution_param").axis, len(s), c.layer) != 1:
        raise c.layer.unsupported("convolution over an axis other than 1 (channels)")
    k, p, st, d = geo["kernel"], geo["pad"], geo["stride"], geo["dilation"]
    inputs = [c.xs[0], c.g.const(f"{c.name}.weight", c.blobs[0])]
    if geo["bias"]:
        inputs.append(c.g.const(f"{c.name}.bias", c.blobs[1]))
    if c.layer.type == "Convolution":
        out_sp = [(s[2 + i] + 2 * p[i] - (d[i] * (k[i] - 1) + 1)) // st[i] + 1 for i in range(len(k))]
        op = "Conv"
    else:
        out_sp = [st[i] * (s[2 + i] - 1) + (d[i] * (k[i] - 1) + 1) - 2 * p[i] for i in range(len(k))]
        op = "ConvTranspose"
    if any(o <= 0 for o in out_sp):
        raise c.layer.err(f"output size {out_sp} is not positive for input {s}, kernel {k}, pad {p}, stride {st}")
    c.g.node(op, inputs, [c.outs[0]], c.name, kernel_shape=k, pads=p + p, strides=st, dilations=d,
             group=geo["group"])
    return [[s[0], geo["num_output"], *out_sp]]


def _h_inner_product(c: _Ctx) -> list[list[int]]:
    p = c.layer.param("inner_product_param")
    s = c.shapes[0]
    axis = _canon_axis(p.axis, len(s), c.layer)
    n, k = int(p.num_output), _prod(s[axis:])
    w = c.blobs[0]
    out_shape = s[:axis] + [n]
    if axis == 1:
        x = c.xs[0]
        if len(s) != 2:
            x = c.g.tmp(c.layer, "flatten")
            c.g.node("Flatten", [c.xs[0]], [x], f"{c.name}#flatten", axis=1)
        inputs = [x, c.g.const(f"{c.name}.weight", w)]
        if p.bias_term:
            inputs.append(c.g.const(f"{c.name}.bias", c.blobs[1]))
        c.g.node("Gemm", inputs, [c.outs[0]], c.name, transB=0 if p.transpose else 1)
        return [out_shape]
    # general axis: [..., K] @ W^T (+ b)
    x = c.xs[0]
    if len(s) != axis + 1:
        x = c.g.tmp(c.layer, "reshape")
        tgt = c.reshape_target(s, s[:axis] + [k]) if axis == 0 else [0] * axis + [k]
        c.g.node("Reshape", [c.xs[0], c.g.const(f"{c.name}.shape", np.array(tgt), np.int64)], [x],
                 f"{c.name}#reshape")
    wt = w if p.transpose else w.T
    if p.bias_term:
        y = c.g.tmp(c.layer, "matmul")
        c.g.node("MatMul", [x, c.g.const(f"{c.name}.weight", wt)], [y], f"{c.name}#matmul")
        c.g.node("Add", [y, c.g.const(f"{c.name}.bias", c.blobs[1])], [c.outs[0]], c.name)
    else:
        c.g.node("MatMul", [x, c.g.const(f"{c.name}.weight", wt)], [c.outs[0]], c.name)
    return [out_shape]


def _pool_pair(layer: _Layer, p, field: str) -> tuple[int, int]:
    """PoolingParameter's ``pad``/``stride``: one value for both axes, or ``<field>_h`` and ``<field>_w``."""
    if p.HasField(f"{field}_h") or p.HasField(f"{field}_w"):
        if p.HasField(field):
            raise layer.err(f"give {field} OR {field}_h and {field}_w")
        return getattr(p, f"{field}_h"), getattr(p, f"{field}_w")
    value = getattr(p, field)
    return value, value


def _pool_floor(layer: _Layer, p) -> bool:
    """Whether the output size rounds down: BVLC's ``round_mode: FLOOR`` or the forks'
    ``ceil_mode: false`` (OpenCV's caffe.proto, BVLC PR #3057). Both default to ceil."""
    by_round = p.HasField("round_mode") and p.round_mode == 1
    by_ceil = p.HasField("ceil_mode") and not p.ceil_mode
    if p.HasField("round_mode") and p.HasField("ceil_mode") and by_round != by_ceil:
        raise layer.err(f"round_mode: {'FLOOR' if by_round else 'CEIL'} and ceil_mode: "
                        f"{'true' if p.ceil_mode else 'false'} contradict each other")
    return by_round or by_ceil


def _pool_geometry(layer: _Layer, s: list[int]) -> dict:
    p = layer.param("pooling_param")
    if len(s) != 4:
        raise layer.err(f"Caffe pools 4-D blobs only, got shape {s}")
    H, W = s[2], s[3]
    if p.global_pooling:
        if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
            raise layer.err("with global_pooling the kernel size cannot be given")
        kh, kw = H, W
    else:
        has_size = p.HasField("kernel_size")
        has_hw = p.HasField("kernel_h") and p.HasField("kernel_w")
        if has_size == has_hw:
            raise layer.err("give kernel_size OR kernel_h and kernel_w")
        kh, kw = (p.kernel_size, p.kernel_size) if has_size else (p.kernel_h, p.kernel_w)
    ph, pw = _pool_pair(layer, p, "pad")
    sh, sw = _pool_pair(layer, p, "stride")
    if kh <= 0 or kw <= 0:
        raise layer.err("kernel size must be positive")
    if sh <= 0 or sw <= 0:
        raise layer.err("stride must be positive")
    if p.global_pooling and (ph or pw or sh != 1 or sw != 1):
        raise layer.err("with global_pooling only pad = 0 and stride = 1 are allowed")
    if (ph or pw) and (ph >= kh or pw >= kw):
        raise layer.err(f"pad ({ph}, {pw}) must be smaller than the kernel ({kh}, {kw})")

    floor = _pool_floor(layer, p)

    def out_size(n: int, k: int, pad: int, st: int) -> int:
        q = (n + 2 * pad - k) / st
        o = (math.floor(q) if floor else math.ceil(q)) + 1
        return int(o)

    ho, wo = out_size(H, kh, ph, sh), out_size(W, kw, pw, sw)
    if ph or pw:  # Caffe: the last window must start inside the image or its left padding
        if (ho - 1) * sh >= H + ph:
            ho -= 1
        if (wo - 1) * sw >= W + pw:
            wo -= 1
    if ho <= 0 or wo <= 0:
        raise layer.err(f"kernel ({kh}, {kw}) is larger than the padded input {s}")
    return dict(k=[int(kh), int(kw)], pad=[int(ph), int(pw)], stride=[int(sh), int(sw)], out=[ho, wo],
                method=int(p.pool), global_=bool(p.global_pooling), size=[H, W])


def _h_pooling(c: _Ctx) -> list[list[int]]:
    s = c.shapes[0]
    geo = _pool_geometry(c.layer, s)
    method = geo["method"]
    if method == 2:
        raise c.layer.unsupported("STOCHASTIC pooling (its test-time output is a probability-weighted average)")
    N, C = s[0], s[1]
    k, p, st, out, size = geo["k"], geo["pad"], geo["stride"], geo["out"], geo["size"]
    if geo["global_"]:
        c.g.node("GlobalMaxPool" if method == 0 else "GlobalAveragePool", [c.xs[0]], [c.outs[0]], c.name)
        return [[N, C, 1, 1]]
    for i in range(2):
        if (out[i] - 1) * st[i] - p[i] >= size[i]:
            raise c.layer.unsupported(
                f"stride {st[i]} > kernel {k[i]} without padding leaves output windows wholly outside the input "
                "(Caffe fills them with -FLT_MAX or 0)")
    # end padding so that ONNX (floor rounding) yields exactly Caffe's output size
    end = [max(0, (out[i] - 1) * st[i] + k[i] - p[i] - size[i]) for i in range(2)]
    if method == 0:
        pads = p + end
        _check_pool_size(c.layer, size, k, pads, st, out)
        c.g.node("MaxPool", [c.xs[0]], [c.outs[0]], c.name, kernel_shape=k, strides=st, pads=pads)
        return [[N, C, *out]]
    # AVE: Caffe divides by the window clipped to [-pad, size + pad): padding counts, beyond it not.
    if p == [0, 0]:
        pads = [0, 0] + end
        _check_pool_size(c.layer, size, k, pads, st, out)
        c.g.node("AveragePool", [c.xs[0]], [c.outs[0]], c.name, kernel_shape=k, strides=st, pads=pads,
                 count_include_pad=0)
    elif all(end[i] <= p[i] for i in range(2)):
        pads = p + end  # every window lies inside [-pad, size + pad): the divisor is always kh*kw
        _check_pool_size(c.layer, size, k, pads, st, out)
        c.g.node("AveragePool", [c.xs[0]], [c.outs[0]], c.name, kernel_shape=k, strides=st, pads=pads,
                 count_include_pad=1)
    else:
        # zero-pad explicitly (those zeros count), then exclude whatever lies beyond
        padded = c.g.tmp(c.layer, "pad")
        pad_vec = c.g.const(f"{c.name}.pads", np.array([0, 0, p[0], p[1], 0, 0, p[0], p[1]]), np.int64)
        c.g.node("Pad", [c.xs[0], pad_vec], [padded], f"{c.name}#pad", mode="constant")
        psize = [size[i] + 2 * p[i] for i in range(2)]
        end2 = [max(0, (out[i] - 1) * st[i] + k[i] - psize[i]) for i in range(2)]
        pads = [0, 0] + end2
        _check_pool_size(c.layer, psize, k, pads, st, out)
        c.g.node("AveragePool", [padded], [c.outs[0]], c.name, kernel_shape=k, strides=st, pads=pads,
                 count_include_pad=0)
    return [[N, C, *out]]


def _check_pool_size(layer, size, k, pads, st, out) -> None:
    for i in range(2):
        got = (size[i] + pads[i] + pads[i + 2] - k[i]) // st[i] + 1
        if got != out[i] or pads[i] >= k[i] or pads[i + 2] >= k[i]:  # pragma: no cover - our invariant
            raise AssertionError(f"pooling {layer.name}: ONNX size {got} != Caffe size {out[i]} (pads {pads})")


def _h_lrn(c: _Ctx) -> list[list[int]]:
    p = c.layer.param("lrn_param")
    s = c.shapes[0]
    size = int(p.local_size)
    if size % 2 != 1:
        raise c.layer.err(f"LRN only supports odd values for local_size, got {size}")
    if len(s) != 4:
        raise c.layer.err(f"LRN needs a 4-D blob, got shape {s}")
    if p.norm_region == 0:
        c.g.node("LRN", [c.xs[0]], [c.outs[0]], c.name, size=size, alpha=float(p.alpha), beta=float(p.beta),
                 bias=float(p.k))
    else:
        c.g.add(make_within_channel_lrn(c.xs[0], c.outs[0], size, float(p.alpha), float(p.beta), name=c.name))
        c.g.needs_lrn_function = True
    return [list(s)]


def _h_relu(c: _Ctx) -> list[list[int]]:
    slope = float(c.layer.param("relu_param").negative_slope)
    if slope != 0.0:
        c.g.node("LeakyRelu", [c.xs[0]], [c.outs[0]], c.name, alpha=slope)
    else:
        c.g.node("Relu", [c.xs[0]], [c.outs[0]], c.name)
    return [list(c.shapes[0])]


def _h_prelu(c: _Ctx) -> list[list[int]]:
    s = c.shapes[0]
    slope = c.blobs[0].reshape([-1] + [1] * max(0, len(s) - 2)) if len(s) > 2 else c.blobs[0]
    c.g.node("PRelu", [c.xs[0], c.g.const(f"{c.name}.slope", slope)], [c.outs[0]], c.name)
    return [list(s)]


def _simple(op: str, **attrs):
    def h(c: _Ctx) -> list[list[int]]:
        c.g.node(op, [c.xs[0]], [c.outs[0]], c.name, **attrs)
        return [list(c.shapes[0])]
    return h


def _h_elu(c: _Ctx) -> list[list[int]]:
    c.g.node("Elu", [c.xs[0]], [c.outs[0]], c.name, alpha=float(c.layer.param("elu_param").alpha))
    return [list(c.shapes[0])]


def _h_dropout(c: _Ctx) -> list[list[int]]:
    # only reached when scale_train is false: Caffe then scales by (1 - ratio) at test time
    ratio = float(c.layer.param("dropout_param").dropout_ratio)
    c.g.node("Mul", [c.xs[0], c.g.const(f"{c.name}.scale", np.array(1.0 - ratio))], [c.outs[0]], c.name)
    return [list(c.shapes[0])]


def _h_softmax(c: _Ctx) -> list[list[int]]:
    s = c.shapes[0]
    axis = _canon_axis(c.layer.param("softmax_param").axis, len(s), c.layer)
    c.g.node("Softmax", [c.xs[0]], [c.outs[0]], c.name, axis=axis)
    return [list(s)]


def _h_concat(c: _Ctx) -> list[list[int]]:
    p = c.layer.param("concat_param")
    s0 = c.shapes[0]
    raw = int(p.concat_dim) if p.HasField("concat_dim") else int(p.axis)
    axis = _canon_axis(raw, len(s0), c.layer)
    for j, s in enumerate(c.shapes[1:], 1):
        if len(s) != len(s0) or any(s[i] != s0[i] for i in range(len(s0)) if i != axis):
            raise c.layer.err(f"bottom {j} has shape {s}, incompatible with bottom 0 {s0} for concat on axis {axis}")
    out = list(s0)
    out[axis] = sum(s[axis] for s in c.shapes)
    if len(c.xs) == 1:
        c.g.node("Identity", [c.xs[0]], [c.outs[0]], c.name)
    else:
        c.g.node("Concat", c.xs, [c.outs[0]], c.name, axis=axis)
    return [out]


def _h_eltwise(c: _Ctx) -> list[list[int]]:
    p = c.layer.param("eltwise_param")
    s0 = c.shapes[0]
    if len(c.xs) < 2:
        raise c.layer.err("Eltwise needs at least two bottoms")
    for j, s in enumerate(c.shapes[1:], 1):
        if s != s0:
            raise c.layer.err(f"bottom {j} has shape {s}, bottom 0 has {s0}; Eltwise needs equal shapes")
    op = int(p.operation)
    coeff = list(p.coeff)
    if coeff and len(coeff) != len(c.xs):
        raise c.layer.err(f"Eltwise takes one coeff per bottom: {len(coeff)} coeffs for {len(c.xs)} bottoms")
    if coeff and op != 1 and any(v != 1.0 for v in coeff):
        raise c.layer.err("Eltwise coeffs are only allowed for SUM")
    xs = list(c.xs)
    if op == 1 and coeff:
        for j, v in enumerate(coeff):
            if v != 1.0:
                t = c.g.tmp(c.layer, f"coeff{j}")
                c.g.node("Mul", [xs[j], c.g.const(f"{c.name}.coeff{j}", np.array(v))], [t], f"{c.name}#coeff{j}")
                xs[j] = t
    if op == 2:
        c.g.node("Max", xs, [c.outs[0]], c.name)
        return [list(s0)]
    binop = "Add" if op == 1 else "Mul"
    acc = xs[0]
    for j in range(1, len(xs)):
        last = j == len(xs) - 1
        out = c.outs[0] if last else c.g.tmp(c.layer, f"acc{j}")
        c.g.node(binop, [acc, xs[j]], [out], c.name if last else f"{c.name}#{j}")
        acc = out
    return [list(s0)]


def _h_crop(c: _Ctx) -> list[list[int]]:
    """Caffe's CropLayer: bottom 0 cut to bottom 1's shape on ``axis`` and every later axis, starting
    at ``offset`` (none: 0; one: for all those axes; else one per axis). Bottom 1 gives only a shape."""
    p = c.layer.param("crop_param")
    s, ref = c.shapes
    nd = len(s)
    if len(ref) != nd:
        raise c.layer.err(f"bottom 1 (the reference) has {len(ref)} axes, bottom 0 has {nd}")
    axis = _canon_axis(p.axis, nd, c.layer)
    offs = [int(v) for v in p.offset]
    n_crop = nd - axis
    if len(offs) not in (0, 1, n_crop):
        raise c.layer.err(f"offset must be given once or once per cropped axis ({n_crop}), got {len(offs)}")
    out = list(s)
    starts: list[int] = []
    ends: list[int] = []
    axes: list[int] = []
    for i in range(axis, nd):
        o = 0 if not offs else offs[0] if len(offs) == 1 else offs[i - axis]
        size = ref[i]
        if o + size > s[i]:
            raise c.layer.err(f"axis {i}: offset {o} + the reference's size {size} exceed bottom 0's size {s[i]} "
                              f"(bottom 0 {s}, bottom 1 {ref})")
        out[i] = size
        if o == 0 and size == s[i]:
            continue
        if i == 0 and not c.g.fixed_batch:
            raise c.layer.unsupported("crops the batch axis; give --input-shape with a fixed batch")
        starts.append(o)
        ends.append(o + size)
        axes.append(i)
    if not axes:
        c.g.node("Identity", [c.xs[0]], [c.outs[0]], c.name)
        return [out]
    c.g.node("Slice", [c.xs[0], c.g.const(f"{c.name}.starts", np.array(starts), np.int64),
                       c.g.const(f"{c.name}.ends", np.array(ends), np.int64),
                       c.g.const(f"{c.name}.axes", np.array(axes), np.int64)], [c.outs[0]], c.name)
    return [out]


def _h_slice(c: _Ctx) -> list[list[int]]:
    """Caffe's SliceLayer: bottom cut along ``axis`` (or the deprecated ``slice_dim``) at the
    ``slice_point``s, or into equal parts, one per top."""
    p = c.layer.param("slice_param")
    s = c.shapes[0]
    if p.HasField("axis") and p.HasField("slice_dim"):
        raise c.layer.err("either axis or slice_dim may be given, not both")
    axis = _canon_axis(int(p.slice_dim) if p.HasField("slice_dim") else int(p.axis), len(s), c.layer)
    n, dim = len(c.outs), s[axis]
    if axis == 0 and n > 1 and not c.g.fixed_batch:
        raise c.layer.unsupported("slices the batch axis; give --input-shape with a fixed batch")
    points = [int(v) for v in p.slice_point]
    if points:
        if len(points) != n - 1:
            raise c.layer.err(f"{len(points)} slice_point(s) for {n} tops; Caffe needs one fewer than the tops")
        bounds = [0] + points + [dim]
        if any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise c.layer.err(f"slice_points {points} must increase strictly within (0, {dim}) on axis {axis}")
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    else:
        if dim % n:
            raise c.layer.err(f"axis {axis} of size {dim} does not split into {n} equal parts (one per top)")
        sizes = [dim // n] * n
    outs = []
    for size in sizes:
        o = list(s)
        o[axis] = size
        outs.append(o)
    if n == 1:
        c.g.node("Identity", [c.xs[0]], [c.outs[0]], c.name)
        return outs
    c.g.node("Split", [c.xs[0], c.g.const(f"{c.name}.split", np.array(sizes), np.int64)], list(c.outs), c.name,
             axis=axis)
    return outs


def _h_flatten(c: _Ctx) -> list[list[int]]:
    p = c.layer.param("flatten_param")
    s = c.shapes[0]
    a = _canon_axis(p.axis, len(s), c.layer)
    e = _canon_axis(p.end_axis, len(s), c.layer, "end_axis")
    if e < a:
        raise c.layer.err(f"end_axis {p.end_axis} comes before axis {p.axis}")
    out = s[:a] + [_prod(s[a:e + 1])] + s[e + 1:]
    if a == 1 and e == len(s) - 1:
        c.g.node("Flatten", [c.xs[0]], [c.outs[0]], c.name, axis=1)
    else:
        tgt = c.reshape_target(s, out) if a == 0 else [0] + out[1:]
        c.g.node("Reshape", [c.xs[0], c.g.const(f"{c.name}.shape", np.array(tgt), np.int64)], [c.outs[0]], c.name)
    return [out]


def _h_reshape(c: _Ctx) -> list[list[int]]:
    p = c.layer.param("reshape_param")
    s = c.shapes[0]
    nd = len(s)
    axis = p.axis + nd + 1 if p.axis < 0 else p.axis
    if not 0 <= axis <= nd:
        raise c.layer.err(f"axis {p.axis} is out of range for a {nd}-D blob")
    if p.num_axes < -1:
        raise c.layer.err("num_axes must be >= -1")
    end = nd if p.num_axes == -1 else axis + p.num_axes
    if end > nd:
        raise c.layer.err(f"axis + num_axes ({axis} + {p.num_axes}) exceeds the {nd} axes of the bottom")
    dims = [int(d) for d in p.shape.dim]
    new = []
    infer = None
    for i, d in enumerate(dims):
        if d == 0:
            if axis + i >= nd:
                raise c.layer.err(f"shape dim {i} is 0 (copy) but the bottom has no axis {axis + i}")
            new.append(s[axis + i])
        elif d == -1:
            if infer is not None:
                raise c.layer.err("at most one shape dim may be -1")
            infer = i
            new.append(1)
        elif d < 0:
            raise c.layer.err(f"shape dim {d} is invalid")
        else:
            new.append(d)
    out = s[:axis] + new + s[end:]
    total = _prod(s)
    if infer is not None:
        rest = _prod(out)
        if rest == 0 or total % rest:
            raise c.layer.err(f"cannot reshape {s} to {dims}: {total} values do not divide")
        out[axis + infer] = total // rest
    if _prod(out) != total:
        raise c.layer.err(f"cannot reshape {s} ({total} values) to {out} ({_prod(out)} values)")
    tgt = c.reshape_target(s, out)
    c.g.node("Reshape", [c.xs[0], c.g.const(f"{c.name}.shape", np.array(tgt), np.int64)], [c.outs[0]], c.name)
    return [out]


def _h_batchnorm(c: _Ctx) -> list[list[int]]:
    s = c.shapes[0]
    if len(s) < 2:
        raise c.layer.err(f"BatchNorm needs a blob with a channel axis, got shape {s}")
    eps = float(c.layer.param("batch_norm_param").eps)
    mean, var, factor = c.blobs
    f = float(factor.reshape(-1)[0])
    sf = 0.0 if f == 0 else 1.0 / f
    mean = mean.astype(np.float64) * sf
    var = var.astype(np.float64) * sf
    C = s[1]
    gamma, beta = np.ones(C), np.zeros(C)
    fold = c.extra.get("fold_scale")
    name = c.name
    if fold is not None:
        gamma = fold[0].astype(np.float64).reshape(C)
        if len(fold) > 1:
            beta = fold[1].astype(np.float64).reshape(C)
    inputs = [c.xs[0], c.g.const(f"{name}.scale", gamma), c.g.const(f"{name}.bias", beta),
              c.g.const(f"{name}.mean", mean), c.g.const(f"{name}.var", var)]
    n = c.g.node("BatchNormalization", inputs, [c.outs[0]], name, epsilon=eps)
    if fold is not None:
        n.doc_string = f"Caffe BatchNorm {c.name!r} with the following Scale layer {c.extra['fold_name']!r} folded in"
    return [list(s)]


def _broadcast_param(arr: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A Caffe Scale/Bias parameter of shape s[axis:axis+k] as an ONNX-broadcastable array."""
    trailing = ndim - axis - arr.ndim
    return arr.reshape(list(arr.shape) + [1] * trailing) if trailing > 0 else arr


def _h_scale_bias(c: _Ctx) -> list[list[int]]:
    t = c.layer.type
    p = c.layer.param("scale_param" if t == "Scale" else "bias_param")
    s = c.shapes[0]
    axis = _canon_axis(p.axis, len(s), c.layer)
    op = "Mul" if t == "Scale" else "Add"
    if len(c.xs) == 2:
        s1 = c.shapes[1]
        if s[axis:axis + len(s1)] != s1:
            raise c.layer.err(f"bottom 1 shape {s1} does not match bottom 0 {s} from axis {axis}")
        other = c.xs[1]
        trailing = len(s) - axis - len(s1)
        if trailing > 0 and s1:  # right-pad with 1s so ONNX broadcasting lines the axes up
            tgt = s1 + [1] * trailing
            if axis == 0 and not c.g.fixed_batch:
                tgt[0] = 0  # bottom 1 starts with the batch axis: copy it
            other = c.g.tmp(c.layer, "reshape")
            c.g.node("Reshape", [c.xs[1], c.g.const(f"{c.name}.shape", np.array(tgt), np.int64)], [other],
                     f"{c.name}#reshape")
        c.g.node(op, [c.xs[0], other], [c.outs[0]], c.name)
        return [list(s)]
    if axis == 0 and c.blobs[0].ndim > 0 and not c.g.fixed_batch:
        raise c.layer.unsupported("a learned parameter over the batch axis needs --input-shape with a fixed batch")
    w = _broadcast_param(c.blobs[0], axis, len(s))
    has_bias = t == "Scale" and p.bias_term
    if has_bias:
        y = c.g.tmp(c.layer, "scale")
        c.g.node("Mul", [c.xs[0], c.g.const(f"{c.name}.scale", w)], [y], f"{c.name}#scale")
        b = _broadcast_param(c.blobs[1], axis, len(s))
        c.g.node("Add", [y, c.g.const(f"{c.name}.bias", b)], [c.outs[0]], c.name)
    else:
        role = "scale" if t == "Scale" else "bias"
        c.g.node(op, [c.xs[0], c.g.const(f"{c.name}.{role}", w)], [c.outs[0]], c.name)
    return [list(s)]


def _h_power(c: _Ctx) -> list[list[int]]:
    p = c.layer.param("power_param")
    power, scale, shift = float(p.power), float(p.scale), float(p.shift)
    steps: list[tuple[str, float]] = []
    if scale != 1.0:
        steps.append(("Mul", scale))
    if shift != 0.0:
        steps.append(("Add", shift))
    if power != 1.0:
        steps.append(("Pow", power))
    if not steps:
        c.g.node("Identity", [c.xs[0]], [c.outs[0]], c.name)
        return [list(c.shapes[0])]
    x = c.xs[0]
    for j, (op, v) in enumerate(steps):
        last = j == len(steps) - 1
        out = c.outs[0] if last else c.g.tmp(c.layer, op.lower())
        c.g.node(op, [x, c.g.const(f"{c.name}.{op.lower()}", np.array(v))], [out],
                 c.name if last else f"{c.name}#{op.lower()}")
        x = out
    return [list(c.shapes[0])]


HANDLERS = {
    "Convolution": _h_conv,
    "Deconvolution": _h_conv,
    "InnerProduct": _h_inner_product,
    "Pooling": _h_pooling,
    "LRN": _h_lrn,
    "ReLU": _h_relu,
    "PReLU": _h_prelu,
    "ELU": _h_elu,
    "Sigmoid": _simple("Sigmoid"),
    "TanH": _simple("Tanh"),
    "AbsVal": _simple("Abs"),
    "BNLL": _simple("Softplus"),
    "Dropout": _h_dropout,
    "Softmax": _h_softmax,
    "Concat": _h_concat,
    "Crop": _h_crop,
    "Eltwise": _h_eltwise,
    "Flatten": _h_flatten,
    "Reshape": _h_reshape,
    "BatchNorm": _h_batchnorm,
    "Scale": _h_scale_bias,
    "Bias": _h_scale_bias,
    "Power": _h_power,
    "Slice": _h_slice,
}
SUPPORTED_TYPES = sorted(set(HANDLERS) | {"Input", "Split"})
ONE_BOTTOM = {"Convolution", "Deconvolution", "InnerProduct", "Pooling", "LRN", "ReLU", "PReLU", "ELU",
              "Sigmoid", "TanH", "AbsVal", "BNLL", "Dropout", "Softmax", "Flatten", "Reshape", "BatchNorm",
              "Power", "Split", "Slice"}


def _static_check(layer: _Layer) -> str | None:
    """Why a layer of a supported type cannot be converted, judging by its parameters alone."""
    t = layer.type
    if t in ONE_BOTTOM and len(layer.bottoms) != 1:
        return f"expects exactly one bottom, has {len(layer.bottoms)}"
    if t in ("Scale", "Bias") and len(layer.bottoms) not in (1, 2):
        return f"expects one or two bottoms, has {len(layer.bottoms)}"
    if t in ("Concat", "Eltwise") and not layer.bottoms:
        return "has no bottom"
    if len(set(layer.tops)) != len(layer.tops):
        return "names the same top twice"
    if t == "Crop" and len(layer.bottoms) != 2:
        return f"expects two bottoms (the blob to crop and the reference), has {len(layer.bottoms)}"
    if t in ("Split", "Slice"):
        if not layer.tops:
            return "has no top"
    elif t != "Input" and len(layer.tops) != 1:
        return f"expects exactly one top, has {len(layer.tops)}"
    if t == "Pooling" and layer.param("pooling_param").pool == 2:
        return "STOCHASTIC pooling (its test-time output is a probability-weighted average)"
    if t == "BatchNorm" and layer.param("batch_norm_param").HasField("use_global_stats") \
            and not layer.param("batch_norm_param").use_global_stats:
        return "use_global_stats: false (batch statistics at test time) cannot be exported"
    return None


@dataclass
class _Step:
    """One conversion step: a layer, or a BatchNorm together with the Scale layer folded into it."""
    main: _Layer
    scale: _Layer | None

    @property
    def layers(self) -> list[_Layer]:
        return [self.main] if self.scale is None else [self.main, self.scale]

    @property
    def tops(self) -> list[str]:
        return (self.scale or self.main).tops


def _scale_folds(bn: _Layer, sc: _Layer, rest: list[_Layer]) -> bool:
    """Whether Scale layer ``sc`` (right after BatchNorm ``bn``) can become BatchNormalization's gamma/beta."""
    if sc.type != "Scale" or len(sc.bottoms) != 1 or len(sc.tops) != 1 or sc.bottoms[0] != bn.tops[0]:
        return False
    p = sc.param("scale_param")
    if p.axis != 1 or p.num_axes != 1:
        return False
    blob = bn.tops[0]
    if sc.tops[0] == blob:
        return True
    if blob in bn.bottoms:  # BN in place, Scale not: the blob's final value (BN output) must stay visible
        return False
    readers = 0  # not in place: fold only if nothing else reads the BatchNorm output
    for M in rest:
        readers += M.bottoms.count(blob)
        if blob in M.tops:
            break
    return readers == 1


PARAMETRIC = {"Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "Scale", "Bias", "PReLU"}

# --------------------------------------------------------------------------- weights

def _random_blobs(layer: _Layer, expected: list[tuple[str, list[int]]], rng: np.random.Generator) -> list[np.ndarray]:
    """Deterministic untrained parameters: He-scaled normal weights, small biases, BN with positive variance."""
    f32 = np.float32
    out = []
    t = layer.type
    for role, shape in expected:
        shape = [int(d) for d in shape]
        if role == "weight":
            if t == "InnerProduct":
                fan_in = shape[0] if layer.param("inner_product_param").transpose else shape[1]
            else:
                fan_in = _prod(shape[1:])
            a = rng.standard_normal(shape, dtype=f32)
            a *= f32(math.sqrt(2.0 / max(1, fan_in)))
        elif role == "bias" and t in ("Convolution", "Deconvolution", "InnerProduct"):
            a = rng.standard_normal(shape, dtype=f32) * f32(0.01)
        elif role == "mean":
            a = rng.standard_normal(shape, dtype=f32) * f32(0.1)
        elif role == "variance":
            a = rng.random(shape, dtype=f32) + f32(0.5)
        elif role == "moving average factor":
            a = np.ones(shape, f32)
        elif role == "scale":
            a = rng.random(shape, dtype=f32) + f32(0.5)
        elif role == "slope":
            a = f32(0.25) + f32(0.05) * rng.standard_normal(shape, dtype=f32)
        else:  # bias of Scale / Bias layers
            a = rng.standard_normal(shape, dtype=f32) * f32(0.1)
        out.append(np.asarray(a, dtype=f32))
    return out


# --------------------------------------------------------------------------- preprocessing

def _parse_mean(mean) -> list[float]:
    if isinstance(mean, str):
        parts = [p for p in mean.replace(" ", ",").split(",") if p]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise InvalidModelError(f"--mean {mean!r}: expected comma-separated numbers, e.g. 104,117,123") from None
    else:
        try:
            vals = [float(v) for v in np.asarray(mean, dtype=np.float64).reshape(-1)]
        except (TypeError, ValueError):
            raise InvalidModelError(f"mean {mean!r} is not a list of numbers") from None
    if not vals:
        raise InvalidModelError("--mean is empty")
    if not all(math.isfinite(v) for v in vals):
        raise InvalidModelError("--mean contains NaN or infinite values")
    return vals


def _preprocessing(input_name: str, shape: list[int], mean, mean_file, scale: float,
                   channel_order: str | None) -> tuple[dict, np.ndarray | None]:
    """The metadata dict and the mean as an array broadcastable against one input (C,1,1 or C,H,W)."""
    if mean is not None and mean_file is not None:
        raise InvalidModelError("give --mean or --mean-file, not both")
    C = shape[1] if len(shape) > 1 else None
    spatial = shape[2:] if len(shape) >= 3 else []
    if channel_order is not None:
        channel_order = channel_order.lower()
        if channel_order not in ("bgr", "rgb", "gray"):
            raise InvalidModelError(f"--channel-order must be bgr, rgb or gray, got {channel_order!r}")
        if (C != 1) if channel_order == "gray" else (C != 3):
            raise InvalidModelError(f"--channel-order {channel_order} does not fit the input {_shorten(input_name)!r} "
                                    f"of shape {shape}")
    elif C == 3:
        channel_order = "bgr"
    elif C == 1:
        channel_order = "gray"
    if not math.isfinite(scale) or scale == 0:
        raise InvalidModelError(f"--scale must be a finite non-zero number, got {scale}")

    image: np.ndarray | None = None
    vals: list[float] | None = None
    if mean_file is not None:
        arr = load_mean_file(mean_file)
        if C is not None and arr.shape[0] != C:
            raise InvalidModelError(f"mean file has {arr.shape[0]} channels, the input {_shorten(input_name)!r} has {C}")
        if arr.ndim == 1:
            vals = [float(v) for v in arr]
        elif list(arr.shape[1:]) == list(spatial):
            image = arr
        else:
            _warn(f"mean image is {'x'.join(map(str, arr.shape[1:]))} but the input is "
                  f"{'x'.join(map(str, spatial))}: using its per-channel average (as Caffe's Classifier does)")
            vals = [float(v) for v in arr.reshape(arr.shape[0], -1).mean(axis=1)]
    elif mean is not None:
        vals = _parse_mean(mean)
    else:
        vals = [0.0] * (C or 1)
    if image is not None:
        mean_meta: list = image.tolist()
        mean_arr = image
    else:
        if C is not None and len(vals) == 1 and C > 1:
            vals = vals * C
        if C is not None and len(vals) != C:
            raise InvalidModelError(f"mean has {len(vals)} values but the input {_shorten(input_name)!r} has {C} channels")
        mean_meta = [float(v) for v in vals]
        mean_arr = np.asarray(vals, dtype=np.float64).reshape([len(vals)] + [1] * len(spatial))
    meta = {
        "input": input_name,
        "channel_order": channel_order,
        "pixel_scale": PIXEL_SCALE,
        "mean": mean_meta,
        "scale": float(scale),
        "size": [int(d) for d in spatial[-2:]] if len(spatial) >= 2 else [int(d) for d in spatial],
        "embedded": False,
    }
    return meta, mean_arr


# --------------------------------------------------------------------------- unknown fields

def _unknown_list(fields: list[cpb.UnknownField], limit: int = 8) -> str:
    items = [f"{_shorten(u.path)} (line {u.line})" for u in fields[:limit]]
    if len(fields) > limit:
        items.append(f"and {len(fields) - limit} more")
    return ", ".join(items)


def _unknown_offender(L: _Layer, fields: list[cpb.UnknownField]) -> Offender:
    return Offender(L.name, L.type, f"unknown field{'s' if len(fields) > 1 else ''} {_unknown_list(fields)}: not in "
                                    "Caffe's caffe.proto nor a fork field lrponnx honours; refused rather than ignored")


def _refuse_unknown_net_fields(unknown: list[cpb.UnknownField], name: str) -> None:
    """Fields outside any layer entry that the schema does not know: refused, all at once."""
    top = [u for u in unknown if u.entry is None]
    if top:
        raise InvalidModelError(f"{name}: unknown net-level field{'s' if len(top) > 1 else ''} {_unknown_list(top)}: "
                                "not in Caffe's NetParameter; refused rather than ignored")


# --------------------------------------------------------------------------- convert

def convert(prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None, *, mean=None,
            mean_file: str | os.PathLike | None = None, scale: float = 1.0, channel_order: str | None = None,
            input_shape=None, opset: int = 17, random_weights: int | None = None,
            embed_preprocessing: bool = False, _blobs_out: dict | None = None) -> onnx.ModelProto:
    """Convert a Caffe net to an ONNX model (see ``docs/caffe.md``).

    ``caffemodel`` holds the trained weights; without it, ``random_weights`` (a seed) builds
    deterministic untrained ones. Raises :class:`InvalidModelError` for unreadable, truncated or
    inconsistent files and :class:`UnsupportedModelError` listing every layer we cannot convert.
    """
    max_opset = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise InvalidModelError(f"--opset must be between {MIN_OPSET} and {max_opset}, got {opset}")
    if caffemodel is None and random_weights is None:
        raise InvalidModelError("no weights: give a .caffemodel, or --random-weights SEED for an untrained model")

    net, unknown = _load_prototxt_checked(prototxt)
    layers = _layers_of(net)
    _refuse_unknown_net_fields(unknown, Path(prototxt).name)
    unknown_by_entry: dict[int, list[cpb.UnknownField]] = {}
    for u in unknown:
        if u.entry is not None:
            unknown_by_entry.setdefault(u.index, []).append(u)

    # ---- inputs
    inputs: list[tuple[str, list[int]]] = []
    if len(net.input):
        if len(net.input_shape):
            if len(net.input_shape) != len(net.input):
                raise InvalidModelError(f"{len(net.input)} inputs but {len(net.input_shape)} input_shape entries")
            for nm, shp in zip(net.input, net.input_shape):
                inputs.append((nm, [int(d) for d in shp.dim]))
        elif len(net.input_dim):
            if len(net.input_dim) != 4 * len(net.input):
                raise InvalidModelError(f"{len(net.input)} inputs need {4 * len(net.input)} input_dim values, "
                                        f"got {len(net.input_dim)}")
            for i, nm in enumerate(net.input):
                inputs.append((nm, [int(d) for d in net.input_dim[4 * i:4 * i + 4]]))
        else:
            inputs.extend((nm, []) for nm in net.input)
    for L in layers:
        if L.type == "Input":
            shp = list(L.param("input_param").shape)
            if shp and len(shp) not in (1, len(L.tops)):
                raise L.err(f"{len(shp)} shapes for {len(L.tops)} tops")
            for j, top in enumerate(L.tops):
                dims = [int(d) for d in shp[j if len(shp) > 1 else 0].dim] if shp else []
                inputs.append((top, dims))
    data_layer_input = None
    if not inputs:
        data_layers = [L for L in layers if _is_data_layer(L) and L.tops]
        if data_layers:
            dl = data_layers[0]
            dims: list[int] = []
            if dl.type == "MemoryData":
                m = dl.param("memory_data_param")
                dims = [int(m.batch_size), int(m.channels), int(m.height), int(m.width)]
            inputs.append((dl.tops[0], dims))
            data_layer_input = dl.name
    if not inputs:
        raise InvalidModelError("the net declares no input (no Input layer, no input/input_shape/input_dim)")
    fixed_batch = False
    if input_shape is not None:
        dims, symbolic = _parse_input_shape(input_shape)
        if inputs[0][1] and len(dims) != len(inputs[0][1]):
            raise InvalidModelError(f"--input-shape has {len(dims)} dims, the prototxt's input "
                                    f"{inputs[0][0]!r} has {len(inputs[0][1])} ({inputs[0][1]})")
        inputs[0] = (inputs[0][0], dims)
        fixed_batch = not symbolic
    for nm, dims in inputs:
        if not dims:
            raise InvalidModelError(f"input {_shorten(nm)!r} has no shape in the prototxt; give --input-shape")
        if any(d <= 0 for d in dims):
            raise InvalidModelError(f"input {_shorten(nm)!r} has a non-positive dimension {dims}; give --input-shape")
    if len({nm for nm, _ in inputs}) != len(inputs):
        raise InvalidModelError("two inputs share a name")

    # ---- which layers we convert; unsupported ones all at once
    offenders: list[Offender] = []
    work: list[_Layer] = []
    for L in layers:
        if L.type == "Input":
            if L.entry in unknown_by_entry:
                offenders.append(_unknown_offender(L, unknown_by_entry[L.entry]))
            continue
        if _is_data_layer(L):
            if L.name != data_layer_input:
                _warn(f"skipping data layer {_shorten(L.name)!r} ({L.type})")
            else:
                _warn(f"data layer {_shorten(L.name)!r} ({L.type}): its top {L.tops[0]!r} becomes the graph input; "
                      "its transform_param (mean, scale, crop, mirror) is not applied: give --mean/--mean-file/"
                      "--scale and the input size")
            continue
        if L.type == "Silence":
            work.append(L)  # consumes its bottoms, emits nothing
            continue
        if _is_skipped(L.type):
            _warn(f"skipping train-only layer {_shorten(L.name)!r} ({L.type})")
            continue
        if L.type not in HANDLERS and L.type not in ALIAS_LAYERS:
            offenders.append(Offender(L.name, L.type, f"no ONNX conversion for Caffe layer type {L.type!r}"))
            continue
        if L.entry in unknown_by_entry:
            offenders.append(_unknown_offender(L, unknown_by_entry[L.entry]))
            continue
        why = _static_check(L)
        if why:
            offenders.append(Offender(L.name, L.type, why))
            continue
        work.append(L)
    if offenders:
        raise CaffeLayerError(offenders)

    names = [L.name for L in work if L.type != "Silence"]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidModelError(f"duplicate layer names: {', '.join(map(repr, dup))}")

    def is_alias(L: _Layer) -> bool:
        if L.type == "Split":
            return True
        if L.type == "Dropout":
            return bool(L.param("dropout_param").scale_train)
        return False

    # ---- steps: one layer each, except a BatchNorm with the Scale layer that folds into it
    steps: list[_Step] = []
    i = 0
    while i < len(work):
        L = work[i]
        S = work[i + 1] if i + 1 < len(work) else None
        if L.type == "BatchNorm" and S is not None and _scale_folds(L, S, work[i + 1:]):
            steps.append(_Step(L, S))
            i += 2
        else:
            steps.append(_Step(L, None))
            i += 1

    # ---- final-value naming: the last real writer of a blob gives its tensor the blob's name
    input_names = {nm for nm, _ in inputs}
    last_writer: dict[str, int] = {}
    all_blobs: set[str] = set(input_names)
    for k, st in enumerate(steps):
        for M in st.layers:
            all_blobs.update(M.tops)
            all_blobs.update(M.bottoms)
        if not is_alias(st.main) and st.main.type != "Silence":
            for t in st.tops:
                last_writer[t] = k

    g = _Graph(fixed_batch, opset)
    g.reserved = set(all_blobs)

    # ---- weights
    weights: dict[str, list[_Blob]] | None = None
    if caffemodel is not None:
        weights = load_caffemodel(caffemodel)
        needing = [L.name for L in work if L.type in PARAMETRIC]
        if needing and not any(n in weights for n in needing):
            raise InvalidModelError(f"{Path(caffemodel).name} has no layer named like the prototxt's "
                                    f"({', '.join(needing[:3])}{', ...' if len(needing) > 3 else ''}): "
                                    "not the weights of this net")
    rng = np.random.default_rng(random_weights) if random_weights is not None else None

    # ---- graph inputs and preprocessing
    first_name, first_shape = inputs[0]
    meta, mean_arr = _preprocessing(first_name, first_shape, mean, mean_file, scale, channel_order)
    graph_inputs = []
    cur: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    for nm, dims in inputs:
        g.used.add(nm)
        batch = dims[0] if fixed_batch else "N"
        graph_inputs.append(helper.make_tensor_value_info(nm, TensorProto.FLOAT, [batch] + list(dims[1:])))
        cur[nm], shapes[nm] = nm, list(dims)
    if embed_preprocessing:
        sub = g.unique(f"{first_name}#centered", allow_reserved=True)
        g.node("Sub", [first_name, g.const(f"{first_name}.mean", mean_arr)], [sub], "preprocess#mean")
        pre = g.unique(f"{first_name}#preprocessed", allow_reserved=True)
        g.node("Mul", [sub, g.const(f"{first_name}.scale", np.array(float(scale)))], [pre], "preprocess#scale")
        cur[first_name] = pre
        meta["embedded"] = True

    # ---- layers
    missing: list[str] = []
    random_used: list[str] = []
    n_params = 0
    available: dict[str, None] = {}  # Caffe's available_blobs
    for k, st in enumerate(steps):
        L = st.main
        for M in st.layers:
            for b in M.bottoms:
                if b not in cur and not (M is st.scale and b == L.tops[0]):
                    raise M.err(f"unknown bottom blob {b!r} (not an input and not produced by an earlier layer)")
                available.pop(b, None)
        if L.type == "Silence":
            continue
        bshapes = [shapes[b] for b in L.bottoms]
        xs = [cur[b] for b in L.bottoms]
        for t in st.tops:
            if t in cur and t not in L.bottoms:
                raise (st.scale or L).err(f"top blob {t!r} is produced by multiple sources")
        if is_alias(L):
            for t in L.tops:
                cur[t], shapes[t] = xs[0], list(bshapes[0])
                available[t] = None
            continue
        got: list[list[np.ndarray]] = []
        for M in st.layers:
            exp = _expected_blob_shapes(M, bshapes)
            arrs: list[np.ndarray] = []
            if exp:
                n_params += sum(_prod(shp) for _, shp in exp)
                if n_params > MAX_PARAMS:
                    raise M.err(f"the net needs more than {MAX_PARAMS:,} parameters by this layer "
                                f"({', '.join(f'{r} {list(shp)}' for r, shp in exp)}): too large for one ONNX file")
                src = weights.get(M.name) if weights is not None else None
                if not src:
                    if rng is None:
                        missing.append(f"{_shorten(M.name)} ({M.type})")
                        arrs = [np.zeros([int(d) for d in s], np.float32) for _, s in exp]
                    else:
                        if weights is not None:
                            random_used.append(M.name)
                        arrs = _random_blobs(M, exp, rng)
                else:
                    if len(src) != len(exp):
                        raise M.err(f"the caffemodel has {len(src)} blobs, the prototxt implies {len(exp)} "
                                    f"({', '.join(r for r, _ in exp)})")
                    for j, ((role, shp), blob) in enumerate(zip(exp, src)):
                        if not blob.matches(shp):
                            raise M.err(f"blob {j} ({role}) has shape {list(blob.shape)} in the caffemodel but "
                                        f"the prototxt implies {list(shp)}")
                        if not np.all(np.isfinite(blob.data)):
                            raise M.err(f"blob {j} ({role}) in the caffemodel contains NaN or infinite values")
                        arrs.append(blob.data.reshape([int(d) for d in shp]))
            if _blobs_out is not None:
                _blobs_out[M.name] = (M.type, arrs)
            got.append(arrs)
        extra = {"fold_scale": got[1], "fold_name": st.scale.name} if st.scale is not None else {}
        outs = []
        for t in st.tops:
            if last_writer.get(t) == k and t not in input_names:
                g.used.add(t)
                outs.append(t)
            else:
                outs.append(g.unique(f"{t}@{L.name}"))
        out_shapes = HANDLERS[L.type](_Ctx(g, L, xs, bshapes, outs, got[0], extra))
        for t, o, sh in zip(st.tops, outs, out_shapes):
            cur[t], shapes[t] = o, [int(d) for d in sh]
            available[t] = None
    if missing:
        raise InvalidModelError(f"{Path(caffemodel).name} has no weights for layer(s) {', '.join(missing)} "
                                "(names must match the prototxt; --random-weights SEED fills them)")
    if random_used:
        _warn(f"caffemodel lacks layer(s) {', '.join(random_used)}: filled with random weights")

    # ---- outputs (Caffe: blobs produced and never consumed afterwards, in name order)
    out_blobs = sorted(b for b in available if b not in input_names or cur[b] != b)
    if not out_blobs:
        raise InvalidModelError("the net has no output blob (every blob is consumed)")
    graph_outputs = []
    for blob in out_blobs:
        name = cur[blob]
        if blob not in input_names and name != blob:  # an alias (Split/Dropout top): expose it by its name
            g.used.add(blob)
            g.node("Identity", [name], [blob], f"{blob}#output")
            name = blob
        # (an input modified in place keeps its "<blob>@<layer>" name: the blob's name is the graph input)
        dims = list(shapes[blob])
        if not fixed_batch and dims:
            dims = ["N"] + dims[1:]
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))

    graph = helper.make_graph(g.nodes, net.name or Path(prototxt).stem, graph_inputs, graph_outputs)
    g.write_initializers(graph)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="lrponnx caffe2onnx")
    model.ir_version = max(8, helper.find_min_ir_version_for([helper.make_opsetid("", opset)], True))
    if g.needs_lrn_function:
        ensure_lrn_function(model)
    props = {PREPROCESSING_KEY: json.dumps(meta)}
    if caffemodel is None:
        props[WEIGHTS_KEY] = f"random seed {random_weights} (untrained)"
    else:
        props[WEIGHTS_KEY] = f"caffemodel {Path(caffemodel).name}" + (
            f" (+ random seed {random_weights} for {len(random_used)} layer(s))" if random_used else "")
    props["lrponnx.source"] = f"caffe: {Path(prototxt).name}"
    helper.set_model_props(model, props)
    if _blobs_out is not None:  # random_caffemodel wants the weights only; its file is checked when read
        return model
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise InvalidModelError(f"the converted model fails ONNX's checker: {' '.join(str(e).split())[:500]}") from None
    return model


# --------------------------------------------------------------------------- writing weights

def _blob_bytes(a: np.ndarray) -> bytes:
    """A BlobProto (shape + packed float data) as bytes, without a Python float per value."""
    bp = cpb.BlobProto()
    bp.shape.dim.extend(int(d) for d in a.shape)
    raw = np.ascontiguousarray(a, dtype="<f4").tobytes()
    n, size = [], len(raw)
    while True:
        byte = size & 0x7F
        size >>= 7
        n.append(byte | (0x80 if size else 0))
        if not size:
            break
    return bp.SerializeToString() + bytes([5 << 3 | 2]) + bytes(n) + raw


def random_caffemodel(prototxt: str | os.PathLike, seed: int, *, input_shape=None) -> bytes:
    """The bytes of a binary ``.caffemodel`` holding exactly the weights that
    ``convert(prototxt, random_weights=seed)`` builds: a V2 ``layer`` entry per converted layer
    (name, type, its shaped float blobs, if any), in Caffe's own layout (BatchNorm's three blobs,
    the Scale layer after it separately). OpenCV's dnn module and this converter read it (tested);
    converting with it equals converting with the seed."""
    blobs: dict[str, tuple[str, list[np.ndarray]]] = {}
    convert(prototxt, random_weights=seed, input_shape=input_shape, _blobs_out=blobs)
    net = cpb.NetParameter(name=Path(prototxt).stem)
    for lname, (ltype, arrs) in blobs.items():
        lp = net.layer.add(name=lname, type=ltype)
        for a in arrs:
            lp.blobs.add().ParseFromString(_blob_bytes(a))
    return net.SerializeToString()

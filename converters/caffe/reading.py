"""Reading Caffe's files: the text prototxt, the binary caffemodel (its blobs by layer name) and
mean files. Everything malformed is an :class:`~lrponnx.errors.InvalidModelError` on one line."""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lrponnx.errors import InvalidModelError, shorten

from lrponnx.converters.caffe import proto as cpb
from lrponnx.converters.caffe.net import prod


@dataclass
class Blob:
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
    layers it converts (see :func:`load_prototxt_checked`)."""
    return load_prototxt_checked(path)[0]


def load_prototxt_checked(path: str | os.PathLike):
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


def _blob_from_proto(bp, where: str) -> Blob:
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
    count = prod(shape) if shape else 1
    if count != data.size:
        raise InvalidModelError(f"{where} holds {data.size} values but its shape {list(shape)} needs {count}")
    return Blob(data, shape, legacy)


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _text(v) -> str:
    """A proto2 string field: protobuf hands back ``bytes`` when the stored value is not valid UTF-8."""
    return v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v


def load_caffemodel(path: str | os.PathLike) -> dict[str, list[Blob]]:
    """Layer name -> parameter blobs, from a binary ``.caffemodel`` (V1 or V2 layers)."""
    return parse_caffemodel(_read_bytes(path, "caffemodel"), Path(path).name)


def parse_caffemodel(raw: bytes, name: str = "caffemodel") -> dict[str, list[Blob]]:
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
    out: dict[str, list[Blob]] = {}
    for i, lp in enumerate(entries):
        lname = _text(lp.name)
        if not lname:
            continue
        ltype = _text(lp.type) if isinstance(lp.type, (str, bytes)) else cpb.V1_TYPE_NAMES.get(lp.type, "")
        where = f"{name}: layer {shorten(lname)!r}" + (f" ({shorten(ltype)})" if ltype else "")
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


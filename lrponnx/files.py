"""Writing results so that a failure never leaves a half-written file behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx

from .load import set_external_location, stored_dtype, tensor_nbytes

#: Models whose weights exceed this are saved with the weights in a side file ``<name>.data``
#: (protobuf cannot hold 2 GiB, and serialising a large model in one piece doubles the memory).
EXTERNAL_DATA_THRESHOLD = 512 << 20


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(model: onnx.ModelProto, path, external_data: bool | None = None) -> Path:
    """Save atomically; large models (or ``external_data=True``) keep weights in ``<name>.data``.

    Saving with external data moves the weights of the in-memory ``model`` out to the file.
    Tensors that still live in another file (read with ``lazy_weights``) are copied file to
    file, in the kernel where it can, so the weights never pass through memory as a whole; such
    a model is always saved with external data.
    """
    path = Path(path)
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD or bool(_external_tensors(model))
    if not external_data:
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return path
    data_name = path.name + ".data"
    with atomic_path(path.parent / data_name) as tmp_data:
        with open(tmp_data, "wb", buffering=0) as out:
            for t in _weight_tensors(model):
                _write_tensor(t, out, data_name)
        with atomic_path(path) as tmp_model:
            tmp_model.write_bytes(model.SerializeToString())
    return path


#: Tensors at most this large stay inside the .onnx file (as onnx's own saver does).
INLINE_BYTES = 1024
#: Offsets in the data file are aligned to 4 KiB pages, so a runtime may map the weights instead of copying them.
ALIGN = 4096


def _weight_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model) if t.data_type != onnx.TensorProto.STRING]


def _write_tensor(t: onnx.TensorProto, out, data_name: str) -> None:
    """Append one tensor's bytes to the data file ``out`` (unbuffered) and point the tensor at them."""
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo

    external = t.data_location == onnx.TensorProto.EXTERNAL
    if not external and tensor_nbytes(t) <= INLINE_BYTES:
        return
    end = os.fstat(out.fileno()).st_size
    offset = (end + ALIGN - 1) // ALIGN * ALIGN
    if external:
        info = ExternalDataInfo(t)
        length = info.length if info.length is not None else tensor_nbytes(t)
        _copy_range(info.location, info.offset or 0, length, out, offset)
    else:
        if t.HasField("raw_data"):
            data = t.raw_data
        else:
            data = numpy_helper.to_array(t).astype(stored_dtype(t)).tobytes()
        _write_all(out, offset, data)
        length = len(data)
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            t.ClearField(field)
    set_external_location(t, data_name, offset, length)


def _write_all(out, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(out.fileno(), view, offset)
        view, offset = view[n:], offset + n


def _copy_range(src: str, offset: int, length: int, out, dst_offset: int) -> None:
    """Copy ``length`` bytes at ``offset`` of file ``src`` to ``dst_offset`` of ``out``: in the
    kernel where it can (no user-space buffer at all), else in 16 MiB chunks."""
    with open(src, "rb", buffering=0) as f:
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(f.fileno(), out.fileno(), length - done, offset + done, dst_offset + done)
                if n == 0:
                    break
                done += n
        except (AttributeError, OSError):  # no copy_file_range here (or not across these files)
            pass
        while done < length:
            chunk = os.pread(f.fileno(), min(16 << 20, length - done), offset + done)
            if not chunk:
                raise OSError(f"{src}: ended {length - done} bytes early")
            _write_all(out, dst_offset + done, chunk)
            done += len(chunk)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers, from their shapes (cheap: nothing is serialised)."""
    return sum(tensor_nbytes(t) for t in model.graph.initializer)


def _external_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model) if t.HasField("data_location") and
            t.data_location == onnx.TensorProto.EXTERNAL]

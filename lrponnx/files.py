"""Writing results so that a failure never leaves a half-written file behind, and never
destroys a user's file: every writer goes through :func:`check_output` (via :func:`atomic_path`)."""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

import onnx

from lrponnx.errors import OutputError, shorten
from lrponnx.compiler.load import model_tensors, set_external_location, stored_dtype, tensor_nbytes

#: Models whose weights exceed this are saved with the weights in a side file ``<name>.data``
#: (protobuf cannot hold 2 GiB, and serialising a large model in one piece doubles the memory).
EXTERNAL_DATA_THRESHOLD = 512 << 20


def _show(path) -> str:
    return repr(shorten(os.fspath(path)))


def check_output(path, inputs=()) -> Path:
    """Refuse to write ``path`` when that would lose data or cannot work; return it as a Path.

    The one guard every writer shares (``convert``, ``caffe2onnx``, ``zoo build``, ``demo``,
    :func:`save_model`, :func:`atomic_path`). Refused, with one clear :class:`OutputError`:

    - ``path`` is the same file as one of ``inputs`` (compared by device and inode, so another
      spelling, a symlink or a hard link is caught too);
    - ``path`` exists and is not a regular file (a folder, a device node such as ``/dev/null``,
      a FIFO, a socket): replacing it would destroy it, even for root;
    - its folder does not exist, or is not a folder (``file.txt/out.onnx``). Single-file writers
      never create folders, as ``cp`` does not.
    """
    path = Path(os.fspath(path))
    folder = path.parent
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise OutputError(f"cannot write {_show(path)}: {_show(_first_non_folder(folder))} is a file, "
                          "not a folder") from None
    except OSError as e:
        raise OutputError(f"cannot write {_show(path)}: {e.strerror or e}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"output {_show(path)} is a folder; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"output {_show(path)} exists and is not a regular file (a device, FIFO or "
                              "socket); refusing to replace it")
        for src in inputs:
            if src is None:
                continue
            try:
                other = os.stat(os.fspath(src))
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                raise OutputError(f"output {_show(path)} is the input file {_show(src)}; "
                                  "choose another output name")
    if not os.path.isdir(folder if str(folder) else "."):
        if os.path.lexists(folder):
            raise OutputError(f"cannot write {_show(path)}: {_show(folder)} is not a folder")
        raise OutputError(f"output folder {_show(folder)} does not exist (create it first)")
    return path


def _first_non_folder(folder: Path) -> Path:
    """The first component of ``folder`` that exists and is not a folder (for the message)."""
    for p in reversed([folder, *folder.parents]):
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
    return folder


def check_output_folder(path, create: bool = True) -> Path:
    """A folder that results go into (``demo -o``, ``zoo build -o``): an existing file there is
    refused with one line; a missing folder is created (with its parents, as ``mkdir -p``)."""
    path = Path(os.fspath(path))
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"output {_show(path)} exists and is not a folder")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(f"cannot create folder {_show(path)}: {_show(_first_non_folder(path))} "
                              "is a file") from None
        except NotADirectoryError:
            raise OutputError(f"cannot create folder {_show(path)}: {_show(_first_non_folder(path))} "
                              "is a file") from None
        except OSError as e:
            raise OutputError(f"cannot create folder {_show(path)}: {e.strerror or e}") from None
    return path


def file_mode() -> int:
    """The mode a new file gets from the umask (0666 & ~umask), as ``open()`` and other tools give."""
    try:
        with open("/proc/self/status") as f:  # read without changing it (threads may be creating files)
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path, inputs=()):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    ``path`` passes :func:`check_output` first (against ``inputs``) and is checked again just
    before the replace. Whatever ends the block (an error, Ctrl-C, SIGTERM through the CLI's
    handler) removes the temporary file. The result gets the umask's mode, not mkstemp's 0600.
    """
    path = check_output(path, inputs)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        check_output(path, inputs)  # nothing appeared there meanwhile that must not be replaced
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:  # disk full, permission denied, ...: say which output, not the temporary name
        where = "" if e.filename in (None, tmp, str(tmp)) else f" ({shorten(os.fsdecode(e.filename))})"
        raise OutputError(f"cannot write {_show(path)}: {e.strerror or e}{where}") from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)


def save_model(model: onnx.ModelProto, path, external_data: bool | None = None, inputs=()) -> Path:
    """Save atomically; large models (or ``external_data=True``) keep weights in ``<name>.data``.

    Neither the model file nor its data file may be one of ``inputs`` or a file the model's
    external tensors still live in (see :func:`check_output`).

    Saving with external data moves the weights of the in-memory ``model`` out to the file.
    Tensors that still live in another file (read with ``lazy_weights``) are copied file to
    file, in the kernel where it can, so the weights never pass through memory as a whole; such
    a model is always saved with external data.
    """
    path = Path(os.fspath(path))
    external = _external_tensors(model)
    inputs = [*inputs, *{_location(t) for t in external}]
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD or bool(external)
    data_path = path.parent / (path.name + ".data")
    check_output(path, inputs)
    if not external_data:
        with atomic_path(path, inputs) as tmp:
            write_model(model, tmp)
        return path
    check_output(data_path, inputs)
    with atomic_path(data_path, inputs) as tmp_data:
        with open(tmp_data, "wb", buffering=0) as out:
            for t in _weight_tensors(model):
                _write_tensor(t, out, data_path.name)
        with atomic_path(path, inputs) as tmp_model:
            write_model(model, tmp_model)
    return path


def write_model(model: onnx.ModelProto, path) -> None:
    """Write the bytes of ``model.SerializeToString()`` to ``path``, one node or initializer at a time.

    Serialising a whole model holds its encoding twice at once (protobuf's buffer and the bytes:
    +200 MB for GoogLeNet's 99 MB explainer); this holds the largest node's or initializer's instead.
    protobuf writes fields in field-number order, so the same bytes are: the model's fields before
    ``graph``, the graph's key and length, the graph's fields in order (each element of a repeated
    message field with its own key and length), the model's fields after ``graph``.
    """
    graph = model.graph
    m = _field_number(model, "graph")
    parts = []  # bytes, or a message to serialise when written
    graph_len = 0
    for fd in sorted(graph.DESCRIPTOR.fields, key=lambda fd: fd.number):
        if _is_repeated(fd) and fd.type == fd.TYPE_MESSAGE:
            key = varint(fd.number << 3 | 2)  # length-delimited
            for item in getattr(graph, fd.name):
                size = item.ByteSize()  # not cached by protobuf: once per element (CaffeNet: 0.24 s)
                parts += [key + varint(size), item]
                graph_len += len(parts[-2]) + size
        else:
            parts.append(_serialize(_fields(graph, fd.number, fd.number + 1)))
            graph_len += len(parts[-1])
    head = _serialize(_fields(model, 0, m)) + varint(m << 3 | 2) + varint(graph_len)
    tail = _serialize(_fields(model, m + 1, 1 << 30))
    if len(head) + graph_len + len(tail) >= 1 << 31:  # protobuf could not read it back
        raise OutputError("the model is too large for one ONNX file (over 2 GiB); store its weights in a side "
                          "file (--external-data)")
    with open(path, "wb", buffering=0) as out:
        offset = 0
        for x in [head, *parts, tail]:
            data = x if isinstance(x, bytes) else _serialize(x)
            _write_all(out, offset, data)
            offset += len(data)


def _field_number(msg, name: str) -> int:
    return msg.DESCRIPTOR.fields_by_name[name].number


def _fields(msg, lo: int, hi: int):
    """A copy of ``msg`` with only its fields numbered ``lo`` to ``hi - 1`` (all small: no weights)."""
    out = type(msg)()
    for fd in msg.DESCRIPTOR.fields:
        if not lo <= fd.number < hi:
            continue
        value = getattr(msg, fd.name)
        if _is_repeated(fd):
            if len(value):
                getattr(out, fd.name).extend(value)
        elif msg.HasField(fd.name):
            if fd.type == fd.TYPE_MESSAGE:
                getattr(out, fd.name).CopyFrom(value)
            else:
                setattr(out, fd.name, value)
    return out


def _is_repeated(fd) -> bool:
    try:
        return bool(fd.is_repeated)
    except AttributeError:  # older protobuf
        return fd.label == fd.LABEL_REPEATED


def varint(n: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint (keys and lengths of the wire format)."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _serialize(msg) -> bytes:
    try:
        return msg.SerializeToString()
    except ValueError as e:  # protobuf refuses messages over 2 GiB
        raise OutputError(f"the model is too large for one ONNX file ({e}); store its weights in a side "
                          "file (--external-data)") from None


def _location(t: onnx.TensorProto) -> str:
    from onnx.external_data_helper import ExternalDataInfo

    return ExternalDataInfo(t).location


#: Tensors at most this large stay inside the .onnx file (as onnx's own saver does).
INLINE_BYTES = 1024
#: Offsets in the data file are aligned to 4 KiB pages, so a runtime may map the weights instead of copying them.
ALIGN = 4096


def _weight_tensors(model: onnx.ModelProto):
    return [t for t in model_tensors(model) if t.data_type != onnx.TensorProto.STRING]


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
    return [t for t in model_tensors(model) if t.HasField("data_location") and
            t.data_location == onnx.TensorProto.EXTERNAL]

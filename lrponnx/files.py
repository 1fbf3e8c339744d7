"""Writing results so that a failure never leaves a half-written file behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx

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
    Saving with external data moves the weights of the in-memory ``model`` out to the file."""
    path = Path(path)
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return path
    data_name = path.name + ".data"
    with atomic_path(path.parent / data_name) as tmp_data:
        # onnx writes the data file next to the model under the given location name
        staging = tmp_data.parent / (tmp_data.name + ".onnx")
        try:
            onnx.save_model(model, str(staging), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            fixed = onnx.load_model(str(staging), load_external_data=False)
            for t in _external_tensors(fixed):
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
            with atomic_path(path) as tmp_model:
                tmp_model.write_bytes(fixed.SerializeToString())
        finally:
            if staging.exists():
                staging.unlink()
    return path


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers, from their shapes (cheap: nothing is serialised)."""
    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def _external_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model) if t.HasField("data_location") and
            t.data_location == onnx.TensorProto.EXTERNAL]

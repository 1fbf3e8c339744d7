"""Where the shared, public data lives, and small helpers the recipes and tests share.

The shared data folder is ``<repo>/../shared/data`` (the project root's sibling), overridable with
the environment variable ``LRPONNX_SHARED_DATA``. Nothing in it is copied into the repository.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lrponnx.errors import LrpOnnxError
from lrponnx.metadata import PREPROCESSING_KEY

ENV_VAR = "LRPONNX_SHARED_DATA"

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]


class SharedDataMissingError(LrpOnnxError):
    """A recipe needs a file of the shared data folder (../shared/data) that is not there."""


def shared_data_dir() -> Path:
    """The shared data folder: ``$LRPONNX_SHARED_DATA`` or ``<repo root>/../shared/data``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    # model_zoo/ sits at the repository root; parents[1] is the root, its parent holds shared/.
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_shared(*parts: str) -> Path:
    """The path ``shared_data_dir()/parts...``; a clear :class:`SharedDataMissingError` if absent."""
    base = shared_data_dir()
    path = base.joinpath(*parts)
    if not path.exists():
        raise SharedDataMissingError(
            f"this recipe needs {path}, which does not exist.\n"
            f"The shared data folder is {base} (set {ENV_VAR} to point elsewhere); it holds public "
            "material (Caffe prototxts/weights, CIFAR-10 JPEGs) that is not part of the repository."
        )
    return path


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_image_folder(root: str | os.PathLike, classes: list[str] = CIFAR10_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """``root/<class>/*.jpg`` -> (uint8 images [N, H, W, 3] in RGB, int64 labels [N]), sorted by class then name."""
    from PIL import Image

    root = Path(root)
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).glob("*.jpg")):
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            labels.append(label)
    if not images:
        raise SharedDataMissingError(f"no images found under {root}/<class>/*.jpg")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def preprocessing_of(model) -> dict | None:
    """The ``lrponnx.preprocessing`` metadata of an ONNX model, parsed; None when absent."""
    for p in model.metadata_props:
        if p.key == PREPROCESSING_KEY:
            return json.loads(p.value)
    return None


def preprocess(images_rgb_u8: np.ndarray, prep: dict) -> np.ndarray:
    """Turn uint8 RGB images [N, H, W, 3] into the float32 NCHW tensor a model expects.

    ``tensor = ((img_rgb01 * pixel_scale - mean) / std) * scale`` in the recorded channel order;
    with ``embedded: true`` the model subtracts the mean itself and gets ``img * pixel_scale``.
    ``mean`` may be per channel ([3]) or a full mean image ([3, H, W]).
    """
    x = images_rgb_u8.astype(np.float32) / 255.0
    x = x.transpose(0, 3, 1, 2)  # NCHW, RGB
    if prep.get("channel_order", "rgb").lower() == "bgr":
        x = x[:, ::-1]
    x = x * float(prep.get("pixel_scale", 255.0))
    if not prep.get("embedded", False):
        if prep.get("mean") is not None:
            mean = np.asarray(prep["mean"], dtype=np.float32)
            x = x - (mean.reshape(3, 1, 1) if mean.ndim == 1 else mean)
        if prep.get("std") is not None:
            std = np.asarray(prep["std"], dtype=np.float32)
            x = x / (std.reshape(3, 1, 1) if std.ndim == 1 else std)
        x = x * float(prep.get("scale", 1.0))
    return np.ascontiguousarray(x, dtype=np.float32)


def onnx_accuracy(model_path: str | os.PathLike, images_rgb_u8: np.ndarray, labels: np.ndarray,
                  batch: int = 250, prep: dict | None = None) -> float:
    """Top-1 accuracy of an ONNX classifier on uint8 RGB images, run by ONNX Runtime (1 thread)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    prep = prep if prep is not None else preprocessing_of(model)
    if prep is None:
        raise ValueError(f"{model_path} has no lrponnx.preprocessing metadata; pass prep=")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = fixed_batch or batch
    correct = 0
    for i in range(0, len(images_rgb_u8), step):
        x = preprocess(images_rgb_u8[i:i + step], prep)
        if fixed_batch and len(x) != fixed_batch:  # pad the last batch of a fixed-batch model
            x = np.concatenate([x, np.zeros((fixed_batch - len(x),) + x.shape[1:], np.float32)])
        out = sess.run(None, {inp.name: x})[0].reshape(step, -1)[: len(images_rgb_u8[i:i + step])]
        correct += int((out.argmax(1) == labels[i:i + step]).sum())
    return correct / len(images_rgb_u8)

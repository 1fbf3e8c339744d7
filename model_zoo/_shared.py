"""Where the shared, public data lives, and small helpers the recipes and tests share.

The shared data folder is ``<repo>/../shared/data`` (the project root's sibling), overridable with
the environment variable ``LRPONNX_SHARED_DATA``. Nothing in it is copied into the repository.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lrponnx.errors import LrpOnnxError
from lrponnx.metadata import PREPROCESSING_KEY, ZOO_TRAINING_KEY

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


# ----------------------------------------------------------------------------- training (torch)
#: the report fields also written into the model (:data:`~lrponnx.metadata.ZOO_TRAINING_KEY`)
TRAINING_FIELDS = ("seed", "epochs", "train_images", "threads", "torch")


def training_data(cfg, train_data, load_train_set):
    """Seed torch and numpy from ``cfg.seed``, set torch's threads, and get the (uint8 NHWC, labels)
    training set (``train_data`` or ``load_train_set(limit=)``, cut to ``cfg.limit``).

    Returns (numpy generator, start time, images, labels, decode seconds). The generator is made here,
    before anything else draws from it, so a recipe's augmentation is fixed by its seed."""
    import torch

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    images, labels = train_data if train_data is not None else load_train_set(limit=cfg.limit)
    if cfg.limit is not None:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    return rng, t0, images, labels, time.perf_counter() - t0


def channel_mean_std(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 NHWC images (0-255 units), accumulated in float64, as float32."""
    flat = images.reshape(-1, images.shape[-1])
    return (flat.mean(0, dtype=np.float64).astype(np.float32), flat.std(0, dtype=np.float64).astype(np.float32))


def normalised(images_nchw, mean: np.ndarray, std: np.ndarray | None):
    """uint8 NCHW tensor -> float ``(x - mean) / std`` (``std`` None: no division), as the model sees it."""
    import torch

    mean_t = torch.from_numpy(mean).reshape(1, -1, 1, 1)
    inv_std_t = torch.from_numpy(1.0 / std).reshape(1, -1, 1, 1) if std is not None else torch.ones(1, 3, 1, 1)
    return (images_nchw.float() - mean_t) * inv_std_t


def fit(net, opt, images: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray | None, *, cfg,
        rng: np.random.Generator, size: int, label_smoothing: float = 0.0, clip_norm: float | None = None,
        name: str, log=print) -> tuple[list[dict], float]:
    """The zoo recipes' training loop: ``cfg.epochs`` epochs of mini-batches of ``cfg.batch_size`` under a
    one-cycle schedule (peak ``cfg.lr``, ``cfg.pct_start``), each batch normalised by ``mean``/``std``,
    zero padded by 4, randomly cropped back to ``size`` and flipped (crops, flips and order from ``rng``).

    Returns (per-epoch history, training seconds). ``net`` is left in training mode."""
    import torch
    import torch.nn.functional as F

    pad = 4
    cache = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # uint8 NCHW
    labels_t = torch.from_numpy(labels)
    steps = math.ceil(len(images) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps,
                                                pct_start=cfg.pct_start)
    t1 = time.perf_counter()
    history = []
    for epoch in range(cfg.epochs):
        net.train()
        perm = rng.permutation(len(images))
        offs = rng.integers(0, 2 * pad + 1, size=(len(images), 2))
        flips = rng.random(len(images)) < 0.5
        tot_loss, tot_ok, seen = 0.0, 0, 0
        for s in range(steps):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xp = F.pad(normalised(cache[idx], mean, std), (pad, pad, pad, pad))
            xb = torch.stack([xp[j, :, offs[i, 0]:offs[i, 0] + size, offs[i, 1]:offs[i, 1] + size]
                              for j, i in enumerate(idx)])
            fl = torch.from_numpy(flips[idx])
            xb[fl] = xb[fl].flip(3)
            yb = labels_t[idx]
            logits = net(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip_norm)
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            tot_ok += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        history.append({"epoch": epoch + 1, "loss": round(tot_loss / seen, 4), "train_acc": round(tot_ok / seen, 4),
                        "elapsed_s": round(time.perf_counter() - t1, 1)})
        log(f"[{name}] epoch {epoch + 1}/{cfg.epochs} loss {tot_loss / seen:.4f} train acc {tot_ok / seen:.4f} "
            f"({time.perf_counter() - t1:.0f}s)")
    return history, time.perf_counter() - t1


def training_report(cfg, n_images: int, decode_s: float, train_s: float, history: list[dict]) -> dict:
    """The ``*.train.json`` report of a recipe's run (its :data:`TRAINING_FIELDS` go into the model)."""
    import torch

    return {"seed": cfg.seed, "epochs": cfg.epochs, "config": {k: v for k, v in asdict(cfg).items() if k != "arch"},
            "arch": asdict(cfg.arch), "train_images": n_images, "threads": cfg.threads, "torch": torch.__version__,
            "decode_s": round(decode_s, 1), "train_s": round(train_s, 1), "history": history}


def training_meta(report: dict) -> dict:
    """The model metadata that records how it was trained."""
    return {ZOO_TRAINING_KEY: json.dumps({k: report[k] for k in TRAINING_FIELDS})}

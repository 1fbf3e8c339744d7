"""Recipe ``cifar10-lrn``: a small CIFAR-10 CNN with both kinds of LRN, trained by us on the CPU.

In the spirit of Caffe's ``cifar10_full``::

    data [N,3,32,32]  (RGB, 0-255 minus the per-channel training mean)
    conv1 5x5/1 pad 2 (3->C1)  relu  maxpool 3/2 pad 1  LRN across channels (n=5)       -> 16x16
    conv2 5x5/1 pad 2 (C1->C2) relu  avgpool 3/2 pad 1  LRN within channel (3x3)        -> 8x8
    conv3 5x5/1 pad 2 (C2->C3) relu  avgpool 3/2 pad 1                                  -> 4x4
    flatten  linear (C3*16 -> 10)  -> logits

Training: random crop (pad 4) + horizontal flip, AdamW with a one-cycle schedule, on the 50,000 JPEGs of ``cifar10_train_jpeg.tar.gz`` decoded once into a uint8 array.
Everything random comes from ``seed``. torch is needed only for :func:`train`; :func:`export_onnx`
writes the ONNX graph by hand (onnx.helper) from the trained state dict, so the LRNs appear as
the ONNX ``LRN`` op and the model-local ``ai.lrponnx::WithinChannelLRN`` function.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lrponnx.compiler.lrn_ops import FUNCTION_OPSET, ensure_lrn_function, make_within_channel_lrn

from lrponnx.model_zoo._shared import (CIFAR10_CLASSES, channel_mean_std, fit, load_image_folder, normalised,
                                        onnx_accuracy, require_shared, training_data, training_meta, training_report)
from lrponnx.metadata import CLASSES_KEY, PREPROCESSING_KEY, ZOO_KEY

NAME = "cifar10-lrn"


@dataclass(frozen=True)
class Arch:
    c1: int = 32
    c2: int = 32
    c3: int = 64
    # LRN across channels (ONNX LRN / torch LocalResponseNorm): y = x (bias + alpha/n sum x^2)^-beta
    across_size: int = 5
    across_alpha: float = 1e-4
    across_beta: float = 0.75
    across_bias: float = 1.0
    # LRN within a channel (Caffe WITHIN_CHANNEL): y = x (1 + alpha/n^2 sum_{n x n} x^2)^-beta
    within_size: int = 3
    within_alpha: float = 5e-5
    within_beta: float = 0.75


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 15
    batch_size: int = 128
    lr: float = 2e-3          # peak learning rate of the one-cycle schedule
    momentum: float = 0.9     # SGD only
    weight_decay: float = 5e-4
    pct_start: float = 0.25
    optimizer: str = "adam"   # "adam" (AdamW) | "sgd" (Nesterov momentum; needs divide_std=True to train)
    divide_std: bool = False  # also divide the input by the per-channel std (recorded in the metadata)
    threads: int = 2
    limit: int | None = None  # train on the first `limit` (shuffled) images only: smoke tests
    arch: Arch = field(default_factory=Arch)


# ----------------------------------------------------------------------------- data

def load_train_set(tar_path: str | Path | None = None, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``cifar10_train_jpeg.tar.gz`` once into (uint8 [N,32,32,3] RGB, int64 labels [N]).

    Members are sorted by path so the array order (hence training) does not depend on the tar order.
    ``limit`` keeps a class-balanced prefix (for smoke tests).
    """
    from PIL import Image

    tar_path = Path(tar_path) if tar_path else require_shared("cifar10_train_jpeg.tar.gz")
    index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    blobs: list[tuple[str, int, bytes]] = []
    per_class = None if limit is None else max(1, math.ceil(limit / len(CIFAR10_CLASSES)))
    counts = dict.fromkeys(CIFAR10_CLASSES, 0)
    with tarfile.open(tar_path, "r:gz") as tf:
        for m in tf:
            if not (m.isfile() and m.name.endswith(".jpg")):
                continue
            cls = Path(m.name).parent.name
            if cls not in index:
                continue
            if per_class is not None and counts[cls] >= per_class:
                continue
            counts[cls] += 1
            blobs.append((m.name, index[cls], tf.extractfile(m).read()))
    blobs.sort(key=lambda b: b[0])
    images = np.empty((len(blobs), 32, 32, 3), np.uint8)
    labels = np.empty(len(blobs), np.int64)
    for i, (_, label, data) in enumerate(blobs):
        with Image.open(io.BytesIO(data)) as im:
            images[i] = np.asarray(im.convert("RGB"), dtype=np.uint8)
        labels[i] = label
    return images, labels


def load_test_sample(root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 1,000 shared test JPEGs (100 per class) as (uint8 [N,32,32,3] RGB, labels)."""
    root = Path(root) if root else require_shared("cifar10_test_sample")
    return load_image_folder(root)


# ----------------------------------------------------------------------------- torch model

def _torch_net(arch: Arch):
    import torch
    from torch import nn
    import torch.nn.functional as F

    class WithinChannelLRN(nn.Module):
        """``x * (1 + alpha/n^2 * sum_{n x n window, zero padded} x^2) ** -beta`` (Caffe WITHIN_CHANNEL)."""

        def __init__(self, size: int, alpha: float, beta: float):
            super().__init__()
            if size % 2 != 1:
                raise ValueError("within-channel LRN needs an odd size")
            self.size, self.alpha, self.beta = size, alpha, beta

        def forward(self, x):
            avg = F.avg_pool2d(x * x, self.size, stride=1, padding=(self.size - 1) // 2, count_include_pad=True)
            return x * torch.pow(1.0 + self.alpha * avg, -self.beta)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, arch.c1, 5, padding=2)
            self.pool1 = nn.MaxPool2d(3, 2, padding=1)
            self.norm1 = nn.LocalResponseNorm(arch.across_size, arch.across_alpha, arch.across_beta, arch.across_bias)
            self.conv2 = nn.Conv2d(arch.c1, arch.c2, 5, padding=2)
            self.pool2 = nn.AvgPool2d(3, 2, padding=1, count_include_pad=True)
            self.norm2 = WithinChannelLRN(arch.within_size, arch.within_alpha, arch.within_beta)
            self.conv3 = nn.Conv2d(arch.c2, arch.c3, 5, padding=2)
            self.pool3 = nn.AvgPool2d(3, 2, padding=1, count_include_pad=True)
            self.fc = nn.Linear(arch.c3 * 16, 10)

        def forward(self, x):
            x = self.norm1(self.pool1(F.relu(self.conv1(x))))
            x = self.norm2(self.pool2(F.relu(self.conv2(x))))
            x = self.pool3(F.relu(self.conv3(x)))
            return self.fc(torch.flatten(x, 1))

    return Net()


def build_torch_model(arch: Arch = Arch(), state_dict: dict | None = None):
    """The torch twin of the ONNX graph (for training and for equality tests)."""
    net = _torch_net(arch)
    if state_dict is not None:
        import torch

        net.load_state_dict({k: (v.detach().clone() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)))
                             for k, v in state_dict.items()})
    return net


# ----------------------------------------------------------------------------- ONNX export

def export_onnx(state_dict: dict, arch: Arch, mean: list[float], std: list[float] | None = None, *, extra_meta: dict | None = None) -> onnx.ModelProto:
    """The ONNX graph, built node by node from a state dict of numpy arrays (or tensors)."""
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float32)
          for k, v in state_dict.items()}
    inits = [numpy_helper.from_array(sd[k], k) for k in (
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "conv3.weight", "conv3.bias", "fc.weight", "fc.bias")]
    conv = dict(kernel_shape=[5, 5], pads=[2, 2, 2, 2], strides=[1, 1])
    pool = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    nodes = [
        helper.make_node("Conv", ["data", "conv1.weight", "conv1.bias"], ["conv1"], name="conv1", **conv),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", **pool),
        helper.make_node("LRN", ["pool1"], ["norm1"], name="norm1", size=arch.across_size,
                         alpha=float(arch.across_alpha), beta=float(arch.across_beta), bias=float(arch.across_bias)),
        helper.make_node("Conv", ["norm1", "conv2.weight", "conv2.bias"], ["conv2"], name="conv2", **conv),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("AveragePool", ["relu2"], ["pool2"], name="pool2", count_include_pad=1, **pool),
        make_within_channel_lrn("pool2", "norm2", arch.within_size, arch.within_alpha, arch.within_beta, name="norm2"),
        helper.make_node("Conv", ["norm2", "conv3.weight", "conv3.bias"], ["conv3"], name="conv3", **conv),
        helper.make_node("Relu", ["conv3"], ["relu3"], name="relu3"),
        helper.make_node("AveragePool", ["relu3"], ["pool3"], name="pool3", count_include_pad=1, **pool),
        helper.make_node("Flatten", ["pool3"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cifar10_lrn",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", FUNCTION_OPSET)],
                              producer_name="lrponnx.model_zoo", producer_version="1")
    model.ir_version = 8
    ensure_lrn_function(model)
    model.doc_string = ("cifar10-lrn: CIFAR-10 CNN with LRN across channels (norm1) and within a channel "
                        "(norm2), trained by lrponnx.model_zoo.cifar10_lrn")
    prep = {"input": "data", "channel_order": "rgb", "pixel_scale": 255.0,
            "mean": [float(np.float32(m)) for m in mean], "scale": 1.0, "size": [32, 32], "embedded": False}
    if std is not None:
        prep["std"] = [float(np.float32(s)) for s in std]
    meta = {PREPROCESSING_KEY: json.dumps(prep), ZOO_KEY: NAME,
            CLASSES_KEY: json.dumps(CIFAR10_CLASSES)}
    meta.update(extra_meta or {})
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def state_dict_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The initializers of an exported model, keyed like the torch state dict."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def arch_of(model: onnx.ModelProto) -> Arch:
    """Recover the :class:`Arch` of an exported model from its LRN nodes and weight shapes."""
    from lrponnx.compiler.lrn_ops import spec_of_node

    sd = state_dict_of(model)
    kw = dict(c1=sd["conv1.weight"].shape[0], c2=sd["conv2.weight"].shape[0], c3=sd["conv3.weight"].shape[0])
    for node in model.graph.node:
        spec = spec_of_node(node)
        if spec is None:
            continue
        if spec.region == "across":
            kw.update(across_size=spec.size, across_alpha=spec.alpha, across_beta=spec.beta, across_bias=spec.k)
        else:
            kw.update(within_size=spec.size, within_alpha=spec.alpha, within_beta=spec.beta)
    return Arch(**kw)


def compare_with_torch(model: onnx.ModelProto, x: np.ndarray) -> float:
    """Max relative difference (w.r.t. max |logit|) between ONNX Runtime and the torch twin on ``x``."""
    import onnxruntime as ort
    import torch

    net = build_torch_model(arch_of(model), state_dict_of(model)).eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"data": x})[0]
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


# ----------------------------------------------------------------------------- training

def train(seed: int = 0, epochs: int = 15, *, out: str | Path | None = None, config: TrainConfig | None = None,
          train_data: tuple[np.ndarray, np.ndarray] | None = None, eval_test: bool = True,
          log=print) -> tuple[onnx.ModelProto, dict]:
    """Train ``cifar10-lrn`` from scratch, export it to ONNX and (optionally) measure test accuracy.

    Returns (model, report); writes the model to ``out`` when given. ``config`` (if given) overrides
    ``seed``/``epochs``. Reproducible from the seed
    (same torch build and thread count give the same weights).
    """
    import torch

    cfg = config or TrainConfig(seed=seed, epochs=epochs)
    rng, t0, images, labels, t_data = training_data(cfg, train_data, load_train_set)
    mean, std = channel_mean_std(images)  # per channel, 0-255 units
    std = std if cfg.divide_std else None
    log(f"[cifar10-lrn] {len(images)} training images decoded in {t_data:.1f}s; mean RGB {[round(float(m), 2) for m in mean]}")

    net = build_torch_model(cfg.arch)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                              weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    history, t_train = fit(net, opt, images, labels, mean, std, cfg=cfg, rng=rng, size=32, name=NAME, log=log)

    net.eval()
    report = training_report(cfg, len(images), t_data, t_train, history)
    model = export_onnx(net.state_dict(), cfg.arch, mean.tolist(), None if std is None else std.tolist(),
                        extra_meta=training_meta(report))

    # ONNX Runtime must agree with torch
    probe = normalised(torch.from_numpy(np.ascontiguousarray(images[:64].transpose(0, 3, 1, 2))), mean, std).numpy()
    report["onnx_vs_torch_max_rel_diff"] = compare_with_torch(model, probe)
    if report["onnx_vs_torch_max_rel_diff"] > 1e-5:
        raise RuntimeError(f"ONNX and torch disagree: {report['onnx_vs_torch_max_rel_diff']:.3g}")

    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(out))
    if eval_test:
        ti, tl = load_test_sample()
        if out is not None:
            report["test_sample_accuracy"] = onnx_accuracy(out, ti, tl)
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                onnx.save(model, f"{d}/m.onnx")
                report["test_sample_accuracy"] = onnx_accuracy(f"{d}/m.onnx", ti, tl)
        log(f"[cifar10-lrn] accuracy on the 1,000-image test sample (ONNX Runtime): "
            f"{report['test_sample_accuracy']:.3f}")
    report["total_s"] = round(time.perf_counter() - t0, 1)
    log(f"[cifar10-lrn] wall time: decode {t_data:.0f}s + train {t_train:.0f}s; total {report['total_s']:.0f}s")
    return model, report

"""``vit-cifar10``: a small Vision Transformer trained on CIFAR-10 in a few minutes on the CPU.

torchvision's ``VisionTransformer`` (32x32 input, 4x4 patches = 64 tokens + a class token, 3
encoder blocks of width 48 with 3 heads, MLP 96, GELU, LayerNorm), trained from scratch on the
shared ``cifar10_train_jpeg.tar.gz`` (random crop + flip, AdamW, one-cycle schedule) and exported
with PyTorch's TorchScript exporter (opset 17, dynamic batch). Its explainer uses the ``attnlrp``
composite (AttnLRP, Achtibat et al. 2024): ``lrponnx demo --model vit-cifar10``.

    python -m lrponnx.model_zoo.vit_cifar10 --epochs 4 -o model_zoo/vit_cifar10.onnx
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lrponnx.model_zoo._shared import (CIFAR10_CLASSES, channel_mean_std, fit, onnx_accuracy, training_data,
                                        training_meta, training_report)
from lrponnx.metadata import CLASSES_KEY, COMPOSITE_KEY, PATCH_SIZE_KEY, PREPROCESSING_KEY, ZOO_KEY

NAME = "vit-cifar10"
COMPOSITE = "attnlrp"


@dataclass(frozen=True)
class Arch:
    image_size: int = 32
    patch_size: int = 4
    num_layers: int = 3
    num_heads: int = 3
    hidden_dim: int = 48
    mlp_dim: int = 96


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    pct_start: float = 0.2
    threads: int = 2
    limit: int | None = None  # train on the first `limit` images only (smoke tests)
    arch: Arch = field(default_factory=Arch)


def build_torch_model(arch: Arch = Arch()):
    import torchvision

    return torchvision.models.VisionTransformer(image_size=arch.image_size, patch_size=arch.patch_size,
                                                num_layers=arch.num_layers, num_heads=arch.num_heads,
                                                hidden_dim=arch.hidden_dim, mlp_dim=arch.mlp_dim, num_classes=10)


def export_onnx(net, arch: Arch, mean: list[float], std: list[float], extra_meta: dict | None = None) -> onnx.ModelProto:
    """TorchScript export (opset 17, dynamic batch) with the zoo's metadata (preprocessing, classes)."""
    import contextlib
    import io
    import tempfile
    import warnings

    import torch
    from onnx import helper

    net = net.eval()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, arch.image_size, arch.image_size),), f"{d}/m.onnx",
                          input_names=["data"], output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"data": {0: "N"}, "logits": {0: "N"}})
        model = onnx.load(f"{d}/m.onnx")
    model.producer_name, model.producer_version = "lrponnx.model_zoo", "1"
    model.doc_string = f"{NAME}: a small ViT trained on CIFAR-10 by lrponnx.model_zoo.vit_cifar10 (explain with attnlrp)"
    prep = {"input": "data", "channel_order": "rgb", "pixel_scale": 255.0, "mean": [float(np.float32(m)) for m in mean],
            "std": [float(np.float32(s)) for s in std], "scale": 1.0, "size": [arch.image_size] * 2, "embedded": False}
    meta = {PREPROCESSING_KEY: json.dumps(prep), ZOO_KEY: NAME, CLASSES_KEY: json.dumps(CIFAR10_CLASSES),
            COMPOSITE_KEY: COMPOSITE, PATCH_SIZE_KEY: str(arch.patch_size)}
    meta.update(extra_meta or {})
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def train(config: TrainConfig | None = None, *, out: str | Path | None = None, train_data=None, eval_test: bool = True,
          log=print) -> tuple[onnx.ModelProto, dict]:
    """Train, export and (optionally) measure the accuracy on the shared 1,000-image test sample."""
    import torch

    from lrponnx.model_zoo.cifar10_lrn import load_test_sample, load_train_set

    cfg = config or TrainConfig()
    rng, t0, images, labels, t_data = training_data(cfg, train_data, load_train_set)
    mean, std = channel_mean_std(images)
    log(f"[{NAME}] {len(images)} training images decoded in {t_data:.1f}s")
    net = build_torch_model(cfg.arch)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, t_train = fit(net, opt, images, labels, mean, std, cfg=cfg, rng=rng, size=cfg.arch.image_size,
                           label_smoothing=0.1, clip_norm=1.0, name=NAME, log=log)
    net.eval()
    report = training_report(cfg, len(images), t_data, t_train, history)
    model = export_onnx(net, cfg.arch, mean.tolist(), std.tolist(), extra_meta=training_meta(report))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(out))
    if eval_test and out is not None:
        ti, tl = load_test_sample()
        report["test_sample_accuracy"] = onnx_accuracy(out, ti, tl)
        log(f"[{NAME}] accuracy on the 1,000-image test sample (ONNX Runtime): {report['test_sample_accuracy']:.3f}")
    report["total_s"] = round(time.perf_counter() - t0, 1)
    return model, report


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default="vit-cifar10.onnx")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    a = p.parse_args(argv)
    out = Path(a.output)
    _, report = train(TrainConfig(seed=a.seed, epochs=a.epochs, limit=a.limit), out=out)
    out.with_suffix(".train.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Small transformers with seeded random weights (no downloads) and their ONNX exports from both
PyTorch exporters, for the AttnLRP tests (issue 14)."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np

EXPORTERS = ("torchscript", "dynamo")


def small_vit(seed: int = 0, num_classes: int = 10):
    """torchvision's VisionTransformer: 32x32 images, 8x8 patches, 2 blocks, 2 heads, width 32."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                             mlp_dim=64, num_classes=num_classes).eval()
    randomise_head(m)
    return m


def randomise_head(m, seed: int = 1):
    """torchvision zero-initialises the class token and the head of a fresh ViT: random values
    instead, so that logits and relevance are not all zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [m.heads.head.weight, m.heads.head.bias] + ([m.class_token] if hasattr(m, "class_token") else []):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def small_bert(seed: int = 0, vocab: int = 100, num_labels: int = 3):
    """A BERT-style text classifier: token embedding, two encoder blocks, pooled head (transformers'
    BertForSequenceClassification, random weights)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=num_labels, attn_implementation="eager")
    return BertForSequenceClassification(cfg).eval()


class LogitsOnly:
    """Wrap a transformers model so that export sees ``ids -> logits``."""

    def __new__(cls, hf):
        import torch

        class _M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = hf

            def forward(self, ids):
                return self.m(input_ids=ids).logits

        return _M().eval()


def export(model, example, path: Path, exporter: str, input_name: str = "x", opset: int | None = None) -> Path:
    """Export with TorchScript (dynamic batch, opset 17 unless given) or dynamo (static shapes,
    opset 18 unless given); quiet."""
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=["logits"],
                              dynamic_axes={input_name: {0: "N"}, "logits": {0: "N"}}, opset_version=opset or 17,
                              dynamo=False)
        else:
            torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=["logits"],
                              opset_version=opset or 18, dynamo=True, external_data=False)
    return path


def images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def token_ids(n: int, length: int = 12, vocab: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, (n, length)).astype(np.int64)

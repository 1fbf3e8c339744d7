"""Recognising LRN that arrives decomposed into elementary ops (e.g. torch.onnx's export of
``nn.LocalResponseNorm``), so it is explained with the LRN rule instead of being refused."""
from __future__ import annotations

from .view import ModelView


def find_decomposed_lrn(view: ModelView) -> list:
    """Units for every decomposed LRN chain in the graph (none recognised yet)."""
    return []

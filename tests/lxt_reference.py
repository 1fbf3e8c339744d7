"""AttnLRP relevance from LXT 2.1 (``lxt.efficient``, input x gradient with patched gradients), the
authors' own implementation, for the parity tests of issue 14 (tests/test_lxt_parity.py) and
bench/attnlrp.py.

LXT patches classes (``nn.LayerNorm.forward``, ...) for the whole process; :func:`lxt_patched`
patches for the duration of a ``with`` block and restores them afterwards, so the other tests and
ONNX export see plain PyTorch.

- torchvision ViT / Swin: LXT ships no AttnLRP map (its ``vit_torch`` map is CP-LRP), so it is
  assembled from LXT's own pieces as its GPT-2 map does: ``layer_norm_forward`` on ``nn.LayerNorm``,
  ``non_linear_forward`` (the identity rule) on ``nn.GELU``, and the attention wrapped like
  ``lxt.efficient.patches.wrap_attention_forward`` (``divide_gradient`` of 4, 4, 2 at q, k, v) with
  the softmax's gradient left as it is.
- BERT: LXT's own AttnLRP copy of ``transformers``' modeling_bert
  (``lxt.efficient.models.bert``), with its map's LayerNorm and Dropout patches.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

try:  # LXT 2.1 imports only beside transformers 4.52.x
    import torch
    import torch.nn.functional as F
    from lxt.efficient.patches import dropout_forward, layer_norm_forward, non_linear_forward
    from lxt.efficient.rules import divide_gradient
    LXT_ERROR = None
except Exception as e:  # pragma: no cover - reported by the tests' skip reason
    LXT_ERROR = f"lxt 2.1 is not importable ({type(e).__name__}: {e}); pip install 'lxt==2.1.*' transformers==4.52.4"


def _mha_attnlrp(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                 average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention`` (batch_first, self-attention) written out, with LXT's
    ``wrap_attention_forward``: q, k, v through ``divide_gradient(·, 4 / 4 / 2)``."""
    assert self.batch_first and query is key and key is value and attn_mask is None and key_padding_mask is None
    N, T, E = query.shape
    H = self.num_heads
    d = E // H
    q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(N, T, H, d).transpose(1, 2) for t in (q, k, v))
    q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
    A = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    o = (A @ v).transpose(1, 2).reshape(N, T, E)
    return self.out_proj(o), None


def _swin_attention_attnlrp(self, x):
    """torchvision's ``ShiftedWindowAttention`` (v1) with the same wrapper at q, k, v."""
    relative_position_bias = self.get_relative_position_bias()
    return _shifted_window_attention_attnlrp(
        x, self.qkv.weight, self.proj.weight, relative_position_bias, self.window_size, self.num_heads,
        shift_size=self.shift_size, qkv_bias=self.qkv.bias, proj_bias=self.proj.bias)


def _shifted_window_attention_attnlrp(input, qkv_weight, proj_weight, relative_position_bias, window_size,
                                      num_heads, shift_size, qkv_bias=None, proj_bias=None):
    """torchvision.models.swin_transformer.shifted_window_attention (eval, no dropout), q/k/v wrapped."""
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = list(shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)  # LXT's attention wrapper
    q = q * (C // num_heads) ** -0.5
    attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0]: h[1], w[0]: w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = F.linear(x, proj_weight, proj_bias)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


@contextlib.contextmanager
def lxt_patched(patches: list):
    """``patches``: [(class, method name, new function, keep_original)]; restored on exit."""
    saved = []
    try:
        for cls, name, fn, keep in patches:
            saved.append((cls, name, cls.__dict__.get(name), cls.__dict__.get(f"original_{name}")))
            if keep:
                setattr(cls, f"original_{name}", getattr(cls, name))
            setattr(cls, name, fn)
        yield
    finally:
        for cls, name, old, old_original in reversed(saved):
            if old is None:
                delattr(cls, name)
            else:
                setattr(cls, name, old)
            if old_original is None:
                if f"original_{name}" in cls.__dict__:
                    delattr(cls, f"original_{name}")
            else:
                setattr(cls, f"original_{name}", old_original)


def _vision_patches() -> list:
    from torch import nn
    from torchvision.models import swin_transformer as st

    return [(nn.LayerNorm, "forward", layer_norm_forward, False),
            (nn.GELU, "forward", non_linear_forward, True),
            (nn.Dropout, "forward", dropout_forward, False),
            (nn.MultiheadAttention, "forward", _mha_attnlrp, False),
            (st.ShiftedWindowAttention, "forward", _swin_attention_attnlrp, False)]


def vision_relevance(model, x: np.ndarray, target: np.ndarray, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """(relevance [N, C, H, W], target logits [N]) of a torchvision ViT or Swin under AttnLRP in LXT."""
    dtype = dtype or torch.float64
    import copy

    m = copy.deepcopy(model).to(dtype).eval()
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    with lxt_patched(_vision_patches()):
        logits = m(xt)
        picked = logits.gather(1, torch.tensor(target, dtype=torch.long).reshape(-1, 1)).sum()
        picked.backward()
    R = (xt * xt.grad).detach().numpy()
    return R, logits.detach().numpy()[np.arange(len(target)), target]


def bert_relevance(hf_model, ids: np.ndarray, target: np.ndarray, dtype=None,
                   attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(token relevance [N, T], target logits [N]) of a ``BertForSequenceClassification`` under AttnLRP,
    computed by LXT's own AttnLRP BERT (same weights), as its README does: relevance
    ``(inputs_embeds * grad).sum(-1)``."""
    dtype = dtype or torch.float64
    from lxt.efficient.models import bert as lxt_bert
    from torch import nn

    config = hf_model.config
    m = lxt_bert.BertForSequenceClassification(config)
    m.load_state_dict(hf_model.state_dict())
    m = m.to(dtype).eval()
    ids_t = torch.tensor(ids, dtype=torch.long)
    with lxt_patched([(nn.LayerNorm, "forward", layer_norm_forward, False),
                      (nn.Dropout, "forward", dropout_forward, False)]):
        emb = m.get_input_embeddings()(ids_t).detach().requires_grad_(True)
        mask = None if attention_mask is None else torch.tensor(attention_mask, dtype=torch.long)
        logits = m(inputs_embeds=emb, attention_mask=mask).logits
        logits.gather(1, torch.tensor(target, dtype=torch.long).reshape(-1, 1)).sum().backward()
    R = (emb * emb.grad).sum(-1).detach().numpy()
    return R, logits.detach().numpy()[np.arange(len(target)), target]


def rel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Relative L2 distance per sample, ``||a - b|| / ||b||``."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-300)

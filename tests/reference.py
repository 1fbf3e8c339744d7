"""A float64 reference of the LRP contract (/work/shared/docs/lrp-rules.md).

Written independently of lrponnx's graph emitter: it never imports lrponnx. A network is a
small DAG of *steps* built from torch modules (:class:`Net`); the same object, in float32,
is what the tests export to ONNX, and a float64 copy of it computes the relevance layer by
layer with the contract's formulas. Vector-Jacobian products ``W^T q`` (and the adjoint of
the pooling maps) come from torch autograd, which is independent of the ONNX emitter.

Steps (``inputs`` are names of earlier steps' outputs; the network input is ``"input"``):

- :func:`linear`   Conv1d/2d/3d, ConvTranspose1d/2d, Linear; optional BatchNorm folded in;
                   rule ``(name, params)`` with name in epsilon, zplus, alpha-beta, gamma,
                   zbox, wsquare, flat.
- :func:`act`      any elementwise op (ReLU, Sigmoid, ..., Sub/Div by constants, BN
                   elsewhere): ``pass``.
- :func:`reshape`  Flatten / Reshape: ``pass``, reshaped back.
- :func:`avgpool`  AvgPool / AdaptiveAvgPool(1) (GlobalAveragePool): ``norm``.
- :func:`maxpool`  MaxPool / AdaptiveMaxPool(1): ``winner-take-all`` or ``proportional``.
- :func:`add`      Add / Sum of activations (plus an optional constant bias): ``norm``.
- :func:`transpose` Transpose: ``pass``, permuted back.
- :func:`concat`   Concat: split back.
- :func:`pad`      constant Pad: crop back.

``Net(steps, softmax=True)`` puts a Softmax on the output; the explained logits are its input.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

F64 = torch.float64


# ------------------------------------------------------------------------------- the network

@contextlib.contextmanager
def single_thread():
    """Tiny float64 convolutions run ~1000x slower with several intra-op threads on a busy
    machine; run them on one and restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class Step:
    kind: str
    out: str
    inputs: list
    module: nn.Module | None = None
    fn: Callable | None = None
    bn: nn.Module | None = None
    rule: tuple = ("pass", {})
    opts: dict = field(default_factory=dict)


def linear(out, inp, module, rule, bn=None) -> Step:
    name, params = (rule, {}) if isinstance(rule, str) else rule
    return Step("linear", out, [inp], module=module, bn=bn, rule=(name, dict(params)))


def act(out, inp, fn) -> Step:
    return Step("act", out, [inp], fn=fn)


def reshape(out, inp, fn=None) -> Step:
    return Step("reshape", out, [inp], fn=fn or (lambda t: torch.flatten(t, 1)))


def avgpool(out, inp, module, epsilon=1e-6) -> Step:
    return Step("avgpool", out, [inp], module=module, rule=("norm", {"epsilon": epsilon}))


def maxpool(out, inp, module, rule="winner-take-all", epsilon=1e-6) -> Step:
    return Step("maxpool", out, [inp], module=module, rule=(rule, {"epsilon": epsilon}))


def add(out, inputs, epsilon=1e-6, const=None) -> Step:
    """Sum of activations (and optionally a constant, which is a bias and receives nothing)."""
    opts = {"const": None if const is None else torch.as_tensor(np.asarray(const))}
    return Step("add", out, list(inputs), rule=("norm", {"epsilon": epsilon}), opts=opts)


def transpose(out, inp, perm) -> Step:
    return Step("transpose", out, [inp], opts={"perm": list(perm)})


def concat(out, inputs, dim=1) -> Step:
    return Step("concat", out, list(inputs), opts={"dim": dim})


def pad(out, inp, pads, value=0.0) -> Step:
    """``pads`` in torch.nn.functional.pad order (last dim first: left, right, top, bottom, ...)."""
    return Step("pad", out, [inp], opts={"pads": list(pads), "value": value})


class Net(nn.Module):
    """A DAG of steps; ``forward`` returns the last step's output (through a Softmax if asked)."""

    def __init__(self, steps: list[Step], softmax: bool = False):
        super().__init__()
        self.steps = steps
        self.softmax = softmax
        self.mods = nn.ModuleDict()
        for s in steps:
            if s.module is not None:
                self.mods[s.out] = s.module
            if s.bn is not None:
                self.mods[s.out + "_bn"] = s.bn
            if isinstance(s.fn, nn.Module):
                self.mods[s.out + "_fn"] = s.fn

    @property
    def logits(self) -> str:
        return self.steps[-1].out

    def _module(self, s: Step):
        return self.mods[s.out]

    def activations(self, x: torch.Tensor) -> dict:
        acts = {"input": x}
        for s in self.steps:
            ins = [acts[i] for i in s.inputs]
            if s.kind == "linear":
                y = self._module(s)(ins[0])
                if s.bn is not None:
                    y = self.mods[s.out + "_bn"](y)
            elif s.kind in ("act", "reshape"):
                fn = self.mods[s.out + "_fn"] if isinstance(s.fn, nn.Module) else s.fn
                y = fn(ins[0])
            elif s.kind in ("avgpool", "maxpool"):
                y = self._module(s)(ins[0])
            elif s.kind == "add":
                y = ins[0]
                for t in ins[1:]:
                    y = y + t
                if s.opts["const"] is not None:
                    y = y + s.opts["const"].to(y.dtype)
            elif s.kind == "transpose":
                y = ins[0].permute(s.opts["perm"])
            elif s.kind == "concat":
                y = torch.cat(ins, dim=s.opts["dim"])
            elif s.kind == "pad":
                y = F.pad(ins[0], s.opts["pads"], mode="constant", value=s.opts["value"])
            else:
                raise ValueError(s.kind)
            acts[s.out] = y
        return acts

    def forward(self, x):
        y = self.activations(x)[self.logits]
        return torch.softmax(y, dim=1) if self.softmax else y

    def output64(self, x) -> np.ndarray:
        """The model's output in float64 (numpy)."""
        with single_thread(), torch.no_grad():
            net = copy.deepcopy(self).to(F64).eval()
            return net(torch.as_tensor(np.asarray(x), dtype=F64)).numpy()

    # -- the reference ----------------------------------------------------------------------------
    def relevance(self, x, target=None, seed: str = "logit", layers: bool = False, dtype=F64):
        """Input relevance (float64 numpy, shape of ``x``) by the contract's formulas.

        ``target``: per-sample class index (None or -1: the argmax of the logits).
        With ``layers=True`` also returns ``{step out: relevance at that step's output}``.
        ``dtype``: float64 is the reference; float32 only serves to measure how sensitive a
        case is to rounding (a badly conditioned case shows a large float32-vs-float64 gap).
        """
        with single_thread():
            return self._relevance(x, target, seed, layers, dtype)

    def _relevance(self, x, target, seed, layers, dtype):
        net = copy.deepcopy(self).to(dtype).eval()
        x = torch.as_tensor(np.asarray(x), dtype=dtype)
        with torch.no_grad():
            acts = net.activations(x)
        logits = acts[net.logits]
        t = logits.argmax(dim=1)
        if target is not None:
            given = torch.as_tensor(np.asarray(target), dtype=torch.int64)
            t = torch.where(given < 0, t, given)
        onehot = F.one_hot(t, logits.shape[1]).to(dtype)
        R = {net.logits: onehot * logits if seed == "logit" else onehot}
        at_output = {}
        for s in reversed(net.steps):
            r = R.pop(s.out, None)
            if r is None:
                continue
            at_output[s.out] = r
            for name, ri in net._step_relevance(s, acts, r).items():
                R[name] = R[name] + ri if name in R else ri
        out = R.get("input", torch.zeros_like(x)).detach().double().numpy()
        if layers:
            return out, {k: v.detach().double().numpy() for k, v in at_output.items()}
        return out

    def _step_relevance(self, s: Step, acts: dict, R: torch.Tensor) -> dict:
        ins = [acts[i] for i in s.inputs]
        if s.kind == "linear":
            bn = self.mods[s.out + "_bn"] if s.bn is not None else None
            return {s.inputs[0]: linear_rule(s.rule[0], s.rule[1], self._module(s), bn, ins[0], R)}
        if s.kind == "act":
            return {s.inputs[0]: R}
        if s.kind == "reshape":
            return {s.inputs[0]: R.reshape(ins[0].shape)}
        if s.kind == "avgpool":
            return {s.inputs[0]: norm_rule(self._module(s), ins[0], R, s.rule[1]["epsilon"])}
        if s.kind == "maxpool":
            m = self._module(s)
            if s.rule[0] == "winner-take-all":
                return {s.inputs[0]: vjp(m, ins[0], R, at_actual_input=True)}
            return {s.inputs[0]: norm_rule(WindowSum(m, ins[0].shape, acts[s.out].shape, R.dtype), ins[0], R,
                                           s.rule[1]["epsilon"])}
        if s.kind == "transpose":
            return {s.inputs[0]: R.permute(list(np.argsort(s.opts["perm"])))}
        if s.kind == "add":
            q = stab_div(R, acts[s.out], s.rule[1]["epsilon"])  # the sum of every input, bias included
            out = {}
            for name, a in zip(s.inputs, ins):
                out[name] = out.get(name, 0) + a * q
            return out
        if s.kind == "concat":
            dim = s.opts["dim"]
            parts = torch.split(R, [t.shape[dim] for t in ins], dim=dim)
            out = {}
            for name, p in zip(s.inputs, parts):
                out[name] = out[name] + p if name in out else p
            return out
        if s.kind == "pad":
            p = s.opts["pads"]
            idx = [slice(None)] * R.ndim
            for k in range(len(p) // 2):
                dim = R.ndim - 1 - k
                idx[dim] = slice(p[2 * k], R.shape[dim] - p[2 * k + 1])
            return {s.inputs[0]: R[tuple(idx)]}
        raise ValueError(s.kind)


# ------------------------------------------------------------------------------------ helpers

def stab(d: torch.Tensor, eps: float) -> torch.Tensor:
    """``d + eps * sign0(d)``, ``sign0(0) = +1``."""
    return d + eps * torch.where(d >= 0, 1.0, -1.0).to(d.dtype)


def stab_div(R: torch.Tensor, d: torch.Tensor, eps: float) -> torch.Tensor:
    """``R / stab(d)``; with ``eps = 0`` a zero denominator gives zero."""
    den = stab(d, eps)
    zero = den == 0
    return torch.where(zero, torch.zeros_like(R), R / torch.where(zero, torch.ones_like(den), den))


def vjp(fn, like: torch.Tensor, q: torch.Tensor, at_actual_input: bool = False) -> torch.Tensor:
    """The adjoint of ``fn`` applied to ``q``: for a linear ``fn`` this is ``W^T q``; for max
    pooling (``at_actual_input``) it is the gradient at ``like``."""
    x0 = (like.detach().clone() if at_actual_input else torch.zeros_like(like)).requires_grad_(True)
    with torch.enable_grad():
        y = fn(x0)
        (g,) = torch.autograd.grad(y, x0, q)
    return g.detach()


def norm_rule(P, x: torch.Tensor, R: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * P^T(R / stab(P x))`` for a linear map ``P`` (a pooling module)."""
    with torch.no_grad():
        y = P(x)
    return x * vjp(P, x, stab_div(R, y, eps))


class WindowSum:
    """Sum over the windows of a max pooling module (padding counts as zeros), by explicit
    enumeration of the windows: output o along a dim covers input ``o*s - p + j*d``, j < k."""

    def __init__(self, m: nn.Module, x_shape, y_shape, dtype=F64):
        n = len(x_shape) - 2
        if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            k, s, p, d = list(x_shape[2:]), [1] * n, [0] * n, [1] * n
        else:
            def tup(v):
                return list(v) if isinstance(v, (tuple, list)) else [v] * n
            k, s, p, d = tup(m.kernel_size), tup(m.stride or m.kernel_size), tup(m.padding), tup(m.dilation)
        # one 0/1 matrix per spatial dim; the window is their outer product
        self.mats = []
        for i in range(n):
            A = torch.zeros(y_shape[2 + i], x_shape[2 + i], dtype=dtype)
            for o in range(y_shape[2 + i]):
                for j in range(k[i]):
                    src = o * s[i] - p[i] + j * d[i]
                    if 0 <= src < x_shape[2 + i]:
                        A[o, src] += 1.0
            self.mats.append(A)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i, A in enumerate(self.mats):  # contract spatial dim i with A
            y = torch.movedim(torch.tensordot(y, A, dims=([2 + i], [1])), -1, 2 + i)
        return y


# ---------------------------------------------------------------------------------- linear rules

def folded_params(m: nn.Module, bn: nn.Module | None, dtype=F64):
    """``W, b`` (float64) of a linear module with a following BatchNorm folded in."""
    W = m.weight.detach().to(dtype).clone()
    out_ch = W.shape[0] if not isinstance(m, nn.modules.conv._ConvTransposeNd) else W.shape[1] * m.groups
    b = m.bias.detach().to(dtype).clone() if m.bias is not None else torch.zeros(out_ch, dtype=dtype)
    if bn is not None:
        s = bn.weight.detach().to(dtype) / torch.sqrt(bn.running_var.detach().to(dtype) + bn.eps)
        b = (b - bn.running_mean.detach().to(dtype)) * s + bn.bias.detach().to(dtype)
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            g = m.groups
            C, Mg = W.shape[0], W.shape[1]
            W = (W.reshape((g, C // g, Mg) + tuple(W.shape[2:]))
                 * s.reshape((g, 1, Mg) + (1,) * (W.ndim - 2))).reshape(W.shape)
        else:
            W = W * s.reshape((-1,) + (1,) * (W.ndim - 1))
    return W, b


def linear_map(m: nn.Module, W: torch.Tensor, b: torch.Tensor | None):
    """``x -> W x + b`` with the module's own geometry and substitute weights."""
    if isinstance(m, nn.Linear):
        return lambda x: F.linear(x, W, b)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[W.ndim - 2]
        return lambda x: fn(x, W, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError("reference supports explicit zero padding only")
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[W.ndim - 2]
        return lambda x: fn(x, W, b, m.stride, m.padding, m.dilation, m.groups)
    raise TypeError(type(m))


def _as_bound(v, x: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1), dtype=x.dtype)
    if a.numel() == 1:
        return torch.full((1,) + tuple(x.shape[1:]), float(a[0]), dtype=x.dtype)
    return a.reshape((1, -1) + (1,) * (x.ndim - 2)).expand((1,) + tuple(x.shape[1:])).clone()


def linear_rule(name: str, params: dict, m: nn.Module, bn, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Input relevance of one linear layer by the contract's table."""
    dt = x.dtype  # float64 for the reference
    W, b = folded_params(m, bn, dt)
    eps = float(params.get("epsilon", 1e-6))
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)

    def fwd(inp, w, bias=None):
        with torch.no_grad():
            return linear_map(m, w, bias)(inp)

    def T(q, w):  # W^T q
        return vjp(linear_map(m, w, None), x, q)

    if name == "epsilon":
        return x * T(stab_div(R, fwd(x, W, b), eps), W)
    if name in ("zplus", "alpha-beta"):
        alpha, beta = (1.0, 0.0) if name == "zplus" else (float(params.get("alpha", 2.0)),
                                                         float(params.get("beta", 1.0)))
        p = fwd(xp, Wp, b.clamp(min=0)) + fwd(xn, Wn)
        qp = stab_div(R, p, eps)
        out = alpha * (xp * T(qp, Wp) + xn * T(qp, Wn))
        if beta != 0:
            n = fwd(xp, Wn, b.clamp(max=0)) + fwd(xn, Wp)
            qn = stab_div(R, n, eps)
            out = out - beta * (xp * T(qn, Wn) + xn * T(qn, Wp))
        return out
    if name == "gamma":
        g = float(params.get("gamma", 0.25))
        Gp, Gn = W + g * Wp, W + g * Wn
        cp, cn = b + g * b.clamp(min=0), b + g * b.clamp(max=0)
        z = fwd(x, W, b)
        p = fwd(xp, Gp, cp) + fwd(xn, Gn)
        n = fwd(xp, Gn, cn) + fwd(xn, Gp)
        qp = stab_div((z > 0).to(dt) * R, p, eps)
        qn = stab_div((z < 0).to(dt) * R, n, eps)
        return xp * (T(qp, Gp) + T(qn, Gn)) + xn * (T(qp, Gn) + T(qn, Gp))
    if name == "zbox":
        lo, hi = _as_bound(params["low"], x), _as_bound(params["high"], x)
        d = fwd(x, W) - fwd(lo, Wp) - fwd(hi, Wn)
        q = stab_div(R, d, eps)
        return x * T(q, W) - lo * T(q, Wp) - hi * T(q, Wn)
    if name == "wsquare":
        ones = torch.ones((1,) + tuple(x.shape[1:]), dtype=dt)
        W2 = W * W
        return T(stab_div(R, fwd(ones, W2, b * b), eps), W2)
    if name == "flat":
        ones = torch.ones((1,) + tuple(x.shape[1:]), dtype=dt)
        W1 = torch.ones_like(W)
        return T(stab_div(R, fwd(ones, W1), eps), W1)
    raise ValueError(f"unknown linear rule {name!r}")


# ----------------------------------------------------------------------------------- utilities

def randomize_bn(bn: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters for an eval-mode BatchNorm."""
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
        bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        bn.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)
    return bn.eval()


def rel_l2(a, ref) -> float:
    """Relative L2 error of ``a`` against ``ref`` (both one sample)."""
    a, ref = np.asarray(a, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(a - ref) / den) if den > 0 else float(np.linalg.norm(a))


def max_rel_l2_per_sample(a, ref) -> float:
    return max(rel_l2(a[i], ref[i]) for i in range(len(ref)))

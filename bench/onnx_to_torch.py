"""A small converter of the benchmark's ONNX graphs into ``torch.nn`` modules with the same weights.

It exists so that Zennit (and Captum) can run the *same* network as lrponnx: every ONNX node
becomes one child module (registered in graph order, so Zennit's "first layer" is the graph's first
Conv/Gemm), and ``forward`` runs the nodes in graph order on a dict of tensors.

Supported (what the Caffe-derived benchmark models and the VGG16 export use):
Conv, Relu, MaxPool (ceil_mode, explicit and asymmetric pads), AveragePool, GlobalAveragePool,
LRN (ONNX semantics), ``ai.lrponnx::WithinChannelLRN``, Concat, Gemm, MatMul with a constant,
Flatten, Reshape, Dropout, Identity, Softmax, Sum/Add (as ``zennit.layer.Sum`` so that Zennit's
``Norm`` rule applies, like lrponnx's Add), Constant.

LRN layers are plain modules without a Zennit rule: Zennit back-propagates the plain gradient
through them (Zennit 0.5.1 has no LRN rule).

    net = OnnxTorch(onnx.load(path), logits=True)   # logits=True: stop before a final Softmax
    y = net(torch.from_numpy(x))
    check_against_ort(net, path, x)                  # max relative error vs ONNX Runtime

Run ``python bench/onnx_to_torch.py MODEL.onnx [--batch N]`` to check a model.
"""
from __future__ import annotations

import math
import re

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

try:  # Zennit's Sum module gets Zennit's Norm rule; fall back to an equivalent module without Zennit
    from zennit.layer import Sum as _Sum
except Exception:  # pragma: no cover
    class _Sum(torch.nn.Module):
        def __init__(self, dim=-1):
            super().__init__()
            self.dim = dim

        def forward(self, input):
            return torch.sum(input, dim=self.dim)


class UnsupportedOp(NotImplementedError):
    pass


# ----------------------------------------------------------------------------- modules

class OnnxLRN(torch.nn.Module):
    """ONNX LRN: y = x / (bias + alpha/size * sum_{c' in [c - floor((n-1)/2), c + ceil((n-1)/2)]} x_c'^2)^beta."""

    def __init__(self, size: int, alpha: float, beta: float, bias: float):
        super().__init__()
        self.size, self.alpha, self.beta, self.bias = int(size), float(alpha), float(beta), float(bias)
        self.lo = (self.size - 1) // 2
        self.hi = self.size - 1 - self.lo

    def forward(self, x):
        sq = (x * x).unsqueeze(1)                                   # N, 1, C, H, W
        sq = F.pad(sq, (0, 0, 0, 0, self.lo, self.hi))               # pad the channel axis
        avg = F.avg_pool3d(sq, (self.size, 1, 1), stride=1).squeeze(1)   # sum / size
        return x / (self.bias + self.alpha * avg) ** self.beta

    def extra_repr(self):
        return f"size={self.size}, alpha={self.alpha:g}, beta={self.beta:g}, bias={self.bias:g}"


class WithinChannelLRN(torch.nn.Module):
    """ai.lrponnx::WithinChannelLRN: y = x / (1 + alpha * avgpool_{k, pads, count_include_pad}(x^2))^beta."""

    def __init__(self, alpha: float, beta: float, kernel_shape, pads):
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)
        self.kernel = tuple(int(k) for k in kernel_shape)
        self.pads = [int(p) for p in pads]

    def forward(self, x):
        t, l, b, r = self.pads
        sq = F.pad(x * x, (l, r, t, b))   # zeros, counted in the average (count_include_pad=1)
        avg = F.avg_pool2d(sq, self.kernel, stride=1)
        return x / (1.0 + self.alpha * avg) ** self.beta

    def extra_repr(self):
        return f"alpha={self.alpha:g}, beta={self.beta:g}, kernel={self.kernel}, pads={self.pads}"


class Flatten(torch.nn.Module):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x):
        a = self.axis if self.axis >= 0 else self.axis + x.dim()
        return x.reshape(int(np.prod(x.shape[:a], dtype=np.int64)), -1)


class Reshape(torch.nn.Module):
    def __init__(self, shape, allowzero: int = 0):
        super().__init__()
        self.shape = [int(s) for s in shape]
        self.allowzero = allowzero

    def forward(self, x):
        shape = [x.shape[i] if (s == 0 and not self.allowzero) else s for i, s in enumerate(self.shape)]
        return x.reshape(shape)


class Concat(torch.nn.Module):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, *xs):
        return torch.cat(xs, dim=self.axis)


class SumN(torch.nn.Module):
    """Add/Sum of several activations: stack, then ``zennit.layer.Sum`` (Zennit gives it the Norm rule)."""

    def __init__(self):
        super().__init__()
        self.sum = _Sum(dim=-1)

    def forward(self, *xs):
        shape = torch.broadcast_shapes(*(x.shape for x in xs))
        return self.sum(torch.stack([x.expand(shape) for x in xs], dim=-1))


class AddConst(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.register_buffer("c", c)

    def forward(self, x):
        return x + self.c


class PaddedPool(torch.nn.Module):
    """A pool module after an explicit pad (asymmetric or oversized ONNX pads), cropped to ONNX's output size."""

    def __init__(self, pool: torch.nn.Module, pads, value: float, out_hw=None):
        super().__init__()
        self.pool = pool
        t, l, b, r = pads
        self.torch_pads = (l, r, t, b)
        self.value = value
        self.out_hw = out_hw

    def forward(self, x):
        y = self.pool(F.pad(x, self.torch_pads, value=self.value))
        if self.out_hw is not None:
            y = y[..., : self.out_hw[0], : self.out_hw[1]]
        return y


class PaddedConv(torch.nn.Module):
    """Conv2d after an explicit zero pad (asymmetric ONNX pads). The Conv2d is the child Zennit hooks."""

    def __init__(self, conv: torch.nn.Conv2d, pads):
        super().__init__()
        self.conv = conv
        t, l, b, r = pads
        self.torch_pads = (l, r, t, b)

    def forward(self, x):
        return self.conv(F.pad(x, self.torch_pads))


# ----------------------------------------------------------------------------- helpers

def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _onnx_pool_out(size: int, k: int, s: int, pb: int, pe: int, d: int, ceil: bool) -> int:
    """ONNX Runtime's pooling output size (a ceil window that starts in the end padding is dropped)."""
    eff = (k - 1) * d + 1
    num = size + pb + pe - eff
    out = (math.ceil(num / s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + pb:
        out -= 1
    return out


def _safe(name: str, used: set) -> str:
    s = re.sub(r"[^0-9A-Za-z_]", "_", name) or "node"
    if s[0].isdigit():
        s = "n_" + s
    base, i = s, 1
    while s in used:
        i += 1
        s = f"{base}_{i}"
    used.add(s)
    return s


# ----------------------------------------------------------------------------- the converter

class OnnxTorch(torch.nn.Module):
    """An ONNX graph as a torch module: one child per node, run in graph order."""

    def __init__(self, model: onnx.ModelProto, logits: bool = True, shapes: dict | None = None):
        super().__init__()
        g = model.graph
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in self.consts]
        self.steps: list[tuple[str, list[str], list[str]]] = []
        self.layers = torch.nn.ModuleDict()
        self._opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self._shapes = shapes if shapes is not None else _infer_shapes(model)
        used: set = set()
        outputs = [o.name for o in g.output]
        producer = {o: n for n in g.node for o in n.output}
        self.logits_name = outputs[0]
        last = producer.get(outputs[0])
        skip = None
        if logits and last is not None and last.op_type in ("Softmax", "LogSoftmax"):
            self.logits_name = last.input[0]
            skip = id(last)
        for node in g.node:
            if id(node) == skip:
                continue
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
                continue
            mod, ins = self._module(node)
            name = _safe(node.name or node.op_type, used)
            self.layers[name] = mod
            self.steps.append((name, ins, [o for o in node.output[:1]]))
        self.consts = {}  # weights now live in the modules; free the numpy copies

    # ---- node -> module
    def _w(self, name) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.consts[name]).astype(np.float32))

    def _module(self, node):
        op, a = node.op_type, _attrs(node)
        dyn = [i for i in node.input if i and i not in self.consts]
        if node.domain not in ("", "ai.onnx"):
            if node.domain == "ai.lrponnx" and op == "WithinChannelLRN":
                return WithinChannelLRN(a["alpha"], a["beta"], a["kernel_shape"], a["pads"]), dyn
            raise UnsupportedOp(f"{node.domain}::{op}")
        if op == "Conv":
            W = self._w(node.input[1])
            if W.dim() != 4:
                raise UnsupportedOp(f"Conv with {W.dim() - 2} spatial dims")
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise UnsupportedOp("Conv auto_pad")
            pads = list(a.get("pads", [0, 0, 0, 0]))
            group = int(a.get("group", 1))
            conv = torch.nn.Conv2d(W.shape[1] * group, W.shape[0], tuple(W.shape[2:]), stride=tuple(a.get("strides", [1, 1])),
                                   dilation=tuple(a.get("dilations", [1, 1])), groups=group,
                                   bias=len(node.input) > 2 and bool(node.input[2]),
                                   padding=(pads[0], pads[1]) if pads[:2] == pads[2:] else 0)
            with torch.no_grad():
                conv.weight.copy_(W)
                if conv.bias is not None:
                    conv.bias.copy_(self._w(node.input[2]))
            return (conv if pads[:2] == pads[2:] else PaddedConv(conv, pads)), [node.input[0]]
        if op == "Gemm":
            if a.get("transA", 0):
                raise UnsupportedOp("Gemm transA")
            B = self._w(node.input[1])
            W = B if a.get("transB", 0) else B.t()
            alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
            has_c = len(node.input) > 2 and bool(node.input[2])
            lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=has_c)
            with torch.no_grad():
                lin.weight.copy_(alpha * W)
                if has_c:
                    lin.bias.copy_(beta * self._w(node.input[2]).reshape(-1).expand(W.shape[0]))
            return lin, [node.input[0]]
        if op == "MatMul" and node.input[1] in self.consts:
            B = self._w(node.input[1])
            lin = torch.nn.Linear(B.shape[0], B.shape[1], bias=False)
            with torch.no_grad():
                lin.weight.copy_(B.t())
            return lin, [node.input[0]]
        if op == "Relu":
            return torch.nn.ReLU(), dyn
        if op in ("Dropout", "Identity"):
            return torch.nn.Identity(), [node.input[0]]
        if op in ("MaxPool", "AveragePool"):
            return self._pool(node, op, a), [node.input[0]]
        if op == "GlobalAveragePool":
            return torch.nn.AdaptiveAvgPool2d(1), dyn
        if op == "LRN":
            return OnnxLRN(a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)), dyn
        if op == "Concat":
            return Concat(int(a["axis"])), dyn
        if op == "Flatten":
            return Flatten(int(a.get("axis", 1))), dyn
        if op == "Reshape":
            return Reshape(self.consts[node.input[1]].tolist(), int(a.get("allowzero", 0))), [node.input[0]]
        if op in ("Softmax", "LogSoftmax"):
            axis = int(a.get("axis", -1 if self._opset >= 13 else 1))
            if self._opset < 13 and axis != -1:
                raise UnsupportedOp("Softmax with opset < 13 (coerced 2-D)")
            return (torch.nn.Softmax(axis) if op == "Softmax" else torch.nn.LogSoftmax(axis)), dyn
        if op in ("Sum", "Add"):
            consts = [i for i in node.input if i in self.consts]
            if not consts:
                return SumN(), dyn
            if len(dyn) == 1 and len(consts) == 1:
                return AddConst(self._w(consts[0])), dyn
        raise UnsupportedOp(op)

    def _pool(self, node, op, a):
        k = [int(v) for v in a["kernel_shape"]]
        if len(k) != 2:
            raise UnsupportedOp(f"{op} with {len(k)} spatial dims")
        s = [int(v) for v in a.get("strides", [1, 1])]
        d = [int(v) for v in a.get("dilations", [1, 1])]
        pads = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
        ceil = bool(a.get("ceil_mode", 0))
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise UnsupportedOp(f"{op} auto_pad")
        symmetric = pads[:2] == pads[2:] and all(pads[i] <= k[i] // 2 for i in range(2))
        if op == "MaxPool":
            if symmetric:
                return torch.nn.MaxPool2d(k, s, padding=pads[:2], dilation=d, ceil_mode=ceil)
            shape = self._shapes.get(node.input[0])
            out_hw = None
            if shape is not None and all(isinstance(v, int) and v > 0 for v in shape[2:4]):
                out_hw = [_onnx_pool_out(shape[2 + i], k[i], s[i], pads[i], pads[i + 2], d[i], ceil) for i in range(2)]
            return PaddedPool(torch.nn.MaxPool2d(k, s, dilation=d, ceil_mode=ceil), pads, float("-inf"), out_hw)
        if d != [1, 1]:
            raise UnsupportedOp("AveragePool with dilations")
        include = bool(a.get("count_include_pad", 0))
        if symmetric:
            return torch.nn.AvgPool2d(k, s, padding=pads[:2], ceil_mode=ceil, count_include_pad=include)
        if include and not ceil:
            return PaddedPool(torch.nn.AvgPool2d(k, s), pads, 0.0)
        shape = self._shapes.get(node.input[0])
        if not include and shape is not None and all(isinstance(v, int) and v > 0 for v in shape[2:4]) \
                and all(pads[i] <= pads[i + 2] and pads[i] <= k[i] // 2 for i in range(2)):
            # Padding is never counted, so extra end padding only matters through the output size:
            # torch's ceil_mode with the begin pads gives the same windows when the sizes agree.
            want = [_onnx_pool_out(shape[2 + i], k[i], s[i], pads[i], pads[i + 2], 1, ceil) for i in range(2)]
            for mode in (False, True):
                got = [_onnx_pool_out(shape[2 + i], k[i], s[i], pads[i], pads[i], 1, mode) for i in range(2)]
                if got == want:
                    return torch.nn.AvgPool2d(k, s, padding=pads[:2], ceil_mode=mode, count_include_pad=False)
        raise UnsupportedOp("AveragePool with asymmetric pads and count_include_pad=0 or ceil_mode")

    # ---- run
    def forward(self, *inputs):
        env = dict(zip(self.input_names, inputs))
        for name, ins, outs in self.steps:
            env[outs[0]] = self.layers[name](*(env[i] for i in ins))
        return env[self.logits_name]


def _infer_shapes(model: onnx.ModelProto) -> dict:
    """Static shapes of the graph's values (a symbolic batch dim -> None), inferred without the big weights."""
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    sk.graph.node.extend(model.graph.node)
    sk.graph.input.extend(model.graph.input)
    sk.graph.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= 4096 and t.data_location != onnx.TensorProto.EXTERNAL:
            sk.graph.initializer.append(t)       # small: shapes of Reshape etc. may need the values
        else:
            sk.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(sk)
    except Exception:
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return out


def load(path, logits: bool = True) -> OnnxTorch:
    return OnnxTorch(onnx.load(str(path)), logits=logits).eval()


def ort_logits(path, x: np.ndarray, logits_name: str, threads: int = 2) -> np.ndarray:
    """The model's tensor ``logits_name`` on ONNX Runtime (added as an extra graph output if needed)."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    if logits_name not in {o.name for o in model.graph.output}:
        model.graph.output.append(helper.make_tensor_value_info(logits_name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run([logits_name], {sess.get_inputs()[0].name: x})[0]


def check_against_ort(net: OnnxTorch, path, x: np.ndarray, threads: int = 2) -> dict:
    """Compare the torch forward with ORT's on ``x``: max abs error relative to max |ORT logit|."""
    ref = ort_logits(path, x, net.logits_name, threads)
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    abs_err = float(np.max(np.abs(got - ref)))
    scale = float(np.max(np.abs(ref)))
    return {"tensor": net.logits_name, "max_abs_err": abs_err, "max_abs_ref": scale,
            "rel_err": abs_err / max(scale, 1e-30), "ok": abs_err <= 1e-4 * max(scale, 1.0),
            "argmax_equal": bool(np.all(got.argmax(1) == ref.argmax(1)))}


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(2)
    net = load(args.model)
    shape = _infer_shapes(onnx.load(args.model, load_external_data=False))[net.input_names[0]]
    x = np.random.default_rng(0).uniform(-120, 140, size=[args.batch] + shape[1:]).astype(np.float32)
    print(net)
    print(json.dumps(check_against_ort(net, args.model, x), indent=1))

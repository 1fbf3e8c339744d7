"""Check that the benchmark's two sides compute the same thing: lrponnx's explainer vs Zennit on the
torch module of ``bench/onnx_to_torch.py``, with LRN made comparable.

Zennit has no LRN rule, so the timed Zennit column uses the plain gradient through LRN, while
lrponnx uses its Taylor rule: their heatmaps differ. Here both pass relevance through LRN unchanged
(lrponnx ``lrn_rule="identity"``, Zennit ``Pass`` on the LRN modules), which makes every other layer
comparable: the relative L2 error per sample should be small (float32 on both sides).

    python bench/parity.py MODEL.onnx [--composite epsilon-plus-flat] [--batch 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parity(model_path, composite: str, batch: int = 2, threads: int = 2) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
    from zennit.rules import Pass

    import lrponnx
    from lrponnx.compiler.emit import _bounds_from_metadata

    sys.path.insert(0, str(HERE))
    import onnx_to_torch
    from worker import make_input, model_input_info

    torch.set_num_threads(threads)
    name, shape, mean = model_input_info(model_path)
    x = make_input(shape, batch, mean, seed=3)
    low, high = _bounds_from_metadata(onnx.load(str(model_path), load_external_data=False))
    kw = dict(low=low, high=high) if composite == "epsilon-gamma-box" else {}
    explainer = lrponnx.convert(str(model_path), composite, lrn_rule="identity", **kw)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(explainer.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ours = sess.run(["relevance"], {name: x, "target": np.full([len(x)], -1, np.int64)})[0]

    net = onnx_to_torch.load(model_path).eval()
    lrn_types = (onnx_to_torch.OnnxLRN, onnx_to_torch.WithinChannelLRN)
    layer_map = [(lrn_types, Pass())]
    if composite == "epsilon-gamma-box":
        def t(v):
            return torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
        comp = EpsilonGammaBox(low=t(low), high=t(high), layer_map=layer_map)
    else:
        comp = EpsilonPlusFlat(layer_map=layer_map)
    xt = torch.from_numpy(x).requires_grad_(True)
    with comp.context(net):
        out = net(xt)
        onehot = torch.nn.functional.one_hot(out.argmax(1), out.shape[1]).to(out.dtype)
        ref, = torch.autograd.grad(out, xt, grad_outputs=onehot * out.detach())
    ref = ref.numpy()
    a = ours.reshape(batch, -1).astype(np.float64)
    b = ref.reshape(batch, -1).astype(np.float64)
    err = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    return {"model": str(model_path), "composite": composite, "rel_l2_err": err.tolist(),
            "sum_lrponnx": a.sum(1).tolist(), "sum_zennit": b.sum(1).tolist()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--composite", default="epsilon-plus-flat")
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args(argv)
    print(json.dumps(parity(a.model, a.composite, a.batch), indent=1))


if __name__ == "__main__":
    main()

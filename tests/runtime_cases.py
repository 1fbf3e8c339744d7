"""The zoo explainers every runtime is checked on (tests/test_runtimes.py, bench/runtimes.py).

A case is (zoo model, composite, target runtime of the graph forms). Its inputs are one batch of
``n`` samples twice: the first half with a FED target (for every sample a class that is not its
argmax: the second-best logit), the second half with -1 (the argmax default), so one run checks
both. The Python ONNX Runtime reference is taken at ``all`` optimisations; its own spread is the
largest per-sample relative L2 between the four optimisation levels.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import lrponnx

MODELS = {  # zoo name -> (batch of distinct inputs, input scale)
    "cifar10-lrn": (2, 60.0),
    "cifar10-full-caffe": (2, 60.0),
    "bvlc-googlenet": (1, 50.0),   # x2 (fed + default target): batch 2
}
COMPOSITES = ("epsilon-plus-flat", "epsilon-gamma-box")
EXACT = "+exact-forward"  # a composite with this suffix: convert(..., exact_forward=True)
# (model, composite) pairs: every model with every composite, and the Caffe model with its LRN
# nodes kept (--exact-forward; the table had both)
CASES = [(m, c) for m in MODELS for c in COMPOSITES] + [("cifar10-full-caffe", "epsilon-plus-flat" + EXACT)]
LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def has_target_runtime() -> bool:
    """Whether this lrponnx's convert() takes ``target_runtime`` (the WebGPU graph forms)."""
    return "target_runtime" in inspect.signature(lrponnx.convert).parameters


def model_path(name: str, out_dir: Path, shared_data) -> Path:
    """The zoo model's ONNX file (``shared_data()`` is called, and may skip, for the non-bundled)."""
    from lrponnx.model_zoo import registry

    if name == "cifar10-lrn":
        return registry.default_model_path()
    shared_data()
    path = Path(out_dir) / f"{name}.onnx"
    return path if path.exists() else registry.build(name, out_dir)


def session(path, level: str = "all", threads: int = 0) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-sample relative L2 distance of ``a`` from ``b``."""
    n = len(b)
    a, b = a.reshape(n, -1).astype(np.float64), b.reshape(n, -1).astype(np.float64)
    return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)).max())


@dataclass
class Case:
    model: str
    composite: str
    target_runtime: str
    path: Path                      # the explainer, one self-contained file
    feeds: dict                     # input name -> array, including `target`
    reference: dict                 # Python ORT (all optimisations): output name -> array
    spread: float                   # Python ORT's own spread across optimisation levels
    python_ms: dict = field(default_factory=dict)

    @property
    def tolerance(self) -> float:
        return max(1e-5, 2 * self.spread)


def build_case(model: str, composite: str, src: Path, out_dir: Path, target_runtime: str = "any") -> Case:
    kw = {"target_runtime": target_runtime} if target_runtime != "any" or has_target_runtime() else {}
    if composite.endswith(EXACT):
        kw["exact_forward"] = True
    explainer = lrponnx.convert(str(src), composite.removesuffix(EXACT), **kw)
    path = Path(out_dir) / f"{model}.{composite}.{target_runtime}.onnx"
    onnx.save(explainer, str(path))
    n, scale = MODELS[model]
    sess = session(path)
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else n for d in inp.shape]
    shape[0] = n
    x = np.random.default_rng(sum(map(ord, model))).normal(0, scale, shape).astype(np.float32)
    logits = sess.run([sess.get_outputs()[0].name], {inp.name: x, "target": np.full([n], -1, np.int64)})[0]
    second = np.argsort(logits.reshape(n, -1), axis=1)[:, -2]          # a class that is not the argmax
    feeds = {inp.name: np.concatenate([x, x]), "target": np.concatenate([second, np.full([n], -1)]).astype(np.int64)}
    outs = {}
    for level in LEVELS:
        s = session(path, level)
        outs[level] = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
    ref = outs["all"]
    spread = max(rel_l2(o["relevance"], ref["relevance"]) for o in outs.values())
    return Case(model, composite, target_runtime, path, feeds, ref, spread)

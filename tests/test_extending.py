"""docs/extending.md's worked examples, run exactly as written: the code blocks marked
``# example: ...`` are executed (registering a toy rule and a toy op handler in this process), a
small model is converted with them and the heatmap is checked against a float64 numpy reference
written here; the registrations are removed afterwards. Also: registries refuse duplicates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrponnx
from lrponnx.errors import RuleError
from lrponnx.ops import registry
from lrponnx.rules import RULES, base
from doc_examples import example


@pytest.fixture
def toys():
    """Register the page's toy rule and handler; remove them afterwards whatever happens."""
    assert "smooth-epsilon" not in RULES and "Neg" not in registry.HANDLERS
    namespace = {"__name__": "extending_example"}
    try:
        exec(compile(example("rule"), "docs/extending.md (rule)", "exec", dont_inherit=True), namespace)
        exec(compile(example("op"), "docs/extending.md (op)", "exec", dont_inherit=True), namespace)
        yield namespace
    finally:
        RULES.pop("smooth-epsilon", None)
        registry.HANDLERS.pop("Neg", None)


def model(seed: int = 0) -> onnx.ModelProto:
    """x [N, 6] -> Gemm fc1 -> Neg -> Gemm fc2 -> logits [N, 4]."""
    rng = np.random.default_rng(seed)
    inits = {"W1": rng.standard_normal((5, 6)), "b1": 0.3 * rng.standard_normal(5),
             "W2": rng.standard_normal((4, 5)), "b2": 0.3 * rng.standard_normal(4)}
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["z1"], name="fc1", transB=1),
             helper.make_node("Neg", ["z1"], ["n"], name="neg"),
             helper.make_node("Gemm", ["n", "W2", "b2"], ["logits"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 4])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def reference(m: onnx.ModelProto, x: np.ndarray, target: np.ndarray, eps1: float, eps2: float) -> np.ndarray:
    """float64: the logit seed, epsilon (eps2) on fc2, R through Neg unchanged, then
    R_x = x * W1^T (R z1 / (z1^2 + eps1)) on fc1."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    x = x.astype(np.float64)
    z1 = x @ w["W1"].T + w["b1"]
    n = -z1
    z2 = n @ w["W2"].T + w["b2"]
    R2 = np.zeros_like(z2)
    R2[np.arange(len(x)), target] = z2[np.arange(len(x)), target]
    s2 = R2 / (z2 + eps2 * np.where(z2 >= 0, 1.0, -1.0))
    R_n = n * (s2 @ w["W2"])
    R_z1 = R_n
    q1 = R_z1 * z1 / (z1 * z1 + eps1)
    return x * (q1 @ w["W1"])


def run(explainer: onnx.ModelProto, x, target) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(explainer.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(["relevance"], {"x": x, "target": target})[0]


def rel_l2(a, ref) -> float:
    a, ref = np.asarray(a, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("eps1", [None, 0.05, 2.0])  # None: the rule's default (0.01, from the class)
def test_the_documented_rule_and_op_explain_a_model(toys, eps1):
    m = model()
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    target = np.array([0, 3, 1], np.int64)
    spec = "smooth-epsilon" if eps1 is None else f"smooth-epsilon:epsilon={eps1:g}"
    explainer = lrponnx.convert(m, rules=[f"fc1={spec}", "fc2=epsilon:epsilon=0.1"])
    got = run(explainer, x, target)
    ref = reference(m, x, target, eps1=0.01 if eps1 is None else eps1, eps2=0.1)
    assert rel_l2(got, ref) <= 1e-5
    # the stabiliser matters at these sizes: a wrong epsilon would not pass
    assert rel_l2(reference(m, x, target, eps1=(0.01 if eps1 is None else eps1) * 2, eps2=0.1), ref) > 1e-4


def test_the_documented_rule_through_the_cli(toys, tmp_path, capsys):
    from lrponnx.app.cli import main

    src = tmp_path / "toy.onnx"
    onnx.save(model(), src)
    assert main(["convert", str(src), "-o", str(tmp_path / "ex.onnx"), "--rule", "fc1=smooth-epsilon",
                 "--rule", "fc2=epsilon:epsilon=0.1"]) == 0
    x = np.random.default_rng(2).standard_normal((2, 6)).astype(np.float32)
    target = np.array([2, 1], np.int64)
    got = run(onnx.load(tmp_path / "ex.onnx"), x, target)
    assert rel_l2(got, reference(model(), x, target, eps1=0.01, eps2=0.1)) <= 1e-5
    assert main(["rules"]) == 0
    listing = capsys.readouterr().out
    assert "smooth-epsilon" in listing and "epsilon=0.01  added to z^2" in listing


def test_the_documented_rule_checks_and_applies_only_to_linear_layers(toys):
    with pytest.raises(RuleError, match="smooth-epsilon needs epsilon > 0"):
        lrponnx.convert(model(), rules=["fc1=smooth-epsilon:epsilon=0"])
    with pytest.raises(RuleError, match="must be a finite number >= 0"):
        lrponnx.convert(model(), rules=["fc1=smooth-epsilon:epsilon=-1"])
    with pytest.raises(RuleError, match=r"does not apply to 'neg' \(Neg\); allowed: pass"):
        lrponnx.convert(model(), rules=["neg=smooth-epsilon"])


def test_without_the_toy_handler_neg_is_refused():
    with pytest.raises(lrponnx.UnsupportedModelError, match="Neg"):
        lrponnx.convert(model())


def test_registries_refuse_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        @base.register
        @dataclass(frozen=True)
        class Another(base.Rule):
            name: ClassVar[str] = "epsilon"
    with pytest.raises(ValueError, match="already has a handler"):
        registry.handler("Relu")(lambda ctx, unit, R: {})
    with pytest.raises(ValueError, match="no handler to replace"):
        registry.handler("NoSuchOp", replace=True)(lambda ctx, unit, R: {})
    assert "NoSuchOp" not in registry.HANDLERS and RULES["epsilon"].__module__ == "lrponnx.rules.linear"

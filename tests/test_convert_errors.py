"""User mistakes give one clear lrponnx error: unsupported nodes (all listed at once), bad files,
bad rules."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrponnx
from lrponnx import InvalidModelError, LrpOnnxError, RuleError, UnsupportedModelError


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def small_cnn(opset: int = 17) -> onnx.ModelProto:
    """Conv(3->4) - Relu - Flatten - Gemm(4*4*4 -> 5), input [2, 3, 6, 6]."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "W1", "b1"], ["c"], name="conv1", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu1"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "W2", "b2"], ["output"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 5])],
                              [_init("W1", rng.standard_normal((4, 3, 3, 3))), _init("b1", rng.standard_normal(4)),
                               _init("W2", rng.standard_normal((5, 64))), _init("b2", rng.standard_normal(5))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# ------------------------------------------------------------------------------ unsupported nodes

def many_problems() -> onnx.ModelProto:
    """Two unknown-domain nodes, a Softmax in the middle, and a Conv whose weight is a graph input."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["input", "W1"], ["c1"], name="conv_ok", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Swish", ["c1"], ["s1"], name="custom_swish", domain="com.example"),
        helper.make_node("Conv", ["s1", "Wdyn"], ["c2"], name="conv_dynamic_weight", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Softmax", ["c2"], ["sm"], name="softmax_middle", axis=1),
        helper.make_node("Mish", ["sm"], ["m"], name="custom_mish", domain="com.example"),
        helper.make_node("Flatten", ["m"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "W2"], ["output"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "bad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4]),
         helper.make_tensor_value_info("Wdyn", TensorProto.FLOAT, [3, 3, 3, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 5])],
        [_init("W1", rng.standard_normal((3, 3, 3, 3))), _init("W2", rng.standard_normal((5, 48)))],
        value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 4, 4]) for n in ("s1", "m")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])


EXPECTED_OFFENDERS = {
    "custom_swish": "Swish",
    "custom_mish": "Mish",
    "softmax_middle": "Softmax",
    "conv_dynamic_weight": "Conv",
}
STATIC = {k: v for k, v in EXPECTED_OFFENDERS.items() if k != "conv_dynamic_weight"}


def _check_offenders(err: UnsupportedModelError, expected: dict) -> None:
    found = {o.node: o for o in err.offenders}
    assert set(found) == set(expected), f"offenders: {sorted(found)}"
    for name, op in expected.items():
        assert found[name].op_type == op
        assert found[name].why, name
        assert name in str(err) and op in str(err)
    assert "conv_ok" not in found and "fc" not in found
    assert str(len(expected)) in str(err).splitlines()[0]
    assert isinstance(err, LrpOnnxError)


def test_unsupported_nodes_are_listed_all_at_once():
    with pytest.raises(UnsupportedModelError) as info:
        lrponnx.convert(many_problems())
    found = {o.node: o for o in info.value.offenders}
    assert set(STATIC) <= set(found), f"offenders: {sorted(found)}"
    assert "com.example" in found["custom_swish"].why and "com.example" in found["custom_mish"].why
    assert "Softmax" in found["softmax_middle"].why
    assert "conv_ok" not in found and "fc" not in found


def test_unsupported_list_includes_runtime_weight_conv():
    with pytest.raises(UnsupportedModelError) as info:
        lrponnx.convert(many_problems())
    _check_offenders(info.value, EXPECTED_OFFENDERS)
    assert "weight" in {o.node: o for o in info.value.offenders}["conv_dynamic_weight"].why


def test_runtime_weight_conv_alone_is_named():
    m = many_problems()
    g = m.graph
    for node in g.node:  # make the custom nodes and the Softmax harmless: Identity
        if node.name in STATIC:
            node.op_type, node.domain = "Identity", ""
            del node.attribute[:]
    with pytest.raises(UnsupportedModelError) as info:
        lrponnx.convert(m)
    _check_offenders(info.value, {"conv_dynamic_weight": "Conv"})
    assert "weight" in info.value.offenders[0].why


def test_plan_shows_offenders_without_raising():
    p = lrponnx.plan(many_problems())
    found = {o.node: o.op_type for o in p.offenders}
    assert {k: found.get(k) for k in STATIC} == STATIC
    rules = {u.name: u.rule for u in p.units}
    assert rules["conv_ok"] is not None and rules["conv_ok"].name == "flat"


def test_softmax_at_output_is_fine_but_not_two_outputs_deep():
    m = small_cnn()
    m.graph.node[-1].output[0] = "logits"
    m.graph.node.append(helper.make_node("Softmax", ["logits"], ["sm"], name="sm1", axis=1))
    m.graph.node.append(helper.make_node("Softmax", ["sm"], ["output"], name="sm2", axis=1))
    with pytest.raises(UnsupportedModelError) as info:
        lrponnx.convert(m)
    assert [o.node for o in info.value.offenders] == ["sm1"]


def test_output_must_be_batch_by_classes():
    m = small_cnn()
    m.graph.node[-1].output[0] = "logits"
    m.graph.node.append(helper.make_node("Reshape", ["logits", "shape"], ["output"], name="to3d"))
    # [N, K, 1] is a class map (accepted since issue 13); [N, 1, K] has no class axis at 1
    m.graph.initializer.append(numpy_helper.from_array(np.array([2, 1, 5], np.int64), "shape"))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 1, 5]))
    with pytest.raises(UnsupportedModelError, match=r"\[batch, classes\]"):
        lrponnx.convert(m)


# ------------------------------------------------------------------------------------ bad files

@pytest.fixture
def good_bytes() -> bytes:
    return small_cnn().SerializeToString()


def test_missing_file(tmp_path):
    with pytest.raises(InvalidModelError, match="no such file"):
        lrponnx.convert(tmp_path / "nope.onnx")


def test_directory(tmp_path):
    with pytest.raises(InvalidModelError, match="directory"):
        lrponnx.convert(tmp_path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(InvalidModelError, match="empty") as info:
        lrponnx.convert(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize("content", [b"this is not an onnx model\n" * 20, b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
                                     b"\xff" * 64, b"{\"graph\": []}"])
def test_not_onnx(tmp_path, content):
    p = tmp_path / "junk.onnx"
    p.write_bytes(content)
    with pytest.raises(InvalidModelError) as info:
        lrponnx.convert(p)
    msg = str(info.value)
    assert str(p) in msg and ("not an ONNX model" in msg or "checker" in msg), msg
    assert "\n" not in msg.strip()


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_truncated_file(tmp_path, good_bytes, fraction):
    p = tmp_path / "cut.onnx"
    p.write_bytes(good_bytes[: int(len(good_bytes) * fraction)])
    with pytest.raises(InvalidModelError) as info:
        lrponnx.convert(p)
    assert str(info.value).strip(), "the message must say what is wrong"


def test_plan_rejects_bad_files_the_same_way(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(InvalidModelError):
        lrponnx.plan(p)


def test_model_failing_the_checker():
    m = small_cnn()
    m.graph.node[1].input[0] = "no_such_tensor"
    with pytest.raises(InvalidModelError, match="checker"):
        lrponnx.convert(m)


def test_missing_external_data(tmp_path):
    p = tmp_path / "ext.onnx"
    onnx.save(small_cnn(), str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(InvalidModelError, match="external data"):
        lrponnx.convert(p)


def test_good_file_converts(tmp_path, good_bytes):
    p = tmp_path / "good.onnx"
    p.write_bytes(good_bytes)
    assert isinstance(lrponnx.convert(p), onnx.ModelProto)


# ------------------------------------------------------------------------------------- bad rules

@pytest.mark.parametrize("rules, words", [
    (["Conv=foo"], "unknown rule"),
    (["Conv=epsilon:gamma=1"], "no parameter"),
    (["Conv=epsilon:epsilon"], "key=value"),
    (["Conv"], "expected"),
    (["=epsilon"], "expected"),
    (["Conv="], "expected"),
    (["#x=epsilon"], "position"),
    (["#99=epsilon"], "no node"),
    (["NoSuchNode=epsilon"], "no node"),
    (["Relu=zplus"], "does not apply"),
    (["Conv=winner-take-all"], "does not apply"),
    (["Gemm=norm"], "does not apply"),
    (["Conv=epsilon:epsilon=abc"], "epsilon"),
    (["Conv=gamma:gamma=big"], "gamma"),
    (["Conv=zbox"], "bounds"),
    (["Conv=zbox:low=-1"], "bounds"),
    (["Conv=zbox:low=-1/0,high=1/2"], "per channel"),
    (["Conv=taylor"], "does not apply"),
])
def test_bad_rule_overrides(rules, words):
    with pytest.raises(RuleError) as info:
        lrponnx.convert(small_cnn(), rules=rules)
    assert words in str(info.value), str(info.value)


@pytest.mark.parametrize("params", ["alpha=2,beta=2", "alpha=1,beta=1", "alpha=3,beta=1", "alpha=0.5,beta=-0.5",
                                    "alpha=-1,beta=-2", "alpha=1.5"])
def test_alpha_beta_must_differ_by_one(params):
    with pytest.raises(RuleError, match="alpha - beta = 1"):
        lrponnx.convert(small_cnn(), rules=[f"Conv=alpha-beta:{params}"])


@pytest.mark.parametrize("params", ["alpha=2,beta=1", "alpha=1,beta=0", "alpha=1.5,beta=0.5"])
def test_alpha_beta_valid_values(params):
    assert lrponnx.convert(small_cnn(), rules=[f"Conv=alpha-beta:{params}"]) is not None


def test_bad_options():
    with pytest.raises(RuleError, match="unknown composite"):
        lrponnx.convert(small_cnn(), composite="epsilon-magic")
    with pytest.raises(RuleError, match="bounds"):  # zbox needs bounds (no preprocessing metadata here)
        lrponnx.convert(small_cnn(), composite="epsilon-gamma-box")
    with pytest.raises(RuleError):
        lrponnx.convert(small_cnn(), lrn_rule="magic")
    with pytest.raises(RuleError):
        lrponnx.convert(small_cnn(), lrn_denominator="magic")
    with pytest.raises(LrpOnnxError):
        lrponnx.convert(small_cnn(), seed="zero")


def test_plan_reports_rule_errors_too():
    with pytest.raises(RuleError):
        lrponnx.plan(small_cnn(), rules=["Conv=alpha-beta:alpha=2,beta=2"])

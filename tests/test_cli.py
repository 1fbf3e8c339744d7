"""The command line: exit codes, one-line errors, no half-written files."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrponnx.app.cli import main
from explainer_feeds import with_target


def _mlp(path, unknown_ops: int = 0):
    rng = np.random.default_rng(0)
    W1 = numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "W1")
    W2 = numpy_helper.from_array(rng.normal(size=(6, 3)).astype(np.float32), "W2")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu")]
    last = "a"
    domain_imports = []
    for k in range(unknown_ops):
        nodes.append(helper.make_node("Mystery", [last], [f"m{k}"], name=f"mystery{k}", domain="com.example"))
        last = f"m{k}"
        domain_imports = [helper.make_opsetid("com.example", 1)]
    nodes.append(helper.make_node("MatMul", [last, "W2"], ["y"], name="fc2"))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [W1, W2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)] + domain_imports)
    if unknown_ops:
        m.graph.value_info.extend(helper.make_tensor_value_info(f"m{k}", TensorProto.FLOAT, ["N", 6])
                                  for k in range(unknown_ops))
    onnx.save(m, path)
    return path


def test_convert_writes_a_runnable_explainer(tmp_path, capsys):
    src = _mlp(tmp_path / "mlp.onnx")
    out = tmp_path / "ex.onnx"
    assert main(["convert", str(src), "-o", str(out), "--composite", "epsilon-plus"]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    y, r = sess.run(["y", "relevance"], with_target(sess, {"x": x}))
    assert r.shape == x.shape and np.isfinite(r).all()


def test_convert_exact_forward_keeps_the_lrn_node(tmp_path):
    rng = np.random.default_rng(2)
    W = numpy_helper.from_array(rng.normal(size=(4 * 3 * 3, 5)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]),
                           helper.make_node("LRN", ["h"], ["n"], size=3, alpha=0.1, beta=0.75, bias=1.0),
                           helper.make_node("Flatten", ["n"], ["f"]),
                           helper.make_node("MatMul", ["f", "W"], ["y"])], "lrn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [W])
    src = tmp_path / "lrn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    x = rng.normal(size=(2, 4, 3, 3)).astype(np.float32) * 3
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    for flag, lrn_nodes in (([], 0), (["--exact-forward"], 1)):
        out = tmp_path / f"ex{lrn_nodes}.onnx"
        assert main(["convert", str(src), "-o", str(out)] + flag) == 0
        assert sum(n.op_type == "LRN" for n in onnx.load(str(out)).graph.node) == lrn_nodes
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        y = sess.run(["y"], with_target(sess, {"x": x}))[0]
        if lrn_nodes:
            np.testing.assert_array_equal(y, want)
        else:
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_inspect_lists_rules_and_offenders(tmp_path, capsys):
    src = _mlp(tmp_path / "bad.onnx", unknown_ops=2)
    assert main(["inspect", str(src)]) == 3  # 3: the model has nodes that cannot be explained
    text = capsys.readouterr().out
    assert "fc1" in text and "flat" in text and "fc2" in text
    assert "mystery0" in text and "mystery1" in text and "cannot be explained" in text


def test_convert_refuses_every_unsupported_node_and_writes_nothing(tmp_path, capsys):
    src = _mlp(tmp_path / "bad.onnx", unknown_ops=2)
    out = tmp_path / "ex.onnx"
    assert main(["convert", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mystery0" in err and "mystery1" in err and "Mystery" in err
    assert list(tmp_path.iterdir()) == [src]


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage-not-onnx" * 3, None])
def test_bad_files_give_one_line_and_exit_2(tmp_path, capsys, content):
    src = tmp_path / "model.onnx"
    if content is None:  # truncated real model
        good = _mlp(tmp_path / "good.onnx").read_bytes()
        src.write_bytes(good[: len(good) // 2])
    else:
        src.write_bytes(content)
    out = tmp_path / "ex.onnx"
    assert main(["convert", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrponnx: error:") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_missing_file_and_bad_rule(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    src = _mlp(tmp_path / "mlp.onnx")
    assert main(["convert", str(src), "-o", str(tmp_path / "o.onnx"), "--rule", "fc1=nonsense"]) == 2
    assert "unknown rule" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "lrponnx.app.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "lrponnx" in res.stdout


def test_explainer_api_targets(tmp_path):
    import lrponnx

    src = _mlp(tmp_path / "mlp.onnx")
    ex = lrponnx.Explainer(str(src), composite="epsilon-plus")
    x = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    out = ex.explain(x)
    assert out.relevance.shape == x.shape
    assert out.target.tolist() == out.outputs["y"].argmax(1).tolist()
    per_sample = ex.explain(x, target=[0, -1, 2])
    assert per_sample.target.tolist() == [0, int(out.outputs["y"][1].argmax()), 2]
    np.testing.assert_allclose(per_sample.relevance[1], out.relevance[1], rtol=1e-6, atol=1e-7)
    with pytest.raises(lrponnx.LrpOnnxError, match="out of range"):
        ex.explain(x, target=3)
    with pytest.raises(lrponnx.LrpOnnxError, match="entries"):
        ex.explain(x, target=[0, 1])


# -- external data: `convert` leaves the weights on disk and copies them file to file ------------

def _external_cnn(tmp_path):
    """A small CNN (conv weights > 1 KiB) saved with every tensor in one external data file."""
    rng = np.random.default_rng(3)
    W1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "W1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1")
    W2 = numpy_helper.from_array(rng.normal(0, 0.3, (5, 8 * 6 * 6)).astype(np.float32), "W2")
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W2"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [W1, b1, W2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "src" / "cnn.onnx"
    src.parent.mkdir()
    onnx.save(onnx.ModelProto.FromString(m.SerializeToString()), str(src), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    return m, src


def test_convert_external_data_model_equals_in_memory_conversion(tmp_path):
    import lrponnx

    model, src = _external_cnn(tmp_path)
    out = tmp_path / "out" / "ex.onnx"
    out.parent.mkdir()
    assert main(["convert", str(src), "-o", str(out), "--composite", "epsilon-plus-flat"]) == 0
    saved = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in saved.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"ex.onnx.data"}  # the weights were copied beside the explainer, not referenced
    (tmp_path / "src" / "weights.bin").unlink()  # the explainer does not need the source any more
    x = np.random.default_rng(4).normal(size=(3, 3, 6, 6)).astype(np.float32)
    feeds = {"x": x, "target": np.full([3], -1, np.int64)}
    from_cli = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    eager = lrponnx.convert(model, composite="epsilon-plus-flat")
    in_memory = ort.InferenceSession(eager.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(from_cli, in_memory):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_convert_with_broken_external_data_fails_cleanly(tmp_path, capsys, damage):
    _, src = _external_cnn(tmp_path)
    data = tmp_path / "src" / "weights.bin"
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:-100])
    out = tmp_path / "ex.onnx"
    assert main(["convert", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "external data" in err and "weights.bin" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "ex.onnx.data").exists()


def test_save_model_external_keeps_every_tensor_encoding(tmp_path):
    """float_data / int64_data / raw_data initializers (and small inline ones) survive the
    external-data writer bit for bit."""
    from lrponnx.files import save_model

    rng = np.random.default_rng(5)
    W = rng.normal(size=(40, 30)).astype(np.float32)
    b = rng.normal(size=40).astype(np.float32)
    shape = np.array([-1, 40], np.int64)
    inits = [helper.make_tensor("W", TensorProto.FLOAT, W.shape, W.ravel().tolist()),     # float_data
             numpy_helper.from_array(b, "b"),                                               # raw_data, < 1 KiB
             helper.make_tensor("shape", TensorProto.INT64, [2], shape.tolist())]          # int64_data
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1),
                           helper.make_node("Reshape", ["h", "shape"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 30])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 40])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(3, 30)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = save_model(m, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size >= W.nbytes
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    loaded = onnx.load(str(out))
    np.testing.assert_array_equal(numpy_helper.to_array([t for t in loaded.graph.initializer if t.name == "W"][0]), W)


@pytest.mark.parametrize("where", ["outside", "absolute"])
def test_convert_refuses_external_data_outside_the_model_folder(tmp_path, capsys, where):
    """The same rule as onnx's loader: a model cannot make `convert` copy an arbitrary file."""
    _, src = _external_cnn(tmp_path)
    secret = tmp_path / "secret.bin"
    (tmp_path / "src" / "weights.bin").rename(secret)
    m = onnx.load(str(src), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin" if where == "outside" else str(secret)
    onnx.save(m, str(src))
    out = tmp_path / "ex.onnx"
    assert main(["convert", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "external data" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "ex.onnx.data").exists()

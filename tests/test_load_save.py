"""The graph layer's file handling without onnx's private API (issue 12): which external-data
locations a model may use (the same as onnx's own public loader accepts), the tensor walker, and
that a lazily loaded model is saved without reading its weights into memory."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrponnx.compiler.load import external_file, model_tensors, read_model
from lrponnx.errors import InvalidModelError


def _gemm_model(tmp_path, location="w.bin"):
    """A Gemm model whose weight lives in external file ``location`` (relative to the model)."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "real.bin").write_bytes(w.tobytes())
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", location
    path = folder / "model.onnx"
    onnx.save(m, str(path))
    return path, w


def _onnx_accepts(path) -> bool:
    """The reference: onnx's public eager loader."""
    try:
        onnx.load(str(path), load_external_data=True)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("location", ["real.bin", "sub/../real.bin", "./real.bin", "link.bin", "out.bin",
                                      "../secret.bin", "ABS", "missing.bin", ".", "sub"])
def test_external_locations_follow_onnx_loader(tmp_path, location):
    """Our check (read_model lazy) accepts exactly the locations that onnx's loader accepts."""
    (tmp_path / "secret.bin").write_bytes(np.zeros(12, np.float32).tobytes())
    if location == "ABS":
        location = str(tmp_path / "m_real.bin")
    path, w = _gemm_model(tmp_path, location)
    folder = path.parent
    (folder / "sub").mkdir()
    os.symlink("real.bin", folder / "link.bin")
    os.symlink("../secret.bin", folder / "out.bin")
    if location.endswith("m_real.bin"):
        (tmp_path / "m_real.bin").write_bytes(w.tobytes())
    want = _onnx_accepts(path)
    try:
        m = read_model(path, lazy_weights=True)
        got = True
    except InvalidModelError as e:
        assert "external data" in str(e)
        got = False
    assert got == want, (location, want)
    if got:
        from lrponnx.compiler.load import tensor_array

        np.testing.assert_array_equal(tensor_array(m.graph.initializer[0]), w)


def test_external_file_messages(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"1234")
    assert external_file(tmp_path, "a.bin", "t") == tmp_path / "a.bin"
    for location, words in [("", "empty"), ("/etc/passwd", "absolute"), ("../a.bin", "outside"),
                            ("nothing.bin", "does not exist")]:
        with pytest.raises(ValueError, match=words):
            external_file(tmp_path, location, "t")


def test_model_tensors_finds_every_tensor():
    """Initializers, Constant values, tensor lists, subgraph initializers and constants, and the
    constants of model-local functions; names chosen by hand, not read back from the walker."""
    def const(name):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.ones(2, np.float32), name))

    then_g = helper.make_graph([const("c_then")], "then", [], [helper.make_tensor_value_info("c_then", 1, [2])],
                               [numpy_helper.from_array(np.ones(2, np.float32), "init_then")])
    else_g = helper.make_graph([const("c_else")], "else", [], [helper.make_tensor_value_info("c_else", 1, [2])])
    if_node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    listed = helper.make_node("Foo", [], ["z"], domain="custom", ts=[numpy_helper.from_array(np.ones(1), "in_list")])
    g = helper.make_graph([const("c_main"), if_node, listed], "g",
                          [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", 1, [2])],
                          [numpy_helper.from_array(np.ones(2, np.float32), "init_main")])
    f = helper.make_function("local", "F", [], ["o"], [const("c_func")], [helper.make_opsetid("", 17)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], functions=[f])
    names = sorted(t.name for t in model_tensors(m))
    assert names == sorted(["init_main", "c_main", "init_then", "c_then", "c_else", "in_list", "c_func"])



@pytest.mark.parametrize("where", ["node_name", "subgraph_output", "function_doc", "constant_tensor", "metadata"])
def test_check_text_finds_non_utf8_anywhere(where):
    """A string field with bytes that are not UTF-8, placed by hand at several depths, is named."""
    from lrponnx.compiler.load import check_text

    mark = "QQQQ"
    def name(place):
        return mark if place == where else place

    then_g = helper.make_graph([helper.make_node("Identity", ["a"], [name("subgraph_output")])], "then", [],
                               [helper.make_tensor_value_info(name("subgraph_output"), 1, [2])])
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(2, np.float32),
                                                                               name("constant_tensor")))
    g = helper.make_graph([c, helper.make_node("If", ["cond"], ["y"], name=name("node_name"), then_branch=then_g,
                                               else_branch=then_g)], "g",
                          [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", 1, [2])])
    f = helper.make_function("local", "F", [], [], [], [helper.make_opsetid("", 17)], doc_string=name("function_doc"))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], functions=[f])
    helper.set_model_props(m, {"k": name("metadata")})
    data = m.SerializeToString()
    assert data.count(mark.encode()) >= 1
    bad = onnx.ModelProto.FromString(data.replace(mark.encode(), b"Q\xffQQ"))
    check_text(m)  # the clean model passes
    with pytest.raises(InvalidModelError, match="not UTF-8 text"):
        check_text(bad)


LAZY_PROBE = """
import sys
import lrponnx.app.cli, onnx, onnxruntime, numpy  # imported first: the baseline is measured after them

def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) / 1024

base = hwm()
code = lrponnx.app.cli.main(sys.argv[1:])
print("peak_delta_mib", hwm() - base, file=sys.stderr)
sys.exit(code)
"""


def test_convert_leaves_external_weights_on_disk(tmp_path):
    """`lrponnx convert` of a model with a 128 MiB external weight: the weight is checked, pinned and
    copied file to file, never held in memory (peak grows by well under its size), and the explainer
    computes y = x W^T as numpy does."""
    import subprocess
    import sys

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = rng.standard_normal((1 << 15, 1 << 10), dtype=np.float32)  # 128 MiB
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1 << 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1 << 15])],
                          [numpy_helper.from_array(w, "W")])
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src),
              save_as_external_data=True, location="m.data", size_threshold=0)
    out = tmp_path / "ex.onnx"
    r = subprocess.run([sys.executable, "-c", LAZY_PROBE, "convert", str(src), "-o", str(out),
                        "--composite", "epsilon-plus", "--rule", "Gemm=epsilon"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    delta = float(r.stderr.split("peak_delta_mib")[-1].split()[0])
    assert delta < 64, delta  # the weight alone is 128 MiB
    x = rng.standard_normal((2, 1 << 10), dtype=np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run([sess.get_outputs()[0].name], {"x": x, "target": np.full([2], -1, np.int64)})[0]
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3)


def test_write_model_bytes_equal_serialize_to_string(tmp_path):
    """The streamed writer gives exactly protobuf's own bytes (the reference), for a model with
    fields on both sides of `graph` and of `initializer`: doc strings, value_info, sparse
    initializers, metadata, functions, training info, and initializers of every encoding."""
    from lrponnx.files import write_model

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((300, 7)).astype(np.float32), "W"),
             helper.make_tensor("f", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
             helper.make_tensor("i", TensorProto.INT64, [2], [-1, 1 << 40])]
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "sv"),
                                       numpy_helper.from_array(np.array([1, 3], np.int64), "si"), [5])
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, doc_string="gemm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 300])], inits,
                          doc_string="graph doc", value_info=[helper.make_tensor_value_info("v", 1, [1])],
                          sparse_initializer=[sparse])
    f = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                             [helper.make_opsetid("", 17)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], functions=[f], doc_string="model doc",
                          producer_name="test")
    helper.set_model_props(m, {"k": "v"})
    m.training_info.add().algorithm.name = "train"
    for model in (m, helper.make_model(helper.make_graph([], "empty", [], []))):
        write_model(model, tmp_path / "m.onnx")
        assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()

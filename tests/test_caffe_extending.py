"""docs/extending.md's Caffe example, run exactly as written: the code block marked
``# example: caffe layer`` declares a toy ``Swish`` layer (``y = x * sigmoid(beta_c * x)``, a
learned beta per channel) in this process; a tiny prototxt using it is converted with a
caffemodel written here and with random weights, and the result is checked against numpy.
The declaration is removed afterwards. Also: the registry refuses duplicates and incomplete
declarations, and derives the checks of bottoms from the declaration."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lrponnx.converters.caffe import CaffeLayerError, convert
from lrponnx.converters.caffe import proto as cpb
from lrponnx.converters.caffe.layers import LAYERS, CaffeLayer, register, supported_types, unregister
from doc_examples import example


PROTOTXT = """name: "toy"
input: "data"
input_shape { dim: 2 dim: 3 dim: 4 dim: 5 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 1 bias_term: false } }
layer { name: "act" type: "Swish" bottom: "conv" top: "conv" }
"""


@pytest.fixture
def swish():
    """Register the page's toy layer; remove it afterwards whatever happens."""
    assert "Swish" not in LAYERS
    try:
        exec(compile(example("caffe layer"), "docs/extending.md (caffe layer)", "exec", dont_inherit=True),
             {"__name__": "caffe_extending_example"})
        yield LAYERS["Swish"]
    finally:
        LAYERS.pop("Swish", None)


def caffemodel(path: Path, weight: np.ndarray, beta: np.ndarray) -> Path:
    """A V2 caffemodel with the two layers' blobs (shaped BlobProtos, float data)."""
    net = cpb.NetParameter(name="toy")
    for name, ltype, arr in (("conv", "Convolution", weight), ("act", "Swish", beta)):
        bp = net.layer.add(name=name, type=ltype).blobs.add()
        bp.shape.dim.extend(arr.shape)
        bp.data.extend(arr.reshape(-1).tolist())
    path.write_bytes(net.SerializeToString())
    return path


def run(model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"data": x})[0]


def reference(x: np.ndarray, weight: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The 1x1 convolution and the Swish in float64, written from their definitions."""
    z = np.einsum("oc,nchw->nohw", weight.reshape(3, 3).astype(np.float64), x.astype(np.float64))
    b = beta.astype(np.float64)[None, :, None, None]
    return z / (1.0 + np.exp(-b * z))


def test_the_documented_layer_converts_and_computes_swish(swish, tmp_path):
    assert swish.types == ("Swish",) and swish.parametric and "Swish" in supported_types()
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, 3, 1, 1)).astype(np.float32)
    beta = np.array([0.5, 1.0, 2.5], np.float32)
    proto = tmp_path / "toy.prototxt"
    proto.write_text(PROTOTXT)
    model = convert(proto, caffemodel(tmp_path / "toy.caffemodel", weight, beta))
    # named after the layer, as every converted layer: its node, its initializer, the blob's final value
    assert [n.name for n in model.graph.node] == ["conv", "act#scaled", "act#gate", "act"]
    assert [o.name for o in model.graph.output] == ["conv"]
    assert "act.beta" in {t.name for t in model.graph.initializer}
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    got = run(model, x)
    want = reference(x, weight, beta)
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_the_documented_layer_gets_random_weights_and_checked_blobs(swish, tmp_path):
    proto = tmp_path / "toy.prototxt"
    proto.write_text(PROTOTXT)
    model = convert(proto, random_weights=3)
    beta = next(t for t in model.graph.initializer if t.name == "act.beta")
    values = np.frombuffer(beta.raw_data, np.float32)
    assert list(beta.dims) == [3, 1, 1] and np.all((values >= 0.5) & (values < 1.5))  # uniform(0.5): U(0.5, 1.5)
    # the caffemodel's blob is checked against the shape the declaration implies
    weight = np.ones((3, 3, 1, 1), np.float32)
    bad = caffemodel(tmp_path / "bad.caffemodel", weight, np.ones(4, np.float32))
    with pytest.raises(Exception, match=r"layer 'act' \(Swish\): blob 0 \(beta\) has shape \[4\].*implies \[3\]"):
        convert(proto, bad)
    # the default bottoms=(1, 1) refuses a second bottom by layer name
    two = tmp_path / "two.prototxt"
    two.write_text(PROTOTXT.replace('bottom: "conv" top: "conv" }', 'bottom: "conv" bottom: "data" top: "s" }'))
    with pytest.raises(CaffeLayerError, match=r"layer 'act' \(Swish\): expects exactly one bottom, has 2"):
        convert(two, random_weights=0)


def test_without_the_declaration_the_layer_is_refused(tmp_path):
    assert "Swish" not in LAYERS
    proto = tmp_path / "toy.prototxt"
    proto.write_text(PROTOTXT)
    with pytest.raises(CaffeLayerError, match=r"'act' \(Swish\): no ONNX conversion for Caffe layer type 'Swish'"):
        convert(proto, random_weights=0)


def test_registry_refuses_duplicates_and_incomplete_declarations(swish):
    with pytest.raises(ValueError, match="already declared"):
        register(CaffeLayer(("Swish",), lambda c: [list(c.shapes[0])]))
    with pytest.raises(ValueError, match="already declared"):
        register(CaffeLayer(("Toy", "ReLU"), lambda c: [list(c.shapes[0])]))  # a built-in type
    assert "Toy" not in LAYERS  # nothing of a refused declaration stays
    with pytest.raises(ValueError, match="blobs and random together"):
        CaffeLayer(("Toy",), lambda c: [], blobs=lambda layer, shapes: [("w", [1])])
    unregister("Swish")
    assert "Swish" not in LAYERS

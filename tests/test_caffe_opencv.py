"""The Caffe converter's forward pass against an independent Caffe implementation: OpenCV's dnn module.

For every public deploy file in ``../shared/data/caffe_public`` (SqueezeNet v1.1, MobileNet v2,
ResNet-50, SE-BN-Inception), the three ``bvlc_*`` nets and ``cifar10_full``, plus two fixtures
(``ceil_mode.prototxt``, ``crop_slice.prototxt``) for what no public file here uses:

1. random weights from a fixed seed are written as a binary ``.caffemodel``
   (:func:`random_caffemodel`, built with the project's own protobuf schema);
2. OpenCV reads the prototxt and that caffemodel (``cv2.dnn.readNetFromCaffe``) and runs it;
3. the converter reads the same two files, ONNX Runtime runs the result;
4. on the same random input, the final output, the input of the final Softmax (the logits: the
   probabilities of random nets saturate) and a few intermediate blobs must agree within 1e-4
   relative L2.

OpenCV names a layer's output by the layer, lrponnx a blob's final value by the blob, so each
blob is compared at the layer that writes it last (``relu1`` for an in-place ``conv1``).
Skips when ``cv2`` (``opencv-python-headless<5``; 5.x dropped the Caffe importer) is absent.
``bench/caffe_opencv_parity.py`` writes the table of ``docs/caffe.md`` from :func:`parity`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lrponnx.converters.caffe.convert import convert, load_prototxt, random_caffemodel
from lrponnx.converters.caffe.net import layers_of

cv2 = pytest.importorskip("cv2", reason="OpenCV is the independent Caffe reference: pip install "
                                        "'opencv-python-headless<5' (the test extra has it)")
if not hasattr(getattr(cv2, "dnn", None), "readNetFromCaffe"):  # pragma: no cover - OpenCV 5.x
    pytest.skip(f"OpenCV {cv2.__version__} has no dnn.readNetFromCaffe (5.x dropped it; use <5)",
                allow_module_level=True)

FIXTURES = Path(__file__).parent / "caffe_fixtures"
TOL = 1e-4        # the net's outputs and the logits (input of the final Softmax)
TOL_INNER = 1e-3  # intermediate blobs: float32 rounding grows with depth in a random net (docs/caffe.md)
SEED = 0
ALIASES = {"Split", "Dropout", "Input", "Silence"}


@dataclass
class Net:
    """A net of the parity table: where its prototxt is, which input sizes to run."""
    key: str
    path: str                  # relative to ../shared/data, or "fixture:<file>"
    sizes: list[tuple[int, int] | None] = field(default_factory=lambda: [None])  # None: the declared size
    covers: str = ""

    def prototxt(self, shared: Path | None) -> Path:
        if self.path.startswith("fixture:"):
            return FIXTURES / self.path.split(":", 1)[1]
        if shared is None:
            pytest.skip("needs ../shared/data")
        p = shared / self.path
        if not p.exists():
            pytest.skip(f"{p} is absent")
        return p


NETS = [
    Net("squeezenet_v1.1", "caffe_public/squeezenet_v1.1.prototxt",
        covers="Input layer, fire modules (Concat), ceil rounding (pool3 56 -> 28, floor: 27), global AVE"),
    Net("mobilenet_v2", "caffe_public/mobilenet_v2.prototxt",
        covers="input_dim, depthwise (grouped) convolution, BatchNorm + Scale, Eltwise SUM, 1x1-conv classifier"),
    Net("resnet50", "caffe_public/resnet50.prototxt", covers="BatchNorm + Scale, Eltwise SUM, 7x7 AVE pooling"),
    Net("se_bn_inception", "caffe_public/se_bn_inception.prototxt",
        covers="squeeze-excitation: global AVE, Sigmoid, Reshape, two-bottom Scale (axis 0)"),
    Net("bvlc_alexnet", "caffe/bvlc_alexnet/deploy.prototxt", covers="LRN across channels, grouped conv, IP"),
    Net("bvlc_reference_caffenet", "caffe/bvlc_reference_caffenet/deploy.prototxt", covers="pool before LRN"),
    Net("bvlc_googlenet", "caffe/bvlc_googlenet/deploy.prototxt", covers="inception Concat, padded ceil pooling"),
    Net("cifar10_full", "caffe/cifar10_full/cifar10_full.prototxt",
        covers="V1 format, LRN within channel, AVE pooling"),
    Net("ceil_mode fixture", "fixture:ceil_mode.prototxt", sizes=[(13, 13), (12, 12), (8, 11), (21, 19)],
        covers="`ceil_mode: false` / `true` (MAX, AVE, padded, rectangular)"),
    Net("crop_slice fixture", "fixture:crop_slice.prototxt", sizes=[(20, 20), (22, 18), (24, 21)],
        covers="Crop (axis 2 one offset; axis 1 three offsets), Slice (slice_point, equal parts, slice_dim)"),
]


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def probes(prototxt: Path, n_inner: int = 4) -> list[tuple[str, str]]:
    """``(blob, layer that writes it last)`` pairs to compare: a few evenly spaced intermediate
    blobs, the input of the last Softmax, and the outputs."""
    layers = [L for L in layers_of(load_prototxt(prototxt)) if L.type not in ALIASES]
    last: dict[str, str] = {}
    for L in layers:
        for t in L.tops:
            last[t] = L.name
    single = [(L.tops[0], L.name) for L in layers if len(L.tops) == 1 and last.get(L.tops[0]) == L.name]
    picked: list[tuple[str, str]] = []
    if n_inner >= len(single):
        picked += single
    else:  # evenly spaced, neither the first layer nor the last
        picked += [single[int(i)] for i in np.linspace(0, len(single) - 1, n_inner + 2)[1:-1]]
    soft = [L for L in layers if L.type == "Softmax"]
    if soft and soft[-1].bottoms[0] in last:
        picked.append((soft[-1].bottoms[0], last[soft[-1].bottoms[0]]))
    consumed = {b for L in layers for b in L.bottoms}
    picked += [(t, n) for t, n in single if t not in consumed]
    seen: set[str] = set()
    return [p for p in picked if not (p[0] in seen or seen.add(p[0]))]


@dataclass
class Result:
    key: str
    size: tuple[int, ...]
    errors: dict[str, float]   # blob -> relative L2 (ORT vs OpenCV)
    final: list[str]           # the model's outputs and the logits feeding a final Softmax
    model: onnx.ModelProto

    @property
    def worst_final(self) -> float:
        return max(self.errors[b] for b in self.final)

    @property
    def worst_inner(self) -> float | None:
        return max([e for b, e in self.errors.items() if b not in self.final], default=None)

    def failures(self) -> dict[str, float]:
        return {b: e for b, e in self.errors.items() if not e <= (TOL if b in self.final else TOL_INNER)}


def parity(prototxt: Path, tmp: Path, size: tuple[int, int] | None = None, seed: int = SEED,
           key: str = "") -> Result:
    """Random weights as a caffemodel, OpenCV and ONNX Runtime on the same input; errors per blob."""
    dims = [int(d) for d in load_input_dims(prototxt)]
    x_shape = [1, dims[1], *(size or dims[2:])]
    shape = ",".join(map(str, x_shape)) if size is not None else None
    x = np.random.default_rng(seed + 1).uniform(-120.0, 130.0, x_shape).astype(np.float32)
    cm = tmp / f"{prototxt.stem}_{seed}.caffemodel"
    raw = random_caffemodel(prototxt, seed, input_shape=shape)
    cm.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert(prototxt, cm, input_shape=shape)
        if any(n.op_type == "BatchNormalization" for n in model.graph.node):
            cm.write_bytes(calibrate_batchnorm(model, raw, x))
            model = convert(prototxt, cm, input_shape=shape)

    pairs = probes(prototxt)
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(cm))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    # layer by layer: with fusion (conv + BN + ReLU, concat buffers) the output of a fused layer is
    # not always what is read back under its name
    net.enableFusion(False)
    net.setInput(x)
    cv_out = net.forward([layer for _, layer in pairs])

    ours = run_ort(model, x, [blob for blob, _ in pairs])
    errors = {}
    for (blob, layer), a, b in zip(pairs, ours, cv_out):
        assert a.shape == b.shape, f"{key}: blob {blob!r} (layer {layer!r}): lrponnx {a.shape}, OpenCV {b.shape}"
        errors[blob] = rel_l2(a, b)
    final = [o.name for o in model.graph.output]
    soft = [L for L in layers_of(load_prototxt(prototxt)) if L.type == "Softmax" and L.tops[0] in final]
    final += [L.bottoms[0] for L in soft if L.bottoms[0] in errors]
    assert set(final) <= set(errors), f"{key}: outputs {final} not all compared ({list(errors)})"
    return Result(key, tuple(x_shape), errors, final, model)


def run_ort(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """The named tensors of ``model`` on input ``x`` (intermediate ones exposed as outputs)."""
    probe_model = onnx.ModelProto()
    probe_model.CopyFrom(model)
    have = {o.name for o in probe_model.graph.output}
    for name in names:
        if name not in have:
            have.add(name)
            probe_model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(names, {model.graph.input[0].name: x})


def calibrate_batchnorm(model: onnx.ModelProto, caffemodel: bytes, x: np.ndarray) -> bytes:
    """``caffemodel`` with every BatchNorm's mean and variance set to its input's statistics on ``x``.

    Random BatchNorm statistics normalise nothing: in SE-BN-Inception the gated signal then
    shrinks block after block under BatchNorm's random offsets, and a float32 rounding of the
    input (1e-7) moves the logits by 5e-3, so no two float32 implementations can agree to 1e-4.
    With statistics measured the way training would set them (a variance floor of a tenth of
    the layer's mean variance keeps constant channels from amplifying noise), that sensitivity
    drops to ~1e-6, like a trained net's. One pass finds them all: with every BatchNormalization replaced by
    InstanceNormalization (batch 1: normalisation by the statistics it sees), each layer's input
    is what it will be once the layers before it are calibrated. OpenCV and the converter then
    read the same adjusted file."""
    from lrponnx.converters.caffe import proto as cpb

    m = onnx.ModelProto()
    m.CopyFrom(model)
    bns = {}
    for i, n in enumerate(m.graph.node):
        if n.op_type == "BatchNormalization":
            eps = _attr(n, "epsilon", 1e-5)
            bns[n.name] = n.input[0]
            m.graph.node[i].CopyFrom(onnx.helper.make_node("InstanceNormalization", list(n.input[:3]), list(n.output),
                                                           name=n.name, epsilon=eps))
    vals = run_ort(m, x[:1], list(bns.values()))
    stats = {}
    for name, v in zip(bns, vals):
        var = v.var(axis=(0, 2, 3), dtype=np.float64)
        # a floor: a channel that is (nearly) constant on this one input must not have its
        # rounding noise blown up to unit variance
        stats[name] = (v.mean(axis=(0, 2, 3), dtype=np.float64), var + 0.1 * var.mean())
    net = cpb.NetParameter()
    net.ParseFromString(caffemodel)
    for lp in net.layer:
        if lp.name in stats:
            mu, var = stats[lp.name]
            factor = float(lp.blobs[2].data[0])  # Caffe divides both by this moving-average factor
            for blob, v in ((lp.blobs[0], mu), (lp.blobs[1], var)):
                del blob.data[:]
                blob.data.extend((v.astype(np.float64) * factor).astype(np.float32).tolist())
    return net.SerializeToString()


def load_input_dims(prototxt: Path) -> list[int]:
    net = load_prototxt(prototxt)
    if len(net.input_dim):
        return list(net.input_dim[:4])
    if len(net.input_shape):
        return list(net.input_shape[0].dim)
    for L in layers_of(net):
        if L.type == "Input":
            return list(L.msg.input_param.shape[0].dim)
    raise AssertionError(f"{prototxt}: no input shape")


# --------------------------------------------------------------------------- what each net exercises

def _ops(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        out.setdefault(n.op_type, []).append(n)
    return out


def _attr(n: onnx.NodeProto, name: str, default=None):
    for a in n.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _check_coverage(key: str, model: onnx.ModelProto, prototxt: Path) -> None:
    """The net really exercises what its row claims (so a parity pass means something)."""
    ops = _ops(model)
    text = prototxt.read_text(errors="replace")
    if key == "resnet50" or key == "mobilenet_v2":
        bn = ops.get("BatchNormalization", [])
        assert len(bn) >= 50 and all("Scale layer" in n.doc_string for n in bn), "BatchNorm + Scale folded"
    if key == "mobilenet_v2":
        dw = [n for n in ops["Conv"] if _attr(n, "group", 1) > 1]
        assert len(dw) >= 17, "depthwise convolutions"
    if key == "se_bn_inception":
        inits = {i.name for i in model.graph.initializer}
        gates = [n for n in ops["Mul"] if not any(i in inits for i in n.input)]
        assert len(gates) == 10 and len(ops["Sigmoid"]) == 10, "ten squeeze-excitation gates (Mul of two tensors)"
    if key == "squeezenet_v1.1":
        # BVLC's default ceil rounding: pool3 takes 56 -> 28 (floor would give 27), pool5 28 -> 14 (13)
        assert "ceil_mode" not in text and "round_mode" not in text
        pools = {n.name: n for n in ops["MaxPool"]}
        assert any(_attr(n, "pads", [0] * 4)[2] > 0 for n in pools.values()), "a pooling with ceil end padding"
    if key == "ceil_mode fixture":
        assert "ceil_mode: false" in text and "ceil_mode: true" in text
    if key == "crop_slice fixture":
        assert len(ops["Slice"]) == 2 and len(ops["Split"]) == 3


# --------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def shared():
    from conftest import SHARED_DATA

    return SHARED_DATA if SHARED_DATA.is_dir() else None


@pytest.mark.parametrize("net", NETS, ids=[n.key for n in NETS])
def test_forward_matches_opencv(net: Net, shared, tmp_path):
    prototxt = net.prototxt(shared)
    for size in net.sizes:
        r = parity(prototxt, tmp_path, size, key=net.key)
        _check_coverage(net.key, r.model, prototxt)
        bad = r.failures()
        assert not bad, f"{net.key} {r.size}: relative L2 above {TOL} (outputs, logits) or {TOL_INNER}: {bad}"
        assert len(r.errors) >= 3, f"{net.key}: too few blobs compared: {r.errors}"


def test_round_mode_floor_equals_opencvs_ceil_mode_false(tmp_path):
    """BVLC's ``round_mode: FLOOR`` (OpenCV cannot read it) is the forks' ``ceil_mode: false``:
    the fixture with the BVLC spelling, converted by us, equals OpenCV on the fork spelling."""
    fork = FIXTURES / "ceil_mode.prototxt"
    text = fork.read_text()
    bvlc = tmp_path / "round_mode.prototxt"
    bvlc.write_text(text.replace("ceil_mode: false", "round_mode: FLOOR")
                    .replace("ceil_mode: true", "round_mode: CEIL"))
    assert "ceil_mode:" not in bvlc.read_text() and "round_mode: FLOOR" in bvlc.read_text()
    cm = tmp_path / "w.caffemodel"
    cm.write_bytes(random_caffemodel(fork, SEED))
    x = np.random.default_rng(5).standard_normal((1, 3, 13, 13)).astype(np.float32)
    net = cv2.dnn.readNetFromCaffe(str(fork), str(cm))
    net.setInput(x)
    names = [o.name for o in convert(bvlc, random_weights=0).graph.output]
    ref = dict(zip(names, net.forward(names)))
    model = convert(bvlc, cm)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for name, got in zip(names, sess.run(names, {"data": x})):
        assert got.shape == ref[name].shape, (name, got.shape, ref[name].shape)
        assert rel_l2(got, ref[name]) <= 1e-6, name
    # the floor layers really differ from ceil at this size
    assert ref["max_k2s2_floor"].shape[2:] == (6, 6) and ref["max_k2s2_ceil"].shape[2:] == (7, 7)


def test_fp16_raw_data_blobs_match_opencv(tmp_path):
    """NVIDIA Caffe's ``raw_data`` + ``raw_data_type: FLOAT16`` weights (OpenCV reads them too)."""
    from lrponnx.converters.caffe import proto as cpb

    proto = FIXTURES / "crop_slice.prototxt"
    net32 = cpb.NetParameter()
    net32.ParseFromString(random_caffemodel(proto, 3))
    net16 = cpb.NetParameter()
    for lp in net32.layer:
        nl = net16.layer.add(name=lp.name, type=lp.type)
        for b in lp.blobs:
            nb = nl.blobs.add()
            nb.shape.CopyFrom(b.shape)
            nb.raw_data_type = 2  # FLOAT16
            nb.raw_data = np.asarray(b.data, np.float32).astype("<f2").tobytes()
    cm = tmp_path / "fp16.caffemodel"
    cm.write_bytes(net16.SerializeToString())
    model = convert(proto, cm)
    w = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    exp = np.asarray(net32.layer[[lp.name for lp in net32.layer].index("conv1")].blobs[0].data, np.float32)
    np.testing.assert_array_equal(w["conv1.weight"].ravel(), exp.astype(np.float16).astype(np.float32))
    x = np.random.default_rng(2).standard_normal((1, 3, 20, 20)).astype(np.float32)
    net = cv2.dnn.readNetFromCaffe(str(proto), str(cm))
    net.setInput(x)
    ref = net.forward("fc")
    got = run_ort(model, x, ["fc"])[0]
    assert rel_l2(got, ref) <= TOL


def test_probes_map_in_place_blobs_to_their_last_writer():
    pairs = dict(probes(FIXTURES / "crop_slice.prototxt", n_inner=20))
    assert pairs["conv1"] == "relu1"  # conv1 is overwritten in place by relu1
    assert pairs["fc"] == "fc" and "s0" not in pairs  # Slice tops are compared downstream (reorder)
    assert pairs["crop"] == "crop" and pairs["hsum"] == "hsum"

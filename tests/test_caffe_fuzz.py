"""Fuzzing the Caffe binary readers (caffemodel, binaryproto mean) and the conversion that follows.

Property: whatever the bytes, the converter either produces a model that passes ONNX's checker or
raises one of our user errors (:class:`lrponnx.errors.LrpOnnxError`) -- never another exception,
never a hang. Inputs that once broke it are kept below as explicit regression cases.

The suite runs a modest number of examples. For a longer campaign::

    CAFFE_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/test_caffe_fuzz.py -q -p no:cacheprovider
"""
from __future__ import annotations

import atexit
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrponnx.converters.caffe import convert, proto
from lrponnx.converters.caffe.convert import load_mean_file, parse_caffemodel
from lrponnx.errors import InvalidModelError, LrpOnnxError, UnsupportedModelError

N_EXAMPLES = int(os.environ.get("CAFFE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=os.environ.get("CAFFE_FUZZ_RANDOM") is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)

PROTOTXT = """
name: "fuzz"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "sc" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 3 } }
"""
SHAPES = {"conv": [(2, 3, 3, 3), (2,)], "bn": [(2,), (2,), (1,)], "sc": [(2,), (2,)], "ip": [(3, 32), (3,)]}


def _seed_model(v1: bool) -> bytes:
    """A valid caffemodel for PROTOTXT (V2 with shaped blobs, or V1 with legacy 4-D dims)."""
    net = proto.NetParameter(name="fuzz")
    rng = np.random.default_rng(0)
    for name, shapes in SHAPES.items():
        lp = net.layers.add() if v1 else net.layer.add()
        lp.name = name
        if v1:
            lp.type = {"conv": 4, "ip": 14}.get(name, 0) or 26  # BN/Scale have no V1 enum; any value will do
        else:
            lp.type = {"conv": "Convolution", "bn": "BatchNorm", "sc": "Scale", "ip": "InnerProduct"}[name]
        for shp in shapes:
            b = lp.blobs.add()
            vals = rng.uniform(0.5, 1.5, shp).astype(np.float32)
            b.data.extend(vals.ravel().tolist())
            if v1:
                b.num, b.channels, b.height, b.width = (1,) * (4 - len(shp)) + shp
            else:
                b.shape.dim.extend(shp)
    return net.SerializeToString()


SEED_V2 = _seed_model(False)
SEED_V1 = _seed_model(True)
_TMP = Path(tempfile.mkdtemp(prefix="caffe_fuzz_"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
(_TMP / "net.prototxt").write_text(PROTOTXT)


def _convert_bytes(raw: bytes) -> None:
    cm = _TMP / "w.caffemodel"
    cm.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            convert(_TMP / "net.prototxt", cm)  # a model that passes the checker, or ...
        except LrpOnnxError as e:  # ... one of our errors, with a one-line message
            assert str(e) and "\n" not in str(e)


def _parse(raw: bytes) -> None:
    try:
        out = parse_caffemodel(raw, "fuzz.caffemodel")
    except InvalidModelError as e:
        assert str(e) and "\n" not in str(e)
        return
    for name, blobs in out.items():
        assert isinstance(name, str)
        for b in blobs:
            assert b.data.dtype == np.float32 and b.data.size == int(np.prod(b.shape, dtype=object) if b.shape else 1)


# ----------------------------------------------------------------------------- strategies

@st.composite
def mutated(draw, seed: bytes):
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "dup", "varint"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "dup":
            j = draw(st.integers(i, min(len(data), i + 64)))
            data[j:j] = data[i:j]
        else:  # overwrite with a big or negative varint (lengths, dims, enum values)
            v = draw(st.sampled_from([0, 1, 127, 128, 2**31 - 1, 2**32, 2**63 - 1, 2**64 - 1]))
            enc = bytearray()
            while True:
                b, v = v & 0x7F, v >> 7
                enc.append(b | (0x80 if v else 0))
                if not v:
                    break
            data[i:i + len(enc)] = enc
    return bytes(data)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


FIELDS = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 100, 101, 139, 1001, 536870911])


@st.composite
def wire_message(draw, depth: int = 0):
    """Random protobuf wire data using Caffe's field numbers with any wire type (type confusion)."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        f = draw(FIELDS)
        wt = draw(st.sampled_from([0, 1, 2, 5] + ([3] if depth < 2 else [])))
        key = _varint(f << 3 | wt)
        if wt == 0:
            parts.append(key + _varint(draw(st.integers(-(2**63), 2**64 - 1))))
        elif wt == 1:
            parts.append(key + struct.pack("<d", draw(st.floats(allow_nan=True))))
        elif wt == 5:
            parts.append(key + struct.pack("<f", draw(st.floats(width=32, allow_nan=True))))
        elif wt == 3:  # a group, closed properly or not
            inner = draw(wire_message(depth + 1)) if depth < 2 else b""
            end = _varint(f << 3 | 4) if draw(st.booleans()) else b""
            parts.append(key + inner + end)
        else:
            if depth < 3 and draw(st.booleans()):
                payload = draw(wire_message(depth + 1))
            else:
                payload = draw(st.binary(max_size=40))
            parts.append(key + _varint(len(payload)) + payload)
    return b"".join(parts)


# ----------------------------------------------------------------------------- regression cases
# Inputs found by fuzzing that once broke the reader (see docs/caffe.md, "Fuzzing"), minimised by
# hand, followed by hand-picked edge cases.
FOUND_BY_FUZZING: list[bytes] = [
    # a V2 layer whose name is not valid UTF-8: protobuf returned bytes, not str, for layer.name
    b"\xa2\x06\x06\n\x04\x80onv",
    # the same inside the seed model (the mutation hypothesis found): name b"\x80onv" instead of "conv"
    SEED_V2.replace(b"\n\x04conv", b"\n\x04\x80onv", 1),
    # a blob with double_data beyond float32's range: numpy's cast overflow warning leaked out
    b"\xa2\x06\x13\n\x01c:\x0e:\x03\n\x01\x01B\x08" + struct.pack("<d", 1e300),
]
EDGE_CASES: list[bytes] = [
    b"",
    b"\x00",
    b"\x12\x00",                      # one empty V1 layer: no name
    b"\xa2\x06\x00",                  # one empty V2 layer (field 100)
    b"\x12\x02\x22\x00",              # V1 layer with an empty name
    b"\x12\x06\x22\x01a\x32\x00",     # V1 layer 'a' with one empty blob (legacy dims 0x0x0x0, no data)
]
REGRESSIONS = FOUND_BY_FUZZING + EDGE_CASES


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("raw", REGRESSIONS)
def test_regressions(raw):
    _parse(raw)
    _convert_bytes(raw)


def test_non_utf8_layer_name_is_text():
    out = parse_caffemodel(FOUND_BY_FUZZING[0])
    assert list(out) == ["\\x80onv"]
    with pytest.raises(InvalidModelError, match="infinite"):
        _convert_double_overflow()


def _convert_double_overflow():
    net = proto.NetParameter()
    lp = net.layer.add(name="conv", type="Convolution")
    for shp in SHAPES["conv"]:
        b = lp.blobs.add()
        b.shape.dim.extend(shp)
        b.double_data.extend([1e300] * int(np.prod(shp)))
    cm = _TMP / "dbl.caffemodel"
    cm.write_bytes(net.SerializeToString())
    convert(_TMP / "net.prototxt", cm)


# ----------------------------------------------------------------------------- properties

def test_seeds_are_valid():
    for seed in (SEED_V1, SEED_V2):
        assert set(parse_caffemodel(seed)) == set(SHAPES)
        _convert_bytes(seed)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(raw):
    _parse(raw)


@FUZZ
@given(st.one_of(mutated(SEED_V2), mutated(SEED_V1)))
def test_fuzz_mutated_caffemodel_converts_or_fails_cleanly(raw):
    _parse(raw)
    _convert_bytes(raw)


@FUZZ
@given(wire_message())
def test_fuzz_wire_structure(raw):
    _parse(raw)
    _parse(SEED_V2 + raw)  # trailing garbage after a valid model


FIXTURES = Path(__file__).resolve().parent / "caffe_fixtures"
_PROTO_SEEDS = [(FIXTURES / f).read_text() for f in ("v1_net.prototxt", "layers_b.prototxt", "pooling.prototxt")]
_TOKEN_SUBS = ["0", "1", "-1", "2", "7", "4000000000", "-5", "0.5", "nan", "inf", "true", "MAX", "AVE",
               "STOCHASTIC", "WITHIN_CHANNEL", "FLOOR", '"x"', '"data"', "{", "}", ":", "", "kernel_size",
               "pad", "stride", "group", "axis", "num_output", "top", "bottom", '"Pooling"', '"Eltwise"']


@st.composite
def mutated_prototxt(draw):
    text = draw(st.sampled_from(_PROTO_SEEDS))
    toks = [t for t in text.replace("{", " { ").replace("}", " } ").split(" ")]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(toks) - 1))
        toks[i] = draw(st.sampled_from(_TOKEN_SUBS))
    return " ".join(toks)


@FUZZ
@given(mutated_prototxt())
def test_fuzz_prototxt_converts_or_fails_cleanly(text):
    p = _TMP / "m.prototxt"
    p.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            convert(p, random_weights=0)
        except UnsupportedModelError:
            pass
        except LrpOnnxError as e:
            assert str(e) and "\n" not in str(e)


@FUZZ
@given(st.one_of(st.binary(max_size=256), wire_message()))
def test_fuzz_binaryproto_mean(raw):
    p = _TMP / "mean.binaryproto"
    p.write_bytes(raw)
    try:
        arr = load_mean_file(p)
    except InvalidModelError as e:
        assert "\n" not in str(e)
    else:
        assert arr.ndim in (1, 3) and np.all(np.isfinite(arr))

"""Issue 16 (part A): the CLI never loses a user's data and never shows a traceback.

One table of probe cases: each builds its files in an empty folder, runs ``lrponnx`` (in process
through ``lrponnx.app.cli.main``; the cases marked ``sub`` also as a real ``.venv/bin/lrponnx``
process) and checks the exit code, a fragment of the message, that stderr is one line (for exit
2), that nothing was left on disk (no temporary files, no outputs) and that every input file is
byte-for-byte unchanged. The memory, SIGTERM and ``| head`` probes need a process of their own
and follow the table.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrponnx.app.cli import main

ROOT = Path(__file__).resolve().parents[1]
LRPONNX = Path(sys.executable).with_name("lrponnx")
FIXTURES = Path(__file__).parent / "caffe_fixtures"


# ----------------------------------------------------------------------------------- models

def tiny_cnn(n: int = 8, k: int = 3, name: str = "conv", weight: onnx.TensorProto | None = None,
             pool: str | None = None, op_type: str = "Relu", domain: str = "", channels: int = 2) -> onnx.ModelProto:
    """Conv(1->C, k x k) - Relu - [pool] - GlobalAveragePool - Flatten - Gemm(C->3), input [1,1,n,n].
    ``channels=64``: weights above 1 KiB, which a save with external data writes to the side file."""
    rng = np.random.default_rng(0)
    W = weight if weight is not None else numpy_helper.from_array(
        rng.standard_normal((channels, 1, k, k)).astype(np.float32), "W")
    nodes = [helper.make_node("Conv", ["input", "W"], ["c"], name=name, kernel_shape=[k, k], pads=[1, 1, 1, 1]),
             helper.make_node(op_type, ["c"], ["r"], name="act", domain=domain)]
    last = "r"
    if pool:
        nodes.append(helper.make_node(pool, ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
        last = "p"
    nodes += [helper.make_node("GlobalAveragePool", [last], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "W2"], ["output"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, n, n])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])],
                          [W, numpy_helper.from_array(rng.standard_normal((3, channels)).astype(np.float32), "W2")])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(g, opset_imports=opsets)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())  # no checks: some probes are broken on purpose
    return path


def with_external_data(d: Path, name: str, location: str) -> Path:
    """A model whose weights (all of them) live in the file ``location`` beside it."""
    m = tiny_cnn()
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.random.default_rng(2).standard_normal((2, 1, 3, 3)).astype(np.float32), "W"))
    onnx.save(m, str(d / name), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    return d / name


def non_utf8_node_name(d: Path) -> Path:
    """The node name's bytes replaced by hand (same length), as no ONNX writer would."""
    data = tiny_cnn(name="QQQQQQ").SerializeToString()
    assert data.count(b"QQQQQQ") == 1
    (d / "m.onnx").write_bytes(data.replace(b"QQQQQQ", b"\xff\xfeQQQQ"))
    return d / "m.onnx"


def huge_weight(d: Path) -> Path:
    """A conv weight declaring 2^40 elements and holding none."""
    W = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2, 1, 1 << 20, 1 << 20])
    return save(tiny_cnn(weight=W), d / "m.onnx")


def corrupt_dims(d: Path) -> Path:
    """A conv weight whose dimensions were damaged ([2, 9] instead of [2, 1, 3, 3]); its data fits."""
    m = tiny_cnn()
    W = m.graph.initializer[0]
    del W.dims[:]
    W.dims.extend([2, 9])
    return save(m, d / "m.onnx")


def mlp_two_unknown(d: Path, name_len: int = 0) -> Path:
    """Two nodes of an unknown domain on the relevance path (name_len: the first one's name length)."""
    rng = np.random.default_rng(1)
    n0 = "m" * name_len if name_len else "mystery0"
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1", transB=1),
             helper.make_node("Mystery", ["h"], ["a"], name=n0, domain="com.example"),
             helper.make_node("Mystery", ["a"], ["b"], name="mystery1", domain="com.example"),
             helper.make_node("Gemm", ["b", "W2"], ["y"], name="fc2", transB=1)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                          [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "W1"),
                           numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "W2")],
                          value_info=[helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, 5]) for t in "ab"])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    return save(m, d / "m.onnx")


# ----------------------------------------------------------------------------------- the table

@dataclass
class Case:
    id: str
    setup: Callable[[Path], list]      # builds the files in an empty folder, returns argv
    code: int
    message: str                       # a fragment of stderr ("" when exit 0 and nothing to say)
    outputs: tuple = ()                # files the run may create (successful cases)
    sub: bool = False                  # also run as a real subprocess of .venv/bin/lrponnx
    patch: Callable | None = None      # (monkeypatch) -> None, in-process only
    extra: Callable | None = None      # (folder) -> None, more checks after the run
    lines: int = 1                     # lines on stderr for exit 2 (one; the unsupported nodes' list: more;
                                       # 0: argparse's usage, then its one error line)


def _m(d, channels=2):
    return save(tiny_cnn(channels=channels), d / "m.onnx")


def _convert(*flags, channels=2):
    return lambda d: ["convert", str(_m(d, channels)), "-o", str(d / "out.onnx"), *flags]


def _symlink(d):
    _m(d)
    os.symlink("m.onnx", d / "link.onnx")
    return ["convert", "m.onnx", "-o", "link.onnx"]


def _hardlink(d):
    _m(d)
    os.link(d / "m.onnx", d / "hard.onnx")
    return ["convert", "m.onnx", "-o", "hard.onnx"]


def _fifo(d):
    _m(d)
    os.mkfifo(d / "out.fifo")
    return ["convert", "m.onnx", "-o", "out.fifo"]


def _device(d: Path) -> str:
    """A character device to write onto: as root, a private copy of /dev/null in the test's folder
    (a regression must not replace the machine's own /dev/null, which root could do); otherwise
    /dev/null itself, which a user cannot replace."""
    if os.geteuid() == 0:
        os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return str(d / "null")
    return "/dev/null"


def _device_unchanged(d):
    node = d / "null" if os.geteuid() == 0 else Path("/dev/null")
    assert stat.S_ISCHR(os.lstat(node).st_mode), f"{node} was replaced"


def _enospc(monkeypatch):  # every file lrponnx.files writes goes through os.pwrite
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)


def _enospc_pwrite(monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)


def _read_only_folder(monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", k.get("dir"))
    monkeypatch.setattr(tempfile, "mkstemp", denied)


def _nested_prototxt(d):
    (d / "deep.prototxt").write_text('name: "deep"\n' + "layer { " * 100_000 + "}" * 100_000)
    return ["caffe2onnx", "deep.prototxt", "--random-weights", "1", "-o", "out.onnx"]


def _latin1_prototxt(d):
    raw = (FIXTURES / "v1_net.prototxt").read_bytes()
    (d / "net.prototxt").write_bytes(b"# Ma\xefs caf\xe9 (Latin-1)\n" + raw)
    return ["caffe2onnx", "net.prototxt", "--random-weights", "1", "-o", "out.onnx"]


def _caffe_long_layer_name(d):
    (d / "net.prototxt").write_text(
        'name: "n"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'
        f'layer {{ name: "{"L" * 1_000_000}" type: "Convolution" bottom: "data" top: "c" '
        'convolution_param { num_output: 4 kernel_size: 3 group: 2 } }\n')
    return ["caffe2onnx", "net.prototxt", "--random-weights", "1", "-o", "out.onnx"]


def _caffe(*flags, out="out.onnx"):
    def setup(d):
        shutil.copy(FIXTURES / "v1_net.prototxt", d / "net.prototxt")
        return ["caffe2onnx", "net.prototxt", "--random-weights", "1", "-o", out, *flags]
    return setup


def _file(name):
    def setup(d):
        (d / name).write_bytes(b"precious")
        return []
    return setup


def _then(first, argv):
    def setup(d):
        first(d)
        return argv
    return setup


def _external_data_output(d):
    """The output's side file <out>.data is the input's weights file."""
    with_external_data(d, "m.onnx", "out.onnx.data")
    return ["convert", "m.onnx", "-o", "out.onnx", "--external-data"]


def _truncated(d):
    data = tiny_cnn().SerializeToString()
    (d / "m.onnx").write_bytes(data[: len(data) // 2])
    return ["convert", "m.onnx", "-o", "out.onnx"]


def _umask_mode(d):
    mode = stat.S_IMODE(os.stat(d / "out.onnx").st_mode)
    assert mode == 0o640, oct(mode)  # 0666 & ~umask 027, not mkstemp's 0600


def _inspect(build):
    return lambda d: ["inspect", str(build(d))]


def _long_name_is_cut(d):
    pass  # checked through the message length below (LONG_NAME_CASES)


CASES = [
    # 1. data loss
    Case("same-path", lambda d: ["convert", str(_m(d)), "-o", str(d / "m.onnx")], 2, "is the input file", sub=True),
    Case("same-path-other-spelling", lambda d: (_m(d), (d / "sub").mkdir(),
                                                ["convert", "m.onnx", "-o", "sub/../m.onnx"])[-1], 2,
         "is the input file"),
    Case("symlink-to-input", _symlink, 2, "is the input file"),
    Case("hardlink-to-input", _hardlink, 2, "is the input file"),
    Case("input-external-data", lambda d: ["convert", str(with_external_data(d, "m.onnx", "m.onnx.data")),
                                           "-o", str(d / "m.onnx.data")], 2, "is the input file", sub=True),
    Case("input-named-weights-file", lambda d: ["convert", str(with_external_data(d, "m.onnx", "w.bin")),
                                                "-o", str(d / "w.bin")], 2, "is the input file"),
    Case("output-data-file-is-input", _external_data_output, 2, "is the input file"),
    Case("device-node", lambda d: ["convert", str(_m(d)), "-o", _device(d)], 2, "not a regular file", sub=True,
         extra=_device_unchanged),
    Case("fifo", _fifo, 2, "not a regular file"),
    Case("output-is-folder", lambda d: (_m(d), (d / "dir").mkdir(), ["convert", "m.onnx", "-o", "dir"])[-1], 2,
         "is a folder"),
    Case("parent-is-file", lambda d: ["convert", str(_m(d)), "-o", str(d / "m.onnx" / "x.onnx")], 2,
         "is a file, not a folder", sub=True),
    Case("missing-parent", lambda d: ["convert", str(_m(d)), "-o", str(d / "nodir" / "x.onnx")], 2,
         "does not exist"),
    Case("caffe2onnx-onto-prototxt", _caffe(out="net.prototxt"), 2, "is the input file"),
    Case("caffe2onnx-device-node", lambda d: _caffe(out=_device(d))(d), 2, "not a regular file",
         extra=_device_unchanged),
    Case("caffe2onnx-missing-parent", _caffe(out="nodir/out.onnx"), 2, "does not exist"),
    Case("zoo-build-onto-file", _then(_file("f"), ["zoo", "build", "cifar10-lrn", "-o", "f"]), 2,
         "exists and is not a folder"),
    Case("demo-onto-file", _then(_file("f"), ["demo", "-o", "f"]), 2, "exists and is not a folder"),
    # 4. silent garbage
    Case("epsilon-inf", _convert("--epsilon", "inf"), 2, "epsilon must be a finite number >= 0", sub=True),
    Case("gamma-nan", _convert("--gamma", "nan"), 2, "gamma must be a finite number >= 0"),
    Case("gamma-negative", _convert("--gamma", "-1"), 2, "gamma must be a finite number >= 0, got -1"),
    Case("low-nan", _convert("--low", "nan", "--high", "1"), 2, "low must be finite"),
    Case("lrn-epsilon-negative", _convert("--lrn-epsilon", "-1"), 2, "--lrn-epsilon"),
    Case("zbox-low-above-high", _convert("--composite", "epsilon-gamma-box", "--low", "1", "--high", "0"), 2,
         "low must be <= high"),
    Case("zbox-low-above-high-per-channel", _convert("--low", "0,0,1", "--high", "1,1,0"), 2, "(channel 2)"),
    Case("rule-epsilon-nan", _convert("--rule", "conv=epsilon:epsilon=nan"), 2, "epsilon must be a finite number"),
    Case("rule-zbox-low-above-high", _convert("--rule", "conv=zbox:low=1,high=-1"), 2, "low must be <= high"),
    # 5. tracebacks
    Case("non-utf8-node-name", lambda d: ["convert", str(non_utf8_node_name(d)), "-o", "out.onnx"], 2,
         "not UTF-8 text", sub=True),
    Case("weight-2^40-elements", lambda d: ["convert", str(huge_weight(d)), "-o", "out.onnx"], 2,
         "declare 2,199,023,255,552 elements"),
    Case("weight-2^40-elements-inspect", _inspect(huge_weight), 2, "declare 2,199,023,255,552 elements"),
    Case("kernel-larger-than-input", lambda d: ["convert", str(save(tiny_cnn(k=20), d / "m.onnx")), "-o", "o.onnx"],
         2, "larger than its input"),
    Case("kernel-larger-than-input-inspect", _inspect(lambda d: save(tiny_cnn(k=20), d / "m.onnx")), 2,
         "larger than its input"),
    Case("corrupt-weight-dims", _inspect(corrupt_dims), 2, "corrupt dimensions"),
    Case("prototxt-nested-100000", _nested_prototxt, 2, "nested too deeply", sub=True),
    Case("input-shape-20-digits", _caffe("--input-shape", "1,3,12345678901234567890,5"), 2, "too large"),
    Case("disk-full", _convert(), 2, "No space left on device", patch=_enospc),
    Case("disk-full-external-data", _convert("--external-data", channels=64), 2, "No space left on device", patch=_enospc_pwrite),
    Case("input-is-folder", lambda d: ["convert", str(d), "-o", "out.onnx"], 2, "is a directory"),
    # 6. smaller
    Case("caffe-1MB-layer-name", _caffe_long_layer_name, 2, "LLL\u2026LLL"),
    Case("onnx-1MB-node-name", lambda d: ["convert", str(mlp_two_unknown(d, name_len=1_000_000)), "-o", "o.onnx"], 2,
         "mmm\u2026mmm", lines=3),
    Case("latin1-prototxt", _latin1_prototxt, 0, "read it as Latin-1", outputs=("out.onnx",)),
    Case("inspect-unexplainable-exit-3", _inspect(mlp_two_unknown), 3, ""),
    Case("umask-mode", _convert(), 0, "", outputs=("out.onnx",), extra=_umask_mode),
    # what held before, so it keeps holding
    Case("empty-file", lambda d: ((d / "m.onnx").write_bytes(b""), ["convert", "m.onnx", "-o", "o.onnx"])[-1], 2,
         "empty"),
    Case("truncated-file", _truncated, 2, "not an ONNX model"),
    Case("random-bytes", lambda d: ((d / "m.onnx").write_bytes(np.random.default_rng(5).bytes(4096)),
                                    ["convert", "m.onnx", "-o", "o.onnx"])[-1], 2, "not an ONNX model"),
    Case("unsupported-all-listed", lambda d: ["convert", str(mlp_two_unknown(d)), "-o", "o.onnx"], 2,
         "2 node(s) are not supported", lines=3),
    Case("bad-rule", _convert("--rule", "conv"), 2, "bad --rule"),
    Case("bad-composite", _convert("--composite", "nonsense"), 2, "invalid choice", lines=0),
    Case("read-only-folder", _convert(), 2, "Permission denied", patch=_read_only_folder),
]


def _snapshot(d: Path) -> dict:
    """Every entry under ``d`` (hidden ones included): kind, and the bytes' hash of files."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[p.relative_to(d)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[p.relative_to(d)] = stat.S_IFMT(st.st_mode)
    return out


def _check(case: Case, d: Path, before: dict, code: int, err: str) -> None:
    assert code == case.code, f"{case.id}: exit {code}, stderr: {err[:500]}"
    assert "Traceback" not in err, err[:2000]
    assert case.message in err, f"{case.id}: {case.message!r} not in {err[:500]!r}"
    assert max((len(line) for line in err.splitlines()), default=0) < 1000, f"{case.id}: a very long line"
    if case.code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        if case.lines:
            assert len(lines) == case.lines, f"{case.id}: expected {case.lines} line(s), got {lines}"
        assert "error:" in (lines[0] if case.lines else lines[-1])
    after = _snapshot(d)
    made = {p for p in after if p not in before}
    assert {str(p) for p in made} == set(case.outputs), f"{case.id}: left on disk: {sorted(map(str, made))}"
    for p, h in before.items():
        assert after.get(p) == h, f"{case.id}: input {p} was changed or removed"
    if case.extra is not None:
        case.extra(d)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_probe_in_process(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old_umask = os.umask(0o027)
    try:
        argv = case.setup(tmp_path)
        before = _snapshot(tmp_path)
        if case.patch is not None:
            case.patch(monkeypatch)
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    finally:
        os.umask(old_umask)
        monkeypatch.undo()
    err = capsys.readouterr().err
    _check(case, tmp_path, before, code, err)


@pytest.mark.parametrize("case", [c for c in CASES if c.sub], ids=[c.id for c in CASES if c.sub])
def test_probe_as_subprocess(case, tmp_path):
    argv = case.setup(tmp_path)
    before = _snapshot(tmp_path)
    r = subprocess.run([str(LRPONNX), *map(str, argv)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    _check(case, tmp_path, before, r.returncode, r.stderr)


def test_long_names_are_shortened_in_messages(tmp_path, capsys):
    src = mlp_two_unknown(tmp_path, name_len=1_000_000)
    assert main(["convert", str(src), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert len(err) < 1000 and "\u2026" in err and "mystery1" in err
    assert main(["inspect", str(src)]) == 3
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) < 400


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(epsilon=float("inf")), "epsilon must be a finite number >= 0"),
    (dict(gamma=float("nan")), "gamma must be a finite number >= 0"),
    (dict(gamma=-1.0), "gamma must be a finite number >= 0"),
    (dict(low=float("nan"), high=1.0), "low must be finite"),
    (dict(lrn_epsilon=-1.0), "--lrn-epsilon"),
    (dict(composite="epsilon-gamma-box", low=[0.0, 2.0], high=[1.0, 1.0]), "low must be <= high"),
    (dict(rules=["conv=epsilon:epsilon=nan"]), "epsilon must be a finite number"),
    (dict(rules=["conv=alpha-beta:alpha=nan,beta=1"]), "alpha must be a finite number"),
])
def test_python_api_rejects_bad_rule_parameters(kwargs, fragment):
    import lrponnx

    with pytest.raises(lrponnx.RuleError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        lrponnx.convert(tiny_cnn(), **kwargs)


def test_a_broken_plugin_fails_loudly(monkeypatch):
    """A subcommand module that fails to import is our bug: the error propagates (a traceback,
    exit 1), it does not make the subcommand silently disappear (issue 12)."""
    import builtins

    from lrponnx.app import cli

    real = builtins.__import__

    def broken(name, *a, **k):
        if name == "lrponnx.app.evaluate":
            raise ImportError("cannot import name 'nothing' (simulated)")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(ImportError, match="simulated"):
        cli.build_parser()


# ----------------------------------------------------------------------------------- own processes

MEMORY_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np, onnx
    from onnx import TensorProto, helper, numpy_helper
    n, path, pool, ceil = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "W"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node(pool, ["r"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=ceil),
             helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W2"], ["output"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, n, n])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])],
                          [numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "W"),
                           numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "W2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from lrponnx.app.cli import main
    code = main(sys.argv[5:])
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child started from a large pytest
    # process (vfork + exec) would report the parent's peak.
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print("peak_kib", hwm, file=sys.stderr)
    sys.exit(code)
""")


@pytest.mark.parametrize("pool, ceil, composite, code", [
    ("MaxPool", 0, "epsilon-plus-flat", 0),
    ("AveragePool", 0, "epsilon-gamma-box", 0),
    ("MaxPool", 1, "epsilon-plus-flat", 0),
    ("AveragePool", 1, "epsilon-plus-flat", 2),   # its shapes must be measured by a run: refused
])
def test_convert_memory_does_not_grow_with_the_declared_input(tmp_path, pool, ceil, composite, code):
    """A 30000 x 30000 declared input under a 4 GiB address-space limit: converts in little memory
    into a small file (the size-dependent constants are computed by the explainer), or says
    plainly why it cannot; never a segfault."""
    src, out = tmp_path / "big.onnx", tmp_path / "ex.onnx"
    argv = ["convert", str(src), "-o", str(out), "--composite", composite, "--low", "0", "--high", "1"]
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, "30000", str(src), pool, str(ceil), *argv],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    peak_mib = int(r.stderr.split("peak_kib")[-1].split()[0]) / 1024
    assert peak_mib < 400, peak_mib  # was 3.3 GB at 8000 x 8000 (and a segfault at 30000)
    if code == 0:
        assert out.stat().st_size < 64 << 10 and not Path(str(out) + ".data").exists()
    else:
        assert "declared input size is too large" in r.stderr and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["big.onnx"] + (["ex.onnx"] if code == 0 else []))


def test_runtime_constants_equal_stored_constants(monkeypatch):
    """The explainer's run-time forms of the size-dependent constants (used above the limit)
    give the stored constants' relevance, to float rounding, for every rule that has them."""
    import onnxruntime as ort

    import lrponnx
    import lrponnx.ops.context as rel  # sized_const_ok reads the limit there

    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Sub", ["input", "mean"], ["xs"], name="sub"),
             helper.make_node("Conv", ["xs", "W", "B"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 0, 2, 1],
                              strides=[1, 2]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("AveragePool", ["r"], ["p"], name="pool", kernel_shape=[3, 2], strides=[2, 2],
                              pads=[1, 0, 1, 1], count_include_pad=0, ceil_mode=1),
             helper.make_node("Conv", ["p", "W3"], ["c3"], name="conv3", kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W2"], ["output"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 4, 13, 12])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 3])],
                          [numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "W"),
                           numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "B"),
                           numpy_helper.from_array(np.array([.1, .2, .3, .4], np.float32).reshape(1, 4, 1, 1), "mean"),
                           numpy_helper.from_array(rng.standard_normal((5, 6, 1, 1)).astype(np.float32), "W3"),
                           numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "W2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 4, 13, 12)).astype(np.float32)

    def relevance(m):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {"input": x}
        if any(i.name == "target" for i in s.get_inputs()):
            feeds["target"] = np.full([2], -1, np.int64)
        return s.run(["relevance"], feeds)[0]

    for kw in (dict(composite="epsilon-plus-flat"),
               dict(composite="epsilon-gamma-box", low=[-1, -2, -1, 0], high=2.0),
               dict(composite="epsilon-plus", rules=["conv=wsquare", "conv3=zbox:low=-1,high=1"]),
               dict(composite="epsilon-plus", rules=["conv=flat", "conv3=flat"])):
        stored = lrponnx.convert(model, **kw)
        monkeypatch.setattr(rel, "SIZED_CONST_LIMIT", 0)
        computed = lrponnx.convert(model, **kw)
        monkeypatch.undo()
        assert sum(t.ByteSize() for t in computed.graph.initializer) < sum(t.ByteSize() for t in stored.graph.initializer)
        a, b = relevance(stored), relevance(computed)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())


@pytest.mark.parametrize("op, ceil, pads", [("MaxPool", 0, [0, 1]), ("MaxPool", 1, [1, 1]), ("AveragePool", 1, [1, 0]),
                                            ("AveragePool", 0, [2, 2])])
def test_pool_output_size_formula_matches_onnxruntime(op, ceil, pads):
    """The output-size formula (compiler/geometry.py; no ONNX Runtime run at convert time) agrees with
    a run. Random geometries with dilations and several axes: tests/test_geometry.py."""
    from lrponnx.compiler.geometry import pool_output_size
    from ort_ops import run_op

    for size in range(3, 40):
        for k, s in ((2, 2), (3, 2), (3, 3), (5, 4)):
            if k > size + sum(pads) or pads[0] >= k or pads[1] >= k:
                continue
            attrs = dict(kernel_shape=[k], strides=[s], pads=pads, ceil_mode=ceil)
            ran = int(run_op(op, np.ones([1, 1, size], np.float32), opset=22, **attrs).shape[2])
            assert pool_output_size(size, k, s, 1, pads[0], pads[1], bool(ceil)) == ran, (op, ceil, pads, size, k, s)


SLOW_WRITE = textwrap.dedent("""
    import os, sys, time
    from lrponnx import files
    real = os.pwrite
    def slow(fd, data, offset):
        sys.stderr.write("WRITING\\n"); sys.stderr.flush()
        time.sleep(30)
        return real(fd, data, offset)
    os.pwrite = slow
    from lrponnx.app.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_the_write_leaves_nothing(tmp_path, sig, code, word):
    src = save(tiny_cnn(channels=64), tmp_path / "m.onnx")
    before = _snapshot(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, "convert", str(src), "-o", str(tmp_path / "x.onnx"),
                          "--external-data"], stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert line.strip() == "WRITING", line
    assert any(n.name.endswith(".tmp") for n in tmp_path.iterdir())  # the hidden temporary file exists now
    p.send_signal(sig)
    err = p.stderr.read()
    assert p.wait(timeout=60) == code
    assert err.strip() == f"lrponnx: {word}", err
    assert _snapshot(tmp_path) == before  # no .x.onnx.data.*.tmp, no output


def relu_chain(n: int) -> onnx.ModelProto:
    """x -> n Relus (long names) -> Gemm: ``inspect`` prints more than a pipe holds."""
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"relu_{i:05d}_" + "x" * 60) for i in range(n)]
    nodes.append(helper.make_node("Gemm", [f"t{n}", "W"], ["y"], name="fc", transB=1))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                          [numpy_helper.from_array(np.ones((3, 4), np.float32), "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_inspect_into_head_exits_quietly(tmp_path):
    src = save(relu_chain(2000), tmp_path / "m.onnx")
    r = subprocess.run(f"'{LRPONNX}' inspect '{src}' | head -1; echo \"status=${{PIPESTATUS[0]}}\"", shell=True,
                       executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[1] == "status=141", lines  # 2000 lines of ~100 bytes: more than a pipe holds


def test_inspect_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "3: the model has nodes that cannot be explained" in out

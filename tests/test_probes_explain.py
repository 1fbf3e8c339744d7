"""`lrponnx explain` probed as a careless user would (issue 16): each case gives its exit code and one
clear line, leaves nothing half-written behind and never changes an input."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lrponnx.app.cli import main


@pytest.fixture(scope="module")
def explainer(tmp_path_factory) -> Path:
    import lrponnx
    from lrponnx.files import save_model
    from lrponnx.model_zoo.registry import default_model_path

    path = tmp_path_factory.mktemp("model") / "explainer.onnx"
    save_model(lrponnx.convert(str(default_model_path())), path)
    return path


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"g{i}.jpg", quality=90)


# Each case: (id, setup(tmp, model) -> argv after "explain", exit code, fragment of stderr, output folder
# expected afterwards: "absent" (never created), "same" (as before the run), or "results" (the run wrote).
def _out_is_file(tmp, model):
    _images(tmp / "in", 2)
    (tmp / "out.txt").write_text("user data")
    return [model, str(tmp / "in"), "-o", str(tmp / "out.txt")]


def _out_under_file(tmp, model):
    _images(tmp / "in", 2)
    (tmp / "out.txt").write_text("user data")
    return [model, str(tmp / "in"), "-o", str(tmp / "out.txt" / "sub")]


def _cmap_bogus_before_model(tmp, model):
    # the model does not exist and the folder is empty: only a check before any work names the cmap
    (tmp / "in").mkdir()
    return [str(tmp / "no-such-model.onnx"), str(tmp / "in"), "-o", str(tmp / "out"), "--cmap", "bogus"]


def _cmap_bogus(tmp, model):
    _images(tmp / "in", 3)
    return [model, str(tmp / "in"), "-o", str(tmp / "out"), "--cmap", "bogus"]


def _nan_npy(tmp, model):
    (tmp / "in").mkdir()
    a = np.zeros((3, 32, 32), np.float32)
    a[1, 2, 3] = np.nan
    np.save(tmp / "in" / "nan.npy", a)
    return [model, str(tmp / "in" / "nan.npy"), "-o", str(tmp / "out")]


def _huge_npy(tmp, model):
    (tmp / "in").mkdir()
    np.save(tmp / "in" / "huge.npy", np.full((3, 32, 32), 1e38, np.float32))
    return [model, str(tmp / "in" / "huge.npy"), "-o", str(tmp / "out")]


def _target(value):
    def setup(tmp, model):
        _images(tmp / "in", 2)
        return [model, str(tmp / "in"), "-o", str(tmp / "out"), "--target", value]
    return setup


def _corrupt_among_good(tmp, model):
    _images(tmp / "in", 4)
    data = (tmp / "in" / "g1.jpg").read_bytes()
    (tmp / "in" / "g1b.jpg").write_bytes(data[:200])
    return [model, str(tmp / "in"), "-o", str(tmp / "out")]


def _empty_folder(tmp, model):
    (tmp / "in").mkdir()
    return [model, str(tmp / "in"), "-o", str(tmp / "out")]


def _batch(value):
    def setup(tmp, model):
        _images(tmp / "in", 2)
        return [model, str(tmp / "in"), "-o", str(tmp / "out"), "--batch-size", value]
    return setup


def _missing_input(tmp, model):
    _images(tmp / "in", 1)
    return [model, str(tmp / "in"), str(tmp / "nope.jpg"), "-o", str(tmp / "out")]


def _wrong_shape_npy(tmp, model):
    (tmp / "in").mkdir()
    np.save(tmp / "in" / "wrong.npy", np.zeros((3, 8, 8), np.float32))
    _images(tmp / "in", 1)
    return [model, str(tmp / "in" / "wrong.npy"), str(tmp / "in" / "g0.jpg"), "-o", str(tmp / "out")]


def _ray_nobody_home(tmp, model):
    # loopback port 1: nothing listens; refused at once (Ray itself would retry for minutes), or
    # "Ray is not installed" where it is absent: either way one line and nothing written
    _images(tmp / "in", 2)
    return [model, str(tmp / "in"), "-o", str(tmp / "out"), "--ray", "127.0.0.1:1"]


CASES = [
    ("-o onto an existing file", _out_is_file, 2, "is not a folder", "absent"),
    ("-o under a regular file", _out_under_file, 2, "is a file", "absent"),
    ("--cmap bogus is checked before anything", _cmap_bogus_before_model, 2, "unknown colour map 'bogus'", "absent"),
    ("--cmap bogus", _cmap_bogus, 2, "unknown colour map 'bogus'", "absent"),
    ("NaN .npy fails as an item", _nan_npy, 3, "non-finite", "results"),
    ("1e38 .npy fails as an item", _huge_npy, 3, "beyond", "results"),
    ("--target 2**70", _target(str(2 ** 70)), 2, "--target", "absent"),
    ("--target -1", _target("-1"), 2, "predicted class", "absent"),
    ("--target -7", _target("-7"), 2, "predicted class", "absent"),
    ("--target = class count", _target("10"), 2, "out of range: the model has 10 classes", "absent"),
    ("corrupt JPEG among good ones", _corrupt_among_good, 3, "truncated or corrupt", "results"),
    ("an empty folder", _empty_folder, 2, "holds no images", "absent"),
    ("--batch-size 0", _batch("0"), 2, "--batch-size", "absent"),
    ("--batch-size -4", _batch("-4"), 2, "--batch-size", "absent"),
    ("a missing input", _missing_input, 2, "does not exist", "absent"),
    ("a .npy of the wrong shape fails as an item", _wrong_shape_npy, 3, "the model expects [3,32,32]", "results"),
    ("--ray at an address where nothing listens", _ray_nobody_home, 2, "Ray", "absent"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_explain_probe(case, explainer, tmp_path, capsys):
    _, setup, code, fragment, out_after = case
    work = tmp_path / "work"
    work.mkdir()
    argv = setup(work, str(explainer))
    before = _snapshot(work)
    model_before = hashlib.sha256(explainer.read_bytes()).hexdigest()
    started = time.perf_counter()
    assert main(["explain", *argv]) == code
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lrponnx: error:")]
    assert len(errors) == (1 if code == 2 else 0)
    after = _snapshot(work)
    out = work / "out"
    # inputs (everything that was there before) unchanged, the model too
    assert {k: v for k, v in after.items() if k in before} == before
    assert hashlib.sha256(explainer.read_bytes()).hexdigest() == model_before
    new = sorted(set(after) - set(before))
    assert not [n for n in new if n.endswith(".tmp")]
    if out_after == "absent":
        assert new == [] and not out.exists()
        assert elapsed < 30
    else:
        summary = json.loads((out / "summary.json").read_text())
        assert summary["failed"] and all(fragment in f["error"] or fragment in err for f in summary["failed"])
        assert len(summary["done"]) + len(summary["failed"]) == summary["inputs"]


def test_cmap_is_checked_before_reading_any_input(explainer, tmp_path, capsys, monkeypatch):
    """--cmap bogus must not wait for the inputs to be read and explained (it used to fail at the end)."""
    import lrponnx.app.inputs as pre

    _images(tmp_path / "in", 3)
    calls = []
    monkeypatch.setattr(pre, "list_inputs", lambda *a, **k: calls.append(a) or [])
    assert main(["explain", str(explainer), str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--cmap", "x"]) == 2
    assert calls == []
    assert "unknown colour map" in capsys.readouterr().err

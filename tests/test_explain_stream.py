"""`lrponnx explain` at scale: bad inputs skipped and listed, resume after kill -9 / SIGTERM with
byte-identical outputs, another job's folder refused, nothing half-written left behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lrponnx.app.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def explainer(tmp_path_factory) -> Path:
    """The bundled CIFAR-10 model's explainer (32x32 RGB input, 10 classes, preprocessing metadata)."""
    import lrponnx
    from lrponnx.files import save_model
    from lrponnx.model_zoo.registry import default_model_path

    path = tmp_path_factory.mktemp("model") / "explainer.onnx"
    save_model(lrponnx.convert(str(default_model_path())), path)
    return path


def make_images(folder: Path, n: int, seed: int = 0, fmt: str = "PNG") -> list[Path]:
    """n small images with smooth random content (so that predictions vary)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((32, 32), Image.Resampling.BILINEAR)
        p = folder / f"img{i:04d}.{'png' if fmt == 'PNG' else 'jpg'}"
        img.save(p, format=fmt)
        paths.append(p)
    return paths


def outputs(folder: Path) -> dict[str, bytes]:
    """Every result file (not the job's state folder) by name, with its bytes."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lrponnx.app.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_heatmaps(proc: subprocess.Popen, out: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.is_dir() and sum(1 for p in out.glob("*_heatmap.png")) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {count} heatmaps existed: "
                                 f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    raise AssertionError("no heatmaps appeared in time")


def test_bad_inputs_are_reported_skipped_and_listed(explainer, tmp_path, capsys):
    good = make_images(tmp_path / "in", 5, fmt="JPEG")
    data = good[1].read_bytes()
    (tmp_path / "in" / "img0001x.jpg").write_bytes(data[: len(data) // 3])  # cut short
    (tmp_path / "in" / "img0002x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    arr = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
    arr[1, 0, 3, 3] = np.nan
    arr[2] = 1e31          # absurd: float32 products overflow
    arr[3] = 1e20          # finite input, but the relevance overflows to NaN/Inf
    np.save(tmp_path / "batch.npy", arr)
    out = tmp_path / "out"
    code = main(["explain", str(explainer), str(tmp_path / "in"), str(tmp_path / "batch.npy"), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == 5 + 2 + 4
    done = [(d["input"], d.get("index")) for d in summary["done"]]
    assert done == [(str(p), None) for p in good] + [(str(tmp_path / "batch.npy"), 0)]
    failed = {(f["input"], f.get("index")): f["error"] for f in summary["failed"]}
    assert set(failed) == {(str(tmp_path / "in" / "img0001x.jpg"), None), (str(tmp_path / "in" / "img0002x.jpg"), None),
                           (str(tmp_path / "batch.npy"), 1), (str(tmp_path / "batch.npy"), 2),
                           (str(tmp_path / "batch.npy"), 3)}
    assert "truncated or corrupt" in failed[(str(tmp_path / "in" / "img0001x.jpg"), None)]
    assert "non-finite" in failed[(str(tmp_path / "batch.npy"), 1)]
    assert "beyond" in failed[(str(tmp_path / "batch.npy"), 2)]
    assert "not finite" in failed[(str(tmp_path / "batch.npy"), 3)]
    for key in failed:  # each failure said on stderr, by name
        assert Path(key[0]).stem in err
    assert sorted(p.name for p in out.glob("*_heatmap.png")) == \
        sorted([f"{p.stem}_heatmap.png" for p in good] + ["batch_0__0_heatmap.png"])  # name "batch[0]", sample 0
    assert (out / "overview.png").exists() and not temporaries(out)


def test_all_good_exits_zero_and_heatmaps_match_the_api(explainer, tmp_path):
    from lrponnx.app.preprocess import Preprocessing
    from lrponnx.app.render import render
    from lrponnx.app.runtime import Explainer

    imgs = make_images(tmp_path / "in", 7)
    out = tmp_path / "out"
    assert main(["explain", str(explainer), str(tmp_path / "in"), "-o", str(out), "--save-raw",
                 "--batch-size", "3"]) == 0
    # the API on the same batches of 3 gives the same arrays and pixels
    ex = Explainer(str(explainer))
    pre = Preprocessing.from_model(ex.model)
    x = np.stack([pre.load_image(p)[0] for p in imgs])
    rel = np.concatenate([ex.explain(x[i:i + 3]).relevance for i in range(0, 7, 3)])
    for k, p in enumerate(imgs):
        assert np.array_equal(np.load(out / f"{p.stem}_relevance.npy"), rel[k])
        assert np.array_equal(np.asarray(Image.open(out / f"{p.stem}_heatmap.png")), np.asarray(render(rel[k])))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [] and len(summary["done"]) == 7


def test_resume_after_kill_9_gives_the_bytes_of_an_uninterrupted_run(explainer, tmp_path):
    make_images(tmp_path / "in", 400)
    args = ["explain", str(explainer), str(tmp_path / "in"), "--save-raw", "--batch-size", "4"]
    clean = tmp_path / "clean"
    assert main([*args, "-o", str(clean)]) == 0

    out = tmp_path / "out"
    proc = cli(*args, "-o", str(out))
    wait_for_heatmaps(proc, out, 40)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it was killed; the test proves nothing"
    first = out / "img0000_heatmap.png"
    stamp = first.stat().st_mtime_ns
    partial = len(list(out.glob("*_heatmap.png")))
    assert partial < 400

    proc = cli(*args, "-o", str(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resuming:" in err
    assert first.stat().st_mtime_ns == stamp  # finished inputs were not redone
    assert outputs(out) == outputs(clean)
    assert not temporaries(out)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_cleanly_and_the_rerun_finishes(explainer, tmp_path, sig, code):
    make_images(tmp_path / "in", 300, seed=2)
    args = ["explain", str(explainer), str(tmp_path / "in"), "--batch-size", "2"]
    out = tmp_path / "out"
    proc = cli(*args, "-o", str(out))
    wait_for_heatmaps(proc, out, 20)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "run the same command again" in err and "Traceback" not in err
    assert not temporaries(out)
    assert not (out / "summary.json").exists()
    assert main([*args, "-o", str(out)]) == 0
    clean = tmp_path / "clean"
    assert main([*args, "-o", str(clean)]) == 0
    assert outputs(out) == outputs(clean)


def test_rerun_of_a_finished_job_redoes_nothing(explainer, tmp_path):
    make_images(tmp_path / "in", 6)
    args = ["explain", str(explainer), str(tmp_path / "in"), "-o", str(tmp_path / "out")]
    assert main(args) == 0
    before = outputs(tmp_path / "out")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*_heatmap.png")}
    assert main(args) == 0
    assert outputs(tmp_path / "out") == before
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*_heatmap.png")} == stamps


def test_another_job_in_the_same_folder_is_refused_unless_overwrite(explainer, tmp_path, capsys):
    make_images(tmp_path / "in", 5)
    base = ["explain", str(explainer), str(tmp_path / "in"), "-o", str(tmp_path / "out")]
    assert main(base) == 0
    before = outputs(tmp_path / "out")
    capsys.readouterr()
    assert main([*base, "--cmap", "hot"]) == 2
    err = capsys.readouterr().err
    assert "another explain job" in err and "cmap" in err and "--overwrite" in err
    assert outputs(tmp_path / "out") == before
    assert main([*base, "--cmap", "hot", "--overwrite"]) == 0
    after = outputs(tmp_path / "out")
    assert after["img0000_heatmap.png"] != before["img0000_heatmap.png"]


def test_outputs_not_made_by_a_job_are_not_replaced(explainer, tmp_path, capsys):
    make_images(tmp_path / "in", 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "img0001_heatmap.png").write_bytes(b"someone's file")
    assert main(["explain", str(explainer), str(tmp_path / "in"), "-o", str(out)]) == 2
    assert "not made by this job" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["img0001_heatmap.png"]
    assert (out / "img0001_heatmap.png").read_bytes() == b"someone's file"


def test_an_input_in_the_output_folder_is_never_replaced(explainer, tmp_path, capsys):
    folder = tmp_path / "both"
    make_images(folder, 2)
    Image.open(folder / "img0000.png").save(folder / "img0001_heatmap.png")  # an input named like an output
    before = outputs(folder)
    assert main(["explain", str(explainer), str(folder), "-o", str(folder), "--overwrite"]) == 2
    assert "would replace an input" in capsys.readouterr().err
    assert outputs(folder) == before and not (folder / ".lrponnx-explain").exists()


def test_overview_keeps_the_first_32_inputs(explainer, tmp_path):
    make_images(tmp_path / "a", 40)
    make_images(tmp_path / "b", 32)
    assert main(["explain", str(explainer), str(tmp_path / "a"), "-o", str(tmp_path / "oa")]) == 0
    assert main(["explain", str(explainer), *sorted(map(str, (tmp_path / "a").iterdir()))[:32],
                 "-o", str(tmp_path / "ob")]) == 0
    assert (tmp_path / "oa" / "overview.png").read_bytes() == (tmp_path / "ob" / "overview.png").read_bytes()
    assert len(list((tmp_path / "oa" / ".lrponnx-explain" / "rows").iterdir())) == 32


def test_the_same_file_twice_is_two_inputs_and_resumes(explainer, tmp_path):
    (img,) = make_images(tmp_path / "in", 1)
    out = tmp_path / "out"
    assert main(["explain", str(explainer), str(img), str(img), "-o", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*_heatmap.png"))
    assert names == ["in_img0000_1_heatmap.png", "in_img0000_heatmap.png"]
    stamps = [(out / n).stat().st_mtime_ns for n in names]
    assert main(["explain", str(explainer), str(img), str(img), "-o", str(out)]) == 0
    assert [(out / n).stat().st_mtime_ns for n in names] == stamps  # neither was redone


def test_a_write_error_midway_is_one_line_and_the_rerun_finishes(explainer, tmp_path, capsys, monkeypatch):
    import errno

    from lrponnx.app.explain import ExplainJob

    make_images(tmp_path / "in", 12)
    args = ["explain", str(explainer), str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--batch-size", "4"]
    real, calls = ExplainJob._fsync_all, []

    def full_disk(self, paths):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, paths)

    monkeypatch.setattr(ExplainJob, "_fsync_all", full_disk)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "4 of 12" in err and "Traceback" not in err
    assert not temporaries(tmp_path / "out")
    assert len(list((tmp_path / "out").glob("*_heatmap.png"))) == 4
    monkeypatch.setattr(ExplainJob, "_fsync_all", real)
    assert main(args) == 0
    assert main([*args[:4], str(tmp_path / "clean"), *args[5:]]) == 0
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean")


def test_overview_rows_lost_from_the_state_are_recomputed_identically(explainer, tmp_path):
    make_images(tmp_path / "in", 11)
    args = ["explain", str(explainer), str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--batch-size", "4"]
    assert main(args) == 0
    before = outputs(tmp_path / "out")
    rows = tmp_path / "out" / ".lrponnx-explain" / "rows"
    for p in rows.iterdir():
        p.unlink()
    (tmp_path / "out" / "overview.png").unlink()
    assert main(args) == 0
    assert outputs(tmp_path / "out") == before
    assert len(list(rows.iterdir())) == 11

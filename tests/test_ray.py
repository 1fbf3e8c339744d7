"""Explaining on Ray (issue 16): a local cluster (2 CPUs, loopback only, no dashboard) gives the very
files of the single-process run; a Ray Dataset maps to the API's relevance."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'lrponnx[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")

from lrponnx.app.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network: Ray must not report usage
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def explainer(tmp_path_factory) -> Path:
    import lrponnx
    from lrponnx.files import save_model
    from lrponnx.model_zoo.registry import default_model_path

    path = tmp_path_factory.mktemp("model") / "explainer.onnx"
    save_model(lrponnx.convert(str(default_model_path())), path)
    return path


def _inputs(folder: Path) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(22):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.Resampling.BILINEAR).save(folder / f"p{i:02d}.png")
    data = (folder / "p03.png").read_bytes()
    (folder / "p03x.png").write_bytes(data[:100])  # corrupt: fails on the actor, listed like locally
    arr = rng.normal(size=(5, 3, 32, 32)).astype(np.float32)
    arr[2, 0, 0, 0] = np.inf
    np.save(folder.parent / "arr.npy", arr)
    return [str(folder), str(folder.parent / "arr.npy")]


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("arrays_below", [None, 5])
def test_ray_run_writes_the_files_of_the_single_process_run(cluster, explainer, tmp_path, monkeypatch,
                                                           arrays_below):
    import lrponnx.app.explain as explain_cli

    if arrays_below is not None:  # actors send arrays for the first 5 only: the other overview rows are redone
        monkeypatch.setattr(explain_cli, "RAY_ARRAYS_BELOW", arrays_below)
    inputs = _inputs(tmp_path / "in")
    args = ["explain", str(explainer), *inputs, "--batch-size", "4"] + (["--save-raw"] if arrays_below is None else [])
    assert main([*args, "-o", str(tmp_path / "single")]) == 3
    assert main([*args, "-o", str(tmp_path / "ray"), "--ray", "auto", "--ray-actors", "2"]) == 3
    single, on_ray = _outputs(tmp_path / "single"), _outputs(tmp_path / "ray")
    # heatmap (+ raw) for 26 good inputs, summary, overview
    assert len(single) == (2 if arrays_below is None else 1) * 26 + 2
    assert sorted(on_ray) == sorted(single)
    assert [n for n in single if single[n] != on_ray[n]] == []
    # a Ray run resumes like any other: running it again single-process redoes nothing
    assert main([*args, "-o", str(tmp_path / "ray")]) == 3
    assert _outputs(tmp_path / "ray") == single


def test_explain_dataset_maps_rows_to_the_apis_relevance(cluster, explainer):
    from lrponnx.app.preprocess import Preprocessing
    from lrponnx.app.runtime import Explainer
    from lrponnx.app.scale import explain_dataset

    rng = np.random.default_rng(7)
    images = [np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((40, 40)))
              for _ in range(9)]
    ex = Explainer(str(explainer))
    pre = Preprocessing.from_model(ex.model)
    x = np.stack([pre.apply(img) for img in images])  # resized 40 -> 32 and normalised, as the actor must
    want = np.concatenate([ex.explain(x[i:i + 1]).relevance for i in range(len(x))])
    pred = np.concatenate([ex.explain(x[i:i + 1]).target for i in range(len(x))])

    ds = ray.data.from_items([{"image": img, "path": f"img{i}"} for i, img in enumerate(images)])
    rows = sorted(explain_dataset(ds, str(explainer), batch_size=4, actors=2).take_all(), key=lambda r: r["path"])
    assert [r["error"] for r in rows] == [""] * 9
    got = np.stack([r["relevance"] for r in rows])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert [int(r["prediction"]) for r in rows] == pred.tolist()
    assert [int(r["target"]) for r in rows] == pred.tolist()

    tensors = x.copy()
    tensors[4, 1, 2, 3] = np.nan
    ds = ray.data.from_items([{"tensor": t, "path": f"t{i}"} for i, t in enumerate(tensors)])
    rows = sorted(explain_dataset(ds, ex, batch_size=3, actors=1, target=5).take_all(), key=lambda r: r["path"])
    assert "non-finite" in rows[4]["error"] and np.isnan(rows[4]["relevance"]).all()
    assert all(r["error"] == "" and int(r["target"]) == 5 for k, r in enumerate(rows) if k != 4)
    want5 = ex.explain(x[:3], target=5).relevance
    np.testing.assert_allclose(np.stack([rows[k]["relevance"] for k in range(3)]), want5, rtol=1e-5,
                               atol=1e-6 * np.abs(want5).max())

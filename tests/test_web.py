"""``lrponnx web``: the server (routes, addresses, errors), the page's numbers (lrp.js in Node against
lrponnx's Python: Pillow's resize, preprocessing, colour map, overlay) and the page itself in headless
Chromium against the Python explainer.

Tolerances (the page and Python run the same explainer on the same float32 tensor):
* tensor fed to the explainer: bit-identical (JS does Preprocessing.apply in float64, as numpy);
* relevance: relative L2 <= 1e-4 (onnxruntime-web's wasm kernels vs Python ONNX Runtime; measured ~5e-7);
* heatmap / overlay pixels read back from the page's canvases, rendered from the page's own relevance:
  >= 99 % of the pixels identical and none more than one colour-table step (7 grey levels, the largest
  step of coldnhot) apart: the float differences above can move a value across a bin edge;
* rendered from Python's relevance by the page's code: bit-identical to lrponnx.app.render.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from js_harness import CHROMIUM, JS_DIR, missing
from lrponnx.app import render
from lrponnx.app.cli import main
from lrponnx.app.preprocess import Preprocessing
from lrponnx.app.web import server as web

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "lrponnx" / "app" / "web" / "static"
ZOO_MODEL = ROOT / "model_zoo" / "cifar10_lrn.onnx"
# as tests/js/run_browser.mjs: Chromium's software WebGPU adapter (SwiftShader)
WEBGPU_FLAGS = "--enable-unsafe-webgpu --use-webgpu-adapter=swiftshader"


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explainer_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("web") / "cifar10_lrn_explainer.onnx"
    assert main(["convert", str(ZOO_MODEL), "-o", str(out)]) == 0
    return out


@pytest.fixture()
def fake_dist(tmp_path) -> Path:
    """A folder with the file names of onnxruntime-web's dist (contents are placeholders)."""
    d = tmp_path / "dist"
    d.mkdir()
    for f in web.ORT_REQUIRED + web.ORT_WEBGPU:
        (d / f).write_bytes(b"// placeholder " + f.encode())
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Running:
    """make_server in a thread, for the route tests."""

    def __init__(self, app):
        self.server = web.make_server(app, "127.0.0.1", 0)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def get(self, path: str, method: str = "GET"):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.putrequest(method, path, skip_accept_encoding=True)  # the path goes out exactly as given
        c.endheaders()
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, dict(r.getheaders()), body

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------------
# finding onnxruntime-web
# --------------------------------------------------------------------------------------------------
def test_ort_dist_explicit_env_and_search_order(tmp_path, fake_dist, monkeypatch):
    assert web.find_ort_dist(fake_dist, environ={}) == fake_dist.resolve()
    # a package folder or a node_modules' parent is accepted for the flag too
    pkg = tmp_path / "proj" / "node_modules" / "onnxruntime-web"
    pkg.parent.mkdir(parents=True)
    shutil.copytree(fake_dist, pkg / "dist")
    assert web.find_ort_dist(tmp_path / "proj", environ={}) == (pkg / "dist").resolve()
    assert web.find_ort_dist(pkg, environ={}) == (pkg / "dist").resolve()
    # the environment variable, then node_modules under the current folder
    assert web.find_ort_dist(None, environ={web.ORT_ENV: str(fake_dist)}) == fake_dist.resolve()
    assert web.find_ort_dist(None, cwd=tmp_path / "proj", environ={}) == (pkg / "dist").resolve()
    # the flag wins over the variable
    assert web.find_ort_dist(pkg, environ={web.ORT_ENV: str(fake_dist)}) == (pkg / "dist").resolve()


def test_ort_dist_errors_say_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(web, "REPO_ROOT", tmp_path / "norepo")
    with pytest.raises(web.WebError) as e:
        web.find_ort_dist(None, cwd=tmp_path, environ={})
    assert "npm install --ignore-scripts onnxruntime-web" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(web.WebError, match=r"--ort-dist .*not onnxruntime-web's dist folder.*npm install"):
        web.find_ort_dist(tmp_path, environ={})
    with pytest.raises(web.WebError, match=web.ORT_ENV):
        web.find_ort_dist(None, cwd=tmp_path, environ={web.ORT_ENV: str(tmp_path / "nowhere")})


def test_cli_without_onnxruntime_web_is_one_line(explainer_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(web, "REPO_ROOT", tmp_path / "norepo")
    monkeypatch.delenv(web.ORT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["web", str(explainer_path), "--no-browser", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrponnx: error: onnxruntime-web not found") and "npm install" in err
    assert len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# addresses and the explainer
# --------------------------------------------------------------------------------------------------
def test_loopback_check():
    for host in ("127.0.0.1", "127.0.0.5", "::1", "localhost"):
        assert web.is_loopback(host), host
    for host in ("0.0.0.0", "10.1.2.3", "192.168.0.1", "::", "no-such-host.invalid"):
        assert not web.is_loopback(host), host


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10"])
def test_cli_refuses_non_loopback_hosts(explainer_path, fake_dist, host, capsys):
    assert main(["web", str(explainer_path), "--host", host, "--ort-dist", str(fake_dist), "--no-browser"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lrponnx: error: --host {host} is not a loopback address") and "--allow-remote" in err


def test_cli_busy_port(explainer_path, fake_dist, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["web", str(explainer_path), "--port", str(port), "--ort-dist", str(fake_dist),
                     "--no-browser"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lrponnx: error: port {port} on 127.0.0.1 is in use; choose another with --port (0 = any free port)"


def test_cli_refuses_a_plain_model(fake_dist, capsys):
    assert main(["web", str(ZOO_MODEL), "--ort-dist", str(fake_dist), "--no-browser"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not an lrponnx explainer" in err and "lrponnx convert" in err and len(err.splitlines()) == 1


def test_cli_missing_file(fake_dist, tmp_path, capsys):
    assert main(["web", str(tmp_path / "nope.onnx"), "--ort-dist", str(fake_dist), "--no-browser"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_meta_of_the_zoo_explainer(explainer_path):
    model = onnx.load(str(explainer_path))
    served, meta, notes = web.prepare(model, "x.onnx")
    assert notes == [] and served.SerializeToString() == model.SerializeToString()
    zoo = onnx.load(str(ZOO_MODEL))
    zoo_meta = {p.key: p.value for p in zoo.metadata_props}
    assert meta["input"] == {"name": "data", "shape": ["N", 3, 32, 32]}
    assert meta["target_input"] == "target" and meta["relevance_output"] == "relevance"
    assert meta["scores_output"] == zoo.graph.output[0].name
    assert meta["classes"] == json.loads(zoo_meta["lrponnx.classes"]) and meta["class_count"] == 10
    pre = json.loads(zoo_meta["lrponnx.preprocessing"])
    for k in ("channel_order", "pixel_scale", "mean", "size", "embedded"):
        assert meta["preprocessing"][k] == pre[k], k
    # the target the page feeds is an ordinary graph input (no initializer), as onnxruntime-web needs
    inits = {i.name for i in model.graph.initializer}
    target = [i for i in model.graph.input if i.name == "target"]
    assert target and "target" not in inits and target[0].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_meta_without_preprocessing_uses_the_graph_size(explainer_path):
    model = onnx.load(str(explainer_path))
    for p in list(model.metadata_props):
        if p.key == "lrponnx.preprocessing":
            model.metadata_props.remove(p)
    meta, notes = web.page_meta(model, "bare.onnx")
    assert meta["preprocessing"]["size"] == [32, 32] and meta["preprocessing"]["channel_order"] == "rgb"
    assert meta["preprocessing"]["pixel_scale"] == 1.0
    assert len(notes) == 1 and "no preprocessing metadata" in notes[0]


def test_meta_refuses_what_the_page_cannot_show(explainer_path):
    model = onnx.load(str(explainer_path))
    d = model.graph.input[0].type.tensor_type.shape.dim
    d[1].dim_value = 5  # five channels: not an image
    with pytest.raises(web.LrpOnnxError, match=r"explains float images \[N, 3, H, W\]"):
        web.page_meta(model, "x.onnx")


def test_legacy_explainer_is_served_upgraded(explainer_path, fake_dist):
    """An explainer of the old contract (target backed by a [-1] initializer, no lrponnx.format) is
    served with target as an ordinary input, and the terminal says so."""
    model = onnx.load(str(explainer_path))
    for p in list(model.metadata_props):
        if p.key == "lrponnx.format":
            model.metadata_props.remove(p)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), "target"))
    legacy = explainer_path.parent / "legacy.onnx"
    onnx.save(model, str(legacy))
    app, notes = web.load_app(legacy, fake_dist, samples=False)
    assert any("upgraded" in n for n in notes)
    served = onnx.load_from_string(app.model_bytes)
    assert "target" not in {i.name for i in served.graph.initializer}
    assert "target" in {i.name for i in served.graph.input}


def test_external_data_is_inlined(explainer_path, fake_dist, tmp_path):
    ext = tmp_path / "ext.onnx"
    assert main(["convert", str(ZOO_MODEL), "-o", str(ext), "--external-data"]) == 0
    assert any(p.name != ext.name for p in tmp_path.iterdir())  # the weights went beside it
    app, _ = web.load_app(ext, fake_dist, samples=False)
    served = onnx.load_from_string(app.model_bytes)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in served.graph.initializer)
    ref = onnx.load(str(explainer_path))
    a = {t.name: onnx.numpy_helper.to_array(t) for t in served.graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in ref.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------------------------------
def test_routes_headers_and_nothing_else(explainer_path, fake_dist):
    app, _ = web.load_app(explainer_path, fake_dist, samples=False)
    app.samples["tiny"] = b"\x89PNG fake"
    app = web.WebApp(model_bytes=app.model_bytes, meta=app.meta, ort_dist=fake_dist, samples=app.samples)
    srv = _Running(app)
    try:
        status, headers, body = srv.get("/")
        assert status == 200 and headers["Content-Type"].startswith("text/html") and b"app.js" in body
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        for name in ("app.js", "lrp.js", "style.css"):
            status, headers, body = srv.get("/" + name)
            assert status == 200 and body == (STATIC / name).read_bytes()
        assert srv.get("/app.js")[1]["Content-Type"].startswith("text/javascript")
        status, headers, body = srv.get("/meta.json")
        meta = json.loads(body)
        assert meta["samples"] == ["tiny"] and meta["webgpu_build"] is True
        status, headers, body = srv.get("/explainer.onnx")
        assert status == 200 and body == onnx.load(str(explainer_path)).SerializeToString()
        status, headers, body = srv.get("/ort/ort.wasm.min.mjs")
        assert status == 200 and headers["Content-Type"].startswith("text/javascript")
        assert body == (fake_dist / "ort.wasm.min.mjs").read_bytes()
        assert srv.get("/ort/ort-wasm-simd-threaded.wasm")[1]["Content-Type"] == "application/wasm"
        assert srv.get("/samples/tiny.png")[2] == b"\x89PNG fake"
        assert srv.get("/", "HEAD")[0] == 200
        (fake_dist.parent / "secret.txt").write_text("no")
        for path in ("/ort/../secret.txt", "/ort/%2e%2e/secret.txt", "/../pyproject.toml", "/ort/",
                     "/ort/sub/ort.wasm.min.mjs", "/samples/../meta.json", "/samples/nope.png", "/server.py",
                     "/lrponnx/web/server.py", "/static/app.js", "//etc/passwd", "/ort/.."):
            assert srv.get(path)[0] == 404, path
    finally:
        srv.close()


# --------------------------------------------------------------------------------------------------
# lrp.js in Node against Python
# --------------------------------------------------------------------------------------------------
def _b64(a) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _unb64(s, dtype, shape):
    return np.frombuffer(base64.b64decode(s), dtype).reshape(shape)


def _run_lrp(cases, tmp_path):
    if shutil.which("node") is None:
        pytest.skip("node is not installed (apt-get install nodejs)")
    src, dst = tmp_path / "cases.json", tmp_path / "out.json"
    src.write_text(json.dumps(cases))
    subprocess.run(["node", str(ROOT / "tests" / "web" / "lrp_check.mjs"), str(src), str(dst)], check=True,
                   timeout=120)
    return json.loads(dst.read_text())


def _photo(h, w, seed):
    """A smooth photo-like RGB image (gradients plus noise), so resizing has something to average."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / (3 + c) + yy / (5 + 2 * c)) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def test_lrp_js_matches_python_preprocessing(tmp_path):
    cases, expected = [], []
    pres = {
        "rgb": Preprocessing(channel_order="rgb", pixel_scale=255.0, mean=[125.3, 122.9, 113.9], size=(32, 32)),
        "torchvision": Preprocessing.from_flags(preset="torchvision", size="24,20"),
        "caffe": Preprocessing.from_flags(preset="caffe", size=(27, 27)),
        "gray": Preprocessing(channel_order="gray", pixel_scale=1.0, mean=[0.5], std=[0.25], scale=2.0, size=(16, 16)),
        "embedded": Preprocessing(channel_order="bgr", pixel_scale=255.0, mean=[1.0, 2.0, 3.0], size=(32, 32),
                                  embedded=True),
        "meanimage": Preprocessing(channel_order="bgr", pixel_scale=255.0,
                                   mean=np.random.default_rng(0).normal(110, 30, (3, 36, 34)), size=(32, 30)),
    }
    sizes = [(32, 32), (45, 37), (75, 100), (20, 17), (7, 5), (227, 300), (64, 31)]
    k = 0
    for name, pre in pres.items():
        for h, w in sizes:
            img = _photo(h, w, k)
            k += 1
            cases.append(dict(kind="preprocess", name=f"{name} {h}x{w}", pixels=_b64(img), w=w, h=h,
                              pre=pre.to_dict()))
            H, W = pre.size
            # Pillow's two-pass bilinear in its classic order (horizontal, then vertical)
            two_pass = Image.fromarray(img)
            if W != w:
                two_pass = two_pass.resize((W, h), Image.Resampling.BILINEAR)
            if H != h:
                two_pass = two_pass.resize((W, H), Image.Resampling.BILINEAR)
            expected.append((pre, img, np.asarray(two_pass)))
    # a transparent PNG: composited on white as read_rgb does
    rgba = np.random.default_rng(9).integers(0, 256, (20, 24, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0
    rgba[1, :, 3] = 255
    png = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(png)
    cases.append(dict(kind="preprocess", name="rgba", pixels=_b64(rgba), w=24, h=20, rgba=True,
                      pre=pres["rgb"].to_dict()))
    out = _run_lrp(cases, tmp_path)
    assert np.array_equal(np.asarray(out["lut"], np.uint8).reshape(256, 3), render.colormap("coldnhot"))
    got = out["cases"][-1]
    ref_t, ref_d = pres["rgb"].load_image(png)
    assert np.array_equal(_unb64(got["display"], np.uint8, (32, 32, 3)), ref_d)
    assert np.array_equal(_unb64(got["tensor"], np.float32, (3, 32, 32)), ref_t)
    for case, got, (pre, img, two_pass) in zip(cases, out["cases"], expected):
        H, W = pre.size
        display = _unb64(got["display"], np.uint8, (H, W, 3))
        tensor = _unb64(got["tensor"], np.float32, (-1, H, W))
        assert np.array_equal(display, two_pass), case["name"]
        # Pillow 13 runs the vertical pass first when the height shrinks much more than the width
        # (python-pillow/Pillow#9549): then single pixels may differ by one grey level
        ref_display = pre.resize(img)
        assert np.abs(display.astype(int) - ref_display).max() <= 1, case["name"]
        # the tensor from the page's display image is Preprocessing.apply's, bit for bit
        assert np.array_equal(tensor, pre.apply(display, resize=False)), case["name"]
        if np.array_equal(ref_display, display):
            assert np.array_equal(tensor, pre.apply(img)), case["name"]


def test_lrp_js_matches_python_rendering(tmp_path):
    rng = np.random.default_rng(1)
    cases, expected = [], []
    rels = [rng.normal(0, 1, (3, 12, 10)).astype(np.float32),
            np.abs(rng.normal(0, 1, (3, 8, 8))).astype(np.float32),         # positive only
            np.zeros((3, 6, 6), np.float32),                                 # all zero: centre colour
            (rng.normal(0, 1, (1, 9, 7)) * 1e-30).astype(np.float32),       # tiny, one channel
            np.round(rng.normal(0, 2, (3, 10, 10))).astype(np.float32)]     # ties and exact bin edges
    for r in rels:
        c, h, w = r.shape
        disp = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cases.append(dict(kind="render", name=str(r.shape), relevance=_b64(r), c=c, h=h, w=w, display=_b64(disp)))
        expected.append((np.asarray(render.render(r)), np.asarray(render.overlay(disp, r))))
    scores = [[2.0, -1.0, 0.5, 3.0, 3.0, -7.0], [0.1, 0.7, 0.2], [10.0, 0.0]]
    for s in scores:
        cases.append(dict(kind="probabilities", name=str(s), scores=s))
    out = _run_lrp(cases, tmp_path)
    for got, (heat, over) in zip(out["cases"], expected):
        h, w = heat.shape[:2]
        g_heat = _unb64(got["heat"], np.uint8, (h, w, 4))
        g_over = _unb64(got["overlay"], np.uint8, (h, w, 4))
        assert np.array_equal(g_heat[..., :3], heat) and np.all(g_heat[..., 3] == 255)
        assert np.array_equal(g_over[..., :3], over)
    for got, s in zip(out["cases"][len(rels):], scores):
        s = np.asarray(s, np.float64)
        if np.all((s >= 0) & (s <= 1)) and abs(s.sum() - 1) < 1e-3:
            p = s  # already probabilities (a Softmax output)
        else:
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        assert np.allclose(got["p"], p, rtol=0, atol=1e-12)
        assert got["top"] == sorted(range(len(s)), key=lambda i: (-p[i], i))[:5]


# --------------------------------------------------------------------------------------------------
# the page in headless Chromium
# --------------------------------------------------------------------------------------------------
def _start_web(explainer: Path, tmp_path: Path):
    env = dict(os.environ)
    env.pop(web.ORT_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "lrponnx.app.cli", "web", str(explainer), "--port", "0",
                             "--no-browser", "--ort-dist", str(JS_DIR / "node_modules" / "onnxruntime-web" / "dist")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("serving "):
            return proc, line.split()[1]
    proc.kill()
    raise AssertionError(f"lrponnx web did not start: {proc.stderr.read()}")


def _drive(url: str, steps: list, tmp_path: Path, flags: str = "") -> dict:
    src, dst = tmp_path / "steps.json", tmp_path / "page.json"
    src.write_text(json.dumps(steps))
    r = subprocess.run(["node", str(ROOT / "tests" / "web" / "drive_page.mjs"), "--url", url, "--steps", str(src),
                        "--out", str(dst), "--chromium", CHROMIUM, "--flags", flags],
                       capture_output=True, text=True, timeout=600)
    assert dst.exists(), r.stderr
    out = json.loads(dst.read_text())
    assert not out.get("error"), (out.get("error"), out.get("log"))
    return out


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _canvas(snap, name):
    c = snap["canvases"][name]
    return np.asarray(c["rgba"], np.uint8).reshape(c["h"], c["w"], 4)


def _within_one_step(got, want) -> tuple[float, int]:
    diff = np.abs(got.astype(int) - want.astype(int)).max(axis=-1)
    return float((diff == 0).mean()), int(diff.max())


def test_page_in_chromium_matches_python(explainer_path, tmp_path):
    why = missing("wasm")
    if why:
        pytest.skip(why)
    from lrponnx.app.runtime import Explainer

    ex = Explainer(explainer_path)
    pre = Preprocessing.from_model(ex.model)
    # an image already at the model's size (32 x 32): resizing cannot differ
    try:
        from lrponnx.app.samples import sample_image

        small, big = sample_image("cat", (32, 32)), sample_image("cat", None)
    except Exception:  # noqa: BLE001 - no scikit-image: a synthetic photo does as well
        small, big = _photo(32, 32, 3), _photo(300, 451, 4)
    small_png, big_png, small_jpg = tmp_path / "cat32.png", tmp_path / "cat_full.png", tmp_path / "cat32.jpg"
    Image.fromarray(small).save(small_png)
    Image.fromarray(big).save(big_png)
    Image.fromarray(small).save(small_jpg, quality=75, subsampling=2)  # 4:2:0, the common JPEG
    x = pre.apply(small)
    first = ex.explain(x[None])
    logits = first.outputs[ex.model_outputs[0]][0]
    order = [int(i) for i in sorted(range(len(logits)), key=lambda i: (-logits[i], i))]
    second_class = order[1]
    second = ex.explain(x[None], target=second_class)

    proc, url = _start_web(explainer_path, tmp_path)
    shot = tmp_path / "page.png"
    try:
        out = _drive(url, [
            {"upload": str(small_png)},
            {"click": "#classes li:nth-child(2) button"},
            {"screenshot": str(shot)},
            {"render": {"relevance": first.relevance[0].ravel().tolist(), "display": small.ravel().tolist()}},
            {"upload": str(big_png)},
            {"upload": str(small_jpg)},
        ], tmp_path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert out["cross_origin_isolated"] is True
    s1, s2, rendered, s3, s4 = (out["steps"][0], out["steps"][1], out["steps"][3]["render"], out["steps"][4],
                                out["steps"][5])

    # 1. the tensor the page fed is Python's, bit for bit
    r1 = s1["result"]
    assert np.array_equal(np.asarray(r1["tensor"], np.float32), x.ravel())
    # 2. the prediction, the top-5 list and the probabilities
    assert r1["target"] == order[0] == int(first.target[0])
    assert r1["top"] == order[:5]
    p = np.exp(logits - logits.max())
    assert np.allclose(r1["probabilities"], p / p.sum(), atol=1e-5)
    names = ex.classes
    assert s1["classes"] == [names[k] for k in order[:5]]
    # 3. relevance of the predicted class
    err1 = _rel_l2(r1["relevance"], first.relevance)
    assert err1 <= 1e-4, err1
    # 4. heatmap and overlay read back from the canvases vs lrponnx.app.render of Python's relevance
    heat_py = np.asarray(render.render(first.relevance[0]))
    over_py = np.asarray(render.overlay(small, first.relevance[0]))
    for name, want in (("heat-canvas", heat_py), ("overlay-canvas", over_py)):
        got = _canvas(s1, name)
        assert got.shape[:2] == want.shape[:2] and np.all(got[..., 3] == 255)
        same, worst = _within_one_step(got[..., :3], want)
        assert same >= 0.99 and worst <= 7, (name, same, worst)
    assert np.array_equal(_canvas(s1, "input-canvas")[..., :3], small)
    # 5. the page's rendering code on Python's relevance: bit-identical to lrponnx.app.render
    assert np.array_equal(np.asarray(rendered["heat"], np.uint8).reshape(32, 32, 4)[..., :3], heat_py)
    assert np.array_equal(np.asarray(rendered["overlay"], np.uint8).reshape(32, 32, 4)[..., :3], over_py)
    # 6. a click on the second class explains that class
    r2 = s2["result"]
    assert r2["target"] == second_class and "Explaining " + names[second_class] in s2["explained"]
    err2 = _rel_l2(r2["relevance"], second.relevance)
    assert err2 <= 1e-4, err2
    assert _rel_l2(r2["relevance"], first.relevance) > 0.1  # a different heatmap, not the first one again
    same, worst = _within_one_step(_canvas(s2, "heat-canvas")[..., :3], np.asarray(render.render(second.relevance[0])))
    assert same >= 0.99 and worst <= 7
    # 7. a full-size photo: decoded and resized as Preprocessing.load_image does (at most one grey level
    #    where Pillow 13 orders its two passes the other way)
    _, display_py = pre.load_image(big_png)
    display_js = np.asarray(s3["result"]["display"], np.uint8).reshape(32, 32, 3)
    assert np.abs(display_js.astype(int) - display_py).max() <= 1
    # 8. a JPEG: Chromium's decoder gives Pillow's pixels (both libjpeg-turbo, fancy upsampling)
    tensor_py, display_py = pre.load_image(small_jpg)
    assert np.array_equal(np.asarray(s4["result"]["display"], np.uint8).reshape(32, 32, 3), display_py)
    assert np.array_equal(np.asarray(s4["result"]["tensor"], np.float32), tensor_py.ravel())
    # 9. the screenshot: a PNG of the whole page
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height >= 600
    print(f"\nweb page: relevance rel. L2 {err1:.2e} (predicted), {err2:.2e} (class {second_class}); "
          f"explainer loaded in {out['load_ms']} ms; {out['browser_version']}; screenshot {shot}")


@pytest.mark.slow
def test_page_on_webgpu(tmp_path):
    """The page's WebGPU runtime (?ep=webgpu) on Chromium's software adapter, with an explainer written
    for it (--target-runtime webgpu): same relevance as Python, for the prediction and a clicked class."""
    why = missing("webgpu")
    if why:
        pytest.skip(why)
    from lrponnx.app.runtime import Explainer

    explainer = tmp_path / "webgpu.onnx"
    assert main(["convert", str(ZOO_MODEL), "-o", str(explainer), "--target-runtime", "webgpu"]) == 0
    ex = Explainer(explainer)
    pre = Preprocessing.from_model(ex.model)
    img = _photo(32, 32, 11)
    png = tmp_path / "img.png"
    Image.fromarray(img).save(png)
    x = pre.apply(img)[None]
    first = ex.explain(x)
    logits = first.outputs[ex.model_outputs[0]][0]
    second_class = int(np.argsort(-logits, kind="stable")[1])
    second = ex.explain(x, target=second_class)
    proc, url = _start_web(explainer, tmp_path)
    try:
        out = _drive(url + "?ep=webgpu", [{"upload": str(png)}, {"click": "#classes li:nth-child(2) button"}],
                     tmp_path, flags=WEBGPU_FLAGS)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    r1, r2 = out["steps"][0]["result"], out["steps"][1]["result"]
    assert "(webgpu)" in out["steps"][0]["explained"]
    assert r1["target"] == int(first.target[0]) and r2["target"] == second_class
    err1, err2 = _rel_l2(r1["relevance"], first.relevance), _rel_l2(r2["relevance"], second.relevance)
    assert err1 <= 1e-4 and err2 <= 1e-4, (err1, err2)
    print(f"\nweb page on WebGPU (software adapter): relevance rel. L2 {err1:.2e}, {err2:.2e}; "
          f"first run {r1['ms']:.0f} ms, second {r2['ms']:.0f} ms")


@pytest.mark.slow
def test_page_with_a_mean_image_and_a_real_jpeg(shared_data, tmp_path):
    """Caffe's trained cifar10_full (a 3x32x32 mean image in its preprocessing) on the first CIFAR-10
    test image, a real JPEG: the page's tensor is Python's, the relevance within 1e-4."""
    why = missing("wasm")
    if why:
        pytest.skip(why)
    from lrponnx.app.runtime import Explainer

    assert main(["zoo", "build", "cifar10-full-caffe", "-o", str(tmp_path)]) == 0
    explainer = tmp_path / "explainer.onnx"
    assert main(["convert", str(tmp_path / "cifar10-full-caffe.onnx"), "-o", str(explainer)]) == 0
    jpg = shared_data / "cifar10_test_sample" / "cat" / "0000.jpg"
    ex = Explainer(explainer)
    pre = Preprocessing.from_model(ex.model)
    assert isinstance(pre.mean, np.ndarray) and pre.mean.shape == (3, 32, 32)
    tensor, _ = pre.load_image(jpg)
    want = ex.explain(tensor[None])
    proc, url = _start_web(explainer, tmp_path)
    try:
        out = _drive(url, [{"upload": str(jpg)}], tmp_path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    got = out["steps"][0]["result"]
    assert np.array_equal(np.asarray(got["tensor"], np.float32), tensor.ravel())
    assert got["target"] == int(want.target[0]) == ex.classes.index("cat")
    err = _rel_l2(got["relevance"], want.relevance)
    assert err <= 1e-4, err

"""``lrponnx web EXPLAINER``: a local page that explains images in the browser with onnxruntime-web.

The server is Python's ``http.server``. It serves, and only serves:

=====================  ============================================================================
``/``                  the page (``static/index.html``; ``/app.js``, ``/lrp.js``, ``/style.css``)
``/meta.json``         what the page needs to know about the explainer, so it needs no protobuf
                       parsing: input name and shape, ``target`` input, output names, class names,
                       preprocessing (``Preprocessing.to_dict``), composite, sample photo names
``/explainer.onnx``    the explainer (external weights inlined; pre-format-2 explainers upgraded)
``/ort/<file>``        onnxruntime-web's ``dist`` files (``ort.wasm.min.mjs``, ``.wasm``, ...)
``/samples/<n>.png``   the bundled sample photos (``lrponnx.app.samples``), when scikit-image is there
=====================  ============================================================================

onnxruntime-web is not part of lrponnx (it is not vendored): :func:`find_ort_dist` looks for its
``dist`` folder. By default the server binds to 127.0.0.1 and refuses other addresses unless
``--allow-remote`` is given. Responses carry COOP/COEP headers so the page is cross-origin
isolated and onnxruntime-web may use its threaded WebAssembly build.
"""
from __future__ import annotations

import http.server
import io
import ipaddress
import json
import mimetypes
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lrponnx.errors import InvalidModelError, LrpOnnxError
from lrponnx.metadata import (CLASS_COUNT_KEY, CLASSES_KEY, COMPOSITE_KEY, LOGITS_KEY, RELEVANCE_OUTPUTS_KEY,
                              TARGET_INPUT, TARGET_INPUT_KEY, VERSION_KEY, ZOO_KEY)

__all__ = ["WebError", "ORT_ENV", "find_ort_dist", "prepare", "page_meta", "WebApp", "make_server", "serve"]

#: Environment variable naming onnxruntime-web's ``dist`` folder.
ORT_ENV = "LRPONNX_ORT_WEB"
#: The files of onnxruntime-web's dist the page loads (the wasm build; the WebGPU build is optional).
ORT_REQUIRED = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs")
ORT_WEBGPU = ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.wasm", "ort-wasm-simd-threaded.asyncify.mjs")
STATIC_DIR = Path(__file__).resolve().parent / "static"
REPO_ROOT = Path(__file__).resolve().parents[3]  # lrponnx/app/web/server.py
_HOW_TO_GET = ("get it with `npm install --ignore-scripts onnxruntime-web` (in this folder, or in the "
               "repository's tests/js), then give --ort-dist node_modules/onnxruntime-web/dist or set "
               f"{ORT_ENV}")
_MIME = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".wasm": "application/wasm", ".png": "image/png",
    ".onnx": "application/octet-stream", ".map": "application/json",
}


class WebError(LrpOnnxError):
    """The web page cannot be served (no onnxruntime-web, a refused address, a busy port, ...)."""


# --------------------------------------------------------------------------------------------------
# onnxruntime-web
# --------------------------------------------------------------------------------------------------
def _is_ort_dist(d: Path) -> bool:
    return all((d / f).is_file() for f in ORT_REQUIRED)


def find_ort_dist(explicit=None, *, cwd=None, environ=None) -> Path:
    """onnxruntime-web's ``dist`` folder: ``explicit`` (``--ort-dist``), else ``$LRPONNX_ORT_WEB``, else
    ``node_modules/onnxruntime-web/dist`` under the current folder or the repository's ``tests/js``.

    A folder given explicitly (flag or variable) must hold the files, or it is an error naming it;
    nothing found is an error that says how to get onnxruntime-web.
    """
    environ = os.environ if environ is None else environ
    for given, what in ((explicit, "--ort-dist"), (environ.get(ORT_ENV) or None, ORT_ENV)):
        if given is None:
            continue
        d = Path(given).expanduser()
        for cand in (d, d / "dist", d / "node_modules" / "onnxruntime-web" / "dist"):
            if cand.is_dir() and _is_ort_dist(cand):
                return cand.resolve()
        raise WebError(f"{what} {str(d)!r} is not onnxruntime-web's dist folder (no {ORT_REQUIRED[0]} "
                       f"and {ORT_REQUIRED[1]} in it); {_HOW_TO_GET}")
    here = Path(cwd) if cwd is not None else Path.cwd()
    for base in (here, REPO_ROOT / "tests" / "js"):
        cand = base / "node_modules" / "onnxruntime-web" / "dist"
        if cand.is_dir() and _is_ort_dist(cand):
            return cand.resolve()
    raise WebError(f"onnxruntime-web not found; {_HOW_TO_GET}")


# --------------------------------------------------------------------------------------------------
# the explainer
# --------------------------------------------------------------------------------------------------
def _dims(value_info) -> list:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def prepare(model, name: str = "explainer.onnx") -> tuple:
    """(the explainer to serve, meta.json for the page, notes for the terminal) from an explainer
    ModelProto; one that predates the current input contract is served upgraded (a copy). Raises
    :class:`LrpOnnxError` for what the page cannot show: not an explainer, not one [N,C,H,W] image
    input, no fixed image size."""
    from lrponnx.app.runtime import is_explainer, upgrade

    if not is_explainer(model):
        raise InvalidModelError(f"{name} is not an lrponnx explainer (no lrponnx metadata); compile it "
                                f"first: lrponnx convert {name} -o explainer.onnx")
    model, note = upgrade(model)
    meta, notes = page_meta(model, name)
    return model, meta, ([note] if note else []) + notes


def page_meta(model, name: str = "explainer.onnx") -> tuple[dict, list[str]]:
    """(meta.json for the page, notes for the terminal) from an explainer ModelProto of the current
    input contract (see :func:`prepare`)."""
    from lrponnx.app.preprocess import Preprocessing
    from lrponnx.app.runtime import is_explainer

    if not is_explainer(model):
        raise InvalidModelError(f"{name} is not an lrponnx explainer (no lrponnx metadata); compile it "
                                f"first: lrponnx convert {name} -o explainer.onnx")
    notes = []
    meta = {p.key: p.value for p in model.metadata_props}
    target = meta.get(TARGET_INPUT_KEY, TARGET_INPUT)
    try:
        relevance_outputs = json.loads(meta[RELEVANCE_OUTPUTS_KEY])
    except (KeyError, ValueError):
        raise InvalidModelError(f"{name}: its lrponnx.relevance_outputs metadata is missing or not JSON") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits and i.name != target]
    if len(inputs) != 1 or len(relevance_outputs) != 1:
        raise LrpOnnxError(f"{name} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); the web page "
                           "explains models with one image input [N, C, H, W]")
    inp = inputs[0]
    shape = _dims(inp)
    if inp.type.tensor_type.elem_type != 1 or len(shape) != 4 or shape[1] not in (1, 3):
        raise LrpOnnxError(f"{name}: input {inp.name!r} is {shape or 'of unknown shape'} "
                           f"(ONNX element type {inp.type.tensor_type.elem_type}); the web page explains float "
                           "images [N, 3, H, W] or [N, 1, H, W]")
    pre = Preprocessing.from_model(model)
    if pre is None:
        order = "rgb" if shape[1] == 3 else "gray"
        hw = tuple(shape[2:]) if all(isinstance(d, int) and d > 0 for d in shape[2:]) else None
        pre = Preprocessing(input=inp.name, channel_order=order, size=hw)
        notes.append(f"{name} has no preprocessing metadata (lrponnx.preprocessing): the page feeds "
                     f"{order.upper()} pixels in [0, 1]; see docs/rendering.md to record the model's own")
    if pre.size is None:
        raise LrpOnnxError(f"{name}: input {inp.name!r} has no fixed height and width and the preprocessing "
                           "metadata has no size; the page needs one (record it, see docs/rendering.md)")
    if pre.channels != shape[1]:
        raise LrpOnnxError(f"{name}: the preprocessing is {pre.channel_order} ({pre.channels} channel(s)) but "
                           f"input {inp.name!r} has {shape[1]}")
    if pre.input not in (None, inp.name):
        raise LrpOnnxError(f"{name}: the preprocessing names input {pre.input!r}; the explainer's is {inp.name!r}")
    rel_names = set(relevance_outputs.values())
    outs = [o.name for o in model.graph.output]
    model_outputs = [o for o in outs if o not in rel_names and not o.startswith("lrp_")]
    if not model_outputs:
        raise InvalidModelError(f"{name}: the explainer has no model output besides the relevance")
    scores = model_outputs[0]
    score_shape = _dims(next(o for o in model.graph.output if o.name == scores))
    classes = json.loads(meta[CLASSES_KEY]) if meta.get(CLASSES_KEY) else None
    count = meta.get(CLASS_COUNT_KEY)
    count = int(count) if count else (score_shape[1] if len(score_shape) == 2 and isinstance(score_shape[1], int)
                                      else (len(classes) if classes else None))
    out = {
        "name": name,
        "model_url": "explainer.onnx",
        "input": {"name": inp.name, "shape": shape},
        "target_input": target,
        "scores_output": scores,
        "logits": meta.get(LOGITS_KEY),
        "relevance_output": relevance_outputs[inp.name] if inp.name in relevance_outputs
        else next(iter(relevance_outputs.values())),
        "class_count": count,
        "classes": classes,
        "preprocessing": pre.to_dict(),
        "composite": meta.get(COMPOSITE_KEY),
        "lrponnx_version": meta.get(VERSION_KEY),
        "zoo": meta.get(ZOO_KEY),
    }
    return out, notes


# --------------------------------------------------------------------------------------------------
# sample photos
# --------------------------------------------------------------------------------------------------
def _sample_names() -> dict[str, bytes | None]:
    """{name: None} for the bundled sample photos when scikit-image is installed (rendered on first
    request, so the server starts at once), else {}."""
    import importlib.util

    if importlib.util.find_spec("skimage") is None:
        return {}
    from lrponnx.app.samples import SAMPLE_NAMES

    return {n: None for n in SAMPLE_NAMES}


def _sample_png(name: str) -> bytes | None:
    """One sample photo at full size as PNG bytes; None when scikit-image cannot give it."""
    from PIL import Image

    from lrponnx.app.samples import SamplesUnavailableError, sample_image

    try:
        rgb = sample_image(name, size=None)
    except (SamplesUnavailableError, ValueError):
        return None
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------
@dataclass
class WebApp:
    """What the server hands out: every route maps to bytes in memory or a file in a fixed folder."""

    model_bytes: bytes
    meta: dict
    ort_dist: Path
    samples: dict = field(default_factory=dict)
    static_dir: Path = STATIC_DIR

    def __post_init__(self):
        self.meta = dict(self.meta)
        self.meta["samples"] = sorted(self.samples)
        self.meta["webgpu_build"] = all((self.ort_dist / f).is_file() for f in ORT_WEBGPU)
        self._meta_bytes = json.dumps(self.meta, separators=(",", ":")).encode()
        self._static = {p.name for p in self.static_dir.iterdir() if p.is_file()}
        self._samples_lock = threading.Lock()
        self._ort = {p.name for p in self.ort_dist.iterdir() if p.is_file()}

    def lookup(self, path: str) -> tuple[str, object] | None:
        """URL path -> (content type, bytes or a Path) or None (404). Only names listed at start-up."""
        path = path.split("?", 1)[0].split("#", 1)[0]
        if path in ("/", "/index.html"):
            return _MIME[".html"], self.static_dir / "index.html"
        if path == "/meta.json":
            return _MIME[".json"], self._meta_bytes
        if path == "/explainer.onnx":
            return _MIME[".onnx"], self.model_bytes
        parts = path.lstrip("/").split("/")
        if len(parts) == 1 and parts[0] in self._static:
            return _MIME.get(Path(parts[0]).suffix, "application/octet-stream"), self.static_dir / parts[0]
        if len(parts) == 2 and parts[0] == "ort" and parts[1] in self._ort:
            suffix = Path(parts[1]).suffix
            return _MIME.get(suffix) or mimetypes.guess_type(parts[1])[0] or "application/octet-stream", \
                self.ort_dist / parts[1]
        if len(parts) == 2 and parts[0] == "samples" and parts[1].endswith(".png") and parts[1][:-4] in self.samples:
            png = self.sample(parts[1][:-4])
            return (_MIME[".png"], png) if png is not None else None
        return None

    def sample(self, name: str) -> bytes | None:
        """PNG bytes of a sample photo, rendered on first use."""
        with self._samples_lock:
            if self.samples.get(name) is None:
                self.samples[name] = _sample_png(name)
            return self.samples[name]


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "lrponnx-web"
    app: WebApp
    quiet = True

    def _send(self, head_only: bool):
        found = self.app.lookup(self.path)
        if found is None:
            body = b"not found\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head_only:
                self.wfile.write(body)
            return
        ctype, content = found
        body = content.read_bytes() if isinstance(content, Path) else content
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        # cross-origin isolation: lets onnxruntime-web use SharedArrayBuffer (threaded wasm)
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not head_only:
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._send(False)

    def do_HEAD(self):  # noqa: N802
        self._send(True)

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        if not self.quiet:
            sys.stderr.write("%s - %s\n" % (self.address_string(), format % args))


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addrs)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False


def make_server(app: WebApp, host: str = "127.0.0.1", port: int = 8000, *, allow_remote: bool = False,
                quiet: bool = True) -> http.server.ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server for ``app``. Port 0 picks a free port."""
    if not allow_remote and not is_loopback(host):
        raise WebError(f"--host {host} is not a loopback address: the page would be reachable from other "
                       "machines; give --allow-remote to serve it there anyway")
    if not 0 <= int(port) <= 65535:
        raise WebError(f"--port must be in 0..65535; got {port}")
    handler = type("Handler", (_Handler,), {"app": app, "quiet": quiet})
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("Server", (_Server,), {"address_family": family})
        return server_cls((host, int(port)), handler)
    except OSError as e:
        if e.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise WebError(f"port {port} on {host} is in use; choose another with --port (0 = any free port)") from None
        raise WebError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def load_app(explainer, ort_dist=None, *, samples: bool = True) -> tuple[WebApp, list[str]]:
    """Read the explainer, find onnxruntime-web, render the sample photos: (WebApp, notes)."""
    from lrponnx.compiler.load import read_model

    dist = find_ort_dist(ort_dist)  # first: the cheaper mistake to report
    path = Path(os.fspath(explainer))
    model = read_model(path)  # external weights are inlined: the page fetches one file
    model, meta, notes = prepare(model, path.name)
    model_bytes = model.SerializeToString()
    return WebApp(model_bytes=model_bytes, meta=meta, ort_dist=dist,
                  samples=_sample_names() if samples else {}), notes


def serve(explainer, *, host: str = "127.0.0.1", port: int = 8000, ort_dist=None, open_browser: bool = True,
          allow_remote: bool = False, quiet: bool = True) -> int:
    """Run ``lrponnx web`` until interrupted."""
    app, notes = load_app(explainer, ort_dist)
    for n in notes:
        print(f"lrponnx: note: {n}", file=sys.stderr)
    server = make_server(app, host, port, allow_remote=allow_remote, quiet=quiet)
    h, p = server.server_address[:2]
    url = f"http://{'[' + h + ']' if ':' in h else h}:{p}/"
    print(f"lrponnx web: {app.meta['name']} ({len(app.model_bytes) / 2**20:.1f} MiB), onnxruntime-web from "
          f"{app.ort_dist}", flush=True)
    print(f"serving {url}  (Ctrl-C to stop)", flush=True)
    if open_browser:
        import webbrowser

        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("lrponnx web: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0

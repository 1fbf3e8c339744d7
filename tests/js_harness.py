"""Run an ONNX model (an lrponnx explainer) in Node or headless Chromium from Python.

``run("node" | "wasm" | "webgpu", model_path, feeds)`` writes the feeds as .npy, runs
``tests/js/run_node.mjs`` (onnxruntime-node, CPU) or ``tests/js/run_browser.mjs`` (onnxruntime-web
in Debian's chromium, wasm or WebGPU on SwiftShader's software adapter) and reads the outputs
back. ``missing(runtime)`` says why a runtime cannot run here (None when it can). Setup:
``cd tests/js && npm install --ignore-scripts`` and ``apt-get install chromium`` (``.ci/run``
does both). See tests/js/README.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

JS_DIR = Path(__file__).resolve().parent / "js"
RUNTIMES = ("node", "wasm", "webgpu")
CHROMIUM = os.environ.get("LRPONNX_CHROMIUM", "/usr/bin/chromium")


@dataclass
class JsResult:
    runtime: str
    outputs: dict = field(default_factory=dict)   # name -> np.ndarray
    run_ms: list = field(default_factory=list)    # one per timed run (after the warm-up runs)
    load_ms: float | None = None                  # session creation
    error: str | None = None                      # the runtime's own message when it failed
    info: dict = field(default_factory=dict)      # the runner's result.json (versions, adapter, flags)

    @property
    def ms(self) -> float | None:
        return float(np.median(self.run_ms)) if self.run_ms else None


def missing(runtime: str) -> str | None:
    """Why ``runtime`` cannot run on this machine, or None."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if shutil.which("node") is None:
        return "node is not installed (apt-get install nodejs npm)"
    package = {"node": "onnxruntime-node"}.get(runtime, "onnxruntime-web")
    if not (JS_DIR / "node_modules" / package).is_dir():
        return f"tests/js/node_modules/{package} is absent (cd tests/js && npm install --ignore-scripts)"
    if runtime != "node":
        if not (JS_DIR / "node_modules" / "puppeteer-core").is_dir():
            return "tests/js/node_modules/puppeteer-core is absent (cd tests/js && npm install --ignore-scripts)"
        if not Path(CHROMIUM).exists():
            return f"{CHROMIUM} is absent (apt-get install chromium)"
    return None


def run(runtime: str, model: str | os.PathLike, feeds: dict, *, outputs=None, repeat: int = 1, warmup: int = 0,
        opt: str = "all", threads: int = 0, timeout: float = 300, flags: str = "") -> JsResult:
    """Run ``model`` (a self-contained .onnx file) on ``feeds`` ({name: array}) in ``runtime``.
    A failure inside the runtime comes back as ``JsResult.error`` (its own message); a harness
    failure (no result at all) raises RuntimeError."""
    why = missing(runtime)
    if why:
        raise RuntimeError(f"{runtime} cannot run here: {why}")
    with tempfile.TemporaryDirectory(prefix=f"lrponnx-{runtime}-") as tmp:
        tmp = Path(tmp)
        out = tmp / "out"
        args = ["--model", str(Path(model).resolve()), "--out", str(out), "--repeat", str(repeat),
                "--warmup", str(warmup), "--opt", opt]
        if threads:
            args += ["--threads", str(threads)]
        for k, (name, value) in enumerate(feeds.items()):
            f = tmp / f"in{k}.npy"
            np.save(f, np.ascontiguousarray(value))
            args += ["--input", f"{name}={f}"]
        if outputs:
            args += ["--outputs", ",".join(outputs)]
        if runtime == "node":
            cmd = ["node", str(JS_DIR / "run_node.mjs"), *args]
        else:
            cmd = ["node", str(JS_DIR / "run_browser.mjs"), "--ep", runtime, "--chromium", CHROMIUM,
                   "--timeout", str(int(timeout)), *args]
            if flags:
                cmd += ["--flags", flags]
        proc = subprocess.run(cmd, cwd=JS_DIR, capture_output=True, text=True, timeout=timeout + 30)
        res = out / "result.json"
        if not res.exists():
            raise RuntimeError(f"{runtime} runner gave no result (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        info = json.loads(res.read_text())
        arrays = {name: np.load(out / file) for name, file in (info.get("outputs") or {}).items()}
        return JsResult(runtime, arrays, info.get("run_ms") or [], info.get("load_ms"), info.get("error"), info)

"""Prepare ONNX Runtime GPU on a machine that cannot download anything (called by run_gpu.sh).

1. Join ``bench/_gpu_wheel/part.*`` (also ``bench/_gpu_wheel/*/part.*``; sorted by file name) into the
   wheel, check it against ``bench/_gpu_wheel/wheel.sha256`` when present, unpack it if it is xz.
2. Name it from its own ``*.dist-info/WHEEL`` tags and refuse it when its Python tag does not match
   this interpreter (a cp311 wheel cannot load in Python 3.12: installing it would also shadow the
   working CPU onnxruntime).
3. ``pip install --no-index --no-deps --target SITE`` (or plain unzip when pip fails).
4. Install the other wheels found in ``bench/_gpu_wheel/`` and ``bench/_gpu_wheel/extra/`` (e.g.
   zennit) only where this Python lacks the module.
5. Find the CUDA/cuDNN libraries of the installed torch (``site-packages/nvidia/*/lib``).

Writes ``WORK/env.sh`` (``export PYTHONPATH=...``, ``export LD_LIBRARY_PATH=...``) and
``OUT/gpu_setup.json``. Never raises: every step records what failed.

    python3 bench/gpu/gpu_setup.py --work /tmp/lrponnx_gpu --out $OUT
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEEL_DIR = ROOT / "bench" / "_gpu_wheel"
XZ_MAGIC = b"\xfd7zXZ\x00"


def step(report: dict, name: str):
    """Decorator-free helper: run a step, record ok/error and duration."""
    class _Step:
        def __enter__(self):
            self.t0 = time.perf_counter()
            print(f"--- {name}", flush=True)
            return self

        def __exit__(self, et, ev, tb):
            report.setdefault("steps", {})[name] = {
                "ok": et is None, "seconds": round(time.perf_counter() - self.t0, 2),
                **({"error": f"{et.__name__}: {ev}"} if et else {})}
            if et:
                print(f"!!! {name} failed: {et.__name__}: {ev}", flush=True)
                traceback.print_exception(et, ev, tb)
            return True  # swallow: the next steps decide what they can still do
    return _Step()


def find_parts() -> list[Path]:
    parts = [Path(p) for p in glob.glob(str(WHEEL_DIR / "part.*")) + glob.glob(str(WHEEL_DIR / "*" / "part.*"))]
    return sorted(parts, key=lambda p: (p.name, str(p)))


def join_parts(parts: list[Path], dest: Path) -> str:
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
                    out.write(block)
    return h.hexdigest()


def wheel_name(path: Path) -> tuple[str, list[str]]:
    """The proper file name of a wheel, from its dist-info (name, version, first tag), and all its tags."""
    with zipfile.ZipFile(path) as z:
        wheel = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        tags = [ln.split(":", 1)[1].strip() for ln in z.read(wheel).decode().splitlines() if ln.startswith("Tag:")]
        fields = dict(ln.split(": ", 1) for ln in z.read(meta).decode().splitlines() if ": " in ln)
    name = fields["Name"].replace("-", "_")
    return f"{name}-{fields['Version']}-{tags[0]}.whl", tags


def install_wheel(whl: Path, site: Path, report_key: dict) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), str(whl)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode == 0:
        report_key["method"] = "pip --target"
        return
    report_key["pip_error"] = (r.stderr or r.stdout)[-800:]
    print(f"pip failed ({r.returncode}); unzipping instead:\n{r.stderr[-800:]}", flush=True)
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
    report_key["method"] = "unzip"


def nvidia_lib_dirs() -> list[str]:
    """Library folders of the nvidia-* wheels next to the installed torch (CUDA runtime, cuBLAS, cuDNN...)."""
    dirs = []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    try:
        import torch  # noqa: F401  (its folder, for wheels vendored inside torch/lib)
        roots.append(str(Path(torch.__file__).parent))
    except Exception:
        pass
    for r in roots:
        for d in sorted(glob.glob(os.path.join(r, "*", "lib")) + glob.glob(os.path.join(r, "lib"))):
            if glob.glob(os.path.join(d, "*.so*")) and d not in dirs:
                dirs.append(d)
    return dirs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/lrponnx_gpu")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "_work" / "gpu_out")))
    a = p.parse_args()
    work, out = Path(a.work), Path(a.out)
    site = work / "site"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    site.mkdir(parents=True, exist_ok=True)
    py_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    report = {"python": sys.version.split()[0], "python_tag": py_tag, "executable": sys.executable,
              "ort_gpu_installed": False}
    print(f"python {report['python']} ({sys.executable})", flush=True)

    whl = None
    with step(report, "join wheel parts"):
        parts = find_parts()
        report["parts"] = [f"{x.relative_to(ROOT)} ({x.stat().st_size} B)" for x in parts]
        if not parts:
            raise FileNotFoundError(f"no {WHEEL_DIR}/part.* files: the ORT GPU wheel did not travel")
        joined = work / "joined.bin"
        digest = join_parts(parts, joined)
        report["sha256"] = digest
        sha_file = WHEEL_DIR / "wheel.sha256"
        if sha_file.exists():
            want = sha_file.read_text().split()[0].strip().lower()
            report["sha256_expected"] = want
            if digest != want:
                raise ValueError(f"joined parts have sha256 {digest}, wheel.sha256 says {want} "
                                 f"(a part is missing or truncated; parts: {len(parts)})")
        with open(joined, "rb") as f:
            head = f.read(6)
        if head == XZ_MAGIC:
            import lzma
            unpacked = work / "unpacked.whl"
            with lzma.open(joined) as src, open(unpacked, "wb") as dst:
                for block in iter(lambda: src.read(1 << 22), b""):
                    dst.write(block)
            joined.unlink()
            joined = unpacked
        name, tags = wheel_name(joined)
        whl = work / name
        joined.replace(whl)
        report["wheel"] = name
        report["wheel_tags"] = tags
        if not any(t.split("-")[0] in (py_tag, "py3") for t in tags):
            bad = whl
            whl = None
            raise RuntimeError(f"{bad.name} is built for {tags[0].split('-')[0]}, this Python is {py_tag}: it cannot "
                               f"load here (and would shadow the CPU onnxruntime). Bring the "
                               f"{py_tag}-{py_tag} wheel of the same version instead.")

    if whl is not None:
        with step(report, "install onnxruntime-gpu"):
            report["ort_install"] = {}
            install_wheel(whl, site, report["ort_install"])
            report["ort_gpu_installed"] = (site / "onnxruntime").is_dir()

    with step(report, "install missing pure-Python wheels"):
        extra = sorted(set(glob.glob(str(WHEEL_DIR / "*.whl")) + glob.glob(str(WHEEL_DIR / "extra" / "*.whl"))))
        report["extra_wheels"] = {}
        for w in extra:
            mod = Path(w).name.split("-")[0].lower()
            if importlib.util.find_spec(mod) is not None:
                report["extra_wheels"][Path(w).name] = "already importable, skipped"
                continue
            info = {}
            install_wheel(Path(w), site, info)
            report["extra_wheels"][Path(w).name] = info.get("method", "?")

    libs = []
    with step(report, "find CUDA libraries"):
        libs = nvidia_lib_dirs()
        report["nvidia_lib_dirs"] = libs

    env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]),
           "LD_LIBRARY_PATH": os.pathsep.join(libs + [x for x in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if x]),
           "LRPONNX_GPU_SITE": str(site)}
    (work / "env.sh").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    report["env"] = env
    (out / "gpu_setup.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("python", "wheel", "ort_gpu_installed") if k in report}), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # never stop run_gpu.sh
        traceback.print_exc()
        sys.exit(0)

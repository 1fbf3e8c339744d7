"""Issue 12 (the redesign): `lrponnx convert` time / peak memory and explainer equivalence, before vs after.

    # once: the "before" tree (commit 811fa18) in its own venv with the same package versions
    git -C /work/main worktree add /tmp/base 811fa18
    python3 -m venv /tmp/basevenv
    /tmp/basevenv/bin/pip install onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6 protobuf==7.36.2 \\
        pillow==13.0.0 tqdm==4.70.1 ml_dtypes==0.7.0
    /tmp/basevenv/bin/pip install --no-deps -e /tmp/base

    # then, from the repository root (the "after" tree is this checkout, run with .venv/bin/python):
    .venv/bin/python bench/redesign_compare.py --before-python /tmp/basevenv/bin/python
    .venv/bin/python bench/redesign_compare.py --before-python /tmp/basevenv/bin/python --quick  # ~2 min

What it does (writes the section "Redesign (issue 12)" of docs/benchmarks.md between the markers
``<!-- redesign_compare:start/end -->``, appended at the end of the page on the first run and replaced
on reruns; raw numbers in ``bench/_work/redesign/results.json``):

1. **Trees.** Each tree is a Python interpreter whose ``import lrponnx`` resolves to that tree (checked:
   the two must differ). Only what both trees share is used: the command line (``lrponnx convert``,
   ``lrponnx zoo build``) run by each interpreter, and ``onnxruntime`` of this interpreter. No lrponnx
   internals are imported here: module paths differ between the trees.
2. **Models.** The zoo models (cifar10-lrn, cifar10-full-caffe, bvlc-caffenet, bvlc-googlenet) are built
   ONCE with the *before* tree's ``lrponnx zoo build`` into ``bench/_work/redesign/models`` (reused on
   reruns unless ``--rebuild``), so both trees convert the very same files. The Caffe recipes need the
   shared data folder (``--shared-data``, default ``$LRPONNX_SHARED_DATA`` or ``<repo>/../shared/data``).
   The VGG16-sized model is ``bench/make_vgg16.py``'s (built once into ``bench/_work/vgg16`` by this
   interpreter, which needs torch; skipped with a note if that fails).
3. **convert: time and peak memory.** Every (model, composite) is converted by each tree's CLI in a child
   process started through ``bench/measure.py`` (a launcher that imports nothing heavy, so the
   ``ru_maxrss`` that ``wait4`` returns is the CLI's own peak and not a big parent's RSS inherited across
   fork/exec). One warm-up round (not counted: page cache, .pyc) then ``--repeats`` rounds; within a round
   the two trees run back to back, in alternating order, so load changes hit both alike. Median wall time,
   CPU time (user + system) and peak RSS are reported, with after/before ratios; "worse" needs both the
   wall and the CPU ratio above ``1 + --time-tol`` (other work on the machine stretches wall time alone). Commands: ``convert MODEL -o OUT
   --composite C`` with the defaults of each tree (LRN rule, epsilon, seed; zbox bounds from the model's
   preprocessing metadata; VGG16 has none, so its ``--low/--high`` are passed).
4. **Equivalence.** For the zoo models and both composites, the explainers written by the last convert
   round of each tree are run in THIS interpreter's onnxruntime (CPU, 2 threads, same session options)
   on the same batch: Caffe's two example photos, two CIFAR-10 test images for 32x32 models, and two
   images of uniform random pixels (seed 0), each preprocessed as the model's ``lrponnx.preprocessing``
   metadata says (written out here, independent of both trees); each sample is explained for target -1
   (the predicted class) and for target 0.
   Reported: per-sample relative L2 of the relevance (``||R_after - R_before|| / ||R_before||``, max over
   samples; pass when <= ``--tolerance``, default 1e-6), max abs difference of the model outputs, whether
   the explained classes agree, whether the per-node rules (metadata ``lrponnx.rules``) are the same, and
   the node counts of the two explainer graphs. When the relevance differs at all, the *before*
   explainer is also run in a second session, to show ORT's own run-to-run noise, and the two graphs are
   compared: same nodes? which constants (initializers) differ, and by how much.

Time: ~6 min on a quiet 2-core machine (--quick ~1.5 min); under heavy load (load average 10) a run took 14 min.
Timings need a quiet machine: the section says so when the load average passed 2.5 during the convert runs.

Options: ``--quick`` (1 timed round, no VGG16), ``--repeats N`` (default 3),
``--render RESULTS_JSON`` (re-render the section from an earlier run), ``--no-timing``, ``--no-equivalence``,
``--models a,b`` (of: cifar10-lrn, cifar10-full-caffe, bvlc-caffenet, bvlc-googlenet, vgg16),
``--after-python`` (default: this interpreter), ``--no-docs`` (print, do not write the page).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work" / "redesign"
MODELS = WORK / "models"
DOC = ROOT / "docs" / "benchmarks.md"
MARKS = ("<!-- redesign_compare:start -->", "<!-- redesign_compare:end -->")
HEADING = "## Redesign (issue 12): `convert` before/after"
THREADS = 2

ZOO = {  # name -> label (the zoo names are the same in both trees)
    "cifar10-lrn": "cifar10-lrn (bundled, trained)",
    "cifar10-full-caffe": "cifar10_full (Caffe, trained)",
    "bvlc-caffenet": "CaffeNet (random weights)",
    "bvlc-googlenet": "GoogLeNet (random weights)",
}
VGG = "vgg16"
LABELS = dict(ZOO, **{VGG: "VGG16 (torchvision, random weights)"})
COMPOSITES = ("epsilon-plus-flat", "epsilon-gamma-box")
TREES = ("before", "after")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env(shared: Path | None = None) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(THREADS)
    # each interpreter must find its own tree: no PYTHONPATH, and never the working directory (`python -c`
    # and `-m` put it first on sys.path; the children also run in bench/_work/redesign, outside any tree)
    env.pop("PYTHONPATH", None)
    env["PYTHONSAFEPATH"] = "1"
    if shared is not None:
        env["LRPONNX_SHARED_DATA"] = str(shared)
    return env


def run_text(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    WORK.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env or child_env(), cwd=WORK, timeout=timeout)


# ----------------------------------------------------------------------------- the two trees

PROBE = """
import json, os, subprocess, importlib.metadata as md, importlib.util
import lrponnx
root = os.path.dirname(os.path.dirname(os.path.abspath(lrponnx.__file__)))
def git(*a):
    try:
        return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return ""
v = {}
for p in ["onnx", "onnxruntime", "numpy", "protobuf", "onnx-ir", "onnx_ir"]:
    try: v[p] = md.version(p)
    except Exception: pass
print(json.dumps({"file": lrponnx.__file__, "root": root, "commit": git("rev-parse", "--short", "HEAD"),
                  "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                  "has_main": importlib.util.find_spec("lrponnx.__main__") is not None, "versions": v}))
"""


def probe_tree(name: str, python: str) -> dict:
    """Where ``python`` imports lrponnx from, the tree's commit, package versions, and how to call its CLI."""
    r = run_text([python, "-c", PROBE])
    if r.returncode != 0:
        raise SystemExit(f"{name} tree: {python} cannot import lrponnx:\n{r.stderr[-2000:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    info["python"] = python
    # the CLI: the console script beside the interpreter, else `python -m lrponnx` (a console script
    # written before a module moved can be stale, so each candidate must answer --version)
    candidates = []
    script = Path(python).with_name("lrponnx")  # not resolved: a venv's python is a symlink
    if script.exists():
        candidates.append([str(script)])
    if info["has_main"]:
        candidates.append([python, "-m", "lrponnx"])
    for cli in candidates:
        if run_text(cli + ["--version"]).returncode == 0:
            info["cli"] = cli
            break
    else:
        raise SystemExit(f"{name} tree: no working lrponnx CLI (tried {candidates})")
    return info


# ----------------------------------------------------------------------------- models

def shared_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("LRPONNX_SHARED_DATA"):
        return Path(os.environ["LRPONNX_SHARED_DATA"])
    return ROOT.parent / "shared" / "data"


def build_models(names: list[str], before: dict, shared: Path, rebuild: bool) -> dict:
    """{name: path}: the zoo models built once by the before tree; VGG16 by bench/make_vgg16.py."""
    MODELS.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        if name == VGG:
            sys.path.insert(0, str(HERE))
            import make_vgg16

            out = make_vgg16.DEFAULT_DIR / "vgg16.onnx"
            if not out.exists():
                log("building the VGG16-sized model (bench/make_vgg16.py, once)")
                r = run_text([sys.executable, str(HERE / "make_vgg16.py")], timeout=1800)
                if r.returncode != 0 or not out.exists():
                    log(f"  VGG16 build failed, skipped: {r.stderr[-300:]}")
                    continue
            paths[name] = out
            continue
        out = MODELS / f"{name}.onnx"
        if out.exists() and not rebuild:
            paths[name] = out
            continue
        log(f"building {name} with the before tree (lrponnx zoo build)")
        r = run_text(before["cli"] + ["zoo", "build", name, "-o", str(MODELS)], env=child_env(shared), timeout=1800)
        if r.returncode != 0 or not out.exists():
            raise SystemExit(f"zoo build {name} failed:\n{r.stderr[-2000:]}")
        paths[name] = out
    return paths


def file_bytes(path: Path) -> int:
    """An ONNX file plus the external data files it names."""
    import onnx

    total = path.stat().st_size
    m = onnx.load(str(path), load_external_data=False)
    locs = {e.value for t in _tensors(m) if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}
    return total + sum((path.parent / loc).stat().st_size for loc in locs)


def _tensors(m):
    yield from m.graph.initializer
    for n in m.graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t


# ----------------------------------------------------------------------------- convert timing

def convert_cmd(tree: dict, model: str, path: Path, composite: str, out: Path) -> list[str]:
    cmd = tree["cli"] + ["convert", str(path), "-o", str(out), "--composite", composite]
    if model == VGG and composite == "epsilon-gamma-box":  # no preprocessing metadata to take bounds from
        sys.path.insert(0, str(HERE))
        from make_vgg16 import BOUNDS

        cmd += ["--low=" + ",".join(f"{v:.6g}" for v in BOUNDS[0]), "--high=" + ",".join(f"{v:.6g}" for v in BOUNDS[1])]
    return cmd


def explainer_path(tree_name: str, model: str, composite: str) -> Path:
    return WORK / "explainers" / tree_name / f"{model}-{composite}.onnx"


def measured(cmd: list[str]) -> dict:
    """Wall time and peak RSS of ``cmd`` alone, through the small launcher bench/measure.py."""
    launcher = [sys.executable, "-S", str(HERE / "measure.py"), "--timeout", "1800", "--"]
    # The previous run's output (hundreds of MB for CaffeNet/VGG16) is still being written back from the
    # page cache; without a sync that writeback lands in this run's system time (up to +40 % wall).
    os.sync()
    load0 = os.getloadavg()[0]
    p = subprocess.run(launcher + cmd, capture_output=True, env=child_env(), cwd=WORK)
    try:
        r = json.loads(p.stdout.decode().strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        r = {"rc": f"launcher failed ({p.returncode})", "wall_s": None, "peak_rss_mb": None,
             "stderr": p.stderr.decode(errors="replace")[-2000:]}
    r["load"] = [load0, os.getloadavg()[0]]
    return r


def time_converts(trees: dict, models: dict, composites: list[str], repeats: int) -> dict:
    """{(model, composite): {tree: [runs]}}; round 0 is the warm-up (kept, flagged, not in the medians)."""
    runs = {(m, c): {t: [] for t in TREES} for m in models for c in composites}
    for rnd in range(repeats + 1):
        order = TREES if rnd % 2 == 0 else TREES[::-1]
        log(f"convert round {rnd}{' (warm-up)' if rnd == 0 else ''}: order {' then '.join(order)}")
        for model, path in models.items():
            for comp in composites:
                for t in order:
                    out = explainer_path(t, model, comp)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    for old in (out, out.with_name(out.name + ".data")):
                        old.unlink(missing_ok=True)
                    r = measured(convert_cmd(trees[t], model, path, comp, out))
                    r["warmup"] = rnd == 0
                    runs[(model, comp)][t].append(r)
                    if r["rc"] != 0:
                        log(f"  {t} {model} {comp}: FAILED rc={r['rc']}: {r.get('stderr', '')[-400:]}")
                    else:
                        r["explainer_bytes"] = file_bytes(out)
                        log(f"  {t:6s} {model} {comp}: {r['wall_s']:.2f} s (CPU {r['user_s'] + r['sys_s']:.2f} s), "
                            f"{r['peak_rss_mb']:.0f} MiB")
    # the VGG16 explainers are ~0.7 GB each and not needed further
    for t in TREES:
        for f in (WORK / "explainers" / t).glob(f"{VGG}-*"):
            f.unlink()
    return runs


def startup(trees: dict, repeats: int) -> dict:
    """Wall time and peak RSS of `lrponnx --help` per tree: the part of every convert that is start-up."""
    out = {}
    for t in TREES:
        rs = [measured(trees[t]["cli"] + ["--help"]) for _ in range(max(3, repeats))]
        out[t] = {"wall_s": statistics.median(r["wall_s"] for r in rs),
                  "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)}
    return out


def summarize_timing(runs: dict) -> list[dict]:
    rows = []
    for (model, comp), by_tree in runs.items():
        row = {"model": model, "composite": comp}
        for t in TREES:
            ok = [r for r in by_tree[t] if not r["warmup"] and r["rc"] == 0]
            failed = [r for r in by_tree[t] if not r["warmup"] and r["rc"] != 0]
            row[t] = {"n": len(ok), "failed": len(failed),
                      "wall_s": statistics.median(r["wall_s"] for r in ok) if ok else None,
                      "wall_range": [min(r["wall_s"] for r in ok), max(r["wall_s"] for r in ok)] if ok else None,
                      "cpu_s": statistics.median(r["user_s"] + r["sys_s"] for r in ok) if ok else None,
                      "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok) if ok else None,
                      "explainer_bytes": ok[-1].get("explainer_bytes") if ok else None,
                      "error": failed[-1].get("stderr", "")[-300:] if failed else None}
        row["max_load"] = max((max(r["load"]) for t in TREES for r in by_tree[t] if not r["warmup"]), default=None)
        b, a = row["before"], row["after"]
        row["time_ratio"] = a["wall_s"] / b["wall_s"] if a["wall_s"] and b["wall_s"] else None
        row["cpu_ratio"] = a["cpu_s"] / b["cpu_s"] if a["cpu_s"] and b["cpu_s"] else None
        row["rss_ratio"] = a["peak_rss_mb"] / b["peak_rss_mb"] if a["peak_rss_mb"] and b["peak_rss_mb"] else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- equivalence

def preprocessing(path: Path) -> dict | None:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(meta["lrponnx.preprocessing"]) if "lrponnx.preprocessing" in meta else None


def to_input(rgb, pre: dict):
    """uint8 RGB [H, W, 3] -> float32 [C, H, W] in the model's input units, as the metadata says:
    channel order, pixel scale, then (x - mean) / std * scale, or pixels only when preprocessing is embedded."""
    import numpy as np

    x = rgb.astype(np.float32) * (float(pre.get("pixel_scale", 255.0)) / 255.0)
    order = pre.get("channel_order", "rgb")
    if order == "bgr":
        x = x[..., ::-1]
    elif order == "gray":
        x = x.mean(axis=2, keepdims=True)
    x = x.transpose(2, 0, 1)
    if pre.get("embedded"):
        return np.ascontiguousarray(x, np.float32)
    mean = np.asarray(pre.get("mean", 0.0), np.float32)
    std = np.asarray(pre.get("std", 1.0), np.float32)
    if mean.ndim == 1:
        mean = mean[:, None, None]
    if std.ndim == 1:
        std = std[:, None, None]
    return np.ascontiguousarray((x - mean) / std * float(pre.get("scale", 1.0)), np.float32)


def make_batch(path: Path, shared: Path):
    """The same inputs for both explainers: real photos (and CIFAR-10 test images for 32x32 models) and
    two random-pixel images (seed 0), preprocessed per the model's metadata. Returns (array, descriptions)."""
    import numpy as np
    from PIL import Image

    pre = preprocessing(path)
    if pre is None:
        raise SystemExit(f"{path}: no lrponnx.preprocessing metadata")
    h, w = pre["size"]
    files = [shared / "images" / "cat.jpg", shared / "images" / "fish-bike.jpg"]
    if (h, w) == (32, 32):
        files += [shared / "cifar10_test_sample" / "cat" / "0000.jpg", shared / "cifar10_test_sample" / "ship" / "0000.jpg"]
    xs, names = [], []
    for f in files:
        if f.exists():
            img = Image.open(f).convert("RGB").resize((w, h), Image.BILINEAR)
            xs.append(to_input(np.asarray(img), pre))
            names.append(f.relative_to(shared).as_posix())
    rng = np.random.default_rng(0)
    for i in range(2):
        xs.append(to_input(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), pre))
        names.append(f"random pixels #{i}")
    return np.stack(xs), names


def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_explainer(path: Path, x) -> dict:
    """All outputs of an explainer for batch ``x``, plus what its metadata says they are. The relevance is
    that of target -1 (the predicted class) followed by that of target 0 (a fixed class: the target path)."""
    import numpy as np
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    target = meta.get("lrponnx.target_input", "target")
    rel = json.loads(meta["lrponnx.relevance_outputs"])  # {model input: relevance output}
    s = session(path)
    data = [i.name for i in s.get_inputs() if i.name != target]
    if len(data) != 1:
        raise SystemExit(f"{path}: expected one data input, got {data}")
    names = [o.name for o in s.get_outputs()]
    out = dict(zip(names, s.run(names, {data[0]: x, target: np.full([x.shape[0]], -1, np.int64)})))
    fixed = dict(zip(names, s.run(names, {data[0]: x, target: np.zeros([x.shape[0]], np.int64)})))
    return {"relevance": {k: np.concatenate([out[v], fixed[v]]) for k, v in rel.items()},
            "outputs": {k: v for k, v in out.items() if k not in rel.values()},
            "explained": meta.get("lrponnx.output"), "rules": json.loads(meta.get("lrponnx.rules", "{}"))}


def graph_facts(path: Path) -> dict:
    import collections

    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {"nodes": len(m.graph.node), "initializers": len(m.graph.initializer),
            "ops": dict(collections.Counter(n.op_type for n in m.graph.node))}


def graph_diff(before: Path, after: Path) -> dict:
    """Where two explainers differ: the same nodes (op, inputs, outputs, in order)? which initializers
    (by name) hold different values, with the largest difference and the largest magnitude there."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    b, a = onnx.load(str(before)), onnx.load(str(after))

    def nodes(m):
        return [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]

    ib = {t.name: t for t in b.graph.initializer}
    ia = {t.name: t for t in a.graph.initializer}
    consts = []
    for name in sorted(set(ib) & set(ia)):
        x, y = numpy_helper.to_array(ib[name]), numpy_helper.to_array(ia[name])
        if x.shape != y.shape:
            consts.append({"name": name, "shape": [list(x.shape), list(y.shape)]})
        elif not np.array_equal(x, y):
            d = np.abs(x.astype(np.float64) - y.astype(np.float64))
            consts.append({"name": name, "max_abs_diff": float(d.max()), "max_abs": float(np.abs(x).max())})
    return {"nodes_equal": nodes(b) == nodes(a), "only_before": sorted(set(ib) - set(ia))[:5],
            "only_after": sorted(set(ia) - set(ib))[:5], "constants": consts}


def rel_l2(a, b):
    import numpy as np

    n = a.shape[0]
    a64, b64 = a.reshape(n, -1).astype(np.float64), b.reshape(n, -1).astype(np.float64)
    den = np.linalg.norm(b64, axis=1)
    num = np.linalg.norm(a64 - b64, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.where(num > 0, np.inf, 0.0))


def compare(model: str, comp: str, path: Path, shared: Path, tol: float) -> dict:
    import numpy as np

    eb, ea = explainer_path("before", model, comp), explainer_path("after", model, comp)
    row = {"model": model, "composite": comp}
    missing = [str(p) for p in (eb, ea) if not p.exists()]
    if missing:
        row.update(status="missing explainer (convert failed?)", missing=missing, passed=False)
        return row
    x, names = make_batch(path, shared)
    b, a = run_explainer(eb, x), run_explainer(ea, x)
    row["samples"] = names
    errs, problems = [], []
    if set(b["relevance"]) != set(a["relevance"]):
        problems.append(f"relevance outputs differ: {sorted(b['relevance'])} vs {sorted(a['relevance'])}")
    for k in set(b["relevance"]) & set(a["relevance"]):
        errs.append(rel_l2(a["relevance"][k], b["relevance"][k]))
    per_sample = np.max(np.stack(errs), axis=0) if errs else np.array([np.inf])
    out_diff = 0.0
    if set(b["outputs"]) != set(a["outputs"]):
        problems.append(f"outputs differ: {sorted(b['outputs'])} vs {sorted(a['outputs'])}")
    for k in set(b["outputs"]) & set(a["outputs"]):
        out_diff = max(out_diff, float(np.max(np.abs(a["outputs"][k].astype(np.float64) - b["outputs"][k]))))
    scores = b["explained"] if b["explained"] in b["outputs"] else next(iter(b["outputs"]))
    cls_b = np.argmax(b["outputs"][scores].reshape(len(x), -1), axis=1)
    cls_a = np.argmax(a["outputs"].get(scores, b["outputs"][scores]).reshape(len(x), -1), axis=1)
    row.update(rel_l2=[float(v) for v in per_sample], max_rel_l2=float(per_sample.max()), max_abs_output_diff=out_diff,
               classes=cls_b.tolist(), classes_equal=bool((cls_a == cls_b).all()),
               rules_equal=b["rules"] == a["rules"], graph_before=graph_facts(eb), graph_after=graph_facts(ea),
               problems=problems)
    if not row["rules_equal"]:
        keys = sorted(set(b["rules"]) | set(a["rules"]))
        row["rules_diff"] = {k: [b["rules"].get(k), a["rules"].get(k)] for k in keys
                             if b["rules"].get(k) != a["rules"].get(k)}
    if row["max_rel_l2"] > 0:  # how much does ORT alone move between two sessions of the same file?
        b2 = run_explainer(eb, x)
        row["noise_rel_l2"] = float(max(rel_l2(b2["relevance"][k], b["relevance"][k]).max() for k in b["relevance"]))
        row["where"] = graph_diff(eb, ea)
    row["passed"] = not problems and row["max_rel_l2"] <= tol and row["classes_equal"]
    log(f"  {model} {comp}: max rel L2 {row['max_rel_l2']:.2e}, outputs max |diff| {out_diff:.2e}, "
        f"rules equal {row['rules_equal']}, nodes {row['graph_before']['nodes']} -> {row['graph_after']['nodes']}"
        + (f"; {problems}" if problems else ""))
    return row


# ----------------------------------------------------------------------------- the page

def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def render(res: dict) -> str:
    L = []
    tb, ta = res["trees"]["before"], res["trees"]["after"]
    L.append(f"Written by `{res['command']}` ({res['started']}, took {res['elapsed_s'] / 60:.1f} min; "
             f"{res['machine']}; load average {res['load'][0]:.1f} at the start, {res['load'][1]:.1f} at the end: "
             "above ~2.5 other work shared the 2 cores).")
    loads = [r["max_load"] for r in res.get("timing", []) if r.get("max_load") is not None]
    if loads and max(loads) > 2.5:
        L.append(f"\n**The timings below are not reliable**: the load average reached {max(loads):.1f} during the "
                 "convert runs (other work on the machine); rerun when the machine is quiet (load < 2). Peak RSS "
                 "and the relevance comparison do not depend on load.\n")
    for name, t in (("before", tb), ("after", ta)):
        dirty = " + uncommitted changes" if t["dirty"] else ""
        vs = ", ".join(f"{k} {v}" for k, v in t["versions"].items())
        L.append(f"- **{name}**: `{t['root']}` at `{t['commit']}`{dirty}, CLI `{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(t['cli']))}`; {vs}")
    L.append("")
    if res.get("timing"):
        L.append("### `convert`: time and peak memory\n")
        L.append(f"Median of {res['repeats']} run(s) per tree after one warm-up round; the two trees alternate "
                 "within each round, each after an `os.sync()` (so that the previous run's file writeback does not land in "
                 "the next run's time). Each run is one `lrponnx convert MODEL -o OUT --composite C` process "
                 "(defaults otherwise), timed through `bench/measure.py` (wall time; peak RSS = `ru_maxrss` "
                 "from `wait4`, start-up and imports included: `lrponnx --help` alone takes "
                 f"{res['startup']['before']['wall_s']:.2f} s / {res['startup']['before']['peak_rss_mb']:.0f} MiB before, "
                 f"{res['startup']['after']['wall_s']:.2f} s / {res['startup']['after']['peak_rss_mb']:.0f} MiB after). "
                 "CPU = user + system time of the process (less sensitive than wall time to other work on the "
                 f"machine). Verdict **worse** (time) when both the wall and the CPU ratio exceed "
                 f"{1 + res['time_tol']:.2f} and the wall time grew by more than {res['time_slack']:g} s; "
                 f"**worse** (memory) when the RSS ratio exceeds {1 + res['rss_tol']:.2f} and RSS grew by more "
                 f"than {res['rss_slack']:g} MiB.\n")
        L.append("| model | composite | wall before (s) | wall after (s) | after / before | CPU before (s) | "
                 "CPU after (s) | after / before | peak RSS before (MiB) | peak RSS after (MiB) | after / before | "
                 "explainer MiB before / after | verdict |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in res["timing"]:
            b, a = r["before"], r["after"]
            worse = []
            if r["time_ratio"] is None or r["rss_ratio"] is None:
                verdict = "**failed**: " + (b["error"] or a["error"] or "?").replace("|", "/").replace("\n", " ")[:120]
            else:
                # slower = both wall and CPU time beyond the tolerance (load from other work stretches the wall
                # time alone) and by more than the absolute slack (sub-second runs are mostly start-up)
                if (r["time_ratio"] > 1 + res["time_tol"] and (r["cpu_ratio"] or 0) > 1 + res["time_tol"]
                        and a["wall_s"] - b["wall_s"] > res["time_slack"]):
                    worse.append("time")
                if r["rss_ratio"] > 1 + res["rss_tol"] and a["peak_rss_mb"] - b["peak_rss_mb"] > res["rss_slack"]:
                    worse.append("memory")
                verdict = ("**worse** (" + ", ".join(worse) + ")") if worse else "no worse"
                fails = [f"{s['failed']} {t} run(s) failed" for t, s in (("before", b), ("after", a)) if s["failed"]]
                if fails:  # medians of the runs that succeeded; say so
                    verdict += "; **" + ", ".join(fails) + "**"
            sizes = " / ".join(_f(s["explainer_bytes"] / 2**20 if s["explainer_bytes"] else None, ".1f") for s in (b, a))
            L.append(f"| {LABELS[r['model']]} | {r['composite']} | {_f(b['wall_s'], '.2f')} | {_f(a['wall_s'], '.2f')} | "
                     f"{_f(r['time_ratio'], '.2f')} | {_f(b['cpu_s'], '.2f')} | {_f(a['cpu_s'], '.2f')} | "
                     f"{_f(r['cpu_ratio'], '.2f')} | {_f(b['peak_rss_mb'], '.0f')} | {_f(a['peak_rss_mb'], '.0f')} | "
                     f"{_f(r['rss_ratio'], '.2f')} | {sizes} | {verdict} |")
        L.append("")
    if res.get("equivalence"):
        L.append("### Same relevance\n")
        L.append("Both trees' explainers (from the last convert round), run in the same onnxruntime "
                 f"({ta['versions'].get('onnxruntime')}, CPU, {THREADS} threads) on the same batch: Caffe's "
                 "`cat.jpg` and `fish-bike.jpg`, for 32x32 models also CIFAR-10 test images `cat/0000.jpg` and "
                 "`ship/0000.jpg`, and two images of random pixels (seed 0), each preprocessed as the model's "
                 "metadata says; each sample explained for target -1 (predicted class) and target 0. Relative "
                 "L2 = `||R_after - R_before|| / ||R_before||` per sample and target (the largest is shown);"
                 f" pass when <= {res['tolerance']:g} and the explained classes "
                 "agree. Rules: the per-node rule table the explainers record (`lrponnx.rules` metadata).\n")
        L.append("| model | composite | samples × targets | max relative L2 (relevance) | max abs diff (outputs) | "
                 "classes equal | rules equal | explainer nodes before → after | pass |")
        L.append("|---|---|---:|---:|---:|---|---|---:|---|")
        for r in res["equivalence"]:
            if "max_rel_l2" not in r:
                L.append(f"| {LABELS[r['model']]} | {r['composite']} | — | — | — | — | — | — | **no**: {r['status']} |")
                continue
            noise = f" (ORT noise {r['noise_rel_l2']:.1e})" if "noise_rel_l2" in r else ""
            extra = ("; " + "; ".join(r["problems"])) if r["problems"] else ""
            L.append(f"| {LABELS[r['model']]} | {r['composite']} | {len(r['samples'])} × 2 | {r['max_rel_l2']:.1e}{noise} | "
                     f"{r['max_abs_output_diff']:.1e} | {'yes' if r['classes_equal'] else '**no**'} | "
                     f"{'yes' if r['rules_equal'] else '**no**'} | {r['graph_before']['nodes']} → "
                     f"{r['graph_after']['nodes']} | {'yes' if r['passed'] else '**no**'}{extra} |")
        for r in res["equivalence"]:
            w = r.get("where")
            if not w:
                continue
            parts = ["the same nodes" if w["nodes_equal"] else "**different nodes**"]
            for c in w["constants"][:3]:
                parts.append(f"constant `{c['name']}` " + (f"max abs diff {c['max_abs_diff']:.1e} (values up to "
                             f"{c['max_abs']:.1e})" if "max_abs_diff" in c else f"shape {c['shape'][0]} → {c['shape'][1]}"))
            if len(w["constants"]) > 3:
                parts.append(f"{len(w['constants']) - 3} more constants")
            if w["only_before"] or w["only_after"]:
                parts.append(f"initializers only before {w['only_before']}, only after {w['only_after']}")
            L.append(f"\nWhere {LABELS[r['model']]} / {r['composite']} differs: " + "; ".join(parts) + ".")
        diffs = [r for r in res["equivalence"] if r.get("rules_diff")]
        for r in diffs:
            shown = "; ".join(f"`{k}`: `{v[0]}` → `{v[1]}`" for k, v in list(r["rules_diff"].items())[:4])
            L.append(f"\nRules that differ in {LABELS[r['model']]} / {r['composite']}: {shown}"
                     + (" …" if len(r["rules_diff"]) > 4 else ""))
        L.append("")
    L.append("Rerun: `.venv/bin/python bench/redesign_compare.py --before-python /tmp/basevenv/bin/python` "
             "(setup of the before tree in the script's docstring); raw numbers: `bench/_work/redesign/results.json`.")
    return "\n".join(L)


def write_doc(text: str) -> None:
    """Replace this script's block of docs/benchmarks.md (added at the end, with its heading, the first time)."""
    sys.path.insert(0, str(HERE))
    from docs_block import replace_block

    doc = DOC.read_text()
    if MARKS[0] not in doc:
        DOC.write_text(doc.rstrip("\n") + f"\n\n{HEADING}\n\n{MARKS[0]}\n{MARKS[1]}\n")
    replace_block(DOC, *MARKS, text)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before-python", required=True, help="interpreter whose `import lrponnx` is the before tree")
    p.add_argument("--after-python", default=sys.executable, help="interpreter of the after tree (default: this one)")
    p.add_argument("--quick", action="store_true", help="1 timed round and no VGG16 (~2 min)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3, --quick 1)")
    p.add_argument("--models", default=None, help="comma-separated, of " + ", ".join(LABELS))
    p.add_argument("--composites", default=",".join(COMPOSITES))
    p.add_argument("--shared-data", default=None, help="the shared data folder (default $LRPONNX_SHARED_DATA "
                   "or <repo>/../shared/data)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the zoo models with the before tree")
    p.add_argument("--no-timing", action="store_true", help="skip the convert timing (equivalence converts once)")
    p.add_argument("--no-equivalence", action="store_true")
    p.add_argument("--tolerance", type=float, default=1e-6, help="relative L2 allowed per sample (default 1e-6)")
    p.add_argument("--time-tol", type=float, default=0.10, help="after/before time ratio above 1 + this is worse")
    p.add_argument("--time-slack", type=float, default=0.05, help="seconds a convert may grow before it is worse")
    p.add_argument("--rss-tol", type=float, default=0.05, help="after/before RSS ratio above 1 + this is worse")
    p.add_argument("--rss-slack", type=float, default=5.0, help="MiB the peak RSS may grow before it is worse")
    p.add_argument("--no-docs", action="store_true", help="print the section instead of writing docs/benchmarks.md")
    p.add_argument("--render", metavar="RESULTS_JSON", help="only re-render the docs section from a results.json "
                   "of an earlier run (e.g. bench/_work/redesign/results.json)")
    args = p.parse_args(argv)

    if args.render:
        res = json.loads(Path(args.render).read_text())
        if res.get("timing_runs"):  # summarise again: the summary may have changed since that run
            res["timing"] = summarize_timing({(x["model"], x["composite"]): x["runs"] for x in res["timing_runs"]})
        text = render(res)
        if args.no_docs:
            print(text)
        else:
            write_doc(text)
        return 0
    t0 = time.time()
    argv_used = argv if argv is not None else sys.argv[1:]
    command = "python bench/redesign_compare.py " + " ".join(shlex.quote(a) for a in argv_used)
    names = args.models.split(",") if args.models else list(ZOO) + ([] if args.quick else [VGG])
    unknown = [n for n in names if n not in LABELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(LABELS)}")
    composites = [c for c in args.composites.split(",") if c]
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    shared = shared_dir(args.shared_data)

    trees = {"before": probe_tree("before", args.before_python), "after": probe_tree("after", args.after_python)}
    for t, info in trees.items():
        log(f"{t}: {info['file']} ({info['commit']}{', dirty' if info['dirty'] else ''}), CLI {info['cli']}, {info['versions']}")
    if Path(trees["before"]["file"]).resolve() == Path(trees["after"]["file"]).resolve():
        raise SystemExit("both interpreters import the same lrponnx: give --before-python the before tree's venv")
    for k in ("onnx", "onnxruntime", "numpy", "protobuf"):
        if trees["before"]["versions"].get(k) != trees["after"]["versions"].get(k):
            log(f"WARNING: {k} differs: before {trees['before']['versions'].get(k)}, after {trees['after']['versions'].get(k)}")

    models = build_models(names, trees["before"], shared, args.rebuild)
    res = {"command": command, "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "trees": trees, "repeats": repeats,
           "time_tol": args.time_tol, "rss_tol": args.rss_tol, "time_slack": args.time_slack,
           "rss_slack": args.rss_slack, "tolerance": args.tolerance,
           "models": {n: str(pth) for n, pth in models.items()}}
    load_start = os.getloadavg()[0]

    if not args.no_timing:
        runs = time_converts(trees, models, composites, repeats)
        res["startup"] = startup(trees, repeats)
        res["timing"] = summarize_timing(runs)
        res["timing_runs"] = [{"model": m, "composite": c, "runs": v} for (m, c), v in runs.items()]
    else:  # the equivalence still needs each tree's explainers
        eq_models = {n: pth for n, pth in models.items() if n in ZOO}
        time_converts(trees, eq_models, composites, 0)

    if not args.no_equivalence:
        log("equivalence")
        res["equivalence"] = [compare(m, c, models[m], shared, args.tolerance)
                              for m in models if m in ZOO for c in composites]

    res["load"] = [load_start, os.getloadavg()[0]]
    res["elapsed_s"] = time.time() - t0
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "results.json").write_text(json.dumps(res, indent=1, default=str))
    text = render(res)
    if args.no_docs:
        print(text)
    else:
        write_doc(text)
        log(f"wrote {DOC} ({HEADING})")
    log(f"done in {res['elapsed_s'] / 60:.1f} min")
    failed = [r for r in res.get("equivalence", []) if not r.get("passed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

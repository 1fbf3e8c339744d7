"""lrponnx benchmarks: explaining vs predicting on ONNX Runtime, vs Zennit (and Captum) on PyTorch.

    python bench/run.py            # full run (batch 1 and 32), writes docs/benchmarks.md
    python bench/run.py --quick    # development: batch 1 and 8, few repeats

Every measurement runs in its own process (``bench/worker.py``), one per engine and case, one at a
time, each with 2 intra-op threads. Per model and batch the engines run side by side in this order:
ORT forward, then per composite the ORT explainer and Zennit; ratios are taken from this run only.
``lrponnx convert`` is timed as a child process (wall time and peak RSS from ``wait4``).

Models are built into ``bench/_work/`` (git-ignored): a full run rebuilds the zoo models (the converter may
have changed), ``--quick`` reuses them unless ``--rebuild``; the VGG16-sized model is built once.
Raw results: ``bench/_work/results.json`` (every sample of every measurement).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work"
MODELS = WORK / "models"
EXPLAINERS = WORK / "explainers"
THREADS = 2
COMPOSITES = ("epsilon-plus-flat", "epsilon-gamma-box")
LRN_RULE = "taylor"

# name -> (zoo name, label)
CASES = {
    "cifar10-full-caffe": "cifar10_full (Caffe, trained)",
    "bvlc-caffenet": "CaffeNet (random weights)",
    "bvlc-googlenet": "GoogLeNet (random weights)",
}
TARGET_MODELS = ("bvlc-caffenet", "bvlc-googlenet")
TARGET_BATCH = 32
TARGET_EXPLAIN = {"epsilon-plus-flat": 3.2, "epsilon-gamma-box": 5.5}
TARGET_ZENNIT = 2.0
TARGET_CONVERT_S = 10.0
TARGET_CONVERT_RSS = 2.0

PROFILES = {
    #          batches, warmup, min_repeats, max_repeats, budget_s per measurement
    "full": dict(batches=[1, 32], warmup=2, min_repeats=5, max_repeats=30, budget_s=4.0),
    "quick": dict(batches=[1, 8], warmup=1, min_repeats=3, max_repeats=10, budget_s=1.5),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env() -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(THREADS)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def measured(cmd: list[str], timeout: float = 1800, capture: bool = False) -> dict:
    """Run ``cmd`` through ``bench/measure.py``: rc, wall seconds, peak RSS (MiB) of the command alone,
    stderr tail, and (``capture``) its stdout."""
    launcher = [sys.executable, "-S", str(HERE / "measure.py"), "--timeout", str(timeout)]
    if capture:
        launcher.append("--capture")
    p = subprocess.run(launcher + ["--"] + cmd, capture_output=True, env=child_env(), cwd=ROOT)
    try:
        return json.loads(p.stdout.decode().strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"rc": f"launcher failed ({p.returncode})", "wall_s": None, "peak_rss_mb": None,
                "stderr": p.stderr.decode(errors="replace")[-2000:], "stdout": ""}


def worker(engine: str, **kw) -> dict:
    cmd = [sys.executable, str(HERE / "worker.py"), engine]
    for k, v in kw.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            cmd.append(flag)
        else:
            cmd += [flag, json.dumps(v) if isinstance(v, (list, dict)) else str(v)]
    load_before = os.getloadavg()[0]
    r = measured(cmd, timeout=1800, capture=True)
    res = None
    for line in reversed(r["stdout"].strip().splitlines()):
        if line.startswith("{"):
            try:
                res = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if res is None:
        res = {"engine": engine, "status": "error", "error": f"worker exit {r['rc']}: {r['stderr'][-500:]}"}
    res["process_wall_s"] = r["wall_s"]
    res["process_peak_rss_mb"] = r["peak_rss_mb"]
    res["loadavg_before"] = load_before
    res["loadavg_after"] = os.getloadavg()[0]
    if res.get("status") == "error":
        log(f"  {engine}: ERROR {res.get('error')}")
    return res


# ----------------------------------------------------------------------------- models

def file_size(path: Path) -> int:
    """Bytes on disk of an ONNX file plus the external data files it references."""
    import onnx

    from lrponnx.compiler.load import model_tensors

    path = Path(path)
    total = path.stat().st_size
    m = onnx.load(str(path), load_external_data=False)
    locs = set()
    for t in model_tensors(m):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    locs.add(e.value)
    return total + sum((path.parent / loc).stat().st_size for loc in locs)


def param_count(path: Path) -> int:
    import numpy as np
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in m.graph.initializer))


def build_models(names, rebuild: bool) -> dict:
    """Build the zoo models into bench/_work/models; returns {name: {"path", "note"}}."""
    from lrponnx.model_zoo import registry

    MODELS.mkdir(parents=True, exist_ok=True)
    info = {}
    for name in names:
        out = MODELS / f"{name}.onnx"
        note_file = MODELS / f"{name}.note"
        if out.exists() and not rebuild:
            info[name] = {"path": out, "note": note_file.read_text() if note_file.exists() else ""}
            continue
        log(f"building {name}")
        note = ""
        try:
            built = registry.build(name, MODELS)
            assert Path(built) == out, built
        except Exception as e:
            if name != "cifar10-full-caffe":
                raise
            # the zoo recipe may still be in progress: convert directly with the per-channel mean
            note = (f"zoo build failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); built with "
                    "lrponnx.converters.caffe.convert and the per-channel mean of the mean image")
            log("  " + note)
            _build_cifar_fallback(out)
        note_file.write_text(note)
        info[name] = {"path": out, "note": note}
    return info


def _build_cifar_fallback(out: Path) -> None:
    import numpy as np
    import onnx
    from lrponnx.converters.caffe import convert
    from lrponnx.model_zoo._shared import require_shared

    base = ("caffe", "cifar10_full")
    mean = np.load(require_shared(*base, "mean_rgb_3x32x32.npy")).astype(np.float32)
    m = convert(str(require_shared(*base, "cifar10_full.prototxt")),
                str(require_shared(*base, "cifar10_full_iter_70000.caffemodel")),
                mean=mean.reshape(3, -1).mean(axis=1).tolist(), channel_order="rgb")
    onnx.save(m, str(out))


def zbox_bounds(path: Path):
    """The bounds lrponnx derives from the model's preprocessing metadata (passed to every engine)."""
    import onnx
    from lrponnx.compiler.emit import _bounds_from_metadata

    low, high = _bounds_from_metadata(onnx.load(str(path), load_external_data=False))
    if low is None:
        raise SystemExit(f"{path}: no preprocessing metadata for the zbox bounds")
    return [round(float(v), 6) for v in low], [round(float(v), 6) for v in high]


def lrponnx_cli() -> list[str]:
    exe = Path(sys.executable).with_name("lrponnx")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lrponnx.app.cli"]


def convert_cmd(model: Path, out: Path, composite: str, low, high) -> list[str]:
    cmd = lrponnx_cli() + ["convert", str(model), "-o", str(out), "--composite", composite, "--lrn-rule", LRN_RULE]
    if composite == "epsilon-gamma-box":
        cmd += ["--low=" + ",".join(f"{v:g}" for v in low), "--high=" + ",".join(f"{v:g}" for v in high)]
    return cmd


def measure_convert(label: str, model: Path, composite: str, low, high) -> dict:
    EXPLAINERS.mkdir(parents=True, exist_ok=True)
    out = EXPLAINERS / f"{model.stem}-{composite}.onnx"
    for old in (out, out.with_name(out.name + ".data")):
        if old.exists():
            old.unlink()
    cmd = convert_cmd(model, out, composite, low, high)
    r = measured(cmd)
    r.update(model=label, composite=composite, command=" ".join(shlex.quote(c) for c in cmd),
             model_bytes=file_size(model), params=param_count(model), explainer=str(out))
    if r["rc"] == 0:
        r["explainer_bytes"] = file_size(out)
        log(f"  convert {label} {composite}: {r['wall_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MiB, "
            f"explainer {r['explainer_bytes'] / 2**20:.0f} MiB (model {r['model_bytes'] / 2**20:.0f} MiB)")
    else:
        log(f"  convert {label} {composite}: FAILED rc={r['rc']}: {r['stderr'][-300:]}")
    return r


# ----------------------------------------------------------------------------- facts

def machine_facts() -> dict:
    facts = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        kv = {}
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            kv[k.strip()] = v.strip()
        facts["cpu_model"] = kv.get("Model name")
        facts["cores_per_socket"] = kv.get("Core(s) per socket")
        facts["threads_per_core"] = kv.get("Thread(s) per core")
        facts["sockets"] = kv.get("Socket(s)")
        facts["cpus"] = kv.get("CPU(s)")
        facts["hypervisor"] = kv.get("Hypervisor vendor")
        facts["l2_l3"] = f"L2 {kv.get('L2 cache', '?')}, L3 {kv.get('L3 cache', '?')}"
        flags = kv.get("Flags", "").split()
        facts["isa"] = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags)
    except Exception as e:  # pragma: no cover
        facts["lscpu_error"] = str(e)
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        facts["mem_total_gib"] = round(int(mem) / 2**20, 1)
    except Exception:
        pass
    return facts


def versions() -> dict:
    out = {}
    code = ("import json, importlib.metadata as md\n"
            "v = {}\n"
            "for p in ['lrponnx','onnx','onnxruntime','numpy','torch','torchvision','zennit','captum','protobuf']:\n"
            "    try: v[p] = md.version(p)\n"
            "    except Exception: v[p] = None\n"
            "print(json.dumps(v))\n")
    try:
        out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        timeout=60).stdout)
    except Exception as e:  # pragma: no cover
        out = {"error": str(e)}
    return out


# ----------------------------------------------------------------------------- the run

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 1 and 8, few repeats (development)")
    p.add_argument("--models", default=",".join(CASES), help="comma-separated zoo names")
    p.add_argument("--batches", default=None, help="override the batch sizes, e.g. 1,32")
    p.add_argument("--composites", default=",".join(COMPOSITES))
    p.add_argument("--no-zennit", action="store_true")
    p.add_argument("--no-captum", action="store_true")
    p.add_argument("--no-vgg16", action="store_true", help="skip the VGG16-sized convert measurement")
    p.add_argument("--rebuild", action="store_true", help="rebuild the zoo models in bench/_work (a full run always "
                   "does, unless --reuse-models)")
    p.add_argument("--reuse-models", action="store_true", help="full run: reuse the zoo models built before")
    p.add_argument("--no-parity", action="store_true", help="skip the lrponnx-vs-Zennit parity check (bench/parity.py)")
    p.add_argument("--profile", action="store_true", help="also write per-node ORT profiles of the explainers "
                   "(bench/_work/profiles/, at the largest batch; not timed)")
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--json", default=str(WORK / "results.json"))
    args = p.parse_args(argv)

    cfg = dict(PROFILES["quick" if args.quick else "full"])
    if args.batches:
        cfg["batches"] = [int(b) for b in args.batches.split(",")]
    names = [n for n in args.models.split(",") if n]
    composites = [c for c in args.composites.split(",") if c]
    command = "python bench/run.py" + (" " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
                                       if (argv if argv is not None else sys.argv[1:]) else "")
    t_start = time.time()
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    results = {"command": command, "started": started, "mode": "quick" if args.quick else "full", "config": cfg,
               "threads": THREADS, "machine": machine_facts(), "versions": versions(),
               "loadavg_start": os.getloadavg(), "models": {}, "convert": [], "bench": [], "captum": []}
    log(f"{command}: {results['machine'].get('cpu_model')}, load {results['loadavg_start'][0]:.1f}")

    rebuild = args.rebuild or (not args.quick and not args.reuse_models)
    models = build_models(names, rebuild)
    bounds = {}
    for name, m in models.items():
        low, high = zbox_bounds(m["path"])
        bounds[name] = (low, high)
        results["models"][name] = {"path": str(m["path"]), "note": m["note"], "low": low, "high": high,
                                   "bytes": file_size(m["path"]), "params": param_count(m["path"])}

    # 1. convert (also produces the explainers the bench uses)
    log("convert")
    explainers = {}
    for name, m in models.items():
        for comp in composites:
            r = measure_convert(CASES[name], m["path"], comp, *bounds[name])
            results["convert"].append(r)
            explainers[(name, comp)] = Path(r["explainer"]) if r["rc"] == 0 else None
    if not args.no_vgg16:
        sys.path.insert(0, str(HERE))
        import make_vgg16

        vgg = make_vgg16.DEFAULT_DIR / "vgg16.onnx"
        if not vgg.exists() or args.rebuild:
            log("building the VGG16-sized model (once)")
            r = measured([sys.executable, str(HERE / "make_vgg16.py")], timeout=1800)
            if r["rc"] != 0:
                log(f"  VGG16 build failed: {r['stderr'][-500:]}")
        if vgg.exists():
            for comp in (composites if not args.quick else composites[:1]):
                r = measure_convert("VGG16 (torchvision, random weights)", vgg, comp, *make_vgg16.BOUNDS)
                r["target_model"] = True
                results["convert"].append(r)
            for f in EXPLAINERS.glob("vgg16-*"):  # ~0.7-0.8 GB each, not needed further
                f.unlink()
    baseline = measured([sys.executable, "-c", "import lrponnx.app.cli, lrponnx.compiler.emit, lrponnx.files"])
    results["convert_baseline"] = {"wall_s": baseline["wall_s"], "peak_rss_mb": baseline["peak_rss_mb"]}

    # 2. the two sides compute the same composite (LRN passed through on both sides)
    results["parity"] = []
    if not args.no_parity and not args.no_zennit:
        log("parity lrponnx vs Zennit (LRN identity / Pass)")
        for name, m in models.items():
            for comp in composites:
                r = measured([sys.executable, str(HERE / "parity.py"), str(m["path"]), "--composite", comp,
                              "--batch", "2"], capture=True)
                try:
                    d = json.loads(r["stdout"])
                    err = max(d["rel_l2_err"])
                except Exception:
                    d, err = {"error": r.get("stderr", "")[-300:]}, None
                d.update(model=name, composite=comp, max_rel_l2_err=err)
                results["parity"].append(d)
                log(f"  {name} {comp}: max relative L2 error {err if err is None else f'{err:.1e}'}")

    # 3. timings, side by side per model and batch
    common = dict(warmup=cfg["warmup"], min_repeats=cfg["min_repeats"], max_repeats=cfg["max_repeats"],
                  budget_s=cfg["budget_s"], threads=THREADS)
    for name, m in models.items():
        low, high = bounds[name]
        for bi, batch in enumerate(cfg["batches"]):
            log(f"{name} batch {batch}")
            fwd = worker("ort-forward", model=m["path"], batch=batch, **common)
            _say("ORT forward", fwd)
            first = explainers.get((name, composites[0])) if composites else None
            fwd_part = (worker("ort-explainer-forward", model=m["path"], explainer=first, batch=batch, **common)
                        if first else None)
            if fwd_part:
                _say("explainer's forward part", fwd_part)
            for ci, comp in enumerate(composites):
                row = {"model": name, "label": CASES[name], "batch": batch, "composite": comp, "forward": fwd,
                       "forward_part": fwd_part}
                ex = explainers.get((name, comp))
                row["explainer"] = (worker("ort-explainer", model=m["path"], explainer=ex, batch=batch, **common)
                                    if ex else {"status": "error", "error": "convert failed"})
                _say(f"explainer {comp}", row["explainer"])
                if not args.no_zennit:
                    row["zennit"] = worker("zennit", model=m["path"], batch=batch, composite=comp, low=low,
                                           high=high, check=(bi == 0 and ci == 0), torch_forward=(ci == 0),
                                           **common)
                    _say(f"zennit {comp}", row["zennit"])
                results["bench"].append(row)
        if not args.no_captum:
            r = worker("captum", model=m["path"], batch=1, **common)
            r["model"] = name
            results["captum"].append(r)
            log(f"  captum: {r.get('status')} {r.get('error', '')[:160]}")
        if args.profile:
            results.setdefault("profiles", []).extend(
                _profiles(name, m["path"], composites, explainers, max(cfg["batches"])))

    results["loadavg_end"] = os.getloadavg()
    results["elapsed_s"] = time.time() - t_start
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    sys.path.insert(0, str(HERE))
    from report import write_markdown

    write_markdown(results, Path(args.output))
    log(f"wrote {args.output} and {args.json} in {results['elapsed_s'] / 60:.1f} min")
    return 0


def _say(what: str, r: dict) -> None:
    if r.get("status") == "ok" and "median_s" in r:
        log(f"  {what}: {r['median_s'] * 1e3:.1f} ms (median of {r['repeats']}, load {r['loadavg_after']:.1f})")


def _profiles(name, path, composites, explainers, batch) -> list:
    out = WORK / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    found = []
    for comp in composites:
        ex = explainers.get((name, comp))
        if not ex:
            continue
        txt = out / f"{name}-{comp}-b{batch}.txt"
        js = txt.with_suffix(".json")
        r = measured([sys.executable, str(HERE / "profile_explainer.py"), str(path), str(ex), "--batch", str(batch),
                      "--runs", "2", "--json", str(js)], timeout=1800, capture=True)
        txt.write_text(r.get("stdout", "") + r.get("stderr", ""))
        log(f"  profile -> {txt}")
        if js.exists():
            d = json.loads(js.read_text())
            found.append({"model": name, "composite": comp, "batch": batch, "text": str(txt),
                          "model_run_ms": d["model_run_ms"], "explainer_run_ms": d["explainer_run_ms"],
                          "parts_ms": d["parts_ms"], "by_op": d["by_op"], "top_nodes": d["nodes"][:10]})
    return found


if __name__ == "__main__":
    sys.exit(main())

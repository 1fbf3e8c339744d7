"""GPU timings (called by run_gpu.sh): CaffeNet and GoogLeNet (random weights), batch 32.

(a) the model's forward pass on ONNX Runtime's CUDA EP, (b) the lrponnx explainer on the CUDA EP,
(c) Zennit 0.5.1 on PyTorch CUDA (same weights via bench/onnx_to_torch.py, LRN: plain gradient),
plus the PyTorch forward for reference. ORT runs with I/O binding (input and outputs stay on the
GPU, like the torch tensors); a plain ``run`` with numpy arrays (host copies included) is timed too.

Models are built here from the BVLC deploy prototxts with ``random_weights=0`` (they are too big to
carry). Every part is in try/except; results are written to ``$OUT/gpu_results.json`` and
``$OUT/gpu_results.md`` after each part, so a timeout still leaves what was measured.

    python3 bench/gpu/gpu_bench.py [--batch 32] [--deadline-s 270] [--cpu-only]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

MODELS = {
    "bvlc-caffenet": "bvlc_reference_caffenet",
    "bvlc-googlenet": "bvlc_googlenet",
}
MEAN_BGR = [104.0, 117.0, 123.0]
LOW = [-m for m in MEAN_BGR]
HIGH = [255.0 - m for m in MEAN_BGR]
COMPOSITES = ("epsilon-plus-flat", "epsilon-gamma-box")

T0 = time.perf_counter()
RES: dict = {"errors": [], "results": []}


def elapsed() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def fail(what: str, e: BaseException) -> None:
    msg = f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
    RES["errors"].append(msg)
    log("FAILED " + msg)
    traceback.print_exc()


def prototxt(folder: str) -> Path:
    cands = [BENCH / "gpu" / f"{folder}.prototxt", BENCH / "_gpu_wheel" / "extra" / f"{folder}.prototxt",
             BENCH / "_gpu_wheel" / f"{folder}.prototxt"]
    if os.environ.get("LRPONNX_SHARED_DATA"):
        cands.append(Path(os.environ["LRPONNX_SHARED_DATA"]) / "caffe" / folder / "deploy.prototxt")
    cands.append(ROOT.parent / "shared" / "data" / "caffe" / folder / "deploy.prototxt")
    for c in cands:
        if c.exists():
            return c
    raise FileNotFoundError(f"no prototxt for {folder}; looked in {[str(c) for c in cands]}")


def import_caffe_convert():
    """lrponnx.converters lives in <repo>/converters (package-dir mapping); without an install, add the
    repo root to lrponnx's package path so that ``lrponnx.converters`` resolves to it."""
    try:
        from lrponnx.converters.caffe import convert
    except ImportError:
        import lrponnx
        lrponnx.__path__.append(str(ROOT))
        from lrponnx.converters.caffe import convert
    return convert


def timed(fn, sync, warmup: int, min_rep: int, max_rep: int, budget_s: float) -> dict:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    start = time.perf_counter()
    while len(samples) < max_rep and (len(samples) < min_rep or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t)
    return {"median_ms": statistics.median(samples) * 1e3, "min_ms": min(samples) * 1e3, "repeats": len(samples)}


def write_out(out: Path) -> None:
    RES["elapsed_s"] = elapsed()
    (out / "gpu_results.json").write_text(json.dumps(RES, indent=1, default=str))
    L = ["# lrponnx GPU timings", "",
         f"Device: {RES.get('device', '?')}; torch {RES.get('torch', '?')} (CUDA {RES.get('cuda', '?')}, cuDNN "
         f"{RES.get('cudnn', '?')}, TF32 conv {RES.get('tf32_conv', '?')}, TF32 matmul {RES.get('tf32_matmul', '?')}); "
         f"onnxruntime {RES.get('onnxruntime', '?')} providers {RES.get('ort_providers', '?')}; "
         f"batch {RES.get('batch', '?')}; medians in ms. ORT = run_with_iobinding, input and outputs on the GPU "
         "(\"ORT numpy\": plain run with host arrays). Zennit: forward + autograd.grad with the composite "
         "registered; LRN layers get the plain gradient (Zennit has no LRN rule).", "",
         "| model | composite | ORT CUDA forward | ORT CUDA explainer | explainer / forward | ORT numpy fwd / expl "
         "| Zennit CUDA | Zennit / explainer | PyTorch CUDA forward | CPU fallback nodes |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def ms(d, k="median_ms"):
        return f"{d[k]:.2f}" if d and k in d else "—"

    for r in RES["results"]:
        f, e, z, tf = r.get("ort_forward"), r.get("ort_explainer"), r.get("zennit"), r.get("torch_forward")
        ratio = f"{e['median_ms'] / f['median_ms']:.2f}" if f and e else "—"
        zr = f"{z['median_ms'] / e['median_ms']:.2f}" if z and e else "—"
        numpy_pair = f"{ms(r.get('ort_forward_numpy'))} / {ms(r.get('ort_explainer_numpy'))}"
        L.append(f"| {r['model']} | {r['composite']} | {ms(f)} | {ms(e)} | {ratio} | {numpy_pair} | {ms(z)} | {zr} | "
                 f"{ms(tf)} | {r.get('cpu_fallback', '—')} |")
    if RES["errors"]:
        L += ["", "Failures:", ""] + [f"- {e}" for e in RES["errors"]]
    L += ["", f"Total {RES['elapsed_s']:.0f} s."]
    (out / "gpu_results.md").write_text("\n".join(L) + "\n")


def ort_cuda_session(ort, path, allow_fallback: bool):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    cuda = ("CUDAExecutionProvider", {"device_id": 0})
    if not allow_fallback:  # fails at creation, naming the node, if any node cannot run on CUDA
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return ort.InferenceSession(str(path), so, providers=[cuda])
    return ort.InferenceSession(str(path), so, providers=[cuda, "CPUExecutionProvider"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--deadline-s", type=float, default=270.0)
    ap.add_argument("--work", default="/tmp/lrponnx_gpu")
    ap.add_argument("--out", default=os.environ.get("OUT", str(BENCH / "_work" / "gpu_out")))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--allow-cpu", action="store_true", help="smoke test without a GPU: torch parts on the CPU")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    (work / "models").mkdir(parents=True, exist_ok=True)
    RES["batch"] = args.batch
    B = args.batch

    import numpy as np

    torch = None
    try:  # torch first: it loads the CUDA runtime, cuBLAS and cuDNN that the ORT CUDA EP needs
        import torch
        RES.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                   cudnn=torch.backends.cudnn.version(), tf32_conv=torch.backends.cudnn.allow_tf32,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
        if torch.cuda.is_available():
            RES["device"] = torch.cuda.get_device_name(0)
        log(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {RES.get('device')}")
    except Exception as e:
        fail("import torch", e)

    ort = None
    try:
        import onnxruntime as ort
        RES["onnxruntime"] = ort.__version__
        RES["onnxruntime_file"] = ort.__file__
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()  # CUDA + cuDNN from the nvidia-* wheels, where ORT knows how
                RES["preload_dlls"] = "ok"
            except Exception as e:
                RES["preload_dlls"] = f"{type(e).__name__}: {e}"
        RES["ort_providers"] = ort.get_available_providers()
        log(f"onnxruntime {ort.__version__} from {ort.__file__}; providers {RES['ort_providers']}")
        if "CUDAExecutionProvider" not in RES["ort_providers"]:
            RES["errors"].append("onnxruntime has no CUDAExecutionProvider here (GPU wheel not installed or not "
                                 "loadable): ORT columns will be empty")
    except Exception as e:
        fail("import onnxruntime", e)
    write_out(out)

    from worker import make_input

    try:
        import lrponnx
        convert_caffe = import_caffe_convert()
        import onnx
    except Exception as e:
        fail("import lrponnx / converter / onnx", e)
        write_out(out)
        return 0

    state = {"ort_cuda": ort is not None and "CUDAExecutionProvider" in RES.get("ort_providers", [])}
    for name in [m for m in args.models.split(",") if m]:
        if elapsed() > args.deadline_s:
            RES["errors"].append(f"deadline reached before {name}")
            break
        folder = MODELS[name]
        model_path = work / "models" / f"{name}.onnx"
        try:
            if not model_path.exists():
                log(f"building {name} from {prototxt(folder)}")
                m = convert_caffe(str(prototxt(folder)), None, random_weights=0, mean=list(MEAN_BGR),
                                  channel_order="bgr")
                onnx.save(m, str(model_path))
                del m
        except Exception as e:
            fail(f"build {name}", e)
            continue
        shape = [B, 3, 227, 227] if "caffenet" in name else [B, 3, 224, 224]
        x = make_input(shape, B, np.asarray(MEAN_BGR, np.float32))

        def ort_time(path, explainer: bool, row: dict, key: str):
            try:
                try:
                    sess = ort_cuda_session(ort, path, allow_fallback=False)
                    row.setdefault("cpu_fallback", "none")
                except Exception as e:
                    row["cpu_fallback"] = f"{key}: {str(e).splitlines()[0][:200]}"
                    sess = ort_cuda_session(ort, path, allow_fallback=True)
                if "CUDAExecutionProvider" not in sess.get_providers():
                    state["ort_cuda"] = False  # no point in trying again
                    raise RuntimeError(f"the session runs on {sess.get_providers()} only (CUDA EP failed to load)")
                feed = {sess.get_inputs()[0].name: x}
                if explainer:
                    feed["target"] = np.full([B], -1, np.int64)
                b = sess.io_binding()
                for k, v in feed.items():
                    b.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
                for o in sess.get_outputs():
                    b.bind_output(o.name, "cuda", 0)
                row[key] = timed(lambda: sess.run_with_iobinding(b), lambda: None, 3, 10, 50, 3.0)
                row[key + "_numpy"] = timed(lambda: sess.run(None, feed), lambda: None, 1, 5, 20, 1.5)
                row[key]["providers"] = sess.get_providers()
                log(f"  {key}: {row[key]['median_ms']:.2f} ms (numpy I/O {row[key + '_numpy']['median_ms']:.2f} ms)")
                if explainer:  # sanity: the CUDA relevance against ORT's CPU EP on 2 samples
                    try:
                        so = ort.SessionOptions()
                        so.log_severity_level = 3
                        cpu = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                        f2 = {k: v[:2] for k, v in feed.items()}
                        rg = sess.run(["relevance"], f2)[0].astype(np.float64)
                        rc = cpu.run(["relevance"], f2)[0].astype(np.float64)
                        row["relevance_rel_err_vs_cpu"] = float(np.linalg.norm(rg - rc) / np.linalg.norm(rc))
                    except Exception as e:
                        row["relevance_rel_err_vs_cpu"] = f"{type(e).__name__}: {e}"[:200]
                sess = None  # free its GPU memory
            except Exception as e:
                fail(f"{name} {key} ({row.get('composite', '')})", e)

        fwd_row: dict = {}
        if state["ort_cuda"]:
            ort_time(model_path, False, fwd_row, "ort_forward")
        net = None
        dev = "cuda" if torch is not None and torch.cuda.is_available() else ("cpu" if args.allow_cpu else None)
        sync = (torch.cuda.synchronize if dev == "cuda" else (lambda: None))
        if torch is not None and dev:
            try:
                import onnx_to_torch
                net = onnx_to_torch.load(model_path).eval().to(dev)
                for p_ in net.parameters():
                    p_.requires_grad_(False)
                xt = torch.from_numpy(x).to(dev)

                def fwd():
                    with torch.no_grad():
                        net(xt)
                fwd_row["torch_forward"] = timed(fwd, sync, 3, 10, 50, 2.0)
                log(f"  torch forward: {fwd_row['torch_forward']['median_ms']:.2f} ms")
            except Exception as e:
                fail(f"{name} torch forward", e)
        write_out(out)

        for comp in COMPOSITES:
            if elapsed() > args.deadline_s:
                RES["errors"].append(f"deadline reached before {name} {comp}")
                break
            row = {"model": name, "composite": comp, "batch": B, **fwd_row}
            RES["results"].append(row)
            ex_path = work / "models" / f"{name}-{comp}.onnx"
            try:
                if not ex_path.exists():
                    t = time.perf_counter()
                    kw = dict(low=LOW, high=HIGH) if comp == "epsilon-gamma-box" else {}
                    e_model = lrponnx.convert(str(model_path), comp, lrn_rule="taylor", **kw)
                    onnx.save(e_model, str(ex_path))
                    del e_model
                    row["convert_s"] = time.perf_counter() - t
                    log(f"{name} {comp}: converted in {row['convert_s']:.1f} s")
            except Exception as e:
                fail(f"{name} convert {comp}", e)
                continue
            if state["ort_cuda"]:
                ort_time(ex_path, True, row, "ort_explainer")
            if net is not None:
                try:
                    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
                    if comp == "epsilon-gamma-box":
                        lo = torch.tensor(LOW, device=dev).view(1, -1, 1, 1)
                        hi = torch.tensor(HIGH, device=dev).view(1, -1, 1, 1)
                        composite = EpsilonGammaBox(low=lo, high=hi)
                    else:
                        composite = EpsilonPlusFlat()

                    def explain():
                        xi = xt.clone().requires_grad_(True)
                        o = net(xi)
                        onehot = torch.nn.functional.one_hot(o.argmax(1), o.shape[1]).to(o.dtype)
                        r, = torch.autograd.grad(o, xi, grad_outputs=onehot * o.detach())
                        return r
                    with composite.context(net):
                        row["zennit"] = timed(explain, sync, 2, 5, 30, 3.0)
                    log(f"  zennit {comp}: {row['zennit']['median_ms']:.2f} ms")
                except Exception as e:
                    fail(f"{name} zennit {comp}", e)
            write_out(out)
        net = None
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_out(out)
    log(f"done; wrote {out / 'gpu_results.md'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:
        fail("gpu_bench", e)
        sys.exit(0)

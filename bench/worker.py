"""One benchmark measurement in its own process (``bench/run.py`` starts one per engine and case).

    python bench/worker.py ENGINE --model M.onnx [--explainer E.onnx] --batch B [--composite C]
                           [--low L --high H] [--warmup W] [--min-repeats N] [--max-repeats N]
                           [--budget-s S] [--threads 2] [--profile DIR] [--check]

ENGINE is one of
  ort-forward    the original model on ONNX Runtime (CPU), the floor
  ort-explainer  the lrponnx explainer on ONNX Runtime (CPU); ``--explainer`` is its path
  zennit         Zennit 0.5.1 on PyTorch (CPU): the model through bench/onnx_to_torch.py, the same
                 composite and bounds; times forward + backward with the rules registered.
                 With ``--torch-forward`` also times the plain torch forward (no grad) for reference,
                 with ``--check`` compares the torch forward with ORT's (batch 2).
  captum         Captum's LRP on the same torch module (records what happened if it cannot run)

Prints one JSON object (the last line of stdout): median/min/mean wall seconds per call, every
sample, load time, peak RSS of this process, versions, thread settings.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEAVY_S = 3.0
VERY_HEAVY_S = 8.0
VERY_HEAVY_REPEATS = 3


def _set_thread_env(threads: int) -> None:
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[k] = str(threads)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_input(shape, batch: int, mean, seed: int = 0):
    """Pixels uniform in [0, 255] minus the per-channel mean (the models' input units)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 255.0, size=[batch] + list(shape[1:])).astype(np.float32)
    if mean is not None:
        m = np.asarray(mean, dtype=np.float32)
        x -= m.reshape(-1, 1, 1) if m.ndim == 1 else m
    return x


def model_input_info(path):
    """(input name, static shape with batch None, preprocessing mean or None)."""
    import numpy as np
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    shape = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    meta = {p.key: p.value for p in m.metadata_props}
    mean = None
    if "lrponnx.preprocessing" in meta:
        pre = json.loads(meta["lrponnx.preprocessing"])
        if not pre.get("embedded"):
            mean = np.asarray(pre.get("mean", 0.0), dtype=np.float32)
            if mean.ndim == 0:
                mean = np.full(shape[1], float(mean), np.float32)
    return inp.name, shape, mean


def forward_part(explainer, model, tmp: Path) -> Path:
    """The explainer cut down to the model's outputs: the forward pass exactly as the explainer runs
    it (with LRN recomputed in plain ops, unless it was converted with ``exact_forward``)."""
    import onnx
    from lrponnx.app.perturbation import keep_outputs

    m = onnx.load(str(model), load_external_data=False)
    part = keep_outputs(onnx.load(str(explainer)), [o.name for o in m.graph.output])
    out = tmp / "forward_part.onnx"
    onnx.save(part, str(out))
    return out


def time_calls(fn, warmup: int, min_repeats: int, max_repeats: int, budget_s: float):
    """Warm up, then call ``fn`` at least ``min_repeats`` times and at most ``max_repeats`` times,
    stopping once ``budget_s`` seconds of timed calls have passed. A call slower than ``HEAVY_S`` gets
    one warm-up only; one slower than ``VERY_HEAVY_S`` at least ``VERY_HEAVY_REPEATS`` timed calls only."""
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        if first > HEAVY_S:  # one warm-up is enough for a slow call
            break
    if first > VERY_HEAVY_S:
        min_repeats = min(min_repeats, VERY_HEAVY_REPEATS)
    samples, cpu = [], []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < budget_s):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "mean_s": statistics.fmean(samples),
            "samples_s": samples, "cpu_median_s": statistics.median(cpu), "repeats": len(samples),
            "warmup": warmup}


def ort_session(path, threads: int, profile_dir: str | None = None, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_dir:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(profile_dir) / Path(path).stem)
    return ort.InferenceSession(str(path), so, providers=[provider])


# ----------------------------------------------------------------------------- engines

def run_ort(args, path, explainer: bool):
    import numpy as np
    import onnxruntime as ort

    name, shape, mean = model_input_info(args.model)
    t0 = time.perf_counter()
    sess = ort_session(path, args.threads, args.profile)
    load_s = time.perf_counter() - t0
    x = make_input(shape, args.batch, mean)
    feed = {name: x}
    if explainer:
        feed["target"] = np.full([args.batch], -1, np.int64)
    out = sess.run(None, feed)  # first call outside the timing (also the output check below)
    res = time_calls(lambda: sess.run(None, feed), args.warmup, args.min_repeats, args.max_repeats, args.budget_s)
    res.update(load_s=load_s, versions={"onnxruntime": ort.__version__})
    if explainer:
        rel = out[-1]
        res["relevance_finite"] = bool(np.all(np.isfinite(rel)))
        res["relevance_sum0"] = _conservation(out, sess)
    if args.profile:
        res["profile"] = sess.end_profiling()
    return res


def _conservation(out, sess):
    """sum(relevance) of sample 0 (a sanity number, not a test)."""
    import numpy as np

    names = [o.name for o in sess.get_outputs()]
    rel = out[names.index("relevance")]
    return float(np.sum(rel[0], dtype=np.float64))


def _torch_setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


def _bounds_tensor(torch, v):
    t = torch.tensor(v, dtype=torch.float32)
    return t.view(1, -1, 1, 1) if t.ndim else t


def run_zennit(args):
    torch = _torch_setup(args.threads)
    import zennit
    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat

    sys.path.insert(0, str(HERE))
    import onnx_to_torch

    name, shape, mean = model_input_info(args.model)
    t0 = time.perf_counter()
    net = onnx_to_torch.load(args.model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    load_s = time.perf_counter() - t0
    res = {"load_s": load_s, "versions": {"torch": torch.__version__, "zennit": getattr(zennit, "__version__", "0.5.1")}}
    lrn = [type(m).__name__ for m in net.modules() if isinstance(m, (onnx_to_torch.OnnxLRN, onnx_to_torch.WithinChannelLRN))]
    res["lrn_layers_plain_gradient"] = len(lrn)
    if args.check:
        res["forward_check"] = onnx_to_torch.check_against_ort(net, args.model, make_input(shape, 2, mean, seed=1),
                                                               args.threads)
    x0 = torch.from_numpy(make_input(shape, args.batch, mean))

    def forward():
        with torch.no_grad():
            net(x0)

    if args.torch_forward:
        res["torch_forward"] = time_calls(forward, 1, max(2, args.min_repeats // 2), args.max_repeats,
                                          args.budget_s / 3)
    if args.composite == "epsilon-plus-flat":
        composite = EpsilonPlusFlat()
    elif args.composite == "epsilon-gamma-box":
        composite = EpsilonGammaBox(low=_bounds_tensor(torch, args.low), high=_bounds_tensor(torch, args.high))
    else:
        raise SystemExit(f"unknown composite {args.composite}")

    def explain():
        x = x0.clone().requires_grad_(True)
        out = net(x)
        onehot = torch.nn.functional.one_hot(out.argmax(1), out.shape[1]).to(out.dtype)
        rel, = torch.autograd.grad(out, x, grad_outputs=onehot * out.detach())  # seed: target logit
        return rel

    with composite.context(net):
        first = [n for n, m in net.named_modules() if getattr(m, "_forward_pre_hooks", None) or
                 getattr(m, "_forward_hooks", None)]
        res["hooked_modules"] = len(first)
        rel = explain()
        res["relevance_finite"] = bool(torch.isfinite(rel).all())
        res["relevance_sum0"] = float(rel[0].double().sum())
        res.update(time_calls(explain, args.warmup, args.min_repeats, args.max_repeats, args.budget_s))
    return res


def run_captum(args):
    torch = _torch_setup(args.threads)
    sys.path.insert(0, str(HERE))
    import onnx_to_torch

    res = {}
    try:
        import captum
        from captum.attr import LRP
        res["versions"] = {"captum": captum.__version__, "torch": torch.__version__}
    except Exception as e:
        return {"status": "not installed", "error": f"{type(e).__name__}: {e}"}
    name, shape, mean = model_input_info(args.model)
    net = onnx_to_torch.load(args.model).eval()
    x0 = torch.from_numpy(make_input(shape, args.batch, mean))
    lrp = LRP(net)

    def explain():
        x = x0.clone().requires_grad_(True)
        return lrp.attribute(x, target=0)

    try:
        explain()
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        res.update(status="failed", error=msg)
        return res
    res["status"] = "ran (Captum's default rules: epsilon everywhere, not the composite)"
    res.update(time_calls(explain, args.warmup, args.min_repeats, args.max_repeats, args.budget_s))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description="one benchmark measurement")
    p.add_argument("engine", choices=["ort-forward", "ort-explainer", "ort-explainer-forward", "zennit", "captum"])
    p.add_argument("--model", required=True)
    p.add_argument("--explainer")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--composite", default="epsilon-plus-flat")
    p.add_argument("--low", type=json.loads, default=None, help="JSON: scalar or list")
    p.add_argument("--high", type=json.loads, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--max-repeats", type=int, default=30)
    p.add_argument("--budget-s", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", default=None, help="folder for an ORT profile (ort-* engines)")
    p.add_argument("--check", action="store_true", help="zennit: compare the torch forward with ORT's")
    p.add_argument("--torch-forward", action="store_true", help="zennit: also time the plain torch forward")
    args = p.parse_args(argv)
    _set_thread_env(args.threads)
    res = {"engine": args.engine, "batch": args.batch, "threads": args.threads}
    try:
        if args.engine == "ort-forward":
            res.update(run_ort(args, args.model, explainer=False))
        elif args.engine == "ort-explainer":
            res.update(run_ort(args, args.explainer, explainer=True))
        elif args.engine == "ort-explainer-forward":
            with tempfile.TemporaryDirectory() as tmp:
                res.update(run_ort(args, forward_part(args.explainer, args.model, Path(tmp)), explainer=False))
        elif args.engine == "zennit":
            res.update(run_zennit(args))
        else:
            res.update(run_captum(args))
        res.setdefault("status", "ok")
    except Exception as e:
        res["status"] = "error"
        res["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        traceback.print_exc()
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res))
    return 0 if res["status"] != "error" else 1


if __name__ == "__main__":
    sys.exit(main())

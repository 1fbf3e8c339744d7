"""Per-node ONNX Runtime profile of an explainer (and of its model, for comparison).

    python bench/profile_explainer.py MODEL.onnx EXPLAINER.onnx [--batch 8] [--runs 3] [--top 25] [--json OUT]

Runs each model ``--runs`` times after two warm-ups with ``SessionOptions.enable_profiling`` and
2 intra-op threads, then sums the kernel time of every node over the profiled runs (divided by
the runs) and prints:

* the explainer's time split into the forward part (nodes that are in the original model) and the
  relevance part (nodes lrponnx added, named ``lrp/...``);
* the time per op type, forward vs relevance;
* the top nodes.

Node names in ORT's profile are those after graph optimisation (fused nodes keep the name of the
node they start from), so the split is a good approximation, not exact.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARMUP_RUNS = 2


def profile(path, feed_fn, runs: int, threads: int, out_dir: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(out_dir) / Path(path).stem)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = feed_fn(sess)
    # Two warm-up runs (in the profile too: skipped below by run index). ORT's arena still grows
    # during the second run of a large explainer, and the page faults of fresh memory made its
    # forward nodes look 2-4x slower than in steady state.
    for _ in range(WARMUP_RUNS):
        sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last_warmup = model_runs[WARMUP_RUNS - 1] if len(model_runs) >= WARMUP_RUNS else None
    skip_until = last_warmup["ts"] + last_warmup["dur"] if last_warmup else 0
    nodes = defaultdict(float)
    ops = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < skip_until:
            continue
        name = e["name"][: -len("_kernel_time")]
        nodes[name] += e["dur"] / 1e3 / runs  # ms per run
        ops[name] = e.get("args", {}).get("op_name", "?")
    timed = model_runs[WARMUP_RUNS:]
    total_run = sum(e["dur"] for e in timed) / 1e3 / max(1, len(timed))
    return dict(nodes), ops, total_run, prof


SUFFIXES = ("_nchwc",)


def part_of(name: str, forward_names: set) -> str:
    """'fwd' (a node of the original model), 'lrp' (added by lrponnx) or 'ort' (added by ORT's
    optimiser, e.g. the NCHWc layout reorders)."""
    base = name
    for s in SUFFIXES:
        if base.endswith(s):
            base = base[: -len(s)]
    if base.startswith("lrp/"):
        return "lrp"
    if base in forward_names:
        return "fwd"
    return "ort"


def summarise(nodes: dict, ops: dict, forward_names: set):
    by_op = defaultdict(lambda: {"fwd": 0.0, "lrp": 0.0, "ort": 0.0})
    parts = {"fwd": 0.0, "lrp": 0.0, "ort": 0.0}
    for n, ms in nodes.items():
        part = part_of(n, forward_names)
        by_op[ops[n]][part] += ms
        parts[part] += ms
    return parts, by_op


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("explainer")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None, help="write the per-node table here")
    p.add_argument("--keep", default=None, help="keep ORT's raw profile files in this folder")
    args = p.parse_args(argv)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = str(args.threads)
    import numpy as np
    import onnx

    sys.path.insert(0, str(HERE))
    from worker import make_input, model_input_info

    name, shape, mean = model_input_info(args.model)
    x = make_input(shape, args.batch, mean)
    m = onnx.load(args.model, load_external_data=False)
    # ORT names some optimised nodes after their output (e.g. "<output>_nchwc"): accept both
    forward_names = {n.name for n in m.graph.node} | {o for n in m.graph.node for o in n.output}
    out_dir = args.keep or tempfile.mkdtemp(prefix="lrponnx-prof-")
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    f_nodes, f_ops, f_total, _ = profile(args.model, lambda s: {name: x}, args.runs, args.threads, out_dir)
    e_nodes, e_ops, e_total, _ = profile(args.explainer, lambda s: {name: x, "target": np.full([args.batch], -1, np.int64)},
                                         args.runs, args.threads, out_dir)
    parts, by_op = summarise(e_nodes, e_ops, forward_names)
    f_parts, _ = summarise(f_nodes, f_ops, forward_names)
    print(f"batch {args.batch}, {args.threads} threads, {args.runs} profiled runs (ms per run)")
    print(f"model:     run {f_total:8.1f}   kernels: model {f_parts['fwd']:8.1f}, ORT layout {f_parts['ort']:6.1f}")
    print(f"explainer: run {e_total:8.1f}   kernels: forward part {parts['fwd']:8.1f}, relevance part "
          f"{parts['lrp']:8.1f}, ORT layout {parts['ort']:6.1f}")
    print(f"ratio explainer/model (runs): {e_total / f_total:.2f}")
    print("\nper op type (ms/run):       forward |  relevance | ORT-added")
    for op, v in sorted(by_op.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"  {op:22s} {v['fwd']:9.1f} | {v['lrp']:9.1f} | {v['ort']:9.1f}")
    print(f"\ntop {args.top} explainer nodes (ms/run):")
    top = sorted(e_nodes.items(), key=lambda kv: -kv[1])[: args.top]
    for n, ms in top:
        print(f"  {ms:8.2f}  {part_of(n, forward_names)}  {e_ops[n]:18s} {n}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "batch": args.batch, "model_run_ms": f_total, "explainer_run_ms": e_total, "parts_ms": parts,
            "by_op": by_op,
            "nodes": [{"name": n, "op": e_ops[n], "ms": ms, "part": part_of(n, forward_names)}
                      for n, ms in sorted(e_nodes.items(), key=lambda kv: -kv[1])],
            "model_nodes": [{"name": n, "op": f_ops[n], "ms": ms} for n, ms in sorted(f_nodes.items(), key=lambda kv: -kv[1])],
        }, indent=1))
    if not args.keep:
        for f in Path(out_dir).glob("*.json"):
            f.unlink()
        Path(out_dir).rmdir()


if __name__ == "__main__":
    main()

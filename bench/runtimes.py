"""Every zoo explainer in every tested runtime: relevance error vs Python ONNX Runtime and time per batch.

Runs the cases of tests/runtime_cases.py (cifar10-lrn, cifar10-full-caffe, bvlc-googlenet x
epsilon-plus-flat, epsilon-gamma-box; a fed non-argmax target for the first half of the batch, -1
for the second) in Python ORT (CPU), Node (onnxruntime-node, CPU), Chromium + onnxruntime-web wasm,
and Chromium WebGPU on the SwiftShader software adapter (with the explainer built for
``--target-runtime webgpu`` where this lrponnx has it). Times are medians of the timed runs after
one warm-up run (GoogLeNet on WebGPU: one run, the first, which includes shader compilation: it
takes minutes). ``--write-docs`` replaces the table in docs/runtimes.md.

    .venv/bin/python bench/runtimes.py [--models cifar10-lrn ...] [--runtimes node wasm] [--write-docs]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from docs_block import replace_block  # noqa: E402
from js_harness import missing, run  # noqa: E402
from runtime_cases import (CASES, MODELS, build_case, has_target_runtime, model_path, rel_l2,  # noqa: E402
                           session)

DOCS = HERE.parent / "docs" / "runtimes.md"
START, END = "<!-- runtimes:start -->", "<!-- runtimes:end -->"
SHARED = HERE.parent.parent / "shared" / "data"
RUNTIMES = ("node", "wasm", "webgpu")


def python_ms(case, warmup: int, repeat: int) -> float:
    s = session(case.path)
    times = []
    for i in range(warmup + repeat):
        t0 = time.perf_counter()
        s.run(None, case.feeds)
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(times))


def shared_data():
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: only cifar10-lrn can run (--models cifar10-lrn)")
    return SHARED


def measure(models, runtimes, repeat: int, log=print) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lrponnx-runtimes-") as tmp:
        for model in models:
            src = model_path(model, Path(tmp), shared_data)
            for composite in [c for m, c in CASES if m == model]:
                cases = {"any": build_case(model, composite, src, Path(tmp))}
                row = {"model": model, "composite": composite, "batch": len(cases["any"].feeds["target"]),
                       "spread": cases["any"].spread, "python_ms": python_ms(cases["any"], 1, repeat)}
                for rt in runtimes:
                    why = missing(rt)
                    if why:
                        row[rt] = {"error": f"not run: {why}"}
                        continue
                    forms = "webgpu" if rt == "webgpu" and has_target_runtime() else "any"
                    if forms not in cases:
                        cases[forms] = build_case(model, composite, src, Path(tmp), forms)
                        row["python_ms_webgpu_forms"] = python_ms(cases[forms], 1, repeat)
                    case = cases[forms]
                    slow = rt == "webgpu" and model == "bvlc-googlenet"
                    res = run(rt, case.path, case.feeds, warmup=0 if slow else 1, repeat=1 if slow else repeat,
                              timeout=900)
                    cell = {"forms": forms, "load_ms": res.load_ms, "first_run_only": slow,
                            "tolerance": case.tolerance, "spread": case.spread}
                    if res.error:
                        cell["error"] = res.error
                    else:
                        cell["ms"] = res.ms
                        cell["rel_l2"] = rel_l2(res.outputs["relevance"], case.reference["relevance"])
                        cell["ok"] = cell["rel_l2"] <= case.tolerance
                    if rt != "node":
                        cell["threads"] = res.info.get("numThreads")
                        cell["adapter"] = res.info.get("adapter")
                    row[rt] = cell
                    log(f"{model} {composite} {rt}: {json.dumps(cell, default=str)}")
                rows.append(row)
    return rows


def table(rows, runtimes) -> str:
    head = ["explainer", "composite", "batch", "Python ORT spread", "Python ORT ms"]
    names = {"node": "Node", "wasm": "Chromium wasm", "webgpu": "Chromium WebGPU (SwiftShader)"}
    head += [f"{names[r]}: rel. L2 / ms" for r in runtimes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for row in rows:
        cells = [row["model"], row["composite"], str(row["batch"]), f"{row['spread']:.1e}", f"{row['python_ms']:.1f}"]
        for r in runtimes:
            c = row.get(r, {})
            if "error" in c:
                cells.append(f"error: `{c['error'][:160]}`")
            else:
                mark = "" if c["ok"] else " **over tolerance**"
                first = " (first run)" if c.get("first_run_only") else ""
                cells.append(f"{c['rel_l2']:.1e}{mark} / {c['ms']:.1f}{first}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the raw rows here")
    ap.add_argument("--write-docs", action="store_true", help=f"replace the table in {DOCS}")
    args = ap.parse_args()
    t0 = time.time()
    rows = measure(args.models, args.runtimes, args.repeat)
    js = json.loads((HERE.parent / "tests" / "js" / "package.json").read_text())["dependencies"]
    cpu = platform.processor() or platform.machine()
    text = (f"Measured {time.strftime('%Y-%m-%d')} on {cpu}, {__import__('os').cpu_count()} cores; onnxruntime "
            f"(Python) {ort.__version__}, onnxruntime-node {js['onnxruntime-node']}, onnxruntime-web "
            f"{js['onnxruntime-web']} in headless Chromium (Debian's), Node {__import__('subprocess').run(['node', '--version'], capture_output=True, text=True).stdout.strip()}; "
            f"WebGPU explainers built with target_runtime="
            f"{'webgpu' if has_target_runtime() else 'any (no such option yet)'}. Relevance: largest per-sample "
            f"relative L2 against Python ORT (all optimisations) on the same explainer file; times: median ms "
            f"per batch after one warm-up run, {args.repeat} timed runs. Whole run {time.time() - t0:.0f} s.\n\n"
            + table(rows, args.runtimes))
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    if args.write_docs:
        replace_block(DOCS, START, END, text)


if __name__ == "__main__":
    main()

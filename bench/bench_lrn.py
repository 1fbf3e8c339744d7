"""How much the LRN rule costs, and that its window sums are O(n) per element, not O(C).

Model: ``x [1, C, H, H] -> LRN(n, alpha=1e-4, beta=0.75, k=1) -> GlobalAveragePool -> Flatten``
(the C pooled channels are the "classes"). The number of elements is the same for every C
(``C * H * H = 1024 * 28 * 28``: H = 112, 56, 28 for C = 64, 256, 1024), so the tensors are the
same size in memory and a cost per element that does not grow with C means the rule is O(n),
not O(C), per element (with a fixed H the larger C would also fall out of the caches, which
measures the memory hierarchy, not the algorithm). For each C in 64, 256, 1024 and n in 3, 5, 9
it times with ONNX Runtime on the CPU (2 intra-op threads), median over repeats:

- ``forward``: the model alone;
- ``explainer (identity)``: the explainer with the LRN rule ``identity`` (everything but the rule);
- ``explainer (taylor)``: the explainer with the paper's rule;
- ``taylor part``: the difference, i.e. the LRN rule's relevance subgraph, also per element;
- ``dense C x C``: for contrast, one window sum done as a banded C x C MatMul (what an
  implementation without pooling would pay; it grows with C).

    .venv/bin/python bench/bench_lrn.py                 # print the table
    .venv/bin/python bench/bench_lrn.py --write-docs    # also put it into docs/lrn.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from docs_block import replace_block

import lrponnx

ELEMENTS = 1024 * 28 * 28
DOCS = Path(__file__).resolve().parents[1] / "docs" / "lrn.md"
START, END = "<!-- bench_lrn:start -->", "<!-- bench_lrn:end -->"


def side(C: int) -> int:
    h = int(round((ELEMENTS / C) ** 0.5))
    assert C * h * h == ELEMENTS, C
    return h


def lrn_model(C: int, n: int) -> onnx.ModelProto:
    HW = side(C)
    nodes = [helper.make_node("LRN", ["x"], ["y"], name="lrn", size=n, alpha=1e-4, beta=0.75, bias=1.0),
             helper.make_node("GlobalAveragePool", ["y"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["logits"], name="flat")]
    g = helper.make_graph(nodes, "lrn_bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, HW, HW])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, C])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def dense_window_model(C: int, n: int) -> onnx.ModelProto:
    """One across-channel window sum as [HW, C] x band(C x C): O(C) per element."""
    HW = side(C)
    lo = (n - 1) // 2
    band = np.zeros((C, C), np.float32)
    for c in range(C):
        band[max(0, c - lo):min(C, c - lo + n), c] = 1.0
    nodes = [helper.make_node("Reshape", ["x", "s2"], ["x2"]),
             helper.make_node("Transpose", ["x2"], ["xt"], perm=[1, 0]),
             helper.make_node("MatMul", ["xt", "band"], ["y"])]
    g = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, HW, HW])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(band, "band"),
                           numpy_helper.from_array(np.array([C, HW * HW], np.int64), "s2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # CPU time = work, not spinning
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def measure(C: int, n: int, repeats: int, threads: int, warmup: int = 3) -> dict:
    """Interleaved rounds (forward, identity, taylor, dense once each per round), so that load
    from elsewhere hits all four alike; medians over the rounds, the taylor part as the median
    of the per-round differences taylor - identity, in wall time and in process CPU time (both
    threads' work; ORT's spin-waiting is off), which other processes' load disturbs less."""
    HW = side(C)
    x = np.abs(np.random.default_rng(0).standard_normal((1, C, HW, HW))).astype(np.float32) * 20
    feeds = {"x": x}
    m = lrn_model(C, n)
    sessions = {"forward": session(m, threads), "identity": session(lrponnx.convert(m, lrn_rule="identity"), threads),
                "taylor": session(lrponnx.convert(m), threads), "dense": session(dense_window_model(C, n), threads)}
    explained = {**feeds, "target": np.full([len(x)], -1, np.int64)}  # explainers take `target`
    key_feeds = {k: explained if k in ("identity", "taylor") else feeds for k in sessions}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + repeats):
        for key, sess in sessions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            sess.run(None, key_feeds[key])
            if i >= warmup:
                times[key].append(1e3 * (time.perf_counter() - t0))
                cpu[key].append(1e3 * (time.process_time() - c0))
    row = {"C": C, "n": n, "H": HW}
    row.update({k: statistics.median(v) for k, v in times.items()})
    row["part"] = statistics.median(t - i for t, i in zip(times["taylor"], times["identity"]))
    row["part_cpu"] = statistics.median(t - i for t, i in zip(cpu["taylor"], cpu["identity"]))
    row["ns_per_el"] = 1e6 * row["part"] / ELEMENTS
    row["cpu_ns_per_el"] = 1e6 * row["part_cpu"] / ELEMENTS
    row["dense_cpu"] = statistics.median(cpu["dense"])
    return row


def table(rows: list[dict], threads: int, repeats: int) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"x = [1, C, H, H] with C·H·H = {ELEMENTS:,} elements for every C; ONNX Runtime {ort.__version__}, "
             f"CPU provider, {threads} intra-op threads; medians of {repeats} interleaved rounds; "
             f"{platform.machine()}, {os.cpu_count()} logical CPUs, load average {load:.1f} at the end. Times in ms.",
             "",
             "| C | H | n | forward | explainer (identity) | explainer (taylor) | taylor part | "
             "taylor part per element | same, CPU time | dense C×C window sum (contrast) | same, CPU time |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['C']} | {r['H']} | {r['n']} | {r['forward']:.1f} | {r['identity']:.1f} | "
                     f"{r['taylor']:.1f} | {r['part']:.1f} | {r['ns_per_el']:.0f} ns | {r['cpu_ns_per_el']:.0f} ns | "
                     f"{r['dense']:.1f} | {r['dense_cpu']:.1f} |")
    return "\n".join(lines)


def write_docs(text: str) -> None:
    replace_block(DOCS, START, END, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 9])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true", help=f"replace the table in {DOCS}")
    args = ap.parse_args()
    rows = []
    for C in args.channels:
        for n in args.sizes:
            rows.append(measure(C, n, args.repeats, args.threads))
            r = rows[-1]
            print(f"C={C:5d} n={n}: forward {r['forward']:.2f} ms, explainer identity {r['identity']:.2f} / "
                  f"taylor {r['taylor']:.2f} ms, taylor part {r['ns_per_el']:.1f} ns/element "
                  f"({r['cpu_ns_per_el']:.1f} ns CPU), "
                  f"dense {r['dense']:.2f} ms", flush=True)
    text = table(rows, args.threads, args.repeats)
    print()
    print(text)
    if args.write_docs:
        write_docs(text)
        print(f"\nwrote the table into {DOCS}")


if __name__ == "__main__":
    main()

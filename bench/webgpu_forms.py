"""What each WebGPU-ready formulation costs on the CPU, and whether the WebGPU provider runs the zoo.

onnxruntime-web's WebGPU provider (NHWC layout) refuses three things today's explainers contain: the
LRN window sum as a 3-D ``AveragePool`` ("Pooling with kernelShape.length > 2 is not supported for
NHWC format"), ``Conv`` nodes without ``kernel_shape`` ("strides should be 2D") and ``MaxPool``
with an ``Indices`` output ("The Indices output is not supported yet"). Stating every attribute
costs nothing. For the other two this script times the candidate forms in ONNX Runtime's CPU
provider (2 intra-op threads, median over repeats) and writes the tables into ``docs/webgpu.md``:

- ``lrn``: the across-channel window sum on GoogLeNet's two LRN inputs, batch 8 and 32: today's 3-D
  ``AveragePool`` (``any``), the banded 1x1 ``Conv`` with a Div (``webgpu``), a 2-D ``AveragePool``
  on the ``[N, 1, C, H*W]`` view (``webgpu`` when the channel count is symbolic), a 2-D ``Conv``
  on that view, and ``Pad`` + ``Slice`` x n + ``Sum``. The first three are the library's own
  emitters; each form's largest deviation from the 3-D pool is printed.
- ``wta``: winner-take-all on GoogLeNet's 13 max pools, as the library emits it for each target
  runtime (the forward pool included; the forward pool alone for scale), with the largest
  deviation between the two.
- ``explainer``: GoogLeNet's whole explainer (epsilon-plus-flat) for each target runtime, with the
  relevance distance between the two (one session after the other, not interleaved: two sessions
  at batch 32 took ~10 GB and were killed for memory on the 23 GB machine).

Whether WebGPU runs them, and how close it comes to Python, is ``bench/runtimes.py`` (all
runtimes, ``docs/runtimes.md``) and ``tests/test_runtimes.py``.

    .venv/bin/python bench/webgpu_forms.py                           # every part, print only
    .venv/bin/python bench/webgpu_forms.py --parts lrn,wta --write-docs
    .venv/bin/python bench/webgpu_forms.py --parts explainer --googlenet M.onnx

GoogLeNet's model defaults to ``bench/_work/models/bvlc-googlenet.onnx`` (built by
``bench/run.py``); without it the ``explainer`` part is skipped with a note. The other parts
need no model file.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from docs_block import replace_block  # noqa: E402

DOCS = ROOT / "docs" / "webgpu.md"
MODELS = HERE / "_work" / "models"
PARTS = ("lrn", "wta", "explainer")
# GoogLeNet's (BVLC) LRN inputs: norm1 after pool1, norm2 after conv2/3x3. size 5, alpha 1e-4, beta 0.75.
GOOGLENET_LRN = [("pool1/norm1", 64, 56), ("conv2/norm2", 192, 56)]
vi = helper.make_tensor_value_info


# ------------------------------------------------------------------------------------------ helpers

def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def timed_many(sessions: dict, feeds: dict, repeats: int) -> tuple[dict, dict]:
    """Best (least) ms of each session over the repeats, the sessions run interleaved: on a shared
    machine the other loads only ever add time, so the minimum is the steadiest estimate, and load
    drifts hit every form alike."""
    outs = {k: s.run(None, feeds[k] if k in feeds else feeds["*"]) for k, s in sessions.items()}
    for k, s in sessions.items():  # second warm-up
        s.run(None, feeds[k] if k in feeds else feeds["*"])
    samples = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k] if k in feeds else feeds["*"])
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: min(v) for k, v in samples.items()}, outs


def graph_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(nodes, "bench", inputs, outputs, list(inits)),
                             opset_imports=[helper.make_opsetid("", opset)])


def header(what: str, threads: int, repeats: int, interleaved: bool = True) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    order = "interleaved" if interleaved else "one after the other"
    return (f"{what}; ONNX Runtime {ort.__version__}, CPU, {threads} intra-op threads, best of {repeats} runs "
            f"after 2 warm-ups, forms {order}; {platform.machine()}, {os.cpu_count()} logical CPUs, "
            f"load average {load:.1f} at the end (other jobs shared the machine). Times in ms.")


# ----------------------------------------------------------------------------------- LRN window sum

def lrn_forms(N: int, C: int, H: int, n: int = 5) -> dict:
    """{form: model x -> window mean}: the library's emitters and two hand-written alternatives."""
    from lrponnx.compiler.builder import GraphBuilder
    from lrponnx.compiler.lrn_ops import LrnSpec
    from lrponnx.ops import Ctx
    from lrponnx.ops.lrn import _window_mean

    spec = LrnSpec.onnx_across(n, 1e-4, 0.75, 1.0)
    lo, hi = spec.lo, spec.hi
    X = vi("x", TensorProto.FLOAT, [N, C, H, H])
    Y = vi("y", TensorProto.FLOAT, None)

    def library(target_runtime: str, channels) -> onnx.ModelProto:
        graph = helper.make_graph([], "bench", [X], [])
        g = GraphBuilder(graph)
        mean = _window_mean(Ctx(g, None, target_runtime=target_runtime), "x", spec, 4, False, channels)
        g.identity(mean, "y")
        graph.output.append(Y)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def ints(name, v):
        return numpy_helper.from_array(np.asarray(v, np.int64), name)

    forms = {"3-D AveragePool (any)": library("any", C),
             "banded 1x1 Conv (webgpu)": library("webgpu", C),
             "2-D AveragePool [N,1,C,HW] (webgpu, symbolic C)": library("webgpu", None)}
    forms["2-D Conv [N,1,C,HW]"] = graph_model(
        [helper.make_node("Reshape", ["x", "s4"], ["u"]),
         helper.make_node("Conv", ["u", "K"], ["a"], kernel_shape=[n, 1], strides=[1, 1], pads=[lo, 0, hi, 0],
                          dilations=[1, 1], group=1),
         helper.make_node("Reshape", ["a", "s0"], ["s"]),
         helper.make_node("Div", ["s", "n"], ["y"])], [X], [Y],
        [ints("s4", [N, 1, C, H * H]), ints("s0", [N, C, H, H]),
         numpy_helper.from_array(np.ones((1, 1, n, 1), np.float32), "K"),
         numpy_helper.from_array(np.array(n, np.float32), "n")])
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant")]
    inits = [ints("pads", [0, lo, 0, 0, 0, hi, 0, 0]), ints("ax", [1]),
             numpy_helper.from_array(np.array(n, np.float32), "n")]
    for j in range(n):
        nodes.append(helper.make_node("Slice", ["p", f"b{j}", f"e{j}", "ax"], [f"s{j}"]))
        inits += [ints(f"b{j}", [j]), ints(f"e{j}", [j + C])]
    nodes += [helper.make_node("Sum", [f"s{j}" for j in range(n)], ["s"]), helper.make_node("Div", ["s", "n"], ["y"])]
    forms["Pad + Slice×5 + Sum"] = graph_model(nodes, [X], [Y], inits)
    return forms


def bench_lrn(batches, threads, repeats) -> str:
    rows = []
    for N in batches:
        for name, C, H in GOOGLENET_LRN:
            x = np.square(np.random.default_rng(0).standard_normal((N, C, H, H))).astype(np.float32)  # x^2
            forms = lrn_forms(N, C, H)
            times, outs = timed_many({k: session(m, threads) for k, m in forms.items()}, {"*": {"x": x}}, repeats)
            ref = outs["3-D AveragePool (any)"][0]
            for k in forms:
                dev = float(np.abs(outs[k][0] - ref).max() / np.abs(ref).max())
                rows.append((N, name, f"{C}×{H}×{H}", k, times[k], dev))
                print(f"  batch {N} {name} {k}: {times[k]:.1f} ms, max dev {dev:.1e}", flush=True)
    base = {(r[0], r[1]): r[4] for r in rows if r[3].endswith("(any)")}
    lines = [header("GoogLeNet's two LRN window sums (size 5, across channels), input x² of normal noise",
                    threads, repeats), "",
             "| batch | LRN | input | form | ms | × 3-D pool | max deviation |", "|---:|---|---|---|---:|---:|---:|"]
    for N, name, shape, k, t, dev in rows:
        lines.append(f"| {N} | {name} | {shape} | {k} | {t:.1f} | {t / base[(N, name)]:.2f} | {dev:.0e} |")
    for N in batches:
        tot = {}
        for r in rows:
            if r[0] == N:
                tot[r[3]] = tot.get(r[3], 0.0) + r[4]
        any_ = tot["3-D AveragePool (any)"]
        lines.append(f"| {N} | **both** | | " + "; ".join(f"{k.split(' (')[0]} **{v:.0f}** ({v / any_:.2f}×)"
                                                          for k, v in tot.items()) + " | | | |")
    lines += ["", "An explainer computes each LRN's window sum twice (x² forward, the mirrored window of the "
              "relevance backward)."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ winner-take-all

def wta_model(chw, k, s, pads, batch, target_runtime) -> onnx.ModelProto:
    """x -> MaxPool -> y, and the library's winner-take-all of a relevance input R: output r_x."""
    from lrponnx.compiler.builder import GraphBuilder
    from lrponnx.rules import make_rule
    from lrponnx.compiler.load import prepare
    from lrponnx.ops import Ctx, load_handlers
    from lrponnx.compiler.units import build_units
    from lrponnx.compiler.view import ModelView

    C, H, W = chw
    pool = helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[k, k], strides=[s, s], pads=pads)
    model = prepare(graph_model([pool], [vi("x", TensorProto.FLOAT, [batch, C, H, W])],
                                [vi("y", TensorProto.FLOAT, [batch, C, "h", "w"])]))
    view = ModelView(model)
    (unit,) = [u for u in build_units(view) if u.op_type == "MaxPool"]
    unit.rule = make_rule("winner-take-all")
    ys = view.shape("y")
    model.graph.input.append(vi("R", TensorProto.FLOAT, ys))
    g = GraphBuilder(model.graph)
    (r,) = load_handlers()["MaxPool"].fn(Ctx(g, view, target_runtime=target_runtime), unit, "R").values()
    g.identity(r, "r_x")
    g.output("r_x", TensorProto.FLOAT, [batch, C, H, W])
    return model


def bench_wta(batches, threads, repeats) -> str:
    from wta_kernels import GOOGLENET_POOLS

    lines = [header("GoogLeNet's 13 max pools, winner-take-all as the library emits it for each target runtime "
                    "(the forward pool included), inputs ReLU'd normal noise", threads, repeats), "",
             "| batch | pool | input | window | fwd pool | any: Indices + scatter | webgpu: unfold + ArgMax + "
             "ConvTranspose | webgpu / any | max deviation |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for N in batches:
        tot = np.zeros(3)
        for name, chw, k, s, pads in GOOGLENET_POOLS:
            rng = np.random.default_rng(0)
            x = np.maximum(rng.standard_normal([N] + chw), 0).astype(np.float32)
            fwd = graph_model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s],
                                                pads=pads)], [vi("x", TensorProto.FLOAT, [N] + chw)],
                              [vi("y", TensorProto.FLOAT, None)])
            y = session(fwd, threads).run(None, {"x": x})[0]
            R = rng.standard_normal(y.shape).astype(np.float32)
            sessions = {"fwd": session(fwd, threads),
                        "any": session(wta_model(chw, k, s, pads, N, "any"), threads),
                        "webgpu": session(wta_model(chw, k, s, pads, N, "webgpu"), threads)}
            times, outs = timed_many(sessions, {"fwd": {"x": x}, "*": {"x": x, "R": R}}, repeats)
            a, b = outs["any"][1], outs["webgpu"][1]
            dev = float(np.abs(a - b).max() / np.abs(a).max())
            t = np.array([times["fwd"], times["any"], times["webgpu"]])
            tot += t
            lines.append(f"| {N} | {name} | {'×'.join(map(str, chw))} | {k}×{k}/{s} | {t[0]:.1f} | {t[1]:.1f} | "
                         f"{t[2]:.1f} | {t[2] / t[1]:.2f} | {dev:.0e} |")
            print(f"  batch {N} {name}: fwd {t[0]:.1f} any {t[1]:.1f} webgpu {t[2]:.1f} dev {dev:.1e}", flush=True)
        lines.append(f"| {N} | **total** | | | **{tot[0]:.0f}** | **{tot[1]:.0f}** | **{tot[2]:.0f}** | "
                     f"**{tot[2] / tot[1]:.2f}** | |")
    lines += ["", "Max deviation: the largest difference between the two forms' input relevance over the largest "
              "value (both exact; only the order of the additions where windows overlap differs)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- whole explainer

def bench_explainer(model_path: Path, batches, threads, repeats) -> str:
    import lrponnx

    ex = {tr: lrponnx.convert(str(model_path), composite="epsilon-plus-flat", target_runtime=tr)
          for tr in ("any", "webgpu")}
    inp = ex["any"].graph.input[0]
    lines = [header(f"`{model_path.name}` explainer (epsilon-plus-flat), inputs normal noise × 50, target -1",
                    threads, repeats, interleaved=False), "",
             "| batch | any | webgpu | webgpu / any | relevance rel. L2 (webgpu vs any) |", "|---:|---:|---:|---:|---:|"]
    for N in batches:
        shape = [N] + [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
        x = (np.random.default_rng(0).standard_normal(shape) * 50).astype(np.float32)
        feeds = {"*": {inp.name: x, "target": np.full([N], -1, np.int64)}}
        times, r = {}, {}
        for tr, m in ex.items():  # one session at a time: two GoogLeNet sessions at batch 32 need ~10 GB
            sess = session(m, threads)
            t, outs = timed_many({tr: sess}, feeds, repeats)
            times[tr] = t[tr]
            r[tr] = outs[tr][[o.name for o in sess.get_outputs()].index("relevance")]
            del sess, outs
        err = float(np.linalg.norm(r["webgpu"] - r["any"]) / np.linalg.norm(r["any"]))
        lines.append(f"| {N} | {times['any']:.0f} | {times['webgpu']:.0f} | {times['webgpu'] / times['any']:.2f} | "
                     f"{err:.1e} |")
        print(f"  batch {N}: any {times['any']:.0f} webgpu {times['webgpu']:.0f} rel {err:.1e}", flush=True)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--googlenet", type=Path, default=MODELS / "bvlc-googlenet.onnx")
    ap.add_argument("--write-docs", action="store_true", help=f"replace the tables in {DOCS}")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown part(s): {', '.join(sorted(unknown))}")
    batches = [int(b) for b in args.batches.split(",")]
    for part in parts:
        print(f"== {part}", flush=True)
        if part == "lrn":
            text = bench_lrn(batches, args.threads, args.repeats)
        elif part == "wta":
            text = bench_wta(batches, args.threads, args.repeats)
        else:
            if not args.googlenet.is_file():
                print(f"  skipped: {args.googlenet} is absent (bench/run.py builds it, or pass --googlenet)")
                continue
            text = bench_explainer(args.googlenet, batches, args.threads, args.repeats)
        print(text, flush=True)
        if args.write_docs:
            replace_block(DOCS, f"<!-- webgpu_forms:{part}:start -->", f"<!-- webgpu_forms:{part}:end -->", text)
            print(f"wrote {DOCS} ({part})")


if __name__ == "__main__":
    main()

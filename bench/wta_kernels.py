"""What winner-take-all max pooling costs in ONNX Runtime's CPU kernels, and what the alternatives cost.

Winner-take-all (the contract's default max-pool rule, the gradient of max pooling) needs the
argmax of every window and an add of each window's relevance into the input position it came
from. The explainer does that with ``MaxPool`` (Indices output) and ``ScatterElements``
(reduction add, rows ``[N*C, H*W]``). Both are scalar loops in ONNX Runtime, which is why
GoogLeNet's explainer misses the issue's 3.2x target while every other target is met. This
script times, per max pool of the model, the forward pool and the kernels each formulation needs,
side by side in one process (ONNX Runtime, CPU, 2 intra-op threads, median over repeats):

- ``fwd pool``: the forward ``MaxPool`` (MLAS; what the model pays);
- ``argmax``: ``MaxPool`` with its Indices output (what the explainer uses);
- ``f64 key``: an exact argmax without the Indices output: every input is cast to float64, whose
  29 low mantissa bits are zero for a float32 value, the plane position goes into them
  (``BitCast``, ``BitwiseOr``: the order of the values is unchanged, ties go to the first
  position as in torch), the keys are max-pooled and the position read back. ONNX Runtime has
  no fast float64 pool, so this is slower than ``argmax``;
- ``scatter``: zero buffer plus ``ScatterElements`` (add) of one value per window (what the
  explainer uses);
- ``unpool``: ``MaxUnpool`` of the same values: fast, but it writes instead of adding, so it is
  exact only where windows cannot share a winner (the explainer uses it there, e.g. VGG's 2x2/2);
  the ``unpool error`` column shows what it loses on these overlapping pools;
- ``gather``: ``GatherElements`` with the same indices, for scale (a pull, not what WTA needs);
- ``1 pass``: one elementwise ``Add`` over the pool's input: the unit cost of any dense
  reformulation (an exact dense WTA for a 3x3 window needs well over ten such passes).

    .venv/bin/python bench/wta_kernels.py                      # GoogLeNet's pools at batch 32
    .venv/bin/python bench/wta_kernels.py --model M.onnx --batch 8
    .venv/bin/python bench/wta_kernels.py --write-docs         # also put the table into docs/
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

DOCS = Path(__file__).resolve().parents[1] / "docs" / "maxpool-wta.md"
START, END = "<!-- wta_kernels:start -->", "<!-- wta_kernels:end -->"
ZOO_GOOGLENET = Path(__file__).resolve().parent / "_work" / "models" / "bvlc-googlenet.onnx"

# GoogLeNet's (BVLC) max pools: name, [C, H, W] of the input, kernel, stride, pads. Used when no
# model file is given or found (the zoo model is built by `bench/run.py`).
GOOGLENET_POOLS = [
    ("pool1/3x3_s2", [64, 112, 112], 3, 2, [0, 0, 1, 1]),
    ("pool2/3x3_s2", [192, 56, 56], 3, 2, [0, 0, 1, 1]),
    ("inception_3a/pool", [192, 28, 28], 3, 1, [1, 1, 1, 1]),
    ("inception_3b/pool", [256, 28, 28], 3, 1, [1, 1, 1, 1]),
    ("pool3/3x3_s2", [480, 28, 28], 3, 2, [0, 0, 1, 1]),
    ("inception_4a/pool", [480, 14, 14], 3, 1, [1, 1, 1, 1]),
    ("inception_4b/pool", [512, 14, 14], 3, 1, [1, 1, 1, 1]),
    ("inception_4c/pool", [512, 14, 14], 3, 1, [1, 1, 1, 1]),
    ("inception_4d/pool", [512, 14, 14], 3, 1, [1, 1, 1, 1]),
    ("inception_4e/pool", [528, 14, 14], 3, 1, [1, 1, 1, 1]),
    ("pool4/3x3_s2", [832, 14, 14], 3, 2, [0, 0, 1, 1]),
    ("inception_5a/pool", [832, 7, 7], 3, 1, [1, 1, 1, 1]),
    ("inception_5b/pool", [832, 7, 7], 3, 1, [1, 1, 1, 1]),
]
COLUMNS = ["fwd pool", "argmax", "f64 key", "scatter", "unpool", "gather", "1 pass"]


def pools_of(path: Path) -> list[tuple]:
    """The 2-D max pools of a model with their input shapes (onnx shape inference)."""
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(m.graph.value_info) + list(m.graph.input)}
    out = []
    for n in m.graph.node:
        if n.op_type != "MaxPool":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        shape = shapes.get(n.input[0])
        k, s = list(a["kernel_shape"]), list(a.get("strides", [1, 1]))
        if shape is None or len(shape) != 4 or not all(shape[1:]) or k[0] != k[1] or s[0] != s[1] \
                or a.get("ceil_mode", 0) or any(v != 1 for v in a.get("dilations", [1, 1])):
            continue
        out.append((n.name, shape[1:], k[0], s[0], list(a.get("pads", [0, 0, 0, 0]))))
    return out


def session(nodes, inputs, outputs, inits=(), opset=26, threads=2) -> ort.InferenceSession:
    g = helper.make_graph(nodes, "wta", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def timed(sess, feeds, repeats: int) -> tuple[float, list]:
    out = sess.run(None, feeds)
    sess.run(None, feeds)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), out


def measure(name, chw, k, s, pads, batch, repeats, threads) -> dict:
    C, H, W = chw
    P = H * W
    vi = helper.make_tensor_value_info
    pool = dict(kernel_shape=[k, k], strides=[s, s], pads=pads)
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((batch, C, H, W)), 0).astype(np.float32)  # after a ReLU
    X = vi("x", TensorProto.FLOAT, [batch, C, H, W])
    row = {"name": name, "shape": f"{C}×{H}×{W}", "window": f"{k}×{k}/{s}"}

    row["fwd pool"], _ = timed(session([helper.make_node("MaxPool", ["x"], ["y"], **pool)], [X],
                                       [vi("y", TensorProto.FLOAT, None)], threads=threads), {"x": x}, repeats)
    row["argmax"], (y, idx) = timed(session([helper.make_node("MaxPool", ["x"], ["y", "i"], **pool)], [X],
                                            [vi("y", TensorProto.FLOAT, None), vi("i", TensorProto.INT64, None)],
                                            threads=threads), {"x": x}, repeats)
    local = idx % P                                         # plane positions, what the row scatter takes

    # Exact float64 keys: float32 -> float64 leaves 29 zero mantissa bits; put (P-1-pos) there, so
    # equal values prefer the first position, and distinct values keep their order.
    code = np.arange(P, dtype=np.int64)[::-1].reshape(1, 1, H, W).copy()
    key_nodes = [helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE),
                 helper.make_node("BitCast", ["xd"], ["xi"], to=TensorProto.INT64),
                 helper.make_node("BitwiseOr", ["xi", "code"], ["ki"]),
                 helper.make_node("BitCast", ["ki"], ["kd"], to=TensorProto.DOUBLE),
                 helper.make_node("MaxPool", ["kd"], ["yk"], **pool),
                 helper.make_node("BitCast", ["yk"], ["yi"], to=TensorProto.INT64),
                 helper.make_node("BitwiseAnd", ["yi", "mask"], ["c"]),
                 helper.make_node("Sub", ["top", "c"], ["pos"])]
    inits = [numpy_helper.from_array(code, "code"), numpy_helper.from_array(np.array(2 ** 29 - 1, np.int64), "mask"),
             numpy_helper.from_array(np.array(P - 1, np.int64), "top")]
    row["f64 key"], (pos,) = timed(session(key_nodes, [X], [vi("pos", TensorProto.INT64, None)], inits,
                                           threads=threads), {"x": x}, repeats)
    row["f64 key exact"] = bool(np.array_equal(pos, local))

    Ho, Wo = y.shape[2:]
    upd = rng.random((batch, C, Ho, Wo), dtype=np.float32)
    shape_in = numpy_helper.from_array(np.array([batch * C, P], np.int64), "shape")
    sc = session([helper.make_node("ConstantOfShape", ["shape"], ["z"],
                                   value=numpy_helper.from_array(np.zeros(1, np.float32))),
                  helper.make_node("ScatterElements", ["z", "i", "u"], ["o"], axis=1, reduction="add")],
                 [vi("i", TensorProto.INT64, [batch * C, Ho * Wo]), vi("u", TensorProto.FLOAT, [batch * C, Ho * Wo])],
                 [vi("o", TensorProto.FLOAT, None)], [shape_in], opset=18, threads=threads)
    row["scatter"], (scattered,) = timed(sc, {"i": local.reshape(batch * C, -1), "u": upd.reshape(batch * C, -1)},
                                         repeats)
    un = session([helper.make_node("MaxUnpool", ["u", "i", "oshape"], ["o"], **pool)],
                 [vi("u", TensorProto.FLOAT, list(upd.shape)), vi("i", TensorProto.INT64, list(idx.shape))],
                 [vi("o", TensorProto.FLOAT, None)],
                 [numpy_helper.from_array(np.array([batch, C, H, W], np.int64), "oshape")], opset=18, threads=threads)
    row["unpool"], (unpooled,) = timed(un, {"u": upd, "i": idx}, repeats)
    ref = scattered.reshape(batch, C, H, W)
    row["unpool error"] = float(np.abs(unpooled - ref).sum() / np.abs(ref).sum())
    ga = session([helper.make_node("GatherElements", ["u", "i"], ["o"], axis=1)],
                 [vi("u", TensorProto.FLOAT, [batch * C, P]), vi("i", TensorProto.INT64, [batch * C, Ho * Wo])],
                 [vi("o", TensorProto.FLOAT, None)], opset=18, threads=threads)
    row["gather"], _ = timed(ga, {"u": x.reshape(batch * C, P), "i": local.reshape(batch * C, -1)}, repeats)
    add = session([helper.make_node("Add", ["x", "x"], ["o"])], [X], [vi("o", TensorProto.FLOAT, None)],
                  opset=18, threads=threads)
    row["1 pass"], _ = timed(add, {"x": x}, repeats)
    return row


def table(rows: list[dict], batch: int, threads: int, repeats: int, source: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    head = (f"{source}, batch {batch}, inputs ReLU'd normal noise; ONNX Runtime {ort.__version__}, CPU, "
            f"{threads} intra-op threads, median of {repeats} runs after 2 warm-ups; {platform.machine()}, "
            f"{os.cpu_count()} logical CPUs, load average {load:.1f} at the end. Times in ms.")
    lines = [head, "",
             "| pool | input | window | " + " | ".join(COLUMNS) + " | f64 key exact | unpool error |",
             "|---|---|---|" + "---:|" * len(COLUMNS) + "---|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['shape']} | {r['window']} | "
                     + " | ".join(f"{r[c]:.1f}" for c in COLUMNS)
                     + f" | {'yes' if r['f64 key exact'] else 'NO'} | {r['unpool error']:.2f} |")
    tot = {c: sum(r[c] for r in rows) for c in COLUMNS}
    lines.append("| **total** | | | " + " | ".join(f"**{tot[c]:.0f}**" for c in COLUMNS) + " | | |")
    wta = tot["argmax"] + tot["scatter"]
    lines += ["", f"Winner-take-all as the explainer does it (argmax + scatter): **{wta:.0f} ms**, "
              f"{wta / tot['fwd pool']:.0f}× the forward pools ({tot['fwd pool']:.0f} ms) and "
              f"{wta / tot['1 pass']:.0f}× one elementwise pass over every pool input ({tot['1 pass']:.0f} ms). "
              f"The exact float64-key argmax costs {tot['f64 key'] / tot['argmax']:.2f}× the Indices output; "
              f"MaxUnpool places {tot['scatter'] / tot['unpool']:.1f}× faster than the scatter but loses "
              "relevance wherever two windows share a winner (the error column: fraction of the relevance "
              "misplaced)."]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    replace_block(DOCS, START, END, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="take the max pools of this model (default: GoogLeNet's)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true", help=f"replace the table in {DOCS}")
    args = ap.parse_args()
    if args.model:
        pools, source = pools_of(args.model), f"Max pools of `{args.model.name}`"
    else:
        pools, source = GOOGLENET_POOLS, "GoogLeNet's 13 max pools"
    rows = []
    for p in pools:
        rows.append(measure(*p, batch=args.batch, repeats=args.repeats, threads=args.threads))
        print(f"  {p[0]:22s} " + " ".join(f"{c} {rows[-1][c]:.1f}" for c in COLUMNS), flush=True)
    text = table(rows, args.batch, args.threads, args.repeats, source)
    print(text)
    if args.write_docs:
        write_docs(text)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()

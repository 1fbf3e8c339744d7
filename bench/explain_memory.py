"""Peak memory and throughput of ``lrponnx explain`` over many images -> docs/scale.md.

Memory: ``explain`` over 300 and over 3,000 synthetic 224x224 JPEGs (a small 224x224 explainer), each
run in its own subprocess; its peak RSS comes from ``os.wait4`` (the child's own rusage, not the
maximum over every child so far). The issue's target: 3,000 peaks at <= 1.25x the 300 run.

Throughput (``--throughput``): the same model over N images, single-process (ONNX Runtime on every
core) against ``--ray local`` (one node: actors of 1 CPU each, and one actor of every CPU). Ray's
start-up is measured apart (the faster of two runs of 8 images), so images/s is the steady rate:
(N - 8) / (T_N - T_8).

    .venv/bin/python bench/explain_memory.py                  # memory table
    .venv/bin/python bench/explain_memory.py --throughput     # throughput table (needs ray)
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_block import replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "scale.md"
MEM = ("<!-- explain_memory:start -->", "<!-- explain_memory:end -->")
SPEED = ("<!-- explain_throughput:start -->", "<!-- explain_throughput:end -->")


def make_model(path: Path) -> Path:
    """A small 224x224 CNN (conv 7x7/4, conv 3x3/2, dense 10) with torchvision preprocessing metadata,
    compiled into an explainer."""
    import lrponnx
    from lrponnx.files import save_model
    from lrponnx.app.preprocess import Preprocessing

    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(16, 3, 7, 7)) * 0.1).astype(np.float32)
    w2 = (rng.normal(size=(16, 16, 3, 3)) * 0.1).astype(np.float32)
    w3 = (rng.normal(size=(10, 16 * 28 * 28)) * 0.01).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[7, 7], strides=[4, 4], pads=[3, 3, 3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "bench224",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(w3, "w3")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    Preprocessing.from_flags(preset="torchvision", size=224).write_to_model(model)
    save_model(lrponnx.convert(model), path)
    return path


def make_images(folder: Path, n: int, distinct: int = 300) -> Path:
    """n JPEGs 224x224; the first ``distinct`` are drawn, the rest are hard links to them (new names)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        p = folder / f"img{i:05d}.jpg"
        if i < distinct:
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((224, 224), Image.Resampling.BICUBIC).save(p, quality=90)
        else:
            os.link(folder / f"img{i % distinct:05d}.jpg", p)
    return folder


def run(args: list[str]) -> tuple[int, float, float]:
    """Run the CLI in a subprocess: (exit code, peak RSS in MiB, seconds)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lrponnx.app.cli", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 gives this child's own rusage; stderr is small (a progress bar) and read after
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"lrponnx {' '.join(args)} exited {code}: {err[-2000:]}")
    return code, usage.ru_maxrss / 1024.0, seconds


def memory(work: Path, counts: list[int]) -> str:
    model = make_model(work / "explainer.onnx")
    images = make_images(work / "images", max(counts))
    rows = []
    for n in counts:
        folder = work / f"in{n}"
        folder.mkdir()
        for p in sorted(images.iterdir())[:n]:
            os.link(p, folder / p.name)
        out = work / f"out{n}"
        _, rss, seconds = run(["explain", str(model), str(folder), "-o", str(out)])
        heatmaps = len(list(out.glob("*_heatmap.png")))
        assert heatmaps == n, (heatmaps, n)
        rows.append((n, rss, seconds))
        print(f"{n} images: peak RSS {rss:.0f} MiB, {seconds:.1f} s", flush=True)
        shutil.rmtree(out)
    base = rows[0][1]
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}; `bench/explain_memory.py` (synthetic 224x224 JPEGs, a 3-layer "
             "224x224 explainer, default batch 16, no `--save-raw`).", "",
             "| images | peak RSS (MiB) | vs the first row | wall time (s) | images/s |", "|---:|---:|---:|---:|---:|"]
    for n, rss, seconds in rows:
        lines.append(f"| {n:,} | {rss:.0f} | {rss / base:.2f}x | {seconds:.1f} | {n / seconds:.0f} |")
    return "\n".join(lines)


def throughput(work: Path, n: int) -> str:
    model = make_model(work / "explainer.onnx")
    images = make_images(work / "images", n)
    small = work / "small"
    small.mkdir()
    for p in sorted(images.iterdir())[:8]:
        os.link(p, small / p.name)
    cpus = os.cpu_count() or 1
    setups = [("single process (ORT on every core)", []),
              (f"Ray, one node: {cpus} actors x 1 CPU", ["--ray", "local", "--ray-cpus-per-actor", "1"]),
              (f"Ray, one node: 1 actor x {cpus} CPUs", ["--ray", "local", "--ray-cpus-per-actor", str(cpus)])]
    rows = []
    for name, extra in setups:
        times = {}
        for k, folder in ((8, small), (8, small), (n, images)):  # start-up: the faster of two runs
            out = work / "out"
            _, _, seconds = run(["explain", str(model), str(folder), "-o", str(out), *extra])
            shutil.rmtree(out)
            times[k] = min(seconds, times.get(k, seconds))
        rate = (n - 8) / max(1e-9, times[n] - times[8])
        rows.append((name, times[8], times[n], rate))
        print(f"{name}: 8 images {times[8]:.1f} s, {n} images {times[n]:.1f} s, {rate:.1f} images/s", flush=True)
    base = rows[0][3]
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {cpus} cores (shared with other "
             f"work while measured), `bench/explain_memory.py --throughput` ({n} synthetic 224x224 JPEGs, the same "
             "3-layer explainer, batch 16).", "",
             f"| run | 8 images (s): start-up | {n} images (s) | steady images/s | vs single process |",
             "|---|---:|---:|---:|---:|"]
    for name, t8, tn, rate in rows:
        lines.append(f"| {name} | {t8:.1f} | {tn:.1f} | {rate:.1f} | {rate / base:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="300,3000", help="numbers of images (default 300,3000)")
    ap.add_argument("--throughput", action="store_true", help="measure images/s, single process vs Ray")
    ap.add_argument("--images", type=int, default=1500, help="images for --throughput (default 1500)")
    ap.add_argument("--no-docs", action="store_true", help="print the table, do not write docs/scale.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lrponnx-bench-") as tmp:
        if args.throughput:
            text, marks = throughput(Path(tmp), args.images), SPEED
        else:
            text, marks = memory(Path(tmp), [int(c) for c in args.counts.split(",")]), MEM
    print(text)
    if not args.no_docs:
        replace_block(DOCS, *marks, text)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()

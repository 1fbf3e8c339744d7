"""The Caffe converter vs OpenCV's dnn module: writes the parity table of docs/caffe.md.

    .venv/bin/python bench/caffe_opencv_parity.py [--no-write]

Runs :func:`tests.test_caffe_opencv.parity` (random weights from seed 0 written as a
.caffemodel, read by OpenCV and by the converter, same input) on every net of that test and
adds, per net, how sensitive the converted model itself is to float32 rounding: the relative
change of its outputs and logits when the input is perturbed by 1e-7 (relative), in ONNX Runtime.
Needs ../shared/data and ``opencv-python-headless<5``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import test_caffe_opencv as T  # noqa: E402
from conftest import SHARED_DATA  # noqa: E402
from docs_block import replace_block  # noqa: E402

START, END = "<!-- caffe-opencv-parity:start -->", "<!-- caffe-opencv-parity:end -->"


def sensitivity(r: "T.Result", seed: int = 11) -> float:
    x_shape = list(r.size)
    x = np.random.default_rng(T.SEED + 1).uniform(-120.0, 130.0, x_shape).astype(np.float32)
    xp = (x * (1 + 1e-7 * np.random.default_rng(seed).standard_normal(x_shape))).astype(np.float32)
    a = T.run_ort(r.model, x, r.final)
    b = T.run_ort(r.model, xp, r.final)
    return max(T.rel_l2(u, v) for u, v in zip(b, a))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    import cv2

    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for net in T.NETS:
            proto = net.prototxt(SHARED_DATA)
            for size in net.sizes:
                t = time.perf_counter()
                r = T.parity(proto, Path(tmp), size, key=net.key)
                secs = time.perf_counter() - t
                sens = sensitivity(r)
                ok = "yes" if not r.failures() else "**no**"
                rows.append(f"| {net.key} | {'x'.join(map(str, r.size[1:]))} | {len(r.errors)} | "
                             f"{r.worst_final:.1e} | {'—' if r.worst_inner is None else f'{r.worst_inner:.1e}'} | {sens:.1e} | "
                             f"{ok} | {net.covers} |")
                print(rows[-1], f"({secs:.1f} s)", flush=True)
    head = ("| net | input (C x H x W) | blobs compared | outputs + logits, max rel. L2 | intermediate blobs, "
            "max rel. L2 | own float32 sensitivity | within tolerance | what it exercises |\n"
            "|---|---|---|---|---|---|---|---|")
    table = (head + "\n" + "\n".join(rows) + f"\n\nOpenCV {cv2.__version__}, ONNX Runtime "
             f"{__import__('onnxruntime').__version__}, seed {T.SEED}; written by `bench/caffe_opencv_parity.py`.")
    if not args.no_write:
        replace_block(ROOT / "docs" / "caffe.md", START, END, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

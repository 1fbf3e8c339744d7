"""AttnLRP (issue 14): parity with LXT 2.1 per model and exporter, and the explainer's cost on vit_b_16.

``parity``: the small ViT, the small BERT-style classifier, torchvision vit_b_16 and swin_t (seeded
random weights, no downloads), each exported by TorchScript (opset 17, dynamic batch) and dynamo
(opset 18, static), converted with ``--composite attnlrp``; per model and exporter: the largest
difference of the explainer's outputs to the exported model in ONNX Runtime, the relative L2 of the
relevance to LXT's AttnLRP in float64 per sample (largest), and the conservation (input relevance
sum / target logit) of both, per sample.

``speed``: vit_b_16 (TorchScript export) at batch 8 with 2 threads: ONNX Runtime forward and explainer
(median of repeats, 2 intra-op threads), and LXT's cost in PyTorch float32 (2 threads): forward, and
forward + backward with the AttnLRP patches (what an LXT heatmap costs).

    .venv/bin/python bench/attnlrp.py parity [--write-docs]    # table -> docs/rules.md (marked block)
    .venv/bin/python bench/attnlrp.py speed [--write-docs]     # table -> docs/benchmarks.md (marked block)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from docs_block import replace_block  # noqa: E402

RULES_DOC = HERE.parent / "docs" / "rules.md"
BENCH_DOC = HERE.parent / "docs" / "benchmarks.md"
PARITY_MARKS = ("<!-- attnlrp_parity:start -->", "<!-- attnlrp_parity:end -->")
SPEED_MARKS = ("<!-- attnlrp_speed:start -->", "<!-- attnlrp_speed:end -->")


def _session(path_or_model, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # no warnings about the exporter's unused constants
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = path_or_model if isinstance(path_or_model, (str, Path)) else path_or_model.SerializeToString()
    return ort.InferenceSession(str(src) if isinstance(src, Path) else src, so, providers=["CPUExecutionProvider"])


def _models(names):
    import torch
    import torchvision

    import attn_models as AM

    for name in names:
        if name == "small-vit":
            yield name, AM.small_vit(), AM.images(2), "x", np.array([3, 7])
        elif name == "small-bert":
            m = AM.small_bert()
            yield name, m, AM.token_ids(2), "ids", np.array([0, 2])
        else:
            torch.manual_seed(0)
            m = getattr(torchvision.models, name)().eval()
            if name.startswith("vit"):
                AM.randomise_head(m)
            yield name, m, AM.images(2, 224), "x", np.array([5, 9])


def parity(names, write_docs: bool) -> None:
    import torch

    import attn_models as AM
    import lrponnx
    import lxt_reference as L

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, model, x, iname, target in _models(names):
            if name == "small-bert":
                R_lxt, logit = L.bert_relevance(model, x, target)
                exported_model = AM.LogitsOnly(model)
            else:
                R_lxt, logit = L.vision_relevance(model, x, target)
                exported_model = model
            lxt_cons = R_lxt.reshape(len(x), -1).sum(1) / logit
            for exporter in AM.EXPORTERS:
                t0 = time.perf_counter()
                path = AM.export(exported_model, torch.tensor(x), Path(d) / f"{name}_{exporter}.onnx", exporter, iname)
                t_export = time.perf_counter() - t0
                t0 = time.perf_counter()
                try:
                    explainer = lrponnx.convert(path, composite="attnlrp")
                except lrponnx.errors.LrpOnnxError as e:
                    rows.append((name, exporter, f"refused: {str(e).splitlines()[0]}"))
                    print(rows[-1], flush=True)
                    continue
                t_convert = time.perf_counter() - t0
                out = lrponnx.Explainer(explainer).explain(x, target=target)
                plain = _session(path).run(None, {iname: x})[0]
                diff = float(np.abs(out.outputs["logits"] - plain).max())
                dist = L.rel_l2(out.relevance, R_lxt)
                ours = out.relevance.reshape(len(x), -1).sum(1) / logit
                rows.append((name, exporter, diff, float(dist.max()), ours, lxt_cons, t_export, t_convert))
                print(rows[-1], flush=True)
    lines = ["| model | exporter | outputs vs model (max abs) | relevance vs LXT (rel. L2, worst sample) | "
             "conservation ours (per sample) | conservation LXT | export / convert (s) |",
             "|---|---|---:|---:|---|---|---:|"]
    for r in rows:
        if len(r) == 3:
            lines.append(f"| {r[0]} | {r[1]} | {r[2]} | | | | |")
            continue
        name, exporter, diff, dist, ours, theirs, te, tc = r
        fmt = lambda v: ", ".join(f"{c:.6f}" for c in v)  # noqa: E731
        lines.append(f"| {name} | {exporter} | {diff:.1e} | {dist:.1e} | {fmt(ours)} | {fmt(theirs)} | {te:.0f} / {tc:.0f} |")
    text = "\n".join(lines + ["", f"`bench/attnlrp.py parity` ({time.strftime('%Y-%m-%d')}; LXT in float64, "
                              "explainer float32 in ONNX Runtime; 2 samples per model, seeded random weights, "
                              "TorchScript with a dynamic batch, dynamo static)."])
    print(text)
    if write_docs:
        replace_block(RULES_DOC, *PARITY_MARKS, text)


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved(fns, repeats: int, warmup: int = 2) -> list[float]:
    """Median time of each function, the calls alternating (f1, f2, f1, f2, ...)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def speed(batch: int, repeats: int, write_docs: bool) -> None:
    import torch

    import attn_models as AM
    import lrponnx
    import lxt_reference as L

    torch.set_num_threads(2)
    torch.set_num_interop_threads(1)
    (name, model, _, _, _), = _models(["vit_b_16"])
    x = AM.images(batch, 224)
    target = np.arange(batch) % 1000
    with tempfile.TemporaryDirectory() as d:
        path = AM.export(model, torch.tensor(x[:1]), Path(d) / "vit_b_16.onnx", "torchscript", "x")
        explainer = lrponnx.convert(path, composite="attnlrp")
        fwd = _session(path)
        exs = _session(explainer)
        # interleaved, so that a change of the machine's load hits both alike
        t_fwd, t_ex = _interleaved([lambda: fwd.run(None, {"x": x}),
                                    lambda: exs.run(None, {"x": x, "target": target.astype(np.int64)})], repeats)
    xt = torch.tensor(x)
    m32 = model.float().eval()

    def torch_forward():
        with torch.no_grad():
            m32(xt)

    def lxt_heatmap():
        xg = xt.clone().requires_grad_(True)
        logits = m32(xg)
        logits.gather(1, torch.tensor(target).reshape(-1, 1)).sum().backward()
        return xg * xg.grad

    t_torch = _median_time(torch_forward, repeats)
    with L.lxt_patched(L._vision_patches()):
        t_lxt = _median_time(lxt_heatmap, repeats)
    load = os.getloadavg()[0]
    ratio = t_ex / t_fwd
    lines = ["| engine (2 threads, batch %d, vit_b_16) | ms per call | ratio |" % batch, "|---|---:|---:|",
             f"| ONNX Runtime: model forward | {t_fwd * 1e3:.0f} | 1 |",
             f"| ONNX Runtime: explainer (`attnlrp`; outputs + relevance) | {t_ex * 1e3:.0f} | "
             f"**{ratio:.2f}** × forward (target ≤ 3: **{'met' if ratio <= 3 else 'missed'}**) |",
             f"| PyTorch float32: forward | {t_torch * 1e3:.0f} | 1 |",
             f"| LXT 2.1 AttnLRP heatmap (forward + backward, patched) | {t_lxt * 1e3:.0f} | "
             f"{t_lxt / t_torch:.2f} × PyTorch forward; {t_lxt / t_ex:.2f} × the explainer |"]
    text = "\n".join(lines + ["", f"`bench/attnlrp.py speed` ({time.strftime('%Y-%m-%d %H:%M')}, median of "
                              f"{repeats} after 2 warm-up calls, forward and explainer calls alternating; {platform.processor() or platform.machine()}, "
                              f"{os.cpu_count()} CPUs, load average {load:.1f} at the end: other work shared "
                              "the cores when it is above ~2)."])
    print(text)
    if write_docs:
        replace_block(BENCH_DOC, *SPEED_MARKS, text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["parity", "speed"])
    p.add_argument("--models", default="small-vit,small-bert,vit_b_16,swin_t")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write-docs", action="store_true")
    a = p.parse_args()
    if a.what == "parity":
        parity(a.models.split(","), a.write_docs)
    else:
        speed(a.batch, a.repeats, a.write_docs)


if __name__ == "__main__":
    main()

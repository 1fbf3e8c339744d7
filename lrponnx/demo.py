"""``lrponnx demo``: the first five minutes. Bundled model, bundled photos, heatmaps on disk."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def run_demo(output="demo_out") -> int:
    from .compiler import convert
    from .files import atomic_path, check_output_folder, save_model
    from .model_zoo.registry import default_model_path
    from .preprocess import Preprocessing
    from .render import overview, render, save_png
    from .runtime import Explainer
    from .samples import sample_images

    started = time.perf_counter()
    out = check_output_folder(Path(output))  # an existing file there: one line, exit 2
    model_path = default_model_path()
    explainer_model = convert(str(model_path))  # default composite, LRN taylor
    save_model(explainer_model, out / "explainer.onnx", inputs=[model_path])
    ex = Explainer(explainer_model)
    pre = Preprocessing.from_model(explainer_model)
    size = tuple(pre.size) if pre is not None and pre.size else (32, 32)
    photos = sample_images(size=size)
    x = np.stack([pre.apply(rgb) for _, rgb in photos]).astype(np.float32)
    result = ex.explain(x)
    logits = result.outputs[ex.model_outputs[0]]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    classes = ex.classes or [str(i) for i in range(logits.shape[1])]
    print(f"model: {model_path.name} (composite epsilon-plus-flat, LRN rule taylor)")
    rows = []
    for k, (name, rgb) in enumerate(photos):
        t = int(result.target[k])
        rel = result.relevance[k]
        print(f"  {name:12s} -> {classes[t]:10s} p={probs[k, t]:.2f}   relevance sum {rel.sum():+.3f} "
              f"(logit {logits[k, t]:+.3f})")
        with atomic_path(out / f"{name}_heatmap.png") as tmp:
            save_png(render(rel, size=(size[0] * 4, size[1] * 4)), tmp)
        rows.append((f"{name}: {classes[t]}", rgb, rel))
    with atomic_path(out / "overview.png") as tmp:
        save_png(overview(rows, scale=4), tmp)
    print(f"wrote {out / 'overview.png'}, {len(photos)} heatmaps and explainer.onnx to {out} "
          f"in {time.perf_counter() - started:.1f} s")
    print(f"look at heatmaps in your browser: lrponnx web {out / 'explainer.onnx'}  (see docs/web.md)")
    return 0

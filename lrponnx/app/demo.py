"""``lrponnx demo``: the first five minutes. Bundled model, bundled photos, heatmaps on disk."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lrponnx.metadata import COMPOSITE_KEY, PATCH_SIZE_KEY


def run_demo(output="demo_out", model: str | None = None) -> int:
    """``model``: a zoo name (``vit-cifar10``) explained beside the bundled CNN (its own composite,
    e.g. ``attnlrp`` for the ViT): the overview then has a column for each model's heatmap."""
    if model not in (None, "cifar10-lrn"):
        return _run_side_by_side(output, model)
    from lrponnx.compiler.emit import convert
    from lrponnx.files import atomic_path, check_output_folder, save_model
    from lrponnx.model_zoo.registry import default_model_path
    from lrponnx.app.render import overview, render, save_png

    started = time.perf_counter()
    out = check_output_folder(Path(output))  # an existing file there: one line, exit 2
    model_path = default_model_path()
    explainer_model = convert(str(model_path))  # default composite, LRN taylor
    save_model(explainer_model, out / "explainer.onnx", inputs=[model_path])
    ex, result, photos, size = _explain_photos(explainer_model)
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


def _run_side_by_side(output, name: str) -> int:
    """The bundled CNN and zoo model ``name`` on the same photos: input | CNN heatmap | its heatmap |
    its patch relevance (a transformer's tokens)."""
    from PIL import Image

    from lrponnx.compiler.emit import convert
    from lrponnx.files import atomic_path, check_output_folder, save_model
    from lrponnx.model_zoo import registry
    from lrponnx.app.render import grid, render, save_png
    from lrponnx.app.render_text import patch_relevance

    started = time.perf_counter()
    entry = registry.get(name)  # an unknown name: one line listing the zoo, exit 2
    if not entry.bundled:
        from lrponnx.errors import LrpOnnxError

        raise LrpOnnxError(f"demo --model takes a bundled zoo model ({', '.join(e.name for e in registry.list_models() if e.bundled)}); "
                           f"build {name} with `lrponnx zoo build {name}` and use `lrponnx convert`/`explain`")
    out = check_output_folder(Path(output))
    cnn_path, other_path = registry.default_model_path(), registry.bundled_path(name)
    results = []
    for path in (cnn_path, other_path):
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        composite = meta.get(COMPOSITE_KEY, "epsilon-plus-flat")
        explainer_model = convert(str(path), composite=composite)
        stem = "explainer" if path == cnn_path else f"explainer_{name}"
        save_model(explainer_model, out / f"{stem}.onnx", inputs=[path])
        ex, result, photos, size = _explain_photos(explainer_model)
        results.append((path.name, composite, ex, result, photos, size))
    rows, labels = [], []
    (cnn_file, cnn_comp, cnn_ex, cnn_res, photos, size), (vit_file, vit_comp, vit_ex, vit_res, _, _) = results
    patch = int(_meta_number(vit_ex, PATCH_SIZE_KEY, 4))
    for k, (photo, rgb) in enumerate(photos):
        big = (size[0] * 4, size[1] * 4)
        cells = [Image.fromarray(rgb).resize(big[::-1], Image.Resampling.NEAREST)]
        text = [photo]
        for file, comp, ex, res in ((cnn_file, cnn_comp, cnn_ex, cnn_res), (vit_file, vit_comp, vit_ex, vit_res)):
            classes = ex.classes or [str(i) for i in range(res.outputs[ex.model_outputs[0]].shape[1])]
            cells.append(render(res.relevance[k], size=big))
            text.append(classes[int(res.target[k])])
        patches = patch_relevance(vit_res.relevance[k], patch)
        cells.append(render(patches, size=big))
        with atomic_path(out / f"{photo}_{name}_heatmap.png") as tmp:
            save_png(cells[2], tmp)
        rows.append(cells)
        labels.append(f"{text[0]}: {text[1]} / {text[2]}")
        print(f"  {photo:12s} -> CNN {text[1]:10s} {name} {text[2]:10s}")
    with atomic_path(out / "overview.png") as tmp:
        save_png(grid(rows, labels, col_labels=["input", f"CNN ({cnn_comp})", f"{name} ({vit_comp})",
                                                f"{name} per patch"]), tmp)
    print(f"wrote {out / 'overview.png'} (input | CNN heatmap | {name} heatmap | per patch) and the explainers "
          f"to {out} in {time.perf_counter() - started:.1f} s")
    return 0


def _explain_photos(explainer_model):
    """The bundled sample photos at the model's input size, explained: (explainer, explanation,
    [(name, uint8 RGB)], (height, width))."""
    from lrponnx.app.preprocess import Preprocessing
    from lrponnx.app.runtime import Explainer
    from lrponnx.app.samples import sample_images

    ex = Explainer(explainer_model)
    pre = Preprocessing.from_model(explainer_model)
    size = tuple(pre.size) if pre is not None and pre.size else (32, 32)
    photos = sample_images(size=size)
    x = np.stack([pre.apply(rgb) for _, rgb in photos]).astype(np.float32)
    return ex, ex.explain(x), photos, size


def _meta_number(ex, key: str, default):
    """A metadata value of the explainer's model (a number), or ``default``."""
    meta = getattr(ex, "metadata", None) or {}
    try:
        return float(meta[key]) if key in meta else default
    except (TypeError, ValueError):
        return default

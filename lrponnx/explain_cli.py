"""``lrponnx explain``: explain image files, folders or .npy arrays and write heatmaps."""
from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import LrpOnnxError


def _providers(name: str | None):
    if name is None:
        return None
    if name == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LrpOnnxError("--provider cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def preprocessing_for(model, args):
    """The model's stored preprocessing, overridden by any flag the user gave."""
    from .preprocess import Preprocessing

    base = Preprocessing.from_model(model)
    flags = dict(mean=args.mean, std=args.std, channel_order=args.channel_order,
                 pixel_scale=args.pixel_scale, size=args.size)
    if base is not None and all(v is None for v in flags.values()):
        return base
    if base is None and all(v is None for v in flags.values()):
        return None
    return Preprocessing.from_flags(base=base, **{k: v for k, v in flags.items() if v is not None})


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _unique_stems(items) -> list[str]:
    """File stems for the outputs; inputs with the same name in different folders keep apart."""
    def stem(it, with_parent: bool) -> str:
        base = Path(it.name).stem + (f"_{it.index}" if it.index is not None else "")
        return _safe_name(f"{Path(it.source).parent.name}_{base}" if with_parent else base)

    plain = [stem(it, False) for it in items]
    clash = {s for s in plain if plain.count(s) > 1}
    stems = [stem(it, s in clash) for it, s in zip(items, plain)]
    seen: dict[str, int] = {}
    for i, s in enumerate(stems):  # still equal (same parent name): number them
        if s in seen:
            seen[s] += 1
            stems[i] = f"{s}_{seen[s]}"
        else:
            seen[s] = 0
    return stems


def run_explain(args) -> int:
    from .cli import rule_kwargs
    from .load import read_model
    from .preprocess import iter_inputs
    from .render import overview, render, save_png
    from .runtime import Explainer, LegacyExplainerWarning, is_explainer

    model = read_model(args.model)
    options = {} if is_explainer(model) else rule_kwargs(args)
    with warnings.catch_warnings():  # said once below, as a note, not as a Python warning
        warnings.simplefilter("ignore", LegacyExplainerWarning)
        explainer = Explainer(model, providers=_providers(args.provider), **options)
    for note in explainer.notes:
        print(f"lrponnx: note: {note}", file=sys.stderr)
    pre = preprocessing_for(model, args)
    items = list(iter_inputs(args.inputs, pre))
    if not items:
        raise LrpOnnxError("no inputs found (give image files, folders of images, or .npy arrays)")
    stems = _unique_stems(items)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = explainer.classes
    rows, summary = [], []
    batch = max(1, int(args.batch_size))
    with tqdm(total=len(items), desc="explaining", unit="input", disable=len(items) <= 4) as bar:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            x = np.stack([it.tensor for it in chunk]).astype(np.float32)
            result = explainer.explain(x, target=args.target)
            logits = result.outputs[explainer.model_outputs[0]].reshape(len(chunk), -1)
            for k, it in enumerate(chunk):
                stem = stems[start + k]
                rel = result.relevance[k]
                t = int(result.target[k])
                label = classes[t] if classes and 0 <= t < len(classes) else str(t)
                save_png(render(rel, args.cmap), out_dir / f"{stem}_heatmap.png")
                if args.save_raw:
                    np.save(out_dir / f"{stem}_relevance.npy", rel)
                pred = int(np.argmax(logits[k]))
                summary.append({"input": str(it.source), "prediction": pred, "target": t,
                                "relevance_sum": float(rel.sum())})
                if len(items) <= 16:
                    print(f"{it.name}: predicted {classes[pred] if classes else pred}, explained {label}")
                if it.display is not None:
                    rows.append((f"{it.name}: {label}", it.display, rel))
            bar.update(len(chunk))
    if rows:
        save_png(overview(rows[:32], cmap=args.cmap, scale=max(1, 96 // max(rows[0][1].shape[:2]))),
                 out_dir / "overview.png")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {len(items)} heatmap(s) to {out_dir}")
    return 0

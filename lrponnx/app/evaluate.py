"""``lrponnx evaluate``: score heatmaps by region perturbation (AOPC, Samek et al. 2017).

    lrponnx evaluate model.onnx images/ --composite epsilon-alpha2-beta1 --compare-lrn -o eval_out

writes ``eval_out/aopc.json`` and ``eval_out/aopc_curves.png`` and prints a table.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lrponnx.errors import LrpOnnxError


def register(subparsers) -> None:
    from lrponnx.app.rule_options import add_rule_flags

    p = subparsers.add_parser(
        "evaluate", help="score heatmaps by region perturbation (AOPC, most relevant first vs random)",
        description="Region perturbation (Samek et al. 2017): replace p x p regions, most relevant first, by "
                    "uniform noise and record the drop of the predicted class's logit; AOPC averages it over "
                    "the steps and images (higher is better). The random region order is the baseline.")
    p.add_argument("model", help="a plain ONNX model (or an explainer, without --compare-lrn)")
    p.add_argument("inputs", nargs="+", help="image files, folders of images (a folder of class folders "
                   "is walked one level down), or .npy arrays [C,H,W] / [N,C,H,W] in model-input units")
    p.add_argument("--region", type=int, default=4, help="region size p (default 4)")
    p.add_argument("--steps", type=int, default=None, help="perturbation steps L (default: all regions)")
    p.add_argument("--limit", type=int, default=None,
                   help="use N inputs, evenly spread over the inputs (every class of a class-sorted folder)")
    p.add_argument("--rng-seed", type=int, default=0,
                   help="seed of the noise and of the random order (default 0). (--seed is the LRP start "
                        "relevance, as in the other subcommands)")
    p.add_argument("--noise", choices=["auto", "pixel", "data", "mean"], default="auto",
                   help="noise range: pixel = uniform 0..255 per channel through the model's preprocessing "
                        "(auto when the model has preprocessing metadata); data = per-channel min..max of the "
                        "input tensors; mean = not noise, the mean input tensor (a sensitivity check)")
    p.add_argument("--compare-lrn", action="store_true", help="evaluate both LRN rules (identity and taylor)")
    p.add_argument("-o", "--output", default="evaluate_out", help="output folder (default evaluate_out)")
    p.add_argument("--batch-size", type=int, default=1024, help="forward passes per ONNX Runtime call")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--provider", choices=["cpu", "cuda"], default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_rule_flags(p)
    p.set_defaults(func=run)


def _expand(paths) -> list:
    """Folders holding only class sub-folders (``cifar10_test_sample/<class>/*.jpg``) go one level down."""
    out = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and not any(c.is_file() for c in p.iterdir() if not c.name.startswith(".")):
            subs = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
            out.extend(subs if subs else [p])
        else:
            out.append(p)
    return out


def load_tensors(paths, pre, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """All inputs as one ``[N,C,H,W]`` array. ``limit`` keeps N inputs evenly spread over the list (a
    class-sorted folder keeps every class), choosing among the files before any image is decoded."""
    from lrponnx.app.inputs import expand_inputs, iter_inputs

    files = expand_inputs(_expand(paths))
    pick_late = limit is not None and any(f.suffix.lower() == ".npy" for f in files)  # several inputs per file
    if limit is not None and not pick_late and limit < len(files):
        files = [files[i] for i in _spread(len(files), limit)]
    xs, names = [], []
    for item in iter_inputs(files, pre):
        xs.append(item.tensor)
        names.append(str(item.source) + (f"[{item.index}]" if item.index is not None else ""))
    if not xs:
        raise LrpOnnxError("no inputs found")
    shapes = {t.shape for t in xs}
    if len(shapes) != 1:
        raise LrpOnnxError(f"inputs have different shapes {sorted(shapes)}; give the model's preprocessing size")
    if pick_late and limit < len(xs):
        keep = _spread(len(xs), limit)
        xs, names = [xs[i] for i in keep], [names[i] for i in keep]
    return np.stack(xs).astype(np.float32), names


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices evenly spread over ``range(n)``, first and last included."""
    if k >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def run(args) -> int:
    from lrponnx.app.rule_options import rule_kwargs
    from lrponnx.rules.composites import RuleOptions
    from lrponnx.compiler.load import read_model
    from lrponnx.app.perturbation import evaluate, lrn_methods, plot_curves, save_json
    from lrponnx.app.preprocess import Preprocessing
    from lrponnx.app.runtime import is_explainer, providers_for

    if args.limit is not None and args.limit < 1:
        raise LrpOnnxError("--limit must be >= 1")
    if args.region < 1:
        raise LrpOnnxError("--region must be >= 1")
    model = read_model(args.model)
    pre = Preprocessing.from_model(model)
    x, names = load_tensors(args.inputs, pre, args.limit)
    kw = rule_kwargs(args)
    label = kw["composite"] + (f" eps={kw['epsilon']:g}" if kw["epsilon"] != RuleOptions.epsilon else "") + \
        "".join(f" {r}" for r in kw["rules"])
    if is_explainer(model):
        if args.compare_lrn:
            raise LrpOnnxError("--compare-lrn needs the plain model; this file is already an explainer")
        meta = {p.key: p.value for p in model.metadata_props}
        methods = {f"explainer ({meta.get('lrponnx.composite', '?')})": model}
    elif args.compare_lrn:
        methods = lrn_methods(kw, prefix=label + " ")
    else:
        methods = {f"{label} lrn={kw['lrn_rule']}": kw}
    result = evaluate(model, x, methods, region=args.region, steps=args.steps, seed=args.rng_seed, noise=args.noise,
                      preprocessing=pre, names=names, providers=providers_for(args.provider), threads=args.threads,
                      batch_size=args.batch_size, progress=not args.no_progress, output=args.explain_output)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    save_json(result, out / "aopc.json", extra={"model": str(args.model), "inputs": [str(i) for i in args.inputs],
                                                "per_image": {k: c.aopc_per_image.tolist()
                                                              for k, c in result.curves.items()},
                                                "input_names": names})
    plot_curves(result, out / "aopc_curves.png",
                title=f"{Path(str(args.model)).name}: region perturbation, {len(x)} inputs, "
                      f"{args.region}x{args.region} regions, L={result.config['steps']}")
    print(f"{len(x)} input(s), {result.config['regions']} regions of {args.region}x{args.region}, "
          f"L={result.config['steps']} steps, noise: {result.config['noise']}")
    print(result.table())
    for k, st in result.heatmap_stats.items():
        d, se = result.paired(k.split(" vs ")[0], k.split(" vs ")[1])
        print(f"{k}: AOPC difference {d:+.4g} +- {se:.2g} (paired sem); heatmaps differ by "
              f"{st['rel_l2_median']:.2%} (median relative L2), region-rank correlation {st['region_rank_corr']:.4f}, "
              f"same first-{st['steps']} order in {st['order_identical']:.1%} of the inputs")
    print(f"wrote {out / 'aopc.json'} and {out / 'aopc_curves.png'}")
    return 0


__all__ = ["register", "run", "load_tensors"]

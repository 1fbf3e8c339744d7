"""Evaluating heatmaps by region perturbation (Samek et al., 2017; Binder et al., 2016).

The input is split into non-overlapping ``p x p`` regions (edge regions are cut short when ``p``
does not divide the height or width). Regions are ordered by their summed relevance (summed over
the channels too), most relevant first ("MoRF"). For ``l = 1 .. L`` the next region is replaced by
noise and the target logit ``f(x^(l))`` is recorded; the target is the class predicted on the
unperturbed input and stays fixed. Per image::

    AOPC = 1/(L+1) * sum_{l=0..L} (f(x^(0)) - f(x^(l)))

averaged over the images; higher is better. The baseline is the same procedure with the regions in
a random order (the same noise image, only the order differs).

Noise: uniform, drawn once per image from a seeded generator (``seed``, image index), so that every
method and the random baseline replace a region by the *same* values and results do not depend on
how images are batched. The range (see :func:`noise_bounds`) is

* ``pixel`` (the default when the model carries preprocessing metadata): uniform over the pixel
  range 0..255 of every channel, mapped into model-input units by the model's own preprocessing
  (mean image / per-channel mean, std, scale). This is the paper's choice (noise in image space).
* ``data``: per channel, uniform between the smallest and largest value of the model-input tensors
  of the evaluated data set.

Everything runs through ONNX Runtime: relevance with :class:`lrponnx.Explainer`, the perturbed
inputs (all ``L+1`` versions of several images per call) with a forward-only session on the
original model whose output is the explained logits tensor (the input of a final Softmax;
:mod:`lrponnx.app.forward_model`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrponnx.app.forward_model import LogitModel, keep_outputs  # noqa: F401 (keep_outputs: public here too)
from lrponnx.errors import LrpOnnxError
from lrponnx.metadata import LOGITS_KEY

__all__ = ["region_map", "region_scores", "morf_order", "random_order", "noise_bounds", "draw_noise",
           "perturbed_inputs", "aopc", "Curve", "Evaluation", "LogitModel", "perturbation_curves",
           "evaluate", "compare_heatmaps", "plot_curves", "lrn_methods"]


# --------------------------------------------------------------------------------------------------
# regions and orders
# --------------------------------------------------------------------------------------------------
def region_map(height: int, width: int, region: int) -> tuple[np.ndarray, int]:
    """(``[H, W]`` int array of region ids, number of regions). Ids run row-major over the grid of
    ``ceil(H/p) x ceil(W/p)`` regions."""
    if int(region) < 1:
        raise LrpOnnxError(f"region size must be >= 1; got {region}")
    p = int(region)
    cols = math.ceil(width / p)
    rows_idx = np.arange(height) // p
    cols_idx = np.arange(width) // p
    ids = rows_idx[:, None] * cols + cols_idx[None, :]
    return ids.astype(np.int64), int(math.ceil(height / p) * cols)


def region_scores(relevance, region: int) -> np.ndarray:
    """Summed relevance per region: ``[C,H,W]`` -> ``[R]``, ``[N,C,H,W]`` -> ``[N,R]`` (also over channels)."""
    r = np.asarray(relevance, dtype=np.float64)
    single = r.ndim == 3
    if single:
        r = r[None]
    if r.ndim != 4:
        raise LrpOnnxError(f"relevance must be [C,H,W] or [N,C,H,W]; got shape {np.shape(relevance)}")
    ids, n = region_map(r.shape[2], r.shape[3], region)
    per_pixel = r.sum(axis=1).reshape(r.shape[0], -1)            # [N, H*W]
    onehot = np.zeros((ids.size, n))
    onehot[np.arange(ids.size), ids.reshape(-1)] = 1.0
    out = per_pixel @ onehot                                      # [N, R]
    return out[0] if single else out


def morf_order(relevance, region: int) -> np.ndarray:
    """Region ids, most relevant first (``[R]`` or ``[N,R]``). Ties keep the row-major order."""
    s = region_scores(relevance, region)
    return np.argsort(-s, axis=-1, kind="stable")


def random_order(n_regions: int, seed: int, index: int) -> np.ndarray:
    """A random permutation of the regions for image ``index``, reproducible from ``seed``."""
    return np.random.default_rng([int(seed), 1, int(index)]).permutation(int(n_regions))


# --------------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------------
def noise_bounds(mode: str, shape_chw, *, preprocessing=None, data=None) -> tuple[np.ndarray, np.ndarray, str]:
    """(low, high, description) of the uniform noise, each broadcastable to ``[C,H,W]``.

    ``mode``: ``pixel`` (needs ``preprocessing``), ``data`` (needs ``data``, ``[N,C,H,W]``),
    ``auto`` (``pixel`` when preprocessing is given, else ``data``), or ``mean`` (a sensitivity check, not
    noise: low = high = the data set's mean input tensor, so a region is replaced by the mean image).
    """
    c, h, w = (int(v) for v in shape_chw)
    if mode == "auto":
        mode = "pixel" if preprocessing is not None else "data"
    if mode == "pixel":
        if preprocessing is None:
            raise LrpOnnxError("noise 'pixel' needs the model's preprocessing (metadata); use noise 'data'")
        lo = preprocessing.apply(np.zeros((h, w, 3), np.uint8), resize=False).astype(np.float64)
        hi = preprocessing.apply(np.full((h, w, 3), 255, np.uint8), resize=False).astype(np.float64)
        if lo.shape != (c, h, w):
            raise LrpOnnxError(f"the preprocessing yields tensors of shape {lo.shape}; the model input is {(c, h, w)}")
        low, high = np.minimum(lo, hi), np.maximum(lo, hi)
        desc = "uniform over pixel values 0..255 per channel, mapped through the model's preprocessing"
    elif mode == "mean":
        if data is None or len(data) == 0:
            raise LrpOnnxError("replacement 'mean' needs the input tensors")
        low = high = np.asarray(data, np.float64).mean(axis=0)
        desc = "not noise: the data set's mean model-input tensor (per pixel and channel)"
    elif mode == "data":
        if data is None or len(data) == 0:
            raise LrpOnnxError("noise 'data' needs the input tensors")
        d = np.asarray(data)
        low = d.min(axis=(0, 2, 3)).astype(np.float64)[:, None, None]
        high = d.max(axis=(0, 2, 3)).astype(np.float64)[:, None, None]
        desc = "uniform per channel between the data set's min and max model-input values"
    else:
        raise LrpOnnxError(f"unknown noise mode {mode!r}; choose pixel, data, mean or auto")
    return low, high, desc


def draw_noise(shape_chw, low, high, seed: int, index: int) -> np.ndarray:
    """The noise image ``[C,H,W]`` (float32) of image ``index``: uniform in [low, high), seeded."""
    rng = np.random.default_rng([int(seed), 0, int(index)])
    u = rng.random(tuple(shape_chw))
    return (np.asarray(low) + u * (np.asarray(high) - np.asarray(low))).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# perturbation
# --------------------------------------------------------------------------------------------------
def perturbed_inputs(x, order, noise, region: int, steps: int) -> np.ndarray:
    """All versions ``x^(0..L)``: ``x [N,C,H,W]``, ``order [N,R]``, ``noise [N,C,H,W]`` -> ``[N, L+1, C,H,W]``.

    ``x^(l)`` has the first ``l`` regions of ``order`` replaced by the noise (``x^(0) = x``).
    """
    x = np.asarray(x, dtype=np.float32)
    order = np.asarray(order)
    n, c, h, w = x.shape
    ids, n_regions = region_map(h, w, region)
    if order.shape != (n, n_regions):
        raise LrpOnnxError(f"order has shape {order.shape}; expected {(n, n_regions)}")
    if not 0 <= steps <= n_regions:
        raise LrpOnnxError(f"steps must be between 0 and the number of regions ({n_regions}); got {steps}")
    rank = np.empty_like(order)
    rank[np.arange(n)[:, None], order] = np.arange(n_regions)[None, :]   # rank[k, region id]
    pixel_rank = rank[:, ids]                                            # [N, H, W]
    ls = np.arange(steps + 1)
    mask = pixel_rank[:, None, None, :, :] < ls[None, :, None, None, None]   # [N, L+1, 1, H, W]
    return np.where(mask, np.asarray(noise, np.float32)[:, None], x[:, None])


def aopc(f) -> np.ndarray:
    """Per-image AOPC from the target logits ``f [N, L+1]`` (column 0 = the unperturbed input)."""
    f = np.asarray(f, dtype=np.float64)
    return (f[:, :1] - f).mean(axis=1)


# the forward model (forward_model.py) runs the perturbed inputs
def perturbation_curves(forward, x, order, noise, target, region: int, steps: int,
                        images_per_call: int = 16) -> np.ndarray:
    """Target logits ``f(x^(l))`` for ``l = 0..L``: ``[N, L+1]``. ``forward`` maps ``[B,C,H,W]`` to logits."""
    x = np.asarray(x, np.float32)
    target = np.asarray(target, np.int64)
    out = np.empty((x.shape[0], steps + 1))
    for s in range(0, x.shape[0], images_per_call):
        e = min(s + images_per_call, x.shape[0])
        stack = perturbed_inputs(x[s:e], order[s:e], noise[s:e], region, steps)
        logits = forward(stack.reshape((-1,) + x.shape[1:]))
        logits = logits.reshape(e - s, steps + 1, -1)
        out[s:e] = logits[np.arange(e - s), :, target[s:e]]
    return out


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
@dataclass
class Curve:
    """One ordering's results: ``f [N, L+1]``, the target logit after ``l`` perturbation steps."""

    name: str
    f: np.ndarray

    @property
    def drop(self) -> np.ndarray:
        """``f(x^(0)) - f(x^(l))`` per image, ``[N, L+1]``."""
        return self.f[:, :1] - self.f

    @property
    def aopc_per_image(self) -> np.ndarray:
        return aopc(self.f)

    @property
    def aopc(self) -> float:
        return float(self.aopc_per_image.mean())

    @property
    def aopc_sem(self) -> float:
        a = self.aopc_per_image
        return float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")

    @property
    def mean_drop(self) -> np.ndarray:
        return self.drop.mean(axis=0)

    @property
    def running_aopc(self) -> np.ndarray:
        """AOPC after ``l`` steps, ``1/(l+1) sum_{k<=l} mean drop``, for ``l = 0..L``."""
        d = self.mean_drop
        return np.cumsum(d) / np.arange(1, len(d) + 1)


@dataclass
class Evaluation:
    """Results of :func:`evaluate`: one :class:`Curve` per method plus ``random``."""

    curves: dict
    target: np.ndarray
    f0: np.ndarray
    config: dict
    names: list = field(default_factory=list)        # input names, in order
    relevance: dict | None = None                     # method -> [N,C,H,W] when kept
    heatmap_stats: dict = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return [k for k in self.curves if k != "random"]

    def paired(self, a: str, b: str) -> tuple[float, float]:
        """Mean and standard error of the per-image AOPC difference ``a - b``."""
        d = self.curves[a].aopc_per_image - self.curves[b].aopc_per_image
        return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")

    def to_dict(self) -> dict:
        res = {}
        for k, c in self.curves.items():
            res[k] = {"aopc": c.aopc, "aopc_sem": c.aopc_sem, "mean_drop": c.mean_drop.tolist(),
                      "running_aopc": c.running_aopc.tolist(), "mean_logit": c.f.mean(axis=0).tolist()}
            if k != "random":
                res[k]["minus_random"] = dict(zip(("mean", "sem"), self.paired(k, "random")))
        return {"config": self.config, "n_images": int(len(self.f0)), "mean_target_logit": float(self.f0.mean()),
                "negative_target_logits": int((self.f0 < 0).sum()), "results": res,
                "heatmap_stats": self.heatmap_stats}

    def table(self) -> str:
        rows = [("method", "AOPC", "+-sem", "vs random")]
        for k, c in self.curves.items():
            vs = "" if k == "random" else "{:+.4g} +- {:.2g}".format(*self.paired(k, "random"))
            rows.append((k, f"{c.aopc:.4g}", f"{c.aopc_sem:.2g}", vs))
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(v.ljust(w[i]) for i, v in enumerate(r)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * x for x in w))
        return "\n".join(lines)


def compare_heatmaps(a, b, region: int, steps: int | None = None) -> dict:
    """How different two heatmaps are, and whether the difference changes the MoRF order.

    ``rel_l2``: median over images of ``||a - b|| / ||b||`` (pixels; ``region_rel_l2``: the same for the
    region sums); ``region_rank_corr``: mean Spearman
    correlation of the region scores; ``order_identical``: fraction of images whose first ``steps``
    MoRF regions come in exactly the same order; ``topk_overlap``: mean overlap of those sets.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = a.shape[0]
    num = np.sqrt(((a - b) ** 2).reshape(n, -1).sum(1))
    den = np.sqrt((b ** 2).reshape(n, -1).sum(1))
    sa, sb = region_scores(a, region), region_scores(b, region)
    steps = sa.shape[1] if steps is None else int(steps)
    oa, ob = np.argsort(-sa, axis=1, kind="stable"), np.argsort(-sb, axis=1, kind="stable")

    def ranks(s):
        return np.argsort(np.argsort(s, axis=1, kind="stable"), axis=1).astype(np.float64)

    ra, rb = ranks(sa), ranks(sb)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    rho = (ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    same = (oa[:, :steps] == ob[:, :steps]).all(axis=1)
    overlap = [len(set(oa[k, :steps]) & set(ob[k, :steps])) / max(steps, 1) for k in range(n)]
    reg = np.linalg.norm(sa - sb, axis=1) / np.maximum(np.linalg.norm(sb, axis=1), 1e-30)
    return {"rel_l2_median": float(np.median(num / np.maximum(den, 1e-30))),
            "region_rel_l2_median": float(np.median(reg)),
            "rel_l2_max": float((num / np.maximum(den, 1e-30)).max()),
            "region_rank_corr": float(np.nanmean(rho)), "order_identical": float(same.mean()),
            "topk_overlap": float(np.mean(overlap)), "steps": steps}


def lrn_methods(base: dict, rules=("identity", "taylor"), prefix: str = "") -> dict:
    """``{name: convert kwargs}`` for the same rules with each LRN rule."""
    return {f"{prefix}lrn={r}": {**base, "lrn_rule": r} for r in rules}


# --------------------------------------------------------------------------------------------------
# the whole evaluation
# --------------------------------------------------------------------------------------------------
def _one_output(methods: dict, output: str | None) -> str | None:
    """The output every method explains: ``output``, or the one the convert kwargs name."""
    named = {v["output"] for v in methods.values() if isinstance(v, dict) and v.get("output") is not None}
    if output is not None:
        named.add(output)
    if len(named) > 1:
        raise LrpOnnxError(f"the methods explain different outputs ({', '.join(sorted(named))}); "
                           "evaluate one output at a time")
    return next(iter(named), None)


def _explainer_batch(explainer) -> int | None:
    """The explainer's fixed batch size, or None when the batch dimension is free."""
    inputs = [i for i in explainer.session.get_inputs() if i.name in explainer.input_names]
    d0 = inputs[0].shape[0] if inputs and inputs[0].shape else None
    return d0 if isinstance(d0, int) else None


def evaluate(model, x, methods: dict, *, region: int = 4, steps: int | None = None, seed: int = 0,
             noise: str = "auto", preprocessing=None, names=None, providers=None, threads: int | None = None,
             batch_size: int = 1024, explain_batch: int = 64, images_per_call: int | None = None,
             keep_relevance: bool = False, progress: bool = True, compare: list | None = None,
             output: str | None = None) -> Evaluation:
    """Region perturbation (MoRF) of ``x [N,C,H,W]`` for every method, plus the random baseline.

    ``model``: a plain ONNX model (path or proto). ``methods``: ``{name: convert kwargs}``; a value may
    instead be a ready :class:`lrponnx.Explainer` or an explainer model. ``steps``: L (default: all
    regions). ``compare``: pairs of method names whose heatmaps :func:`compare_heatmaps` describes
    (default: every pair ``(.. lrn=identity, .. lrn=taylor)`` with the same prefix). ``output``: the
    model output whose class scores are explained and scored (``--explain-output``); convert kwargs
    that name an ``output`` must name the same one.
    """
    from tqdm import tqdm

    from lrponnx.compiler.load import read_model
    from lrponnx.app.runtime import Explainer

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[0] == 0:
        raise LrpOnnxError(f"inputs must be a non-empty [N,C,H,W] array; got shape {x.shape}")
    n, c, h, w = x.shape
    _, n_regions = region_map(h, w, region)
    steps = n_regions if steps is None else int(steps)
    if not 1 <= steps <= n_regions:
        raise LrpOnnxError(f"--steps must be between 1 and the number of regions ({n_regions}); got {steps}")
    output = _one_output(methods, output)
    if output is not None:
        methods = {k: ({**v, "output": output} if isinstance(v, dict) else v) for k, v in methods.items()}
    proto = read_model(model)
    forward = LogitModel(proto, providers=providers, threads=threads, batch_size=batch_size, output=output)
    per_call = images_per_call or max(1, batch_size // (steps + 1))
    low, high, noise_desc = noise_bounds(noise, (c, h, w), preprocessing=preprocessing, data=x)
    noises = np.stack([draw_noise((c, h, w), low, high, seed, k) for k in range(n)])

    f0 = forward(x)
    target = f0.argmax(axis=1)
    f0 = f0[np.arange(n), target]

    curves, kept = {}, {}
    total = n * (len(methods) + 1)
    with tqdm(total=total, desc="perturbing", unit="img", disable=not progress or total <= 64) as bar:
        def curves_for(order: np.ndarray) -> np.ndarray:
            """The target logit after 0..steps regions of each image were replaced, in ``order``."""
            f = np.empty((n, steps + 1))
            for s in range(0, n, per_call):
                e = min(n, s + per_call)
                f[s:e] = perturbation_curves(forward, x[s:e], order[s:e], noises[s:e], target[s:e], region, steps,
                                             images_per_call=per_call)
                bar.update(e - s)
            return f

        for name, spec in methods.items():
            if isinstance(spec, Explainer):
                explainer = spec
            elif isinstance(spec, dict):
                explainer = Explainer(proto, providers=providers, threads=threads, **spec)
            else:
                explainer = Explainer(spec, providers=providers, threads=threads)
            explained = explainer.metadata.get(LOGITS_KEY, forward.logits)
            if explained != forward.logits:  # relevance of one head, perturbation scored on another
                raise LrpOnnxError(f"method {name!r} explains {explained!r} but the scores are {forward.logits!r}; "
                                   "give the same output to both")
            eb = _explainer_batch(explainer) or explain_batch
            rel = np.empty_like(x)
            for s in range(0, n, eb):
                r = explainer.explain(x[s:s + eb], target=target[s:s + eb]).relevance
                rel[s:s + eb] = r
            curves[name] = Curve(name, curves_for(morf_order(rel, region)))
            kept[name] = rel
            del explainer
        order = np.stack([random_order(n_regions, seed, k) for k in range(n)])
        curves["random"] = Curve("random", curves_for(order))

    if compare is None:
        compare = [(k, k.replace("lrn=identity", "lrn=taylor")) for k in methods
                   if "lrn=identity" in k and k.replace("lrn=identity", "lrn=taylor") in methods]
    stats = {}
    for a, b in compare:
        stats[f"{b} vs {a}"] = compare_heatmaps(kept[b], kept[a], region, steps)
    config = {"region": int(region), "steps": steps, "regions": n_regions, "seed": int(seed), "noise": noise_desc,
              "noise_low_range": [float(np.min(low)), float(np.max(low))],
              "noise_high_range": [float(np.min(high)), float(np.max(high))],
              "logits": forward.logits, "target": "class predicted on the unperturbed input",
              "methods": {k: (v if isinstance(v, dict) else str(type(v).__name__)) for k, v in methods.items()}}
    return Evaluation(curves=curves, target=target, f0=f0, config=config,
                      names=list(names) if names is not None else [], heatmap_stats=stats,
                      relevance=kept if keep_relevance else None)


# --------------------------------------------------------------------------------------------------
# plotting
# --------------------------------------------------------------------------------------------------
def plot_curves(evaluation: Evaluation, path, title: str | None = None) -> Path:
    """Two panels: mean ``f(x^(0)) - f(x^(l))`` and the running AOPC, per method and for random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import re

    names = list(evaluation.curves)
    many = len(names) > 5
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + (0.22 * len(names) / 2 if many else 0)))
    groups = []                                   # one colour per rule set; the LRN rule sets the line style
    for name in names:
        g = re.sub(r"\s*\|?\s*lrn=\w+", "", name)
        if name != "random" and g not in groups:
            groups.append(g)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, c in evaluation.curves.items():
        if name == "random":
            style = dict(color="0.4", linestyle="--", linewidth=1.5)
        else:
            g = re.sub(r"\s*\|?\s*lrn=\w+", "", name)
            style = dict(color=palette[groups.index(g) % len(palette)], linewidth=1.5,
                         linestyle=":" if "lrn=identity" in name else "-")
        label = f"{name} (AOPC {c.aopc:.4g})"
        ls = np.arange(len(c.mean_drop))
        axes[0].plot(ls, c.mean_drop, label=label, **style)
        axes[1].plot(ls, c.running_aopc, label=label, **style)
    cfg = evaluation.config
    axes[0].set_xlabel(f"perturbation step l ({cfg['region']}x{cfg['region']} regions, MoRF)")
    axes[0].set_ylabel("mean f(x(0)) - f(x(l))  [target logit]")
    axes[1].set_xlabel("perturbation step l")
    axes[1].set_ylabel("AOPC after l steps")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"region perturbation, {len(evaluation.f0)} images")
    if many:
        handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=2, frameon=False)
        fig.tight_layout(rect=(0, 0.11 * len(names) / 6, 1, 1))
    else:
        axes[1].legend(fontsize=8, loc="lower right")
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_json(evaluation: Evaluation, path, extra: dict | None = None) -> Path:
    d = evaluation.to_dict()
    if extra:
        d.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=1))
    return path

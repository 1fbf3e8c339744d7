"""Explaining one chunk of inputs for ``lrponnx explain``: read, explain as one batch, render.

Shared by the single-process run (:mod:`lrponnx.app.explain`) and Ray's actors
(:mod:`lrponnx.app.scale`): the same chunks give the same bytes wherever they run.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from lrponnx.errors import LrpOnnxError


@dataclass
class ItemResult:
    """What explaining one input gave: either the heatmap (PNG bytes) and relevance, or an error."""

    position: int
    name: str
    source: str
    index: int | None
    error: str | None = None
    prediction: int | None = None
    target: int | None = None
    label: str | None = None
    prediction_label: str | None = None
    relevance_sum: float | None = None
    png: bytes | None = None
    relevance: np.ndarray | None = None
    display: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _ort_errors() -> tuple[type[BaseException], ...]:
    try:
        import onnxruntime.capi.onnxruntime_pybind11_state as C
    except ImportError:  # pragma: no cover
        return ()
    names = ("Fail", "InvalidArgument", "RuntimeException", "EPFail", "EngineError", "NotImplemented")
    return tuple(getattr(C, n) for n in names if isinstance(getattr(C, n, None), type))


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ChunkEngine:
    """Reads, explains and renders one chunk of inputs with one :class:`~lrponnx.app.runtime.Explainer`.

    A chunk is explained as one batch (inputs of another shape in their own batch): the batch
    decides the last bits of the relevance, so a resumed or distributed run that explains the same
    chunks gets the same bytes.
    """

    def __init__(self, explainer, preprocessing, *, target: int | None, cmap: str, render: bool = True):
        self.explainer = explainer
        self.render = render
        self.pre = preprocessing
        self.target = target
        self.cmap = cmap
        self.classes = explainer.classes
        shape = explainer.session.get_inputs()
        shape = next(i.shape for i in shape if i.name == explainer.input_names[0])
        self.sample_shape = [d if isinstance(d, int) else None for d in shape[1:]]

    def _check_shape(self, t: np.ndarray, what: str) -> None:
        want = self.sample_shape
        if t.ndim != len(want) or any(w is not None and w != n for w, n in zip(want, t.shape)):
            shown = "[" + ", ".join("?" if w is None else str(w) for w in want) + "]"
            from lrponnx.app.preprocess import InputError

            raise InputError(f"{what} has shape {list(t.shape)}; the model expects {shown}")

    def run(self, entries) -> list[ItemResult]:
        """``entries``: (position, :class:`~lrponnx.app.inputs.InputRef`) pairs. Reads each input."""
        from lrponnx.app.inputs import load_ref
        from lrponnx.app.preprocess import InputError

        loaded = []
        for pos, ref in entries:
            try:
                item = load_ref(ref, self.pre)
                loaded.append((pos, item, None))
            except InputError as e:
                loaded.append((pos, ref, str(e)))
        return self.run_items(loaded)

    def run_items(self, loaded) -> list[ItemResult]:
        """``loaded``: (position, InputItem or InputRef, error or None) triples, in chunk order."""
        out: dict[int, ItemResult] = {}
        groups: dict[tuple, list] = {}
        for pos, item, error in loaded:
            base = ItemResult(position=pos, name=item.name, source=str(item.source), index=item.index)
            if error is None:
                try:
                    self._check_shape(item.tensor, repr(str(item.source)) + (
                        f" sample {item.index}" if item.index is not None else ""))
                except LrpOnnxError as e:
                    error = str(e)
            if error is not None:
                base.error = error
                out[pos] = base
                continue
            groups.setdefault(item.tensor.shape, []).append((base, item))
        for group in groups.values():
            self._explain(group)
            for base, _ in group:
                out[base.position] = base
        return [out[pos] for pos, _, _ in loaded]

    def _explain(self, group) -> None:
        from lrponnx.app.render import render

        x = np.stack([item.tensor for _, item in group])
        try:
            with warnings.catch_warnings():  # non-finite relevance is reported per input below
                warnings.simplefilter("ignore", RuntimeWarning)
                res = self.explainer.explain(x, target=self.target)
        except (LrpOnnxError, *_ort_errors()) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            for base, _ in group:
                base.error = f"{base.source!r}: explaining failed: {msg}"
            return
        logits = res.outputs[getattr(self.explainer, "scores_output", self.explainer.model_outputs[0])].reshape(
            len(group), -1)
        for k, (base, item) in enumerate(group):
            rel = np.array(res.relevance[k])  # its own copy: the batch is let go
            if not (np.isfinite(rel).all() and np.isfinite(logits[k]).all()):
                base.error = (f"{base.source!r}" + (f" sample {base.index}" if base.index is not None else "")
                              + ": the explanation is not finite (NaN or Inf in the relevance or logits); "
                              "the input is probably far outside the model's range")
                continue
            t = int(res.target[k])
            base.prediction = int(np.argmax(logits[k]))
            base.target = t
            classes = self.classes
            name = lambda c: classes[c] if classes and 0 <= c < len(classes) else str(c)  # noqa: E731
            base.label, base.prediction_label = name(t), name(base.prediction)
            base.relevance_sum = float(rel.sum())
            base.png = png_bytes(render(rel, self.cmap)) if self.render else None
            base.relevance = rel
            base.display = item.display

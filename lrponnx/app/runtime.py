"""Running an explainer with ONNX Runtime: the one Python wrapper users need."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from lrponnx.version import __version__
from lrponnx.compiler.emit import convert
from lrponnx.errors import InvalidModelError, LrpOnnxError
from lrponnx.compiler.load import first_line, read_model
from lrponnx.metadata import (CLASS_COUNT_KEY, CLASSES_KEY, FORMAT, FORMAT_KEY, OUTPUT_KEY, RELEVANCE_OUTPUTS_KEY,
                              TARGET_INPUT, TARGET_INPUT_KEY, VERSION_KEY)


@dataclass
class Explanation:
    outputs: dict            # the model's own outputs, by name
    relevance: np.ndarray    # same shape as the input (dict by input name for several inputs)
    target: np.ndarray       # the explained class per sample
    nonfinite: np.ndarray | None = None  # per sample: True where the relevance has NaN/inf (warned)


class LegacyExplainerWarning(UserWarning):
    """An explainer written before ``lrponnx.format`` 2 was upgraded in memory."""


class NonFiniteRelevanceWarning(RuntimeWarning):
    """The relevance of some samples contains NaN or inf (see ``Explanation.nonfinite``)."""


# ONNX Runtime's type strings -> numpy dtypes, for feeding each input as the session declares it
_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16,
    "tensor(int16)": np.int16, "tensor(uint32)": np.uint32, "tensor(int32)": np.int32,
    "tensor(uint64)": np.uint64, "tensor(int64)": np.int64, "tensor(bool)": np.bool_,
}


def ort_packages() -> list[str]:
    """The ONNX Runtime distributions installed (they all provide the one ``onnxruntime`` module)."""
    from importlib import metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            metadata.distribution(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def default_providers() -> list[str]:
    packages = ort_packages()
    if len(packages) > 1:
        warnings.warn(f"{' and '.join(packages)} are installed side by side and overwrite each other's "
                      f"onnxruntime module; keep one (README: CUDA)", RuntimeWarning, stacklevel=3)
    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def providers_for(name: str | None) -> list[str] | None:
    """The providers of the CLI's ``--provider`` choice: None (not given: :func:`default_providers`),
    "cpu", or "cuda" (an error when this onnxruntime has no CUDA provider)."""
    if name is None:
        return None
    if name == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LrpOnnxError("--provider cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def is_explainer(model: onnx.ModelProto) -> bool:
    return any(p.key == VERSION_KEY for p in model.metadata_props)


def upgrade(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Bring an explainer written before format 2 to the current input contract.

    Old explainers declared ``target`` as an optional input backed by a ``[-1]`` initializer;
    ONNX Runtime then hides it from the session's inputs (onnxruntime-node drops the feed,
    onnxruntime-web rejects it). Dropping the initializer leaves the same graph with ``target``
    an ordinary (required) input. Returns ``(model, None)`` for a current explainer, else an
    upgraded copy (``model`` is left as it is) and a one-line note. Refuses explainers of a newer
    format than this lrponnx knows."""
    meta = {p.key: p for p in model.metadata_props}
    fmt = meta[FORMAT_KEY].value if FORMAT_KEY in meta else None
    if fmt == FORMAT:
        return model, None
    if fmt is not None:
        raise InvalidModelError(f"this explainer has lrponnx format {fmt}; this lrponnx ({__version__}) "
                                f"reads format {FORMAT}: upgrade lrponnx or convert the model again")
    name = meta[TARGET_INPUT_KEY].value if TARGET_INPUT_KEY in meta else TARGET_INPUT
    old, model = model, onnx.ModelProto()
    model.CopyFrom(old)
    inits = [t for t in model.graph.initializer if t.name == name]
    if not any(i.name == name for i in model.graph.input):
        raise InvalidModelError(f"this explainer has no {name!r} input (not written by lrponnx?)")
    for t in inits:
        model.graph.initializer.remove(t)
    model.metadata_props.append(onnx.StringStringEntryProto(key=FORMAT_KEY, value=FORMAT))
    version = meta[VERSION_KEY].value if VERSION_KEY in meta else "?"
    return model, (f"this explainer was written by lrponnx {version} before input format {FORMAT} (optional "
                   f"'{name}'); upgraded in memory to a required '{name}' input (same graph, -1 = predicted "
                   f"class); convert the model again to update the file")


class Explainer:
    """Wraps an explainer (or compiles one from a plain model with ``convert_options``).

    >>> ex = Explainer("model.onnx")            # doctest: +SKIP
    >>> out = ex.explain(x, target=None)        # doctest: +SKIP

    Explainers written before input format 2 are upgraded in memory with a
    :class:`LegacyExplainerWarning`; the note is also kept in ``self.notes``.
    """

    def __init__(self, model, providers: list[str] | None = None, *, threads: int | None = None,
                 optimization: str = "all", **convert_options):
        proto = read_model(model)
        self.notes: list[str] = []
        if not is_explainer(proto):
            proto = convert(proto, **convert_options)
        elif convert_options:
            raise LrpOnnxError("this file is already an explainer; conversion options do not apply")
        else:
            proto, note = upgrade(proto)
            if note:
                self.notes.append(note)
                warnings.warn(note, LegacyExplainerWarning, stacklevel=2)
        self.model = proto
        meta = {p.key: p.value for p in proto.metadata_props}
        self.metadata = meta
        self.target_input = meta.get(TARGET_INPUT_KEY, TARGET_INPUT)
        self.relevance_outputs: dict[str, str] = json.loads(meta[RELEVANCE_OUTPUTS_KEY])
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(proto.SerializeToString(), so,
                                            providers=providers or default_providers())
        self._inputs = {i.name: i for i in self.session.get_inputs() if i.name != self.target_input}
        self.input_names = list(self._inputs)
        outs = [o.name for o in self.session.get_outputs()]
        rel = set(self.relevance_outputs.values())
        self.model_outputs = [o for o in outs if o not in rel and not o.startswith("lrp_")]
        # the output whose class is explained (--explain-output); older explainers: the first
        chosen = meta.get(OUTPUT_KEY)
        self.scores_output = chosen if chosen in self.model_outputs else self.model_outputs[0]

    def _class_count(self) -> int | None:
        if CLASS_COUNT_KEY in self.metadata:
            return int(self.metadata[CLASS_COUNT_KEY])
        shape = self.session.get_outputs()[0].shape
        return shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None

    @property
    def classes(self) -> list[str] | None:
        names = self.metadata.get(CLASSES_KEY)
        return json.loads(names) if names else None

    def _feed(self, name: str, value) -> np.ndarray:
        """``value`` as the array the session declares for input ``name``: its dtype (values
        checked when they would change) and its rank and static dimensions."""
        info = self._inputs[name]
        dtype = np.dtype(_ORT_DTYPES.get(info.type, np.float32))
        try:
            a = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise LrpOnnxError(f"input {name!r}: not an array ({first_line(e)})") from None
        if a.dtype.kind not in "biuf":
            raise LrpOnnxError(f"input {name!r}: expected numbers ({dtype.name}), got an array of {a.dtype}")
        expected = "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in info.shape) + "]"
        if a.ndim != len(info.shape) or any(isinstance(d, int) and d != n for d, n in zip(info.shape, a.shape)):
            raise LrpOnnxError(f"input {name!r} expects shape {expected} ({dtype.name}), got {list(a.shape)}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise LrpOnnxError(f"input {name!r} has {bad} non-finite value(s) (NaN or inf): "
                               f"relevance is undefined there")
        if dtype.kind == "f" and a.dtype.kind in "iuf" and a.size and np.abs(a).max() > np.finfo(dtype).max:
            raise LrpOnnxError(f"input {name!r}: values beyond {dtype.name}'s range")
        if dtype.kind in "iub" and a.dtype != dtype:
            info_t = np.iinfo(dtype) if dtype.kind != "b" else None
            lo, hi = (info_t.min, info_t.max) if info_t is not None else (0, 1)
            if a.size and (np.any(a != np.round(a)) or a.min() < lo or a.max() > hi):
                raise LrpOnnxError(f"input {name!r} is {dtype.name}: values must be whole numbers in "
                                   f"[{lo}, {hi}], got {a.dtype} values in [{a.min()}, {a.max()}]")
        return np.ascontiguousarray(a, dtype=dtype)

    def _target(self, target, batch: int) -> np.ndarray:
        if target is None:
            return np.full([batch], -1, np.int64)
        classes = self._class_count()
        allowed = f"a class in [0, {classes})" if classes is not None else "a class index"
        try:
            raw = np.asarray(target)
        except (TypeError, ValueError) as e:
            raise LrpOnnxError(f"target: not a list of class indices ({first_line(e)})") from None
        if raw.dtype.kind == "O":  # Python ints beyond int64 (numpy keeps them as objects)
            raise LrpOnnxError(f"target must be -1 (predicted class) or {allowed}; got {target!r}")
        if raw.dtype.kind == "f" and (not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw))):
            raise LrpOnnxError(f"target must be whole numbers, got {target!r}")
        if raw.dtype.kind not in "iuf" or raw.ndim > 1:
            raise LrpOnnxError(f"target must be one integer or one per sample, got {target!r}")
        if raw.dtype.kind == "f" and raw.size and np.abs(raw).max() >= 2.0 ** 62:
            raise LrpOnnxError(f"target must be -1 (predicted class) or {allowed}; got {target!r}")
        if raw.dtype.kind == "u" and raw.size and raw.max() > np.iinfo(np.int64).max:
            raise LrpOnnxError(f"target must be -1 (predicted class) or {allowed}; got {raw.max()}")
        t = raw.astype(np.int64).reshape(-1)
        if t.size == 1:
            t = np.repeat(t, batch)
        if t.size != batch:
            raise LrpOnnxError(f"target has {t.size} entries for a batch of {batch}")
        bad = t[(t < -1) | ((t >= classes) if classes is not None else False)]
        if bad.size:
            raise LrpOnnxError(f"target {int(bad[0])} is out of range: give -1 (predicted class) or "
                               f"{allowed}" + (f" (the model has {classes} classes)" if classes else ""))
        return t

    def explain(self, x, target=None) -> Explanation:
        """Explain a batch. ``x``: an array (one-input models) or ``{input name: array}``, each
        converted to the dtype the explainer declares; ``target``: None (every sample's
        predicted class), an int for every sample, or one int per sample (-1 = predicted class).

        Wrong shapes, non-finite inputs and targets out of range raise :class:`LrpOnnxError`;
        relevance with NaN/inf warns (:class:`NonFiniteRelevanceWarning`) and is flagged in
        ``Explanation.nonfinite``."""
        feeds = dict(x) if isinstance(x, dict) else {self.input_names[0]: x}
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise LrpOnnxError(f"missing input(s): {', '.join(missing)}")
        unknown = [n for n in feeds if n not in self._inputs]
        if unknown:
            raise LrpOnnxError(f"unknown input(s) {', '.join(unknown)}; the explainer takes "
                               f"{', '.join(self.input_names)}")
        feeds = {k: self._feed(k, v) for k, v in feeds.items()}
        batches = {k: v.shape[0] for k, v in feeds.items() if v.ndim}
        batch = batches.get(self.input_names[0], 1)
        t = self._target(target, batch)
        feeds[self.target_input] = t
        names = self.model_outputs + list(self.relevance_outputs.values())
        values = self.session.run(names, feeds)
        outputs = dict(zip(self.model_outputs, values[:len(self.model_outputs)]))
        rel = dict(zip(self.relevance_outputs.keys(), values[len(self.model_outputs):]))
        first = outputs[self.scores_output]
        explained = np.where(t < 0, np.argmax(first.reshape(batch, -1), axis=1), t)
        nonfinite = np.zeros(batch, bool)
        for r in rel.values():
            nonfinite |= ~np.isfinite(r.reshape(batch, -1)).all(axis=1)
        if nonfinite.any():
            warnings.warn(f"the relevance of {int(nonfinite.sum())} of {batch} sample(s) contains NaN or "
                          f"inf (samples {np.flatnonzero(nonfinite)[:8].tolist()}): the explanation is not "
                          f"usable there", NonFiniteRelevanceWarning, stacklevel=2)
        relevance = rel[self.input_names[0]] if len(rel) == 1 else rel
        return Explanation(outputs=outputs, relevance=relevance, target=explained, nonfinite=nonfinite)

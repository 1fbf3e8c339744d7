"""Running an explainer with ONNX Runtime: the one Python wrapper users need."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .compiler import TARGET_INPUT, convert
from .errors import LrpOnnxError
from .load import read_model


@dataclass
class Explanation:
    outputs: dict            # the model's own outputs, by name
    relevance: np.ndarray    # same shape as the input (dict by input name for several inputs)
    target: np.ndarray       # the explained class per sample


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def is_explainer(model: onnx.ModelProto) -> bool:
    return any(p.key == "lrponnx.version" for p in model.metadata_props)


class Explainer:
    """Wraps an explainer (or compiles one from a plain model with ``convert_options``).

    >>> ex = Explainer("model.onnx")            # doctest: +SKIP
    >>> out = ex.explain(x, target=None)        # doctest: +SKIP
    """

    def __init__(self, model, providers: list[str] | None = None, *, threads: int | None = None,
                 optimization: str = "all", **convert_options):
        proto = read_model(model)
        if not is_explainer(proto):
            proto = convert(proto, **convert_options)
        elif convert_options:
            raise LrpOnnxError("this file is already an explainer; conversion options do not apply")
        self.model = proto
        meta = {p.key: p.value for p in proto.metadata_props}
        self.metadata = meta
        self.relevance_outputs: dict[str, str] = json.loads(meta["lrponnx.relevance_outputs"])
        so = ort.SessionOptions()
        so.log_severity_level = 3  # the optional `target` input is an initializer too: ORT warns about it
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
        self.input_names = [i.name for i in self.session.get_inputs() if i.name != TARGET_INPUT]
        outs = [o.name for o in self.session.get_outputs()]
        rel = set(self.relevance_outputs.values())
        self.model_outputs = [o for o in outs if o not in rel and not o.startswith("lrp_")]

    def _class_count(self) -> int | None:
        shape = self.session.get_outputs()[0].shape
        return shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None

    @property
    def classes(self) -> list[str] | None:
        names = self.metadata.get("lrponnx.classes")
        return json.loads(names) if names else None

    def explain(self, x, target=None) -> Explanation:
        """Explain a batch. ``x``: an array (one-input models) or ``{input name: array}``;
        ``target``: None (argmax), an int for every sample, or one int per sample (-1 = argmax)."""
        feeds = dict(x) if isinstance(x, dict) else {self.input_names[0]: x}
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise LrpOnnxError(f"missing input(s): {', '.join(missing)}")
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        batch = next(iter(feeds.values())).shape[0]
        if target is not None:
            t = np.asarray(target, dtype=np.int64).reshape(-1)
            if t.size == 1:
                t = np.repeat(t, batch)
            if t.size != batch:
                raise LrpOnnxError(f"target has {t.size} entries for a batch of {batch}")
            classes = self._class_count()
            if classes is not None and np.any(t >= classes):
                raise LrpOnnxError(f"target {int(t.max())} is out of range: the model has {classes} classes")
            feeds[TARGET_INPUT] = t
        names = self.model_outputs + list(self.relevance_outputs.values())
        values = self.session.run(names, feeds)
        outputs = dict(zip(self.model_outputs, values[:len(self.model_outputs)]))
        rel = dict(zip(self.relevance_outputs.keys(), values[len(self.model_outputs):]))
        first = outputs[self.model_outputs[0]]
        explained = np.argmax(first.reshape(batch, -1), axis=1)
        if target is not None:
            explained = np.where(feeds[TARGET_INPUT] < 0, explained, feeds[TARGET_INPUT])
        relevance = rel[self.input_names[0]] if len(rel) == 1 else rel
        return Explanation(outputs=outputs, relevance=relevance, target=explained)

"""Forward-only ONNX Runtime sessions: a copy of a model (or of an explainer's forward part) cut
down to the outputs asked for (:func:`keep_outputs`), and :class:`LogitModel`, which runs the class
scores a plain model or an explainer explains (used by ``lrponnx evaluate`` and the benchmarks).
"""
from __future__ import annotations

import copy

import numpy as np
import onnx

from lrponnx.errors import LrpOnnxError
from lrponnx.metadata import LOGITS_KEY, OUTPUT_KEY

__all__ = ["keep_outputs", "LogitModel"]


def _logits_name(model: onnx.ModelProto, output: str | None = None) -> str:
    """The class-score tensor that is scored: the one the compiler explains for ``output``
    (``--explain-output``; None: the compiler's default choice)."""
    meta = {p.key: p.value for p in model.metadata_props}
    if LOGITS_KEY in meta:                         # an explainer knows what it explains
        logits = meta[LOGITS_KEY]
        if output is not None and output not in (logits, meta.get(OUTPUT_KEY)):
            raise LrpOnnxError(f"this explainer explains {logits!r}, not {output!r}; convert the plain model "
                               f"with --explain-output {output}")
        return logits
    from lrponnx.compiler.emit import find_logits  # the same choice as the compiler's
    from lrponnx.compiler.view import ModelView

    return find_logits(ModelView(model), output)


def keep_outputs(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy whose only outputs are ``outputs``, with the nodes, inputs and initializers they do
    not need removed (a graph with subgraphs keeps every node: their outer-scope reads are not traced)."""
    m = copy.deepcopy(model)
    g = m.graph
    has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for n in g.node for a in n.attribute)
    if not has_subgraphs:
        needed, keep = set(outputs), []
        for node in reversed(list(g.node)):
            if any(o in needed for o in node.output):
                keep.append(node)
                needed.update(i for i in node.input if i)
        keep.reverse()
        del g.node[:]
        g.node.extend(keep)
        kept_inputs = [i for i in g.input if i.name in needed]
        del g.input[:]
        g.input.extend(kept_inputs)
        kept_inits = [i for i in g.initializer if i.name in needed]
        del g.initializer[:]
        g.initializer.extend(kept_inits)
    known = {v.name: v for v in list(g.value_info) + list(g.output)}
    outs = [copy.deepcopy(known[o]) if o in known else onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None)
            for o in outputs]
    del g.output[:]
    g.output.extend(outs)
    return m


def _forward_only(model: onnx.ModelProto, output: str | None = None) -> tuple[onnx.ModelProto, str]:
    """A copy whose only output is the logits tensor, with the nodes it does not need removed."""
    logits = _logits_name(model, output)
    return keep_outputs(model, [logits]), logits


def _free_batch(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy with a symbolic batch dimension, or None when the batch is not a fixed 1."""
    inits = {i.name for i in model.graph.initializer}
    data_inputs = [i for i in model.graph.input if i.name not in inits]
    if len(data_inputs) != 1:
        return None
    dims = data_inputs[0].type.tensor_type.shape.dim
    if not dims or not dims[0].HasField("dim_value"):
        return None
    m = copy.deepcopy(model)
    inp = next(i for i in m.graph.input if i.name == data_inputs[0].name)
    inp.type.tensor_type.shape.dim[0].dim_param = "N"
    del m.graph.value_info[:]
    for o in m.graph.output:
        if o.type.tensor_type.HasField("shape") and o.type.tensor_type.shape.dim:
            o.type.tensor_type.shape.dim[0].dim_param = "N"
    return m


class LogitModel:
    """Forward-only ONNX Runtime session returning the explained logits ``[N, K]`` of a plain model or of
    an explainer (its forward part). Runs in chunks of ``batch_size``; a model with a hard-wired batch of
    1 is given a free batch dimension when that works, else it is run one sample at a time. ``output``:
    the model output whose class scores are explained (``--explain-output``), as in ``convert``."""

    def __init__(self, model, *, providers=None, threads: int | None = None, batch_size: int = 1024,
                 output: str | None = None):
        import onnxruntime as ort

        from lrponnx.compiler.load import read_model

        proto, self.logits = _forward_only(read_model(model), output)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        providers = providers or ["CPUExecutionProvider"]
        self.batch_size = max(1, int(batch_size))
        self._fixed_one = False
        free = _free_batch(proto)
        sess = None
        if free is not None:
            try:
                sess = ort.InferenceSession(free.SerializeToString(), so, providers=providers)
                name = sess.get_inputs()[0].name
                shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
                probe = np.zeros([2] + shape[1:], np.float32)
                one = sess.run([self.logits], {name: probe[:1]})[0]
                two = sess.run([self.logits], {name: probe})[0]
                if two.shape[0] != 2 or not np.allclose(two[:1], one, rtol=1e-4, atol=1e-5):
                    raise ValueError("batch of 2 differs")
            except Exception:  # noqa: BLE001 - a reshape with the batch baked in, etc.
                sess = None
                self._fixed_one = True
        if sess is None:
            sess = ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
        self.session = sess
        self.input_name = sess.get_inputs()[0].name
        if free is None:
            d0 = sess.get_inputs()[0].shape[0]
            self._fixed_one = isinstance(d0, int)

    def __call__(self, x) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = 1 if self._fixed_one else self.batch_size
        outs = [self.session.run([self.logits], {self.input_name: x[s:s + step]})[0]
                for s in range(0, x.shape[0], step)]
        out = np.concatenate(outs, axis=0)
        return out.reshape(out.shape[0], -1)

"""Evaluating small constant expressions at convert time (ONNX Runtime or onnx's reference evaluator).

Some rules need numbers that do not depend on the input (flat/wsquare denominators, zbox
bound terms, pooling divisors). They are computed once here, with the same kernels the
explainer will use, and stored as initializers.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper


def run_op(op_type: str, inputs: list[np.ndarray], opset: int = 17, **attrs) -> np.ndarray:
    """Run one float32 ONNX op on constant inputs; returns its first output."""
    names = [f"in{i}" for i in range(len(inputs))]
    node = helper.make_node(op_type, names, ["out"], **attrs)
    graph = helper.make_graph(
        [node], "const", [],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), n) for n, v in zip(names, inputs)],
    )
    opsets = [helper.make_opsetid("", opset)]
    # the lowest IR version that holds these opsets, so older onnxruntime releases load it too
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]


def evaluate_node(node: onnx.NodeProto, inputs: dict, opset_imports, ir_version: int | None = None) -> list[np.ndarray]:
    """Run one node on constant inputs (name -> array or TensorProto) with onnx's reference
    evaluator, which knows every standard op: used to fold constant subgraphs."""
    from onnx.reference import ReferenceEvaluator

    inits = [v if isinstance(v, onnx.TensorProto) else numpy_helper.from_array(np.asarray(v), k)
             for k, v in inputs.items()]
    outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]
    graph = helper.make_graph([node], "const", [], outputs, inits)
    kwargs = {} if ir_version is None else {"ir_version": ir_version}
    model = helper.make_model(graph, opset_imports=list(opset_imports), **kwargs)
    return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, {})]

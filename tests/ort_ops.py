"""Run one ONNX op in ONNX Runtime (CPU, no graph optimisation): the tests' independent check of
the arithmetic the compiler does in numpy (pool sizes, divisors, constant forwards)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper


def run_op(op_type: str, x: np.ndarray, inputs=(), opset: int = 19, **attrs) -> np.ndarray:
    """``op_type`` applied to input ``x`` (fed at run time) and constant ``inputs``; its first output."""
    names = ["x"] + [f"w{i}" for i in range(len(inputs))]
    node = helper.make_node(op_type, names, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(np.asarray(v, np.float32), n)
                               for n, v in zip(names[1:], inputs)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.asarray(x, np.float32)})[0]

"""Folding constant subgraphs at convert time with onnx's reference evaluator (no ONNX Runtime).

The numbers rules need that do not depend on the input (flat/wsquare denominators, zbox bound
terms, pooling divisors) are computed in numpy: ``compiler/linear_layers.py`` (constant forwards)
and ``compiler/geometry.py`` (pooling sizes and divisors).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


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

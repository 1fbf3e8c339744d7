"""The compiler: a model in, the model plus its relevance graph out.

- ``load.py``: read, check, upgrade and shape-infer the model (``shapes.py``: static-shape folding);
- ``lrn_match.py``, ``lrn_ops.py``: LRN in its ONNX forms and decomposed-LRN matching;
- ``units.py``: group nodes into units (a linear layer with its folded bias/BatchNorm, an LRN, one op);
- ``emit.py``: assign rules (:mod:`lrponnx.rules`), walk the units back from the class scores and
  append each unit's relevance subgraph (:mod:`lrponnx.ops`), check the result;
- ``builder.py``, ``view.py``: emitting nodes, reading the graph; ``constants.py``: constant folding.

The entry points are :func:`lrponnx.convert` and :func:`lrponnx.plan` (defined in ``emit.py``).
This package's ``__init__`` imports nothing, so that its modules can be imported one by one.
"""


def __getattr__(name):
    if name in ("convert", "plan"):
        from lrponnx.compiler import emit

        return getattr(emit, name)
    raise AttributeError(name)

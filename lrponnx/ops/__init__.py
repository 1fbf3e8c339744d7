"""Op -> relevance subgraph: one handler per unit kind, registered in one table.

A handler gets the emission context, the unit and the name of the relevance tensor at the
unit's output, and returns ``{input tensor: relevance}`` for the inputs that receive relevance;
a relevance is a tensor name or a :class:`Product` (``x * factor``, multiplied by the compiler).
A new op is one new function with ``@handler("OpType", rules=(...))`` (a kind registered twice
raises unless ``replace=True``); the rules themselves are classes in lrponnx/rules
(docs/extending.md).

Where things live:
- linear layers: ``linear.py`` (LinearOps, Vjp); their rules in lrponnx/rules/linear.py
- the LRN rule of Binder et al. (taylor, identity):                      ``lrn.py``
- pooling (norm, winner-take-all, proportional):                          ``pooling.py``
- Add/Sum (norm), Concat, Pad, reshapes and pass-through ops:             ``structural.py``
"""
from __future__ import annotations

from lrponnx.ops.context import (SIZED_CONST_LIMIT, TARGET_RUNTIMES, Ctx, Product, Unsupported, combine,  # noqa: F401
                                 nonnegative, runtime_ones, sized_const_ok)
from lrponnx.ops.registry import HANDLERS, Handler, handler  # noqa: F401

# The handler modules register themselves when imported; the order matters where one refines
# another's registration (activations refines Mul; attention wraps the MatMul and Gather handlers).
from lrponnx.ops import linear, lrn, pooling, structural  # noqa: F401,E402
from lrponnx.ops import activations, reductions  # noqa: F401,E402
from lrponnx.ops import layernorm, matmul, routing  # noqa: F401,E402
from lrponnx.ops import attention  # noqa: F401,E402  (keep last)


def load_handlers() -> dict[str, Handler]:
    """The table (every handler module is imported with this package)."""
    return HANDLERS

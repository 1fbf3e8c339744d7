"""The unit: the piece of a model that receives one LRP rule (see :mod:`lrponnx.compiler.units`,
which groups a graph's nodes into units, and the chain matchers :mod:`lrponnx.compiler.lrn_match`
and :mod:`lrponnx.compiler.layernorm_match`, which it calls). A module of its own so that the
matchers and the grouping import it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx


@dataclass
class Unit:
    kind: str                 # key into the relevance handler table
    name: str                 # node name used in rules, errors and metadata
    op_type: str              # what users see ("Conv", "LRN", ...)
    nodes: list[onnx.NodeProto]
    inputs: list[str]         # data inputs (tensors that depend on a model input)
    output: str
    info: Any = None          # a LinearLayer, LrnSpec or the node's attributes
    rule: Any = None          # set by composites.assign_rules
    first: bool = False       # a first linear layer (reached from an input without another linear layer)
    index: int = 0            # position of its first node in the graph
    positions: list[int] = field(default_factory=list)  # positions of all its nodes, for "#N" overrides
    notes: list[str] = field(default_factory=list)

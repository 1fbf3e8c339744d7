"""LRP rules and composites (which rule each layer gets).

- ``base.py``: what a rule is (:class:`Rule`), the registry ``RULES``, ``make_rule``/``parse_rule``
- ``linear.py``: rules for linear layers (epsilon, zplus, alpha-beta, gamma, zbox, wsquare, flat)
- ``basic.py``: pass, norm, winner-take-all, proportional, signal-takes-all (emitted by their ops)
- ``lrn.py``: the LRN rules (taylor, identity; emitted in ops/lrn.py)
- ``attention.py``: AttnLRP's attnlrp-softmax, uniform, attnlrp (emitted in ops/attention.py)
- ``composites.py``: composites, ordered (unit predicate -> rule) lists, and rule assignment
"""
from lrponnx.rules import base, linear, basic, lrn, attention  # noqa: F401  (registers every rule)
from lrponnx.rules.base import RULES, Rule, make_rule, parse_rule, register, unregister  # noqa: F401

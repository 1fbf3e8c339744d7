"""Errors a user can cause. The CLI prints them as one clear message (exit code 2), never a traceback."""
from __future__ import annotations

from dataclasses import dataclass


class LrpOnnxError(Exception):
    """Base class for every error that is the user's input, not our bug."""


class InvalidModelError(LrpOnnxError):
    """The file is missing, truncated, not ONNX, or fails onnx's checker."""


class RuleError(LrpOnnxError):
    """A rule, composite or override was given wrong parameters."""


@dataclass(frozen=True)
class Offender:
    node: str
    op_type: str
    why: str

    def __str__(self) -> str:
        return f"  - node {self.node!r} ({self.op_type}): {self.why}"


class UnsupportedModelError(LrpOnnxError):
    """Nodes on the relevance path that cannot be explained. Lists every one at once."""

    def __init__(self, offenders: list[Offender]):
        self.offenders = list(offenders)
        lines = [f"cannot explain this model: {len(self.offenders)} node(s) are not supported"]
        lines += [str(o) for o in self.offenders]
        super().__init__("\n".join(lines))

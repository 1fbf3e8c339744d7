"""Errors a user can cause. The CLI prints them as one clear message (exit code 2), never a traceback."""
from __future__ import annotations

from dataclasses import dataclass


class LrpOnnxError(Exception):
    """Base class for every error that is the user's input, not our bug."""


class InvalidModelError(LrpOnnxError):
    """The file is missing, truncated, not ONNX, or fails onnx's checker."""


class RuleError(LrpOnnxError):
    """A rule, composite or override was given wrong parameters."""


class OutputError(LrpOnnxError):
    """An output path that cannot be written safely (it is an input, a device, a folder...)."""


#: Longest user-supplied name (node, layer, tensor, file) echoed into a message.
NAME_LIMIT = 80


def shorten(name, limit: int = NAME_LIMIT) -> str:
    """A user-supplied name as it may appear in a message: at most ``limit`` characters, the
    middle replaced by an ellipsis (a 1 MB layer name is not echoed whole). Not quoted."""
    text = name if isinstance(name, str) else str(name)
    if len(text) <= limit:
        return text
    keep = limit - 1
    return text[: keep - keep // 3] + "\u2026" + text[len(text) - keep // 3:]


@dataclass(frozen=True)
class Offender:
    node: str
    op_type: str
    why: str

    def __str__(self) -> str:
        return f"  - node {shorten(self.node)!r} ({shorten(self.op_type)}): {self.why}"


class UnsupportedModelError(LrpOnnxError):
    """Nodes on the relevance path that cannot be explained. Lists every one at once."""

    def __init__(self, offenders: list[Offender]):
        self.offenders = list(offenders)
        lines = [f"cannot explain this model: {len(self.offenders)} node(s) are not supported"]
        lines += [str(o) for o in self.offenders]
        super().__init__("\n".join(lines))

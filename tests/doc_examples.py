"""The code blocks of docs/extending.md, for the tests that run them exactly as written."""
from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def example(marker: str) -> str:
    """The one ```python block of the page that starts with ``# example: <marker>``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    (code,) = [b for b in blocks if b.startswith(f"# example: {marker}\n")]
    return code

"""Benchmarks that own a table inside a hand-written page put it between two HTML comment markers."""
from __future__ import annotations

import re
from pathlib import Path


def replace_block(page: Path, start: str, end: str, text: str) -> None:
    """Replace what lies between ``start`` and ``end`` in ``page`` by ``text`` (the markers stay)."""
    doc = page.read_text()
    if start not in doc or end not in doc:
        raise SystemExit(f"{page} has no {start} ... {end} block")
    # a function as replacement: the table's backslashes and group-like text are not regex syntax
    doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}\n{end}", doc, flags=re.S)
    page.write_text(doc)

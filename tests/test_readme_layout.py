"""The README's "Where things are" table matches the tree: every path it names exists, and every
package of lrponnx (and the converter's layer package) is named (issue 12)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    paths = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        where = line.rstrip(" |").rsplit(" | ", 1)[-1]
        base = None
        for token in re.findall(r"`([^`]+)`", where):
            if not re.fullmatch(r"[\w./-]+", token) or not ("/" in token or token.endswith((".py", ".md"))):
                continue  # a command or an option, not a path
            if "/" in token:
                base = token if token.endswith("/") else token.rsplit("/", 1)[0] + "/"
                paths.append(token)
            elif base is not None:  # a bare file name: in the folder of the last path on the row
                paths.append(base + token)
    return paths


def test_every_path_in_the_table_exists():
    paths = _table_paths()
    assert len(paths) > 30, paths  # the parser found the table
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README 'Where things are' names paths that do not exist: {missing}"


def test_every_package_is_in_the_table():
    named = set(_table_paths())
    packages = sorted({str(p.parent.relative_to(ROOT)) + "/" for p in (ROOT / "lrponnx").rglob("__init__.py")}
                      | {"converters/caffe/layers/"})
    unnamed = [pkg for pkg in packages if pkg != "lrponnx/" and not any(n.startswith(pkg) for n in named)]
    assert not unnamed, f"packages missing from README 'Where things are': {unnamed}"

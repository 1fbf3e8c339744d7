"""The package's module graph has no import cycles, counting imports inside functions too (an
import moved into a function to dodge a cycle hides the cycle; it does not remove it)."""
from __future__ import annotations

import ast
from pathlib import Path

import lrponnx

ROOT = Path(lrponnx.__file__).resolve().parent
#: installed under lrponnx.* from folders beside the package (pyproject's package-dir)
MAPPED = {"lrponnx.converters": ROOT.parent / "converters", "lrponnx.model_zoo": ROOT.parent / "model_zoo"}

#: Cycles still in the tree, each with who removes it (issue 12). Empty means none is allowed.
ALLOWED: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in [("lrponnx", ROOT), *MAPPED.items()]:
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package,) + parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the lrponnx modules it imports anywhere in its code (``from P import name`` counts
    as importing the submodule P.name where that is a module, else P itself)."""
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.split(".")
                    base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[module].update(t for t in targets if t in modules and t != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read_from_the_sources():
    graph = import_graph()
    assert "lrponnx.compiler.units" in graph["lrponnx.compiler.emit"]
    assert "lrponnx.compiler.lrn_match" in graph["lrponnx.compiler.units"]
    # the check finds a cycle made by an import inside a function
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycles():
    found = [c for c in cycles(import_graph()) if frozenset(c) not in ALLOWED]
    gone = ALLOWED - {frozenset(c) for c in cycles(import_graph())}
    assert not gone, f"allowed cycles no longer in the tree, drop them from ALLOWED: {gone}"
    assert not found, "import cycles (every import counts, also inside functions):\n" + "\n".join(
        " <-> ".join(c) for c in found)

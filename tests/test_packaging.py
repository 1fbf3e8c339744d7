"""The wheel holds exactly the package: one ``lrponnx`` namespace with every subpackage of the tree,
``converters/`` and ``model_zoo/`` installed as ``lrponnx.converters`` / ``lrponnx.model_zoo`` (never
top-level), the web page's static files, the bundled zoo models, checksums and cards.

The wheel is built (about 3 s) from a copy of the sources, so a stale ``build/`` folder of the
checkout cannot hide a package missing from ``pyproject.toml``'s explicit ``packages`` list.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> its import name in the wheel (pyproject's package-dir)
SOURCES = {"lrponnx": "lrponnx", "converters": "lrponnx/converters", "model_zoo": "lrponnx/model_zoo"}
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules")


def _tree_files(pattern: str) -> set[str]:
    """Files of the source folders matching ``pattern``, named as in the wheel (lrponnx/model_zoo/...)."""
    out = set()
    for src, dest in SOURCES.items():
        base = ROOT / src
        for f in base.rglob(pattern):
            rel = f.relative_to(base)
            if "__pycache__" in rel.parts:
                continue
            if src == "lrponnx" and rel.parts[0] in ("converters", "model_zoo"):
                continue  # a local link or leftover: the wheel's copies come from the root folders
            out.add(f"{dest}/{rel.as_posix()}")
    return out


@pytest.fixture(scope="module")
def wheel_file(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not available in this environment")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, src / folder, ignore=IGNORE, symlinks=True)
    # no build isolation: offline, with this environment's setuptools (pyproject asks for >= 68)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("lrponnx-*.whl")
    return whl


@pytest.fixture(scope="module")
def wheel(wheel_file) -> list[str]:
    with zipfile.ZipFile(wheel_file) as z:
        return z.namelist()


def _read(wheel_file: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel_file) as z:
        (name,) = [n for n in z.namelist() if n.endswith(suffix)]
        return z.read(name).decode()


def test_one_top_level_package(wheel, wheel_file):
    tops = {n.split("/")[0] for n in wheel}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lrponnx"}
    assert _read(wheel_file, ".dist-info/top_level.txt").split() == ["lrponnx"]


def test_every_module_of_the_tree_and_nothing_else(wheel):
    """Every .py file under lrponnx/, converters/ and model_zoo/ ships (so every subpackage is in
    pyproject's ``packages``), and no module that is not in the tree (no leftovers of old layouts)."""
    shipped = {n for n in wheel if n.endswith(".py")}
    tree = _tree_files("*.py")
    missing, extra = sorted(tree - shipped), sorted(shipped - tree)
    assert not missing, f"not in the wheel (add the package to pyproject's packages): {missing}"
    assert not extra, f"in the wheel but not in the tree: {extra}"
    packages = {str(Path(n).parent) for n in tree if n.endswith("/__init__.py")}
    assert {"lrponnx/compiler", "lrponnx/ops", "lrponnx/rules", "lrponnx/app", "lrponnx/app/web",
            "lrponnx/converters/caffe", "lrponnx/model_zoo"} <= packages


def test_data_files_ship(wheel):
    names = set(wheel)
    static = {n for n in _tree_files("*") if n.startswith("lrponnx/app/web/static/") and "." in Path(n).name}
    assert {"lrponnx/app/web/static/index.html", "lrponnx/app/web/static/app.js"} <= static
    assert static <= names, sorted(static - names)
    zoo = _tree_files("*.onnx") | _tree_files("checksums.json") | {
        n for n in _tree_files("*.md") if n.startswith("lrponnx/model_zoo/cards/")}
    assert {"lrponnx/model_zoo/cifar10_lrn.onnx", "lrponnx/model_zoo/vit_cifar10.onnx",
            "lrponnx/model_zoo/checksums.json", "lrponnx/model_zoo/cards/cifar10-lrn.md"} <= zoo
    assert zoo <= names, sorted(zoo - names)


def test_console_script(wheel_file):
    """``lrponnx`` runs ``lrponnx.app.cli:main``."""
    lines = [ln.strip() for ln in _read(wheel_file, ".dist-info/entry_points.txt").splitlines()]
    assert "[console_scripts]" in lines
    assert "lrponnx = lrponnx.app.cli:main" in lines

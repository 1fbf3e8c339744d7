"""Benchmark helpers: the report's verdicts (a ratio inside the machine's run-to-run spread is called borderline,
not met or missed outright) and the tables that benchmarks write into hand-written pages."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("value, target, lower, expected", [
    (2.71, 3.2, True, "**met**"),
    (3.16, 3.2, True, "met (borderline)"),         # GoogLeNet's run of 2026-11-26 12:15
    (3.30, 3.2, True, "missed (borderline)"),
    (3.42, 3.2, True, "**missed**"),
    (2.05, 2.0, False, "met (borderline)"),
    (1.95, 2.0, False, "missed (borderline)"),
    (2.48, 2.0, False, "**met**"),
    (1.50, 2.0, False, "**missed**"),
])
def test_timing_verdicts_mark_the_spread(report, value, target, lower, expected):
    assert report._verdict(value, target, lower, report.BORDERLINE) == expected


def test_verdicts_without_margin_are_plain(report):
    assert report._verdict(3.19, 3.2, True) == "**met**"
    assert report._verdict(3.21, 3.2, True) == "**missed**"


@pytest.fixture(scope="module")
def docs_block():
    spec = importlib.util.spec_from_file_location("bench_docs_block", BENCH / "docs_block.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_block_replaced_between_markers_only(docs_block, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- b:start -->\nold\ntable\n<!-- b:end -->\nafter\n")
    table = r"| a \| b | 1\2 |"                          # backslashes are text, not regex escapes
    docs_block.replace_block(page, "<!-- b:start -->", "<!-- b:end -->", table)
    assert page.read_text() == f"intro\n<!-- b:start -->\n{table}\n<!-- b:end -->\nafter\n"


def test_missing_markers_stop_with_the_page_named(docs_block, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="page.md"):
        docs_block.replace_block(page, "<!-- b:start -->", "<!-- b:end -->", "x")
    assert page.read_text() == "no markers here\n"

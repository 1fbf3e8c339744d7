"""Shared test helpers: the location of the real data in ../shared/data (skips when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_path() -> Path:
    """Path to ../shared/data next to the project root; skips the calling test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (it lives in ../shared/data beside the project)")
    return SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    return shared_data_path()

"""Fixtures of the `top` tests; the data and helpers they use are in scenario.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ui.scenario import shop_batches, write_replay


@pytest.fixture
def shop_replay(tmp_path) -> Path:
    """The shop scenario as a capture JSON lines file."""
    return write_replay(tmp_path / "shop.jsonl", shop_batches())

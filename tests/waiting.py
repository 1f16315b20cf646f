"""Waiting on conditions, never on the clock: a test polls what it needs and fails only past a deadline that
bounds a hang (generous: a loaded CI machine is slow, not wrong)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come true within {timeout:g} s")
        time.sleep(0.01)

"""The venv is what requirements.lock says: every installed package at its locked version, none unlocked
(a dependency added to pyproject.toml without rerunning scripts/lock fails here, not on a fresh host)."""

import importlib.metadata
import re
from pathlib import Path

LOCK = Path(__file__).resolve().parents[2] / "requirements.lock"
NOT_LOCKED = {"flowscope", "pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_installed_packages_are_the_locked_ones() -> None:
    locked = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            locked[canonical(name)] = version
    installed = {
        canonical(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions()
        if canonical(dist.metadata["Name"]) not in NOT_LOCKED
    }
    assert installed == locked

"""Kernel tests load real probes into the running kernel and build network namespaces: they need root and
the test tools (make setup-test installs them)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helpers' own asserts say what differed, as the tests' do.
pytest.register_assert_rewrite(
    "tests.kernel.capture", "tests.kernel.pcap", "tests.kernel.tc_flows", "tests.kernel.tracepoint_lab"
)

from tests.kernel.lab import Lab  # noqa: E402 - after the rewrite hook

KERNEL_DIR = Path(__file__).resolve().parent
TOOLS = ("ip", "tc", "ethtool", "sysctl", "dumpcap", "tshark")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_DIR in item.path.parents:
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(autouse=True, scope="session")
def kernel_test_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tests load BPF probes and create network namespaces: run them as root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `make setup-test` (it installs the test packages)")


@pytest.fixture
def tc_lab() -> Iterator[Lab]:
    """A lab of the tc flow tests: namespaces fstc-*, 10.201.0.0/16 and fd00:201::/64."""
    with Lab("fstc-", "10.201.0.0/16", "fd00:201::/64") as lab:
        yield lab

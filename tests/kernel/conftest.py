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
# Cases of parametrized tests that also run in each kernel of `make kernel-matrix`, where one capture costs
# about a minute (tests marked @pytest.mark.kernel_matrix run there whole). test_kprobe_families runs drops,
# retransmits, resets and connections there with both probe families at once.
KERNEL_MATRIX = {
    "test_flows_udp.py::test_udp_packets_and_bytes_are_exact[4-ring]",
    "test_flows_udp.py::test_udp_packets_and_bytes_are_exact[6-ring]",
    "test_drops.py::test_udp_to_a_closed_port_is_dropped_with_no_socket_on_its_flow[6-perf]",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    collected = set()
    for item in items:
        if KERNEL_DIR in item.path.parents:
            item.add_marker(pytest.mark.kernel)
            case = f"{item.path.name}::{item.name}"
            collected.add(case)
            if case in KERNEL_MATRIX:
                item.add_marker(pytest.mark.kernel_matrix)
    files = {item.path.name for item in items}
    stale = sorted(case for case in KERNEL_MATRIX if case.partition("::")[0] in files and case not in collected)
    if stale:
        raise pytest.UsageError(f"tests/kernel/conftest.py KERNEL_MATRIX names tests that do not exist: {stale}")


@pytest.fixture(autouse=True, scope="session")
def kernel_test_host() -> None:
    if os.geteuid() != 0:
        why = "kernel tests load BPF probes and create network namespaces: run them as root"
        if os.environ.get("CI"):  # in CI a run without root would pass with every kernel test skipped
            pytest.fail(f"{why} (CI is set, so not running them fails)")
        pytest.skip(why)
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `make setup-test` (it installs the test packages)")


@pytest.fixture
def tc_lab() -> Iterator[Lab]:
    """A lab of the tc flow tests: namespaces fstc-*, 10.201.0.0/16 and fd00:201::/64."""
    with Lab("fstc-", "10.201.0.0/16", "fd00:201::/64") as lab:
        yield lab


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """flowscope's state (the tc qdiscs it created) goes to a directory of each test's own, not
    /run/flowscope: what a test killed half-way leaves there reaches neither a later test nor the host."""
    path = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("FLOWSCOPE_STATE_DIR", str(path))
    return path

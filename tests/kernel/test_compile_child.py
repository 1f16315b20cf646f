"""The agent holds no compiler: BCC compiles and loads the probes in a short-lived child process, which
hands the agent the file descriptors of the maps, programs and attachments. The probes run while the agent
holds them and go with it, after a SIGINT and after a SIGKILL (the tc programs then stay on their filters
until the next start removes them, as before); a load error in the child is one sentence in the agent.

Each test runs `flowscope capture` as users do, in its own namespaces (fsmem-*, veth fsmeA/fsmeB,
10.208.0.0/16, fd00:208::/64), and reads what the process holds from /proc/<pid>/fdinfo."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowscope.kernel.compile_child import load
from flowscope.kernel.loader import LoaderError, LoadOptions
from tests.kernel.capture import Capture, held_by
from tests.kernel.lab import Lab, Netns
from tests.kernel.tracepoint_lab import RAW_TRACEPOINTS

GONE_WITHIN_S = 10.0  # the kernel frees a program after its last reference, in a work item


@pytest.fixture
def agent_netns() -> Iterator[Netns]:
    with Lab("fsmem-", "10.208.0.0/16", "fd00:208::/64") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.link(a, "fsmeA", b, "fsmeB", subnet=1)
        yield a


def loaded_programs() -> set[int]:
    listing = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {entry["id"] for entry in json.loads(listing)}


def remaining_after(ids: set[int], expected: set[int]) -> set[int]:
    """Which of `ids` are still loaded, once only `expected` are (or GONE_WITHIN_S has passed)."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := ids & loaded_programs()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize("transport", [(), ("--perf-buffer",)], ids=["ring", "perf"])
def test_the_agent_maps_no_compiler_and_its_probes_go_with_it(agent_netns: Netns, transport: tuple[str, ...]) -> None:
    run = Capture.start(agent_netns, ["fsmeA"], 0.5, *transport)
    pid = run.process.pid
    libraries = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if ".so" in line}
    assert [name for name in libraries if any(part in name for part in ("libLLVM", "libclang", "libbcc"))] == []
    assert Path(f"/proc/{pid}/task/{pid}/children").read_text() == ""  # the compile step has exited
    held = held_by(pid)
    # One link per raw tracepoint the running families hook, each holding one of the agent's programs.
    assert set(held.raw_tracepoints) == RAW_TRACEPOINTS
    assert set(held.raw_tracepoints.values()) <= set(held.programs)
    assert len(held.tc_programs) == 2
    assert set(held.programs) <= loaded_programs()
    assert run.stop().returncode == 0
    assert remaining_after(set(held.programs), set()) == set()


def test_after_a_sigkill_only_the_tc_filters_hold_programs_until_the_next_start(agent_netns: Netns) -> None:
    run = Capture.start(agent_netns, ["fsmeA"], 0.5)
    held = held_by(run.process.pid)
    assert run.stop(signal.SIGKILL).returncode == -signal.SIGKILL
    # The attachments lived only in the agent's descriptors: the tracepoint programs are gone with it.
    assert remaining_after(set(held.programs), held.tc_programs) == held.tc_programs
    Capture.start(agent_netns, ["fsmeA"], 0.5).stop()  # the next start removes the filters left behind
    assert remaining_after(set(held.programs), set()) == set()


def test_a_load_error_in_the_child_is_one_sentence(capfd: pytest.CaptureFixture[str]) -> None:
    # A ring of 3 pages: the kernel refuses the map (a power of two is required), BCC fails the load.
    with pytest.raises(LoaderError) as raised:
        load(LoadOptions(ring_pages=3))
    assert str(raised.value) == (
        "the probes failed to compile or load (could not open bpf map: fs_events, error: Invalid argument); "
        "run `flowscope doctor -v` and report the output."
    )
    captured = capfd.readouterr()
    assert captured.out == ""  # BCC's own words never reach the agent's output, nor its stderr: the debug log
    assert "could not open bpf map" not in captured.err

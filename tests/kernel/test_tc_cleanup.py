"""flowscope's tc filters are its own and it cleans up after itself: SIGINT and SIGTERM remove them (after a
last drain), a SIGKILL leaves them for the next start to remove, a flowscope that still runs keeps its
filters when another starts, and a clsact qdisc or filter that someone else created is never touched."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.kernel.capture import Capture
from tests.kernel.lab import Lab, Netns
from tests.kernel.tc_flows import (
    Hosts,
    assert_flow_map_balanced,
    filters,
    flow_totals,
    flowscope_filters,
    start_sink,
    two_hosts,
    udp_frame,
    udp_id,
)


def owned_by(found: list[tuple[str, str]], run: Capture) -> bool:
    """Whether the filters are one per hook, owned by this capture process (flowscope:<hook>:<pidns>:<pid>:<start>)."""
    return [hook for hook, _ in found] == ["egress", "ingress"] and all(
        name.split(":")[3] == str(run.process.pid) for _, name in found
    )


def foreign(netns: Netns, ifname: str) -> list[dict]:
    return [entry for entry in filters(netns, ifname) if "bpf_name" not in entry["options"]]


def has_clsact(netns: Netns, ifname: str) -> bool:
    return any(qdisc["kind"] == "clsact" for qdisc in netns.qdiscs(ifname))


def add_foreign_filters(hosts: Hosts) -> list[dict]:
    """A clsact qdisc and a classic-BPF filter on each hook, made with tc, as another tool would."""
    hosts.a.run("tc", "qdisc", "add", "dev", "fstcA", "clsact")
    for hook in ("ingress", "egress"):
        hosts.a.run(
            "tc", "filter", "add", "dev", "fstcA", hook, "prio", "7", "handle", "7", "bpf", "bytecode", "1,6 0 0 0,"
        )
    made = foreign(hosts.a, "fstcA")
    assert len(made) == 2
    return made


def send(hosts: Hosts, count: int) -> None:
    hosts.udp("a", 4, 5001, 7001, 100, count)


def sent(hosts: Hosts, count: int) -> dict:
    a, b = hosts.address("a", 4), hosts.address("b", 4)
    return {udp_id("egress", 4, a, 5001, b, 7001): (count, count * udp_frame(4, 100))}


def wait_for_filters(netns: Netns, run: Capture, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not owned_by(flowscope_filters(netns, "fstcA"), run):
        assert run.process.poll() is None, f"capture exited {run.process.returncode}"
        assert time.monotonic() < deadline, "capture attached no filters"
        time.sleep(0.05)


def no_state_left(netns: Netns, state_dir: Path) -> bool:
    inode = os.stat(f"/run/netns/{netns.name}").st_ino
    return not (state_dir / f"tc-qdiscs-{inode}.json").exists()


@pytest.mark.parametrize("someone_elses_clsact", [True, False])
def test_after_a_sigkill_the_next_start_removes_the_stale_filters(
    tc_lab: Lab, state_dir: Path, someone_elses_clsact: bool
) -> None:
    hosts = two_hosts(tc_lab)
    start_sink(hosts.b, "udp-sink", hosts.address("b", 4), "7001")
    theirs = add_foreign_filters(hosts) if someone_elses_clsact else []

    killed = Capture.start(hosts.a, ["fstcA"])
    stale = flowscope_filters(hosts.a, "fstcA")
    assert owned_by(stale, killed)
    killed.process.kill()
    killed.process.wait(timeout=30)
    assert flowscope_filters(hosts.a, "fstcA") == stale  # a SIGKILL leaves them behind

    run = Capture.start(hosts.a, ["fstcA"])
    assert owned_by(flowscope_filters(hosts.a, "fstcA"), run)  # the stale ones are gone, its own are there
    assert foreign(hosts.a, "fstcA") == theirs
    send(hosts, 12)
    result = run.stop()
    a, b = hosts.address("a", 4), hosts.address("b", 4)
    assert flow_totals(result.flows, "fstcA", {a, b}) == sent(hosts, 12)
    assert_flow_map_balanced(result)

    assert flowscope_filters(hosts.a, "fstcA") == []
    assert foreign(hosts.a, "fstcA") == theirs  # same priorities, handles and programs
    assert has_clsact(hosts.a, "fstcA") == someone_elses_clsact  # flowscope's own qdisc went with it
    assert no_state_left(hosts.a, state_dir)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_drains_and_removes_the_filters(tc_lab: Lab, signum: int) -> None:
    hosts = two_hosts(tc_lab)
    start_sink(hosts.b, "udp-sink", hosts.address("b", 4), "7001")
    theirs = add_foreign_filters(hosts)
    run = Capture.start(hosts.a, ["fstcA"], 60.0, wait=False)  # one long interval: only the stop drains it
    wait_for_filters(hosts.a, run)
    send(hosts, 17)
    result = run.stop(signum)

    assert result.returncode == 0 and result.summary["interrupted"] is True
    a, b = hosts.address("a", 4), hosts.address("b", 4)
    assert flow_totals(result.flows, "fstcA", {a, b}) == sent(hosts, 17)
    assert_flow_map_balanced(result)
    assert flowscope_filters(hosts.a, "fstcA") == []
    assert foreign(hosts.a, "fstcA") == theirs
    assert has_clsact(hosts.a, "fstcA")


def test_a_running_capture_keeps_its_filters_when_another_starts(tc_lab: Lab, state_dir: Path) -> None:
    hosts = two_hosts(tc_lab)
    start_sink(hosts.b, "udp-sink", hosts.address("b", 4), "7001")
    first = Capture.start(hosts.a, ["fstcA"])
    names = flowscope_filters(hosts.a, "fstcA")
    second = Capture.start(hosts.a, ["fstcA"])
    both = flowscope_filters(hosts.a, "fstcA")
    assert len(both) == 4 and set(names) < set(both) and owned_by(sorted(set(both) - set(names)), second)
    send(hosts, 25)
    second_result = second.stop()
    assert flowscope_filters(hosts.a, "fstcA") == names  # the second removed only its own
    send(hosts, 5)
    first_result = first.stop()

    a, b = hosts.address("a", 4), hosts.address("b", 4)
    assert flow_totals(second_result.flows, "fstcA", {a, b}) == sent(hosts, 25)
    assert flow_totals(first_result.flows, "fstcA", {a, b}) == sent(hosts, 30)
    assert_flow_map_balanced(first_result)
    assert_flow_map_balanced(second_result)
    assert flowscope_filters(hosts.a, "fstcA") == []
    assert not has_clsact(hosts.a, "fstcA")  # the first created it, and removed it once nothing was left
    assert no_state_left(hosts.a, state_dir)

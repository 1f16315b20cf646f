"""flowscope's tc filters are its own and it cleans up after itself: SIGINT and SIGTERM remove them (after a
last drain), a SIGKILL leaves them for the next start to remove, a flowscope that still runs keeps its
filters when another starts, and a clsact qdisc or filter that someone else created is never touched."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.kernel.capture import Capture
from tests.kernel.lab import Lab, Netns, host
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


def state_file(netns: Netns, state_dir: Path) -> Path:
    return state_dir / f"tc-qdiscs-{os.stat(f'/run/netns/{netns.name}').st_ino}.json"


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.mark.parametrize("record", ["earlier namespace", "old format"])
def test_a_record_inherited_with_the_namespace_inode_does_not_remove_someone_elses_qdisc(
    tc_lab: Lab, state_dir: Path, record: str
) -> None:
    """The kernel hands a namespace's inode to a new one once it is gone: a record that an earlier namespace
    left under this inode names fstcA, but the clsact on fstcA now is someone else's (the code before
    records held the namespace cookie deleted it at stop)."""
    hosts = two_hosts(tc_lab)
    start_sink(hosts.b, "udp-sink", hosts.address("b", 4), "7001")
    hosts.a.run("tc", "qdisc", "add", "dev", "fstcA", "clsact")
    ifindex = hosts.a.link("fstcA")["ifindex"]
    inherited = (
        {"netns_cookie": 2**63, "boot": boot_id(), "qdiscs": {"fstcA": ifindex}}
        if record == "earlier namespace"
        else {"fstcA": ifindex}
    )
    state_file(hosts.a, state_dir).write_text(json.dumps(inherited))

    run = Capture.start(hosts.a, ["fstcA"])
    assert owned_by(flowscope_filters(hosts.a, "fstcA"), run)
    send(hosts, 9)
    result = run.stop()
    a, b = hosts.address("a", 4), hosts.address("b", 4)
    assert flow_totals(result.flows, "fstcA", {a, b}) == sent(hosts, 9)
    assert flowscope_filters(hosts.a, "fstcA") == []
    assert has_clsact(hosts.a, "fstcA")  # not flowscope's to remove


def test_the_state_of_a_namespace_that_is_gone_is_pruned_and_a_live_ones_kept(tc_lab: Lab, state_dir: Path) -> None:
    hosts = two_hosts(tc_lab)
    gone = tc_lab.namespace("gone")
    gone_inode = os.stat(f"/run/netns/{gone.name}").st_ino
    host("ip", "netns", "del", gone.name)
    tc_lab.namespaces.remove(gone)
    assert gone.name not in host("ip", "netns", "list").stdout
    gone_record = state_dir / f"tc-qdiscs-{gone_inode}.json"
    gone_record.write_text(json.dumps({"netns_cookie": 2**63, "boot": boot_id(), "qdiscs": {"fstcG": 2}}))

    killed = Capture.start(hosts.b, ["fstcB"])  # creates the clsact on fstcB and records it
    killed.process.kill()
    killed.process.wait(timeout=30)
    kept_record = state_file(hosts.b, state_dir)
    assert json.loads(kept_record.read_text())["qdiscs"] == {"fstcB": hosts.b.link("fstcB")["ifindex"]}

    Capture.start(hosts.a, ["fstcA"]).stop()  # a start in another namespace prunes the state
    assert not gone_record.exists()
    assert kept_record.exists()  # b has no process left, but its bind mount keeps it alive

    Capture.start(hosts.b, ["fstcB"]).stop()  # the kept record lets b's next capture remove b's clsact
    assert not has_clsact(hosts.b, "fstcB")
    assert not kept_record.exists()
    assert list(state_dir.iterdir()) == []

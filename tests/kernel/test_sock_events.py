"""Connection events from sock:inet_sock_set_state, through `flowscope capture`: connect, accept and close
carry the process that owns each end (accepts run in softirq, where the current task is whoever was
interrupted), the network namespace, the state a connection closed from, and its lifetime."""

from __future__ import annotations

import time

import pytest

from tests.kernel.tc_flows import TRANSPORTS
from tests.kernel.tracepoint_lab import assert_balanced, capture, client_server, rows


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", [4, 6])
def test_connect_accept_and_close_carry_the_pids_of_their_ends(version: int, transport: str) -> None:
    with client_server() as pair:
        client, server = pair.addresses(version)
        client_netns, server_netns = pair.netns_inode(pair.client), pair.netns_inode(pair.server)
        run = capture(pair, transport)
        listener = pair.start_server(server, 5002)  # listen(2) while the probe watches
        with open(f"/proc/{listener.pid}/comm", encoding="utf-8") as comm:
            server_comm = comm.read().strip()
        started = time.monotonic()
        sent = pair.socket_traffic(pair.client, "client", "--src", client, "--dst", server, "--dport", "5002",
                                   "--bytes", "20000", "--chunk", "5000", "--pause", "0.1")  # fmt: skip
        listener.wait(timeout=30)
        elapsed_us = (time.monotonic() - started) * 1e6
        result = run.stop()
    assert_balanced(result)
    everything = result.events
    outbound = rows(everything, client, sent["sport"], server, 5002, "TCP")
    inbound = rows(everything, server, 5002, client, sent["sport"], "TCP")
    socket_kinds = ("connect", "accept", "close")
    outbound = outbound[outbound["kind"].isin(socket_kinds)]
    inbound = inbound[inbound["kind"].isin(socket_kinds)]
    # Socket events go from the local end: the client's from client to server, the server's the other way.
    assert list(outbound["kind"]) == ["connect", "close"]
    assert list(inbound["kind"]) == ["accept", "close"]
    assert set(outbound["pid"]) == {sent["pid"]} and set(outbound["comm"]) == {sent["comm"]}
    assert set(inbound["pid"]) == {listener.pid} and set(inbound["comm"]) == {server_comm}
    assert set(outbound["netns"]) == {client_netns} and set(inbound["netns"]) == {server_netns}
    assert outbound["cgroup_id"].notna().all() and inbound["cgroup_id"].notna().all()
    # The client closes first (its FIN_WAIT2 socket hands over to a time-wait one), the server from LAST_ACK.
    assert inbound["state"].iloc[1] == "LAST_ACK"
    assert outbound["state"].iloc[1] in ("FIN_WAIT1", "FIN_WAIT2")
    for close in (outbound.iloc[1], inbound.iloc[1]):
        # The connection lived through the client's three pauses, and within the test's own time.
        assert 300_000 <= close["duration_us"] <= elapsed_us


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_refused_connect_closes_from_syn_sent_with_its_pid(transport: str) -> None:
    with client_server() as pair:
        client, server = pair.addresses(4)
        run = capture(pair, transport)
        attempt = pair.socket_traffic(pair.client, "refused", "--src", client, "--dst", server, "--dport", "7")
        result = run.stop()
    assert_balanced(result)
    assert attempt["refused"], attempt
    attempts = rows(result.events, client, attempt["sport"], server, 7, "TCP")
    closes = attempts[attempts["kind"] == "close"]
    assert len(closes) == 1 and "connect" not in set(attempts["kind"])
    close = closes.iloc[0]
    assert close["state"] == "SYN_SENT"
    assert close["pid"] == attempt["pid"] and close["comm"] == attempt["comm"]
    # The socket lived from its SYN to the RST, both within the client's connect().
    assert 0 < close["duration_us"] <= attempt["seconds"] * 1e6


def test_accepts_of_a_listener_older_than_the_probes_carry_its_pid() -> None:
    """A server that was listening before flowscope started: its listener is found in /proc at start."""
    with client_server() as pair:
        client, server = pair.addresses(6)
        listener = pair.start_server(server, 5004)
        with open(f"/proc/{listener.pid}/comm", encoding="utf-8") as comm:
            server_comm = comm.read().strip()
        run = capture(pair, "ring")
        sent = pair.socket_traffic(pair.client, "client", "--src", client, "--dst", server, "--dport", "5004",
                                   "--bytes", "1000")  # fmt: skip
        listener.wait(timeout=30)
        result = run.stop()
    assert_balanced(result)
    inbound = rows(result.events, server, 5004, client, sent["sport"], "TCP")
    assert list(inbound["kind"]) == ["accept", "close"]
    assert set(inbound["pid"]) == {listener.pid} and set(inbound["comm"]) == {server_comm}

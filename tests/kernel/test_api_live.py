"""The agent with real probes serves the lab's traffic over the gRPC flow API: `flowscope observe -f -o jsonl`
and a Hubble client (the stub of the Hubble-subset protos following, as `hubble observe -f` does) receive its
flows with the exact packet and byte counts of the datagrams sent, and its drops with the running kernel's reason
names: NO_SOCKET for UDP to a closed port, NETFILTER_DROP for an iptables DROP rule in the server namespace (as
many as the rule's own counter). The agent runs in the client namespace with tc on fstpC (tracepoint_lab's pair);
its API is on unix sockets of the test's directory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import pandas as pd
import pytest

from flowscope.config import ClientConfig
from flowscope.proto.client import Client
from flowscope.proto.hubble.flow import flow_pb2 as flow
from flowscope.proto.hubble.observer import observer_pb2, observer_pb2_grpc
from tests.kernel.agent_runs import status
from tests.kernel.capture import FLOWSCOPE, READY_TIMEOUT
from tests.kernel.tc_flows import start_sink
from tests.kernel.test_drops import udp_send, wire_length
from tests.kernel.tracepoint_lab import TABLES, Pair, client_server
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)
CLOSED, FILTERED, OPEN = 9, 5555, 7001  # destination ports: nothing bound, bound behind DROP, bound
SENT = {CLOSED: (40001, 5), FILTERED: (40002, 4), OPEN: (40005, 6)}  # port -> (source port, datagrams)
_COUNTS = re.compile(r"(\d+) packets, (\d+) bytes")


def agent_intervals(path: Path) -> int:
    return status(path)["intervals"]


def rule_packets(pair: Pair) -> int:
    """The packet counter of the server namespace's DROP rule (iptables' own count)."""
    listing = pair.server.run("iptables", "-w", "-n", "-v", "-x", "-L", "INPUT").stdout
    (line,) = [line for line in listing.splitlines() if "DROP" in line and f"dpt:{FILTERED}" in line]
    return int(line.split()[0])


class Followers:
    """`flowscope observe -f -o jsonl` and a Hubble GetFlows follow on the agent, read as they arrive."""

    def __init__(self, socket: Path, hubble_socket: Path, directory: Path) -> None:
        self.errors = directory / "observe.err"
        with open(self.errors, "w") as errors:  # a file: nothing has to read it while observe runs
            self.observe = subprocess.Popen(
                [FLOWSCOPE, "observe", "--server", f"unix://{socket}", "-f", "-o", "jsonl"],
                stdout=subprocess.PIPE, stderr=errors, text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            )  # fmt: skip
        self.records: list[dict] = []
        self.hubble: list[flow.Flow] = []
        self.channel = grpc.insecure_channel(f"unix://{hubble_socket}")
        self.call = observer_pb2_grpc.ObserverStub(self.channel).GetFlows(observer_pb2.GetFlowsRequest(follow=True))
        self.threads = [threading.Thread(target=self._read_observe, daemon=True),
                        threading.Thread(target=self._read_hubble, daemon=True)]  # fmt: skip
        for thread in self.threads:
            thread.start()

    def _read_observe(self) -> None:
        for line in self.observe.stdout:
            self.records.append(json.loads(line))

    def _read_hubble(self) -> None:
        try:
            for response in self.call:
                if response.HasField("flow"):
                    self.hubble.append(response.flow)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.CANCELLED, err

    def stop(self) -> str:
        """Ends both follows (observe as by Ctrl-C, with the exit status 130 that says so) and returns observe's
        stderr. An observe still running a minute after SIGINT is made to print its threads' stacks (faulthandler
        on SIGABRT) into the failure."""
        self.call.cancel()
        self.observe.send_signal(signal.SIGINT)
        try:
            self.observe.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.observe.send_signal(signal.SIGABRT)
            self.observe.wait(timeout=60)
            raise AssertionError(f"observe -f did not exit after SIGINT:\n{self.errors.read_text()}") from None
        for thread in self.threads:
            thread.join(10)
        self.channel.close()
        assert self.observe.returncode == 130, self.errors.read_text()
        return self.errors.read_text()


def own_totals(records: list[dict], src: str, dst: str) -> dict[int, tuple]:
    """dport -> (packets, bytes, drop packets, drop bytes, drop reasons of flows, drop events, their reasons)."""
    totals = {}
    for dport, (sport, _count) in SENT.items():
        mine = [r for r in records if (r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"], r["protocol"])
                == (src, sport, dst, dport, "UDP")]  # fmt: skip
        flows = [r for r in mine if r["type"] == "flow"]
        drops = [r for r in mine if r["type"] == "event" and r["kind"] == "drop"]
        totals[dport] = (
            sum(r["packets"] for r in flows), sum(r["bytes"] for r in flows),
            sum(r["drop_packets"] or 0 for r in flows), sum(r["drop_bytes"] or 0 for r in flows),
            {r["drop_reason"] for r in flows if r["drop_packets"]}, len(drops), {r["drop_reason"] for r in drops},
        )  # fmt: skip
    return totals


def summary_counts(flows: list[flow.Flow], verdict: int) -> tuple[int, int]:
    """Packets and bytes of the flows of `verdict`, as their summaries say them ("5 packets, 710 bytes")."""
    pairs = [tuple(map(int, _COUNTS.search(f.Summary).groups())) for f in flows if f.verdict == verdict]
    return sum(p for p, _ in pairs), sum(b for _, b in pairs)


def hubble_totals(flows: list[flow.Flow], src: str, dst: str) -> dict[int, tuple]:
    """dport -> (forwarded packets, bytes, dropped packets, bytes, reasons of dropped flows, drop events, reasons),
    read from what the hubble CLI prints: verdict, observation point and summary."""
    totals = {}
    for dport, (sport, _count) in SENT.items():
        mine = [f for f in flows if (f.IP.source, f.l4.UDP.source_port, f.IP.destination, f.l4.UDP.destination_port)
                == (src, sport, dst, dport)]  # fmt: skip
        counted = [f for f in mine if f.event_type.sub_type != 3]  # flow rows (at the network), not drop events
        events = [f for f in mine if f.event_type.sub_type == 3 and f.verdict == flow.DROPPED]

        totals[dport] = (
            *summary_counts(counted, flow.FORWARDED), *summary_counts(counted, flow.DROPPED),
            {f.Summary.split("; ")[0] for f in counted if f.verdict == flow.DROPPED},
            len(events), {" ".join(f.Summary.split()[:3]) for f in events},
        )  # fmt: skip
    return totals


def test_observe_and_a_hubble_client_get_the_lab_traffic_and_its_drops_exactly(tmp_path: Path) -> None:
    sockets = {name: tmp_path / f"{name}.sock" for name in ("api", "hubble", "status")}
    with client_server() as pair:
        src, dst = pair.addresses(4)
        pair.server.run("iptables", "-w", "-A", "INPUT", "-p", "udp", "--dport", str(FILTERED), "-j", "DROP")
        start_sink(pair.server, "udp-sink", dst, str(FILTERED), str(OPEN))
        agent_log = tmp_path / "agent.err"
        with agent_log.open("w") as agent_errors:  # a file: nothing has to read it while the agent runs
            agent = pair.client.popen(
                FLOWSCOPE, "agent", "-i", "fstpC", "--interval", "0.5", "--node-name", f"apilive-{os.getpid()}",
                "--status-socket", str(sockets["status"]), "--grpc-socket", str(sockets["api"]),
                "--hubble-socket", str(sockets["hubble"]), *TABLES,
                stderr=agent_errors, env={**os.environ, "FLOWSCOPE_FLOWLOG_ENABLED": "0"},
            )  # fmt: skip
        wait_for(lambda: sockets["status"].exists() and agent_intervals(sockets["status"]) >= 1, READY_TIMEOUT,
                 "the agent's first interval")  # fmt: skip
        followers = Followers(sockets["api"], sockets["hubble"], tmp_path)
        client = Client(ClientConfig(server=f"unix://{sockets['api']}", timeout=10.0))
        wait_for(lambda: client.status().clients == 2, 60, "both followers registered")
        for dport, (sport, count) in SENT.items():
            udp_send(pair, 4, sport, dport, count)
        frame = wire_length(4)
        blocked = rule_packets(pair)
        own = {
            CLOSED: (5, 5 * frame, 5, 5 * frame, {"NO_SOCKET"}, 5, {"NO_SOCKET"}),
            FILTERED: (4, 4 * frame, blocked, blocked * frame, {"NETFILTER_DROP"}, blocked, {"NETFILTER_DROP"}),
            OPEN: (6, 6 * frame, 0, 0, set(), 0, set()),
        }
        hubble = {
            CLOSED: (0, 0, 5, 5 * frame, {"kernel drop NO_SOCKET"}, 5, {"kernel drop NO_SOCKET"}),
            FILTERED: (0, 0, blocked, blocked * frame, {"kernel drop NETFILTER_DROP"}, blocked,
                       {"kernel drop NETFILTER_DROP"}),
            OPEN: (6, 6 * frame, 0, 0, set(), 0, set()),
        }  # fmt: skip
        try:
            wait_for(
                lambda: own_totals(list(followers.records), src, dst) == own
                and hubble_totals(list(followers.hubble), src, dst) == hubble,
                90, "the traffic at both clients",
            )  # fmt: skip
            drained = agent_intervals(sockets["status"]) + 2  # anything counted twice would have come by then
            wait_for(lambda: agent_intervals(sockets["status"]) >= drained, 60, "two more intervals")
            served = client.status()
        finally:
            client.close()
            errors = followers.stop()
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
    assert blocked == 4
    assert own_totals(followers.records, src, dst) == own
    assert hubble_totals(followers.hubble, src, dst) == hubble
    assert served.client_lost == 0 and errors == ""
    assert agent.returncode == 0, agent_log.read_text()
    assert pd.Series([r["node"] for r in followers.records]).eq(f"apilive-{os.getpid()}").all()

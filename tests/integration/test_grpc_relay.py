"""`flowscope relay` over three real agents, one of them restarted mid-stream: the merged stream is in time
order, every record comes once, tagged with its node, and the agent's going and coming back is told in-band
and by GetNodes."""

from __future__ import annotations

import threading
from importlib.metadata import version

import pandas as pd
import pytest

from flowscope.proto import codec
from flowscope.proto.client import request
from flowscope.proto.flowscope.v1 import flowscope_pb2 as pb
from flowscope.proto.hubble.flow import flow_pb2 as flow
from flowscope.proto.hubble.observer import observer_pb2 as observer
from tests.integration.grpc_agents import Agent, interval_batches, recording
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(240)
START = pd.Timestamp("2025-03-01T12:00:00Z")
INTERVALS, SECONDS, FLOWS = 80, 0.1, 20
SPEED = "0.5"
MAX_UINT64 = (1 << 64) - 1  # hubble observe --all
VERSION = f"flowscope {version('flowscope')}"


def test_three_agents_behind_a_relay_one_restarted_mid_stream(tmp_path):
    streams = {node: interval_batches(START, INTERVALS, SECONDS, FLOWS, node) for node in ("a", "b", "c")}
    # b is down for the intervals between; its later records start 6 s into the recordings, replayed at half
    # speed: 12 s after the start, well after b is back (a relay does not wait for an unavailable agent:
    # records of it older than what went out are late). At full speed a restart slowed by a loaded machine
    # could miss that (a CI failure).
    before, after = streams["b"][:10], streams["b"][60:]
    agents = {
        node: Agent.start(tmp_path, recording(tmp_path / f"{node}.jsonl", streams[node] if node != "b" else before),
                          "--speed", SPEED, name=node)
        for node in ("a", "b", "c")
    }  # fmt: skip
    peers = [arg for agent in agents.values() for arg in ("--peer", f"unix://{agent.socket}")]
    relay = Agent.start(tmp_path, None, *peers, "--relay-interval", "0.1", "--backoff", "0.1", "--drain-timeout", "30",
                        name="relay", command="relay")  # fmt: skip
    got: list[pb.GetFlowsResponse] = []
    client = relay.client()
    follower = threading.Thread(
        target=lambda: got.extend(client.flows(request(follow=True, since=pd.Timestamp(0, tz="UTC")))), daemon=True
    )
    try:
        follower.start()
        wait_for(lambda: sum(r.flow.node == "b" for r in list(got)) == 10 * FLOWS, 60, "b's first records")
        agents["b"].stop()
        wait_for(lambda: any(r.node_status.state == pb.NODE_UNAVAILABLE for r in list(got)), 60, "b unavailable")
        assert "b" in relay.client().status().unavailable_nodes
        # hubble status and hubble list nodes on the relay: b is known (by the name it answered with) and down
        down = relay.hubble_node_counts()
        down_nodes = relay.hubble_nodes()
        agents["b"] = Agent.start(tmp_path, recording(tmp_path / "b2.jsonl", after), "--speed", SPEED, name="b")
        total = (2 * INTERVALS + len(before) + len(after)) * FLOWS
        wait_for(lambda: sum(r.HasField("flow") for r in list(got)) == total, 120, "every record through the relay")
        nodes = relay.client().nodes().nodes
        up, up_nodes = relay.hubble_node_counts(), relay.hubble_nodes()
    finally:
        client.cancel()
        relay.stop()
        for agent in agents.values():
            agent.stop()
    flows = codec.flows_from(r.flow for r in got if r.HasField("flow"))
    assert flows["time_end"].is_monotonic_increasing  # in time order across the agents
    keys = list(zip(flows["node"], flows["time_end"], flows["src_port"], strict=True))
    assert len(set(keys)) == len(keys) == total  # none twice
    want = {
        node: [b for b in batches]
        for node, batches in (("a", streams["a"]), ("b", before + after), ("c", streams["c"]))
    }
    for node, batches in want.items():
        expected = pd.concat([b.flows for b in batches], ignore_index=True)
        mine = flows[flows["node"] == node].reset_index(drop=True)
        assert mine["time_end"].tolist() == sorted(expected["time_end"].tolist())
        assert int(mine["packets"].sum()) == int(expected["packets"].sum())
    states = [(r.node_status.state, list(r.node_status.nodes)) for r in got if r.HasField("node_status")]
    assert (pb.NODE_UNAVAILABLE, ["b"]) in states and states.index((pb.NODE_UNAVAILABLE, ["b"])) < len(states) - 1
    assert states[-1] == (pb.NODE_CONNECTED, ["b"])
    assert sorted((n.name, n.state) for n in nodes) == [(x, pb.NODE_CONNECTED) for x in ("a", "b", "c")]
    address = {node: f"unix://{agent.socket}" for node, agent in agents.items()}  # the --peer addresses
    assert down == (2, 1, ["b"])
    assert down_nodes == [
        ("a", "NODE_CONNECTED", VERSION, address["a"], False, ""),
        ("b", "NODE_UNAVAILABLE", VERSION, address["b"], False, ""),
        ("c", "NODE_CONNECTED", VERSION, address["c"], False, ""),
    ]
    assert up == (3, 0, [])
    assert up_nodes == [(node, "NODE_CONNECTED", VERSION, address[node], False, "") for node in ("a", "b", "c")]


def test_records_older_than_what_the_relay_let_out_are_lost_in_band_as_late(tmp_path):
    a_batches = interval_batches(START, 30, SECONDS, FLOWS, "a")
    a_last = a_batches[-1].flows["time_end"].max()  # START + 2.9 s + 20 µs
    # b overlaps a's last 1 s: its intervals 0-8 and the first 19 flows of interval 9 end before a_last (late);
    # flow 19 of interval 9 ends at a_last itself (not late), and intervals 10-19 after it
    b_batches = interval_batches(START + pd.Timedelta(seconds=2), 20, SECONDS, FLOWS, "b")
    b_flows = pd.concat([b.flows for b in b_batches], ignore_index=True)
    on_time = sorted(b_flows.loc[b_flows["time_end"] >= a_last, "time_end"])
    late = len(b_flows) - len(on_time)
    assert (late, len(on_time)) == (9 * FLOWS + FLOWS - 1, 10 * FLOWS + 1)
    a = Agent.start(tmp_path, recording(tmp_path / "a.jsonl", a_batches), "--speed", "0", name="a")
    b_socket = tmp_path / "b.sock"  # b is not there yet: the relay does not wait for it
    relay = Agent.start(
        tmp_path, None, "--peer", f"unix://{a.socket}", "--peer", f"unix://{b_socket}", "--relay-interval", "0.1",
        "--backoff", "0.1", "--drain-timeout", "1", name="relay", command="relay",
    )  # fmt: skip
    got: list[pb.GetFlowsResponse] = []
    client = relay.client()
    follower = threading.Thread(
        target=lambda: got.extend(client.flows(request(follow=True, since=pd.Timestamp(0, tz="UTC")))), daemon=True
    )
    b = None
    try:
        follower.start()
        wait_for(lambda: sum(r.flow.node == "a" for r in list(got)) == 30 * FLOWS, 60, "a's records")
        # b never answered: named by its address, with no version (none is known), and counted unavailable
        never = relay.hubble_node_counts(), relay.hubble_nodes()
        b = Agent.start(tmp_path, recording(tmp_path / "b.jsonl", b_batches), "--speed", "0", name="b")

        def lost_late() -> int:
            return sum(r.lost.count for r in list(got) if r.HasField("lost") and r.lost.source == "b/late")

        wait_for(lambda: sum(r.flow.node == "b" for r in list(got)) == len(on_time) and lost_late() == late, 60,
                 "b's records on time and its late ones told lost")  # fmt: skip
        status = relay.client().status()
        # hubble observe --all through the relay: the late records are a LostEvent of b's, a user-space stage
        # (the relay's merge) that did not keep up, not a kernel ring's
        hubble = list(relay.hubble().GetFlows(observer.GetFlowsRequest(number=MAX_UINT64)))
    finally:
        client.cancel()
        relay.stop()
        for agent in (a, b):
            if agent is not None:
                agent.stop()
    flows = codec.flows_from(r.flow for r in got if r.HasField("flow"))
    assert flows["time_end"].is_monotonic_increasing
    assert flows.loc[flows["node"] == "b", "time_end"].tolist() == on_time
    assert flows.loc[flows["node"] == "a", "time_end"].tolist() == sorted(
        pd.concat([x.flows for x in a_batches])["time_end"]
    )
    assert lost_late() == late
    assert status.sources["b/late"] == pb.Count(produced=late, delivered=0, lost=late)
    assert never == (
        (1, 1, [f"unix://{b_socket}"]),
        [("a", "NODE_CONNECTED", VERSION, f"unix://{a.socket}", False, ""),
         (f"unix://{b_socket}", "NODE_UNAVAILABLE", "", f"unix://{b_socket}", False, "")],
    )  # fmt: skip
    hubble_lost = [(r.node_name, r.lost_events.source) for r in hubble if r.HasField("lost_events")]
    assert set(hubble_lost) == {("b", flow.OBSERVER_EVENTS_QUEUE)}
    assert sum(r.lost_events.num_events_lost for r in hubble if r.HasField("lost_events")) == late

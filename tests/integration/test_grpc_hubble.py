"""Hubble compatibility: clients generated from the Hubble-subset protos make exactly the calls the hubble CLI
(v0.11+) makes, on the hubble socket of a real agent replaying the shop recording, and every field the CLI
prints (time, node, IPs and ports, pod and namespace, type, verdict, summary) decodes to the recorded values."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowscope.proto.hubble.flow import flow_pb2 as flow
from flowscope.proto.hubble.observer import observer_pb2 as observer
from flowscope.proto.hubble.relay import relay_pb2 as relay
from tests.integration.grpc_agents import Agent
from tests.integration.test_grpc_api import BATCHES, EVENTS, FLOWS
from tests.ui.scenario import write_replay
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)
MAX_UINT64 = (1 << 64) - 1  # hubble observe --all


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hubble")
    with Agent.start(directory, write_replay(directory / "shop.jsonl", BATCHES), "--speed", "0") as agent:
        client = agent.client()
        wait_for(lambda: client.status().seen == 33, 60, "the agent serving the whole recording")
        client.close()
        yield agent


def hubble_flows_of(pod: str) -> int:
    """How many Hubble flows of the recording have `pod` on either side (a flow row of passed and dropped
    packets is two flows)."""

    def mine(frame):
        return (frame["src_pod"] == pod) | (frame["dst_pod"] == pod)

    drops, packets = FLOWS["drop_packets"].fillna(0), FLOWS["packets"].fillna(0)
    forwarded, dropped = (drops == 0) | (packets > drops), drops > 0
    return int((mine(FLOWS) & forwarded).sum() + (mine(FLOWS) & dropped).sum() + mine(EVENTS).sum())


def flows(responses) -> list[flow.Flow]:
    return [r.flow for r in responses if r.HasField("flow")]


def test_hubble_status_checks_health_then_server_status(agent):
    channel = grpc.insecure_channel(f"unix://{agent.hubble_socket}")
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="hubble.server.Observer"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    status = agent.hubble().ServerStatus(observer.ServerStatusRequest())
    assert (status.num_flows, status.max_flows, status.seen_flows) == (33, 65536, 33)
    last = BATCHES[-1]  # FLOWS PER SECOND: the latest interval's records per second
    assert status.flows_rate == (len(last.flows) + len(last.events)) / 2.0 == 4.0
    assert status.uptime_ns > 0 and status.version.startswith("flowscope ")


def test_hubble_observe_gets_the_last_20_flows_with_every_printed_field(agent):
    responses = list(agent.hubble().GetFlows(observer.GetFlowsRequest(number=20)))
    got = flows(responses)
    assert len(got) == 20
    everything = flows(agent.hubble().GetFlows(observer.GetFlowsRequest(number=MAX_UINT64)))
    assert got == everything[-20:]
    # every flow row splits into a FORWARDED flow of what passed and a DROPPED flow of what was dropped
    passed = int(((FLOWS["drop_packets"] == 0) | (FLOWS["packets"] > FLOWS["drop_packets"])).sum())
    assert len(everything) == passed + int((FLOWS["drop_packets"] > 0).sum()) + len(EVENTS) == 34
    assert [r.time for r in responses if r.HasField("flow")] == [f.time for f in got]
    assert all(r.node_name == "node-a" for r in responses if r.HasField("flow"))

    dropped = [f for f in everything if f.verdict == flow.DROPPED and f.Summary.startswith("TCP Flags")]
    row = FLOWS[FLOWS["drop_reason"] == "TCP_INVALID_SEQUENCE"].iloc[0]
    first = next(f for f in dropped if "TCP_INVALID_SEQUENCE" in f.Summary)
    assert first.time.ToNanoseconds() == row["time_end"].value
    assert (first.IP.source, first.IP.destination, first.IP.ipVersion) == ("10.204.0.10", "10.204.0.11", flow.IPv4)
    assert (first.l4.TCP.source_port, first.l4.TCP.destination_port) == (43210, 8443)
    assert (first.source.namespace, first.source.pod_name, first.destination.pod_name) == (
        "shop",
        "checkout-7d9f",
        "payments-0",
    )
    assert [(w.name, w.kind) for w in first.source.workloads] == [("checkout", "Deployment")]
    assert (first.node_name, first.traffic_direction, first.interface.name) == ("node-a", flow.EGRESS, "veth-checkout")
    assert (first.event_type.type, first.event_type.sub_type) == (4, 11)  # a trace at to-network
    assert not first.HasField("is_reply")  # unknown: the CLI prints <>
    assert (  # the RTT is on the FORWARDED half of the split row
        first.Summary == "TCP Flags: none; kernel drop TCP_INVALID_SEQUENCE; 2 packets, 2000 bytes in 2.000s"
    )
    forwarded = next(
        f for f in everything if f.time == first.time and f.verdict == flow.FORWARDED and f.l4.TCP.source_port == 43210
    )
    assert forwarded.Summary == "TCP Flags: none; 128 packets, 128000 bytes in 2.000s; RTT 1.5ms"  # 130 - 2 dropped
    drop = next(f for f in everything if f.Summary.startswith("kernel drop NO_SOCKET at"))
    assert (drop.verdict, drop.event_type.sub_type, drop.Summary) == (
        flow.DROPPED,
        3,
        "kernel drop NO_SOCKET at tcp_v4_rcv (74 bytes)",
    )
    connect = next(f for f in everything if f.Type == flow.SOCK)
    assert (connect.Summary, connect.event_type.type) == ("connect by checkout (4242)", 7)
    lost = [r.lost_events for r in responses if r.HasField("lost_events")]
    # the recording lost 2 events in the kernel's ring between 12:00:06 and 12:00:08
    assert [(e.source, e.num_events_lost, e.first.ToJsonString(), e.last.ToJsonString()) for e in lost] == [
        (flow.PERF_EVENT_RING_BUFFER, 2, "2025-03-01T12:00:06Z", "2025-03-01T12:00:08Z")
    ]


def test_hubble_whitelist_and_blacklist_as_the_cli_sends_them(agent):
    # hubble observe --namespace kube-system: source_pod "kube-system/" or destination_pod "kube-system/"
    namespace = [flow.FlowFilter(source_pod=["kube-system/"]), flow.FlowFilter(destination_pod=["kube-system/"])]
    got = flows(agent.hubble().GetFlows(observer.GetFlowsRequest(number=MAX_UINT64, whitelist=namespace)))
    assert [(f.destination.pod_name, f.l4.UDP.destination_port) for f in got] == [("coredns-55", 53)] * 3
    # --pod checkout: Hubble reads a pod without namespace as of "default" (none here); --pod checkout
    # --namespace shop is sent as "shop/checkout", a prefix of the pod's name
    for pods, want in ((["checkout"], 0), (["shop/checkout"], hubble_flows_of("checkout-7d9f"))):
        pod = [flow.FlowFilter(source_pod=pods), flow.FlowFilter(destination_pod=pods)]
        got = flows(agent.hubble().GetFlows(observer.GetFlowsRequest(number=MAX_UINT64, whitelist=pod)))
        assert len(got) == want
    # --verdict DROPPED --not --protocol tcp: the drops of anything but TCP (the NETFILTER drops of 192.0.2.80)
    request = observer.GetFlowsRequest(
        number=MAX_UINT64, whitelist=[flow.FlowFilter(verdict=[flow.DROPPED])],
        blacklist=[flow.FlowFilter(protocol=["tcp"])],
    )  # fmt: skip
    assert flows(agent.hubble().GetFlows(request)) == []  # every drop of the recording is TCP
    request = observer.GetFlowsRequest(
        number=MAX_UINT64, whitelist=[flow.FlowFilter(verdict=[flow.DROPPED], source_ip=["192.0.2.0/24"])]
    )
    assert {f.Summary.split(";")[0] for f in flows(agent.hubble().GetFlows(request))} == {
        "TCP Flags: none",
        "kernel drop NETFILTER_DROP at nf_hook_slow (60 bytes)",
    }
    # --type drop, --node-name node-*, --port 8443, --from-pod shop/checkout
    request = observer.GetFlowsRequest(
        number=MAX_UINT64, whitelist=[flow.FlowFilter(
            event_type=[flow.EventTypeFilter(type=1)], node_name=["node-*"], destination_port=["8443"],
            source_pod=["shop/checkout"],
        )],
    )  # fmt: skip
    assert [f.Summary for f in flows(agent.hubble().GetFlows(request))] == [
        "TCP Flags: none; kernel drop TCP_INVALID_SEQUENCE; 2 packets, 2000 bytes in 2.000s",
    ]  # the drop event of that reason is of the reply (payments -> checkout:43210)


@pytest.mark.parametrize(
    ("whitelist", "details"),
    [
        (flow.FlowFilter(source_fqdn=["example.com"]), "whitelist[0].source_fqdn: flowscope cannot filter on it"),
        (flow.FlowFilter(protocol=["http"]), "whitelist[0].protocol: flowscope sees L3/L4 only, not 'http'"),
        (flow.FlowFilter(destination_port=["web"]), "whitelist[0].destination_port: a port is a number"),
        (flow.FlowFilter(http_status_code=["5+"]), "whitelist[0].http_status_code: flowscope cannot filter on it"),
        # a field of a newer hubble CLI that these protos do not know (number 40, a varint 1)
        (flow.FlowFilter.FromString(b"\xc0\x02\x01"), "whitelist[0]: unsupported FlowFilter field number 40"),
    ],
)
def test_hubble_unsupported_filters_are_invalid_argument_naming_the_field(agent, whitelist, details):
    with pytest.raises(grpc.RpcError) as raised:
        list(agent.hubble().GetFlows(observer.GetFlowsRequest(number=20, whitelist=[whitelist])))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(details)


def test_hubble_follow_nodes_and_unimplemented_calls(agent):
    call = agent.hubble().GetFlows(observer.GetFlowsRequest(number=5, follow=True))
    got: list = []
    ended: list[grpc.StatusCode] = []

    def follow() -> None:
        try:
            got.extend(call)
        except grpc.RpcError as error:
            ended.append(error.code())

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    wait_for(lambda: len(flows(got)) == 5, 30, "the last 5 flows of a follow")
    assert call.is_active()  # following: the stream stays open
    call.cancel()
    reader.join(30)
    assert ended == [grpc.StatusCode.CANCELLED]  # it ended only when the client cancelled
    nodes = agent.hubble().GetNodes(observer.GetNodesRequest()).nodes
    assert [(n.name, n.state, n.num_flows, n.max_flows, n.seen_flows) for n in nodes] == [
        ("agent", relay.NODE_CONNECTED, 33, 65536, 33)
    ]
    status = agent.hubble().ServerStatus(observer.ServerStatusRequest())
    assert [(n.version, n.address, n.tls.enabled, n.tls.server_name) for n in nodes] == [
        (status.version, f"unix://{agent.socket}", False, "")
    ]
    assert nodes[0].uptime_ns > 0
    # an agent is no relay: ServerStatus has no node counts (the CLI prints none)
    assert not status.HasField("num_connected_nodes") and not status.HasField("num_unavailable_nodes")
    with pytest.raises(grpc.RpcError) as raised:
        list(agent.hubble().GetAgentEvents(observer.GetAgentEventsRequest(number=1)))
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert raised.value.details() == "flowscope has no Cilium agent events"
    with pytest.raises(grpc.RpcError) as raised:
        list(agent.hubble().GetDebugEvents(observer.GetDebugEventsRequest(number=1, follow=True)))
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert raised.value.details() == "flowscope has no Cilium debug events"

"""Hubble translation (exporters/grpc/hubble.py) without a server: flowscope's flow and event rows as the Hubble
Flows a client decodes from GetFlows (through the API's view of a chunk, as the ring serves it), lost notices as
LostEvents, and every FlowFilter field flowscope supports as the exact filter text it becomes and the exact
records it selects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flowscope.exporters.grpc import hubble
from flowscope.exporters.grpc.ring import Chunk, Notice
from flowscope.proto.hubble.flow import flow_pb2 as flow
from flowscope.proto.hubble.observer import observer_pb2 as observer
from flowscope.schema import FlowBatch, events_frame, flows_frame

T0 = pd.Timestamp("2025-03-01T12:00:00Z")
NODE = "node-a"
CHECKOUT = {"namespace": "shop", "pod": "checkout-7d9f", "workload": "checkout", "workload_kind": "Deployment",
            "labels": {"app": "checkout", "tier": "web"}}  # fmt: skip
PAYMENTS = {"namespace": "shop", "pod": "payments-0", "workload": "payments", "workload_kind": "StatefulSet",
            "labels": {"app": "payments"}}  # fmt: skip
COREDNS = {"namespace": "kube-system", "pod": "coredns-55", "workload": "coredns", "workload_kind": "Deployment",
           "labels": {"k8s-app": "kube-dns"}}  # fmt: skip
WEB = {"namespace": "default", "pod": "web-1", "workload": "web", "workload_kind": "Deployment", "labels": {}}


def sides(src: dict, dst: dict) -> dict:
    return {f"src_{k}": v for k, v in src.items()} | {f"dst_{k}": v for k, v in dst.items()}


def served(flows: list[dict], events: list[dict], node: str = NODE) -> list[observer.GetFlowsResponse]:
    """The GetFlows responses of one chunk of these rows, in the ring's time order, as a client decodes them."""
    view = view_of(flows, events, node)
    return [observer.GetFlowsResponse.FromString(data) for data in view.encode(np.arange(len(view.order)))]


def view_of(flows: list[dict], events: list[dict], node: str = NODE):
    batch = FlowBatch(T0, T0 + pd.Timedelta(seconds=2), flows_frame(pd.DataFrame(flows)),
                      events_frame(pd.DataFrame(events)))  # fmt: skip
    chunk = Chunk(0, node, batch, [], (T0 + pd.Timedelta(seconds=2)).value, len(flows) + len(events))
    return hubble.HubbleApi().view(chunk)


def stamp(when: pd.Timestamp):
    message = flow.Flow().time
    message.FromNanoseconds(when.value)
    return message


# ---- a flow row ------------------------------------------------------------------------------------------------

TCP_ROW = {
    "time_start": T0, "time_end": T0 + pd.Timedelta(seconds=2), "node": NODE, "ifname": "veth-checkout",
    "ifindex": 7, "direction": "ingress", "ip_version": 6, "protocol": "TCP", "src_ip": "fd00::10",
    "src_port": 43210, "dst_ip": "fd00::11", "dst_port": 8443, "packets": 10, "bytes": 10000,
    "tcp_flags": 0x02 | 0x08 | 0x10 | 0x100, "drop_packets": 3, "drop_bytes": 3000,
    "drop_reason": "TCP_INVALID_SEQUENCE", "retransmits": 2, "resets": 1, "rtt_us": 1500, "cgroup_id": 12345,
    **sides(CHECKOUT, PAYMENTS),
}  # fmt: skip


def endpoint(identity: dict) -> flow.Endpoint:
    return flow.Endpoint(
        namespace=identity["namespace"], pod_name=identity["pod"],
        labels=[f"{k}={v}" for k, v in sorted(identity["labels"].items())],
        workloads=[flow.Workload(name=identity["workload"], kind=identity["workload_kind"])],
    )  # fmt: skip


def tcp_flow(verdict: int, summary: str) -> flow.Flow:
    return flow.Flow(
        time=stamp(T0 + pd.Timedelta(seconds=2)), verdict=verdict,
        IP=flow.IP(source="fd00::10", destination="fd00::11", ipVersion=flow.IPv6),
        l4=flow.Layer4(TCP=flow.TCP(source_port=43210, destination_port=8443,
                                    flags=flow.TCPFlags(SYN=True, PSH=True, ACK=True, NS=True))),
        source=endpoint(CHECKOUT), destination=endpoint(PAYMENTS), Type=flow.L3_L4, node_name=NODE,
        event_type=flow.CiliumEventType(type=4, sub_type=10), traffic_direction=flow.INGRESS,
        trace_observation_point=flow.FROM_NETWORK, interface=flow.NetworkInterface(index=7, name="veth-checkout"),
        cgroup_id=12345, Summary=summary,
    )  # fmt: skip


def test_a_flow_row_of_passed_and_dropped_packets_is_one_forwarded_and_one_dropped_flow():
    responses = served([TCP_ROW], [])
    assert [r.WhichOneof("response_types") for r in responses] == ["flow", "flow"]
    assert [r.flow for r in responses] == [
        tcp_flow(flow.FORWARDED, "TCP Flags: SYN, PSH, ACK, NS; 7 packets, 7000 bytes in 2.000s; retransmits 2; "
                                 "resets 1; RTT 1.5ms"),
        tcp_flow(flow.DROPPED, "TCP Flags: SYN, PSH, ACK, NS; kernel drop TCP_INVALID_SEQUENCE; 3 packets, 3000 bytes "
                               "in 2.000s"),  # the counters are the FORWARDED half's: summed, they count once
    ]  # fmt: skip
    assert [(r.node_name, r.time) for r in responses] == [(NODE, stamp(T0 + pd.Timedelta(seconds=2)))] * 2
    assert all(r.flow.drop_reason_desc == flow.DROP_REASON_UNKNOWN for r in responses)  # Cilium's numbers do not fit


def test_flow_rows_of_only_passed_or_only_dropped_packets_are_one_flow_each():
    egress = TCP_ROW | {"direction": "egress", "drop_packets": 0, "drop_bytes": 0, "drop_reason": None,
                        "tcp_flags": 0x01 | 0x04, "retransmits": 0, "resets": 0, "rtt_us": None}  # fmt: skip
    dropped = TCP_ROW | {"packets": 3, "bytes": 3000, "tcp_flags": 0, "retransmits": 0, "resets": 0, "rtt_us": None,
                         "src_port": 43211}  # fmt: skip
    udp = TCP_ROW | {"protocol": "UDP", "ip_version": 4, "src_ip": "10.0.0.1", "dst_ip": "10.0.0.53", "dst_port": 53,
                     "drop_packets": 0, "drop_bytes": 0, "drop_reason": None, "packets": 2, "bytes": 180,
                     "retransmits": None, "resets": None, "rtt_us": None, "tcp_flags": None, "cgroup_id": None,
                     "direction": "egress"}  # fmt: skip
    icmp = udp | {"protocol": "ICMP", "src_port": None, "dst_port": None, "icmp_type": 8, "icmp_code": 0}
    got = [r.flow for r in served([egress, dropped, udp, icmp], [])]
    assert [(f.verdict, f.traffic_direction, f.event_type.type, f.event_type.sub_type, f.trace_observation_point)
            for f in got] == [
        (flow.FORWARDED, flow.EGRESS, 4, 11, flow.TO_NETWORK),
        (flow.FORWARDED, flow.EGRESS, 4, 11, flow.TO_NETWORK),
        (flow.FORWARDED, flow.EGRESS, 4, 11, flow.TO_NETWORK),
        (flow.DROPPED, flow.INGRESS, 4, 10, flow.FROM_NETWORK),  # all 3 packets dropped: no FORWARDED flow
    ]  # fmt: skip
    # one time: the FORWARDED flows of the interval come before its DROPPED ones
    assert [f.Summary for f in got] == [
        "TCP Flags: FIN, RST; 10 packets, 10000 bytes in 2.000s",
        "2 packets, 180 bytes in 2.000s",
        "2 packets, 180 bytes in 2.000s",
        "TCP Flags: none; kernel drop TCP_INVALID_SEQUENCE; 3 packets, 3000 bytes in 2.000s",
    ]
    assert [f.l4.TCP.source_port for f in (got[0], got[3])] == [43210, 43211]
    assert got[0].l4.TCP.flags == flow.TCPFlags(FIN=True, RST=True)
    assert got[1].l4 == flow.Layer4(UDP=flow.UDP(source_port=43210, destination_port=53))
    assert (got[1].IP.source, got[1].IP.destination, got[1].IP.ipVersion) == ("10.0.0.1", "10.0.0.53", flow.IPv4)
    assert got[1].cgroup_id == 0 and got[3].cgroup_id == 12345  # no cgroup id: the field stays unset
    assert got[2].l4 == flow.Layer4(ICMPv4=flow.ICMPv4(type=8, code=0))
    assert got[2].l4.WhichOneof("protocol") == "ICMPv4"


# ---- event rows ------------------------------------------------------------------------------------------------


def event(kind: str, offset_ms: int, **fields) -> dict:
    return {"time": T0 + pd.Timedelta(milliseconds=offset_ms), "kind": kind, "node": NODE, "ip_version": 4,
            "protocol": "TCP", "src_ip": "10.0.0.1", "src_port": 43210, "dst_ip": "10.0.0.2", "dst_port": 8443,
            **sides(CHECKOUT, PAYMENTS), **fields}  # fmt: skip


EVENTS = [
    event("connect", 1, pid=4242, comm="checkout", cgroup_id=99),
    event("accept", 2, pid=5151, comm="payments"),
    event("close", 3, pid=4242, comm="checkout", state="FIN_WAIT1", duration_us=1_500_000),
    event("drop", 4, drop_reason="NO_SOCKET", location="tcp_v4_rcv", bytes=74),
    event("retransmit", 5, state="ESTABLISHED"),
    event("reset", 6, state="CLOSE", reset_reason="NOT_SPECIFIED"),
    event("drop", 7, drop_reason=None),  # a kernel that names no reason
]


def test_events_are_flows_whose_type_sub_type_and_summary_say_what_happened():
    got = [r.flow for r in served([], EVENTS)]
    assert [(f.Type, f.verdict, f.event_type.type, f.event_type.sub_type, f.trace_observation_point,
             f.traffic_direction, f.Summary) for f in got] == [
        (flow.SOCK, flow.FORWARDED, 7, 0, 0, flow.EGRESS, "connect by checkout (4242)"),
        (flow.SOCK, flow.FORWARDED, 7, 0, 0, flow.INGRESS, "accept by payments (5151)"),
        (flow.SOCK, flow.FORWARDED, 7, 0, 0, 0, "close by checkout (4242) from FIN_WAIT1 after 1.5s"),
        (flow.L3_L4, flow.DROPPED, 4, 3, flow.TO_STACK, 0, "kernel drop NO_SOCKET at tcp_v4_rcv (74 bytes)"),
        (flow.L3_L4, flow.FORWARDED, 4, 3, flow.TO_STACK, 0, "TCP retransmit in ESTABLISHED"),
        (flow.L3_L4, flow.FORWARDED, 4, 3, flow.TO_STACK, 0, "TCP reset (NOT_SPECIFIED) in CLOSE"),
        (flow.L3_L4, flow.DROPPED, 4, 3, flow.TO_STACK, 0, "kernel drop reason unknown"),
    ]  # fmt: skip
    connect = got[0]
    assert connect == flow.Flow(
        time=stamp(T0 + pd.Timedelta(milliseconds=1)), verdict=flow.FORWARDED,
        IP=flow.IP(source="10.0.0.1", destination="10.0.0.2", ipVersion=flow.IPv4),
        l4=flow.Layer4(TCP=flow.TCP(source_port=43210, destination_port=8443, flags=flow.TCPFlags())),
        source=endpoint(CHECKOUT), destination=endpoint(PAYMENTS), Type=flow.SOCK, node_name=NODE,
        event_type=flow.CiliumEventType(type=7), traffic_direction=flow.EGRESS, cgroup_id=99,
        Summary="connect by checkout (4242)",
    )  # fmt: skip
    assert all(f.drop_reason_desc == flow.DROP_REASON_UNKNOWN for f in got)


def test_lost_notices_are_lost_events_of_hubble_sources_and_the_node_that_lost_them():
    api, start, end = hubble.HubbleApi(), T0.value, (T0 + pd.Timedelta(seconds=2)).value
    got = [
        observer.GetFlowsResponse.FromString(api.notice(Notice(source, 5, start, end), NODE))
        for source in ("event_ring", "flow_map", "client", "sink:grpc", "node-b/late", "node-c/event_ring")
    ]
    assert [(r.node_name, r.lost_events.source, r.lost_events.num_events_lost) for r in got] == [
        (NODE, flow.PERF_EVENT_RING_BUFFER, 5),
        (NODE, flow.PERF_EVENT_RING_BUFFER, 5),
        (NODE, flow.HUBBLE_RING_BUFFER, 5),
        (NODE, flow.OBSERVER_EVENTS_QUEUE, 5),
        ("node-b", flow.OBSERVER_EVENTS_QUEUE, 5),
        ("node-c", flow.PERF_EVENT_RING_BUFFER, 5),
    ]
    assert {(r.lost_events.first.ToJsonString(), r.lost_events.last.ToJsonString(), r.time.ToJsonString())
            for r in got} == {("2025-03-01T12:00:00Z", "2025-03-01T12:00:02Z", "2025-03-01T12:00:02Z")}  # fmt: skip


# ---- FlowFilter -> the filter language -------------------------------------------------------------------------

W = flow.Workload
I = flow.NetworkInterface  # noqa: E741
E = flow.EventTypeFilter


@pytest.mark.parametrize(
    ("message", "texts"),
    [
        (flow.FlowFilter(source_pod=["shop/checkout"]), ["from-pod=shop/checkout"]),
        (flow.FlowFilter(source_pod=["checkout", "/web"]), ["from-pod=default/checkout,web"]),
        (flow.FlowFilter(destination_pod=["kube-system/"]), ["to-pod=kube-system/"]),
        (flow.FlowFilter(source_ip=["10.0.0.0/24", "fd00::10"]), ["from-ip=10.0.0.0/24,fd00::10"]),
        (flow.FlowFilter(destination_ip=["10.0.0.53"]), ["to-ip=10.0.0.53"]),
        (flow.FlowFilter(source_port=["43210"]), ["from-port=43210"]),
        (flow.FlowFilter(destination_port=["53", "8000-9000"]), ["to-port=53,8000-9000"]),
        (flow.FlowFilter(source_label=["app=checkout"]), ["from-label=app=checkout"]),
        (flow.FlowFilter(destination_label=["k8s:k8s-app=kube-dns"]), ["to-label=k8s:k8s-app=kube-dns"]),
        (flow.FlowFilter(source_workload=[W(name="checkout")]), ["from-workload=checkout"]),
        (flow.FlowFilter(destination_workload=[W(name="payments"), W(name="coredns")]),
         ["to-workload=payments,coredns"]),
        (flow.FlowFilter(protocol=["udp"]), ["protocol=UDP"]),
        (flow.FlowFilter(protocol=["TCP", "icmpv4", "ICMPv6", "sctp"]), ["protocol=TCP,ICMP,ICMPv6,SCTP"]),
        (flow.FlowFilter(verdict=[flow.DROPPED]), ["verdict=dropped"]),
        (flow.FlowFilter(verdict=[flow.FORWARDED, flow.DROPPED]), ["verdict=forwarded,dropped"]),
        (flow.FlowFilter(verdict=[flow.AUDIT]), ["verdict="]),  # flowscope emits no AUDIT: matches nothing
        (flow.FlowFilter(traffic_direction=[flow.INGRESS]), ["direction=ingress"]),
        (flow.FlowFilter(node_name=["node-*"]), ["observer=node-*"]),
        (flow.FlowFilter(ip_version=[flow.IPv6]), ["ip=::/0"]),
        (flow.FlowFilter(ip_version=[flow.IPv4, flow.IPv6]), ["ip=0.0.0.0/0,::/0"]),
        (flow.FlowFilter(interface=[I(name="eth0")]), ["ifname=eth0"]),
        (flow.FlowFilter(event_type=[E(type=1)]), ["verdict=dropped"]),
        (flow.FlowFilter(event_type=[E(type=4)]), ["not type=connect,accept,close"]),
        (flow.FlowFilter(event_type=[E(type=4, match_sub_type=True, sub_type=10)]), ["direction=ingress"]),
        (flow.FlowFilter(event_type=[E(type=4, match_sub_type=True, sub_type=11)]), ["direction=egress"]),
        (flow.FlowFilter(event_type=[E(type=4, match_sub_type=True, sub_type=3)]),
         ["type=drop,retransmit,reset not type=flow"]),
        (flow.FlowFilter(event_type=[E(type=7)]), ["type=connect,accept,close"]),
        (flow.FlowFilter(event_type=[E(type=9)]), ["type="]),  # a type flowscope never produces
        (flow.FlowFilter(event_type=[E(type=1, match_sub_type=True, sub_type=2)]), ["type="]),
        # fields AND; each event type is one alternative (the filters are ORed)
        (flow.FlowFilter(source_pod=["shop/"], destination_port=["8443"], event_type=[E(type=7), E(type=1)]),
         ["from-pod=shop/ to-port=8443 type=connect,accept,close", "from-pod=shop/ to-port=8443 verdict=dropped"]),
    ],
)  # fmt: skip
def test_each_supported_flow_filter_field_is_the_filter_text_of_the_same_meaning(message, texts):
    filters = hubble.flow_filter(message)
    assert [f.text for f in filters] == texts
    assert [f.text for f in filters] == [" ".join(t.text for t in f.terms) for f in filters]


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        (flow.FlowFilter(source_workload=[W(name="checkout", kind="Deployment")]),
         "source_workload.kind: flowscope filters workloads by name only"),
        (flow.FlowFilter(destination_workload=[W(kind="Deployment")]),
         "destination_workload.kind: flowscope filters workloads by name only"),
        (flow.FlowFilter(source_workload=[W()]), "source_workload.name: a workload filter needs a name"),
        (flow.FlowFilter(protocol=["dns"]), "protocol: flowscope sees L3/L4 only, not 'dns'"),
        (flow.FlowFilter(node_name=["cluster-1/node-a"]),
         "node_name: flowscope nodes have no cluster name (drop the 'cluster/' part)"),
        (flow.FlowFilter(interface=[I(index=3)]), "interface.index: flowscope filters interfaces by name"),
        (flow.FlowFilter(traffic_direction=[flow.TRAFFIC_DIRECTION_UNKNOWN]),
         "traffic_direction: flowscope's records are ingress or egress"),
        (flow.FlowFilter(source_ip=["10.0.0.300"]),
         "source_ip: '10.0.0.300' is not an IPv4 or IPv6 address (from-ip=10.0.0.300)"),
        (flow.FlowFilter(source_label=["=web"]),
         "source_label: '' is not a label key (e.g. app or app.kubernetes.io/name) (from-label==web)"),
    ],
)  # fmt: skip
def test_a_value_flowscope_cannot_read_names_the_field(message, problem):
    with pytest.raises(hubble.UnsupportedField) as raised:
        hubble.flow_filter(message)
    assert str(raised.value) == problem
    with pytest.raises(ValueError) as listed:
        hubble.filter_set([flow.FlowFilter()], [message])
    assert str(listed.value) == f"blacklist[0].{problem}"


# Records to select from, each tagged by its cgroup id (a flow row of passed and dropped packets is two Flows of
# one tag: (tag, "FORWARDED") and (tag, "DROPPED")).
def flow_row(tag: int, src: tuple, dst: tuple, protocol: str, direction: str, ifname: str, **more) -> dict:
    (src_ip, src_port, src_identity), (dst_ip, dst_port, dst_identity) = src, dst
    return {"time_start": T0, "time_end": T0 + pd.Timedelta(milliseconds=100 + tag), "node": NODE, "ifname": ifname,
            "direction": direction, "ip_version": 6 if ":" in src_ip else 4, "protocol": protocol, "src_ip": src_ip,
            "src_port": src_port, "dst_ip": dst_ip, "dst_port": dst_port, "packets": 10, "bytes": 1000,
            "drop_packets": 0, "drop_bytes": 0, "cgroup_id": tag, **sides(src_identity, dst_identity),
            **more}  # fmt: skip


def event_row(tag: int, kind: str, src: tuple, dst: tuple, **more) -> dict:
    (src_ip, src_port, src_identity), (dst_ip, dst_port, dst_identity) = src, dst
    return {"time": T0 + pd.Timedelta(milliseconds=100 + tag), "kind": kind, "node": NODE, "ip_version": 4,
            "protocol": "TCP", "src_ip": src_ip, "src_port": src_port, "dst_ip": dst_ip, "dst_port": dst_port,
            "cgroup_id": tag, **sides(src_identity, dst_identity), **more}  # fmt: skip


CO, PAY, DNS = ("10.0.0.1", 43210, CHECKOUT), ("10.0.0.2", 8443, PAYMENTS), ("10.0.0.53", 53, COREDNS)
HOST = ("10.0.0.9", 39000, {})
ROWS = [
    flow_row(1, CO, PAY, "TCP", "egress", "veth-checkout"),
    flow_row(2, PAY, CO, "TCP", "ingress", "veth-checkout", drop_packets=2, drop_bytes=200,
             drop_reason="TCP_INVALID_SEQUENCE"),
    flow_row(3, ("10.0.0.1", 40001, CHECKOUT), DNS, "UDP", "egress", "veth-checkout", node="node-b"),
    flow_row(4, ("fd00::10", 50000, WEB), ("fd00::11", 443, PAYMENTS), "TCP", "egress", "eth0"),
]  # fmt: skip
EVENT_ROWS = [
    event_row(5, "connect", CO, PAY, pid=4242, comm="checkout"),
    event_row(6, "drop", HOST, ("10.0.0.2", 9999, PAYMENTS), drop_reason="NO_SOCKET", location="tcp_v4_rcv"),
    event_row(7, "retransmit", CO, PAY, state="ESTABLISHED"),
    event_row(8, "close", PAY, CO, state="ESTABLISHED"),
]
EVERYTHING = [(1, "FORWARDED"), (2, "FORWARDED"), (2, "DROPPED"), (3, "FORWARDED"), (4, "FORWARDED"),
              (5, "FORWARDED"), (6, "DROPPED"), (7, "FORWARDED"), (8, "FORWARDED")]  # fmt: skip


def selected(whitelist: list[flow.FlowFilter], blacklist: list[flow.FlowFilter] = ()) -> list[tuple[int, str]]:
    view = view_of(ROWS, EVENT_ROWS)
    positions = view.select(hubble.filter_set(whitelist, blacklist))
    got = [observer.GetFlowsResponse.FromString(data).flow for data in view.encode(positions)]
    return [(f.cgroup_id, flow.Verdict.Name(f.verdict)) for f in got]


@pytest.mark.parametrize(
    ("whitelist", "want"),
    [
        ([], EVERYTHING),
        ([flow.FlowFilter(source_pod=["shop/checkout"])], [(1, "FORWARDED"), (3, "FORWARDED"), (5, "FORWARDED"),
                                                           (7, "FORWARDED")]),
        # hubble observe --pod shop/payments: source or destination
        ([flow.FlowFilter(source_pod=["shop/payments"]), flow.FlowFilter(destination_pod=["shop/payments"])],
         [(1, "FORWARDED"), (2, "FORWARDED"), (2, "DROPPED"), (4, "FORWARDED"), (5, "FORWARDED"), (6, "DROPPED"),
          (7, "FORWARDED"), (8, "FORWARDED")]),
        ([flow.FlowFilter(source_pod=["web"])], [(4, "FORWARDED")]),  # a pod without namespace: of "default"
        ([flow.FlowFilter(source_pod=["checkout"])], []),
        ([flow.FlowFilter(destination_pod=["kube-system/"])], [(3, "FORWARDED")]),
        ([flow.FlowFilter(source_ip=["10.0.0.9"])], [(6, "DROPPED")]),
        ([flow.FlowFilter(destination_ip=["fd00::/64"])], [(4, "FORWARDED")]),
        ([flow.FlowFilter(source_port=["8443"])], [(2, "FORWARDED"), (2, "DROPPED"), (8, "FORWARDED")]),
        ([flow.FlowFilter(destination_port=["53", "400-500"])], [(3, "FORWARDED"), (4, "FORWARDED")]),
        ([flow.FlowFilter(source_label=["app=checkout"])], [(1, "FORWARDED"), (3, "FORWARDED"), (5, "FORWARDED"),
                                                            (7, "FORWARDED")]),
        ([flow.FlowFilter(destination_label=["k8s:k8s-app=kube-dns"])], [(3, "FORWARDED")]),
        ([flow.FlowFilter(source_workload=[W(name="web")])], [(4, "FORWARDED")]),
        ([flow.FlowFilter(destination_workload=[W(name="coredns")])], [(3, "FORWARDED")]),
        ([flow.FlowFilter(protocol=["udp"])], [(3, "FORWARDED")]),
        ([flow.FlowFilter(verdict=[flow.DROPPED])], [(2, "DROPPED"), (6, "DROPPED")]),
        ([flow.FlowFilter(verdict=[flow.FORWARDED])], [k for k in EVERYTHING if k[1] == "FORWARDED"]),
        ([flow.FlowFilter(verdict=[flow.AUDIT])], []),
        ([flow.FlowFilter(traffic_direction=[flow.INGRESS])], [(2, "FORWARDED"), (2, "DROPPED")]),
        ([flow.FlowFilter(node_name=["node-b"])], [(3, "FORWARDED")]),
        ([flow.FlowFilter(node_name=["node-*"])], EVERYTHING),
        ([flow.FlowFilter(ip_version=[flow.IPv6])], [(4, "FORWARDED")]),
        ([flow.FlowFilter(interface=[I(name="eth0")])], [(4, "FORWARDED")]),
        ([flow.FlowFilter(event_type=[E(type=1)])], [(2, "DROPPED"), (6, "DROPPED")]),  # hubble observe --type drop
        ([flow.FlowFilter(event_type=[E(type=7)])], [(5, "FORWARDED"), (8, "FORWARDED")]),
        ([flow.FlowFilter(event_type=[E(type=4)])], [k for k in EVERYTHING if k[0] not in (5, 8)]),
        ([flow.FlowFilter(event_type=[E(type=4, match_sub_type=True, sub_type=3)])],
         [(6, "DROPPED"), (7, "FORWARDED")]),
        ([flow.FlowFilter(event_type=[E(type=4, match_sub_type=True, sub_type=10)])],
         [(2, "FORWARDED"), (2, "DROPPED")]),
        ([flow.FlowFilter(event_type=[E(type=9)])], []),
        ([flow.FlowFilter(source_pod=["shop/"], event_type=[E(type=7), E(type=1)])],
         [(2, "DROPPED"), (5, "FORWARDED"), (8, "FORWARDED")]),
    ],
)  # fmt: skip
def test_each_supported_flow_filter_field_selects_exactly_its_records(whitelist, want):
    assert selected(whitelist) == want


def test_whitelist_minus_blacklist():
    # hubble observe --from-pod shop/checkout --not --protocol udp
    assert selected([flow.FlowFilter(source_pod=["shop/checkout"])], [flow.FlowFilter(protocol=["udp"])]) == [
        (1, "FORWARDED"), (5, "FORWARDED"), (7, "FORWARDED"),
    ]  # fmt: skip
    # a blacklist alone passes everything else; two blacklist filters each take their records out
    assert selected([], [flow.FlowFilter(verdict=[flow.FORWARDED]), flow.FlowFilter(source_ip=["10.0.0.9"])]) == [
        (2, "DROPPED")
    ]


def test_the_request_becomes_the_ring_query():
    request = observer.GetFlowsRequest(number=20, whitelist=[flow.FlowFilter(source_pod=["shop/"])])
    request.since.FromJsonString("2025-03-01T12:00:00.5Z")
    request.until.FromJsonString("2025-03-01T12:00:02Z")
    got = hubble.query(request)
    assert (got.number, got.first, got.follow, got.since, got.until) == (
        20, False, False, T0.value + 500_000_000, (T0 + pd.Timedelta(seconds=2)).value,
    )  # fmt: skip
    assert [f.text for f in got.filters.allow] == ["from-pod=shop/"] and got.filters.deny == ()
    plain = hubble.query(observer.GetFlowsRequest(follow=True))
    assert (plain.number, plain.follow, plain.since, plain.until, bool(plain.filters)) == (0, True, None, None, False)
    with pytest.raises(ValueError) as raised:
        hubble.query(observer.GetFlowsRequest(first=True, follow=True, number=1))
    assert str(raised.value) == "first: the first flows cannot be followed; drop first or follow"

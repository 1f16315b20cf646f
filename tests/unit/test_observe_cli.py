"""`flowscope observe` without a server: how its flags become the GetFlows request (the filter text of the
hubble-style flags, --last/--first/--all/--follow, --since/--until in the forms hubble takes), and what -o table,
-o json, -o jsonl and -o compact print for fixed responses."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from flowscope.cli import build_parser
from flowscope.cli.observe import Printer, _request, filter_text, parse_time
from flowscope.cli.options import UsageError
from flowscope.proto import codec
from flowscope.proto.flowscope.v1 import flowscope_pb2 as pb
from flowscope.schema import events_frame, flows_frame


def args(*argv: str):
    return build_parser().parse_args(["observe", *argv])


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        ([], ""),
        (["--pod", "shop/checkout"], "pod=shop/checkout"),
        (["--pod", "shop/checkout", "--pod", "payments"], "pod=shop/checkout,payments"),
        (["--from-pod", "shop/checkout", "--to-pod", "shop/payments"], "from-pod=shop/checkout to-pod=shop/payments"),
        (["--namespace", "shop", "-n", "kube-system"], "namespace=shop,kube-system"),
        (["--from-namespace", "shop", "--to-namespace", "kube-system"],
         "from-namespace=shop to-namespace=kube-system"),
        (["--workload", "checkout", "--from-workload", "shop/web", "--to-workload", "coredns"],
         "workload=checkout from-workload=shop/web to-workload=coredns"),
        (["--label", "app=web", "-l", "tier=db", "--from-label", "app", "--to-label", "!canary"],
         "label=app=web,tier=db from-label=app to-label=!canary"),
        (["--ip", "10.0.0.1", "--ip", "fd00::/64"], "ip=10.0.0.1,fd00::/64"),
        (["--from-ip", "10.0.0.0/8", "--to-ip", "192.0.2.80"], "from-ip=10.0.0.0/8 to-ip=192.0.2.80"),
        (["--port", "53", "--from-port", "40000-41000", "--to-port", "443"],
         "port=53 from-port=40000-41000 to-port=443"),
        (["--protocol", "tcp", "--protocol", "udp"], "protocol=tcp,udp"),
        (["--verdict", "DROPPED"], "verdict=DROPPED"),
        (["--drop-reason", "NO_SOCKET", "--drop-reason", "SKB_DROP_REASON_NETFILTER_DROP"],
         "reason=NO_SOCKET,SKB_DROP_REASON_NETFILTER_DROP"),
        (["--type", "drop", "-t", "flow"], "type=drop,flow"),
        (["--node-name", "node-*"], "observer=node-*"),
        (["--interface", "eth0", "--traffic-direction", "ingress"], "ifname=eth0 direction=ingress"),
        # --not negates the next flag only; its values are grouped apart from the same flag's plain ones
        (["--not", "--port", "53", "--port", "80", "--not", "--namespace", "kube-system"],
         "not port=53 port=80 not namespace=kube-system"),
        (["--not", "--pod", "shop/a", "--not", "--pod", "shop/b"], "not pod=shop/a,shop/b"),
        # a trailing FILTER is top's language, ANDed after the flags
        (["--pod", "shop/checkout", "port=443", "not", "reason=NO_SOCKET"],
         "pod=shop/checkout port=443 not reason=NO_SOCKET"),
    ],
)  # fmt: skip
def test_filter_flags_are_the_filter_text_of_top(argv, text):
    assert filter_text(args(*argv)) == text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "http"], 'bad filter term "port=http": a port is a number 0-65535 or a range like 8000-8080; '
                             "see `flowscope top --help` for the filter language."),
        (["--verdict", "audit"], 'bad filter term "verdict=audit": verdict is one of forwarded, dropped; '
                                 "see `flowscope top --help` for the filter language."),
        (["--pod", "x", "--not"], "--not negates the filter flag after it; give one (or write `not TERM` in the "
                                  "FILTER)."),
        (["--not", "port=53"], "--not negates the filter flag after it; give one (or write `not TERM` in the "
                               "FILTER)."),
    ],
)  # fmt: skip
def test_a_bad_filter_flag_is_one_sentence(argv, message):
    with pytest.raises(UsageError) as raised:
        filter_text(args(*argv))
    assert str(raised.value) == message


def stamp(text: str):
    return codec.timestamp(pd.Timestamp(text).value)


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        ([], pb.GetFlowsRequest(number=20)),  # as hubble observe: the last 20
        (["--last", "5", "-f"], pb.GetFlowsRequest(number=5, follow=True)),
        (["--follow"], pb.GetFlowsRequest(follow=True)),
        (["--all"], pb.GetFlowsRequest()),
        (["--first", "3"], pb.GetFlowsRequest(number=3, first=True)),
        (["--pod", "shop/", "--not", "--verdict", "forwarded"],
         pb.GetFlowsRequest(number=20, allow=[pb.Filter(expression="pod=shop/ not verdict=forwarded")])),
        # --since/--until without --last: every record between them
        (["--since", "2025-03-01T12:00:00Z", "--until", "2025-03-01T13:00:10.5+01:00"],
         pb.GetFlowsRequest(since=stamp("2025-03-01T12:00:00Z"), until=stamp("2025-03-01T12:00:10.5Z"))),
        (["--since", "2025-03-01T12:00:00.123456789Z", "--last", "7"],
         pb.GetFlowsRequest(number=7, since=codec.timestamp(pd.Timestamp("2025-03-01T12:00:00Z").value + 123456789))),
        (["--until", "2025-03-01T12:00:00"], pb.GetFlowsRequest(until=stamp("2025-03-01T12:00:00Z"))),  # no zone: UTC
    ],
)  # fmt: skip
def test_flags_are_the_request(argv, want):
    assert _request(args(*argv)) == want


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--last", "3", "--all"], "choose one of --last, --first and --all."),
        (["--first", "3", "--last", "2"], "choose one of --last, --first and --all."),
        (["--first", "3", "-f"], "--first cannot be followed; use --last with --follow."),
        (["--since", "yesterday-ish"],
         "--since 'yesterday-ish' is not a time: give 5m, 1h30m or 2025-03-01T12:00:00Z."),
        (["--until", "5x"], "--until '5x' is not a time: give 5m, 1h30m or 2025-03-01T12:00:00Z."),
    ],
)  # fmt: skip
def test_bad_request_flags_are_one_sentence(argv, message):
    with pytest.raises(UsageError) as raised:
        _request(args(*argv))
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("text", "ago"),
    [
        ("5m", pd.Timedelta(minutes=5)),
        ("1h30m", pd.Timedelta(minutes=90)),
        ("1.5h", pd.Timedelta(minutes=90)),
        ("90s", pd.Timedelta(seconds=90)),
        ("2m30s", pd.Timedelta(seconds=150)),
        ("500ms", pd.Timedelta(milliseconds=500)),
        ("250us", pd.Timedelta(microseconds=250)),  # Go's duration units, as hubble takes them
        ("250µs", pd.Timedelta(microseconds=250)),
        ("1h2m3s4ms5us6ns", pd.Timedelta(hours=1, minutes=2, seconds=3, milliseconds=4, microseconds=5,
                                         nanoseconds=6)),
        ("2d", pd.Timedelta(days=2)),
    ],
)  # fmt: skip
def test_relative_times_are_that_long_ago(text, ago):
    before = pd.Timestamp.now(tz="UTC")
    got = parse_time(text, "--since")
    after = pd.Timestamp.now(tz="UTC")
    assert before - ago <= got <= after - ago
    assert str(got.tz) == "UTC"


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2025-03-01T12:00:00Z", "2025-03-01T12:00:00Z"),
        ("2025-03-01T14:00:00+02:00", "2025-03-01T12:00:00Z"),
        ("2025-03-01T12:00:00.5Z", "2025-03-01T12:00:00.5Z"),
        ("2025-03-01T12:00:00", "2025-03-01T12:00:00Z"),
        ("2025-03-01", "2025-03-01T00:00:00Z"),
    ],
)
def test_absolute_times_are_rfc3339_and_utc_without_a_zone(text, utc):
    assert parse_time(text, "--since") == pd.Timestamp(utc)


# ---- output ----------------------------------------------------------------------------------------------------

FLOW = {
    "time_start": pd.Timestamp("2025-03-01T12:00:06Z"), "time_end": pd.Timestamp("2025-03-01T12:00:08Z"),
    "node": "node-a", "ifname": "veth-checkout", "direction": "egress", "ip_version": 4, "protocol": "TCP",
    "src_ip": "10.204.0.10", "src_port": 43210, "dst_ip": "10.204.0.11", "dst_port": 8443, "packets": 130,
    "bytes": 130000, "drop_packets": 2, "drop_bytes": 2000, "drop_reason": "TCP_INVALID_SEQUENCE", "retransmits": 3,
    "resets": 0, "rtt_us": 1500, "src_namespace": "shop", "src_pod": "checkout-7d9f", "src_labels": {"app": "checkout"},
    "dst_namespace": "shop", "dst_pod": "payments-0",
}  # fmt: skip
EVENT = {
    "time": pd.Timestamp("2025-03-01T12:00:07.201Z"), "kind": "drop", "node": "node-a", "ip_version": 4,
    "protocol": "TCP", "src_ip": "10.204.0.1", "src_port": 39000, "dst_ip": "10.204.0.11", "dst_port": 9999,
    "bytes": 74, "drop_reason": "NO_SOCKET", "location": "tcp_v4_rcv", "dst_namespace": "shop",
    "dst_pod": "payments-0",
}  # fmt: skip


def responses() -> list[pb.GetFlowsResponse]:
    (record,) = codec.flow_records(flows_frame(pd.DataFrame([FLOW])))
    (event,) = codec.event_records(events_frame(pd.DataFrame([EVENT])))
    lost = pb.LostNotice(source="event_ring", count=2, time_start=stamp("2025-03-01T12:00:06Z"),
                         time_end=stamp("2025-03-01T12:00:08Z"))  # fmt: skip
    return [
        pb.GetFlowsResponse(flow=record, node="node-a"),
        pb.GetFlowsResponse(event=event, node="node-a"),
        pb.GetFlowsResponse(progress=pb.Progress(time=stamp("2025-03-01T12:00:08Z")), node="node-a"),
        pb.GetFlowsResponse(lost=lost, node="node-a"),
        pb.GetFlowsResponse(node_status=pb.NodeStatus(state=pb.NODE_UNAVAILABLE, nodes=["node-b"],
                                                      message="the stream ended")),
    ]  # fmt: skip


def printed(output: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    Printer(output, out, err).stream(responses())
    return out.getvalue(), err.getvalue()


def test_table_output():
    out, err = printed("table")
    assert out.splitlines() == [
        "TIME                     NODE         SOURCE                           DESTINATION                      "
        "TYPE       VERDICT   SUMMARY",
        "Mar 01 12:00:07.201      node-a       10.204.0.1:39000                 shop/payments-0:9999             "
        "drop       DROPPED   TCP; drop_reason NO_SOCKET; location tcp_v4_rcv",
        "Mar 01 12:00:08.000      node-a       shop/checkout-7d9f:43210         shop/payments-0:8443             "
        "flow       MIXED     TCP egress veth-checkout; 130 packets 130000 bytes; 2 dropped TCP_INVALID_SEQUENCE; "
        "retransmits 3; rtt 1500us",
    ]
    assert err.splitlines() == [
        "LOST 2 records at event_ring between 2025-03-01T12:00:06.000000000Z and 2025-03-01T12:00:08.000000000Z",
        "nodes unavailable: node-b the stream ended",
    ]


def test_compact_output():
    out, _err = printed("compact")
    assert out.splitlines() == [
        "Mar 01 12:00:07.201 [node-a]: 10.204.0.1:39000 -> shop/payments-0:9999 drop DROPPED (TCP; drop_reason "
        "NO_SOCKET; location tcp_v4_rcv)",
        "Mar 01 12:00:08.000 [node-a]: shop/checkout-7d9f:43210 -> shop/payments-0:8443 flow MIXED (TCP egress "
        "veth-checkout; 130 packets 130000 bytes; 2 dropped TCP_INVALID_SEQUENCE; retransmits 3; rtt 1500us)",
    ]


def test_json_output_is_each_response_as_protobuf_json_on_stdout():
    out, err = printed("json")
    assert err == ""
    assert [json.loads(line) for line in out.splitlines()] == [
        {"flow": {"time_start": "2025-03-01T12:00:06Z", "time_end": "2025-03-01T12:00:08Z", "node": "node-a",
                  "ifname": "veth-checkout", "direction": "egress", "ip_version": 4, "protocol": "TCP",
                  "src_ip": "10.204.0.10", "src_port": 43210, "dst_ip": "10.204.0.11", "dst_port": 8443,
                  "packets": "130", "bytes": "130000", "drop_packets": "2", "drop_bytes": "2000",
                  "drop_reason": "TCP_INVALID_SEQUENCE", "retransmits": "3", "resets": "0", "rtt_us": 1500,
                  "src": {"namespace": "shop", "pod": "checkout-7d9f", "labels": {"items": {"app": "checkout"}}},
                  "dst": {"namespace": "shop", "pod": "payments-0"}},
         "node": "node-a"},
        {"event": {"time": "2025-03-01T12:00:07.201Z", "kind": "drop", "node": "node-a", "ip_version": 4,
                   "protocol": "TCP", "src_ip": "10.204.0.1", "src_port": 39000, "dst_ip": "10.204.0.11",
                   "dst_port": 9999, "bytes": "74", "drop_reason": "NO_SOCKET", "location": "tcp_v4_rcv",
                   "dst": {"namespace": "shop", "pod": "payments-0"}},
         "node": "node-a"},
        {"lost": {"source": "event_ring", "count": "2", "time_start": "2025-03-01T12:00:06Z",
                  "time_end": "2025-03-01T12:00:08Z"},
         "node": "node-a"},
        {"node_status": {"state": "NODE_UNAVAILABLE", "nodes": ["node-b"], "message": "the stream ended"}},
    ]  # fmt: skip


def test_jsonl_output_is_the_record_lines_and_lost_notices():
    out, err = printed("jsonl")
    assert err == "nodes unavailable: node-b the stream ended\n"
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["type"] for line in lines] == ["flow", "event", "lost"]
    assert {k: lines[0][k] for k in ("time_end", "src_pod", "dst_port", "packets", "drop_packets", "src_labels")} == {
        "time_end": "2025-03-01T12:00:08.000000000Z", "src_pod": "checkout-7d9f", "dst_port": 8443, "packets": 130,
        "drop_packets": 2, "src_labels": {"app": "checkout"},
    }  # fmt: skip
    assert (lines[1]["kind"], lines[1]["drop_reason"], lines[1]["location"]) == ("drop", "NO_SOCKET", "tcp_v4_rcv")
    assert lines[2] == {"type": "lost", "node": "node-a", "source": "event_ring", "count": 2,
                        "time_start": "2025-03-01T12:00:06.000000000Z",
                        "time_end": "2025-03-01T12:00:08.000000000Z"}  # fmt: skip

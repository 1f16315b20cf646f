"""The own API's codec: a flow or event frame survives encode -> decode exactly (values, nulls, dtypes),
with every column filled, every column null, and label maps that are empty (known to have none), non-empty
or unknown (null) kept apart."""

from __future__ import annotations

from typing import Any

import pandas as pd

from flowscope.proto import codec
from flowscope.proto.flowscope.v1 import flowscope_pb2 as pb
from flowscope.schema import EVENT_COLUMNS, FLOW_COLUMNS, UTC_TIME, events_frame, flows_frame

T0 = pd.Timestamp("2026-11-26T10:00:00.000000001Z")
T1 = pd.Timestamp("2026-11-26T10:00:01.999999999Z")


def identity(side: str, labels: dict[str, str] | None) -> dict[str, Any]:
    """Every identity column of one side with a non-default value."""
    return {
        f"{side}_namespace": f"{side}-ns",
        f"{side}_pod": f"{side}-pod-7d9f",
        f"{side}_workload": f"{side}-deploy",
        f"{side}_workload_kind": "Deployment",
        f"{side}_container": f"{side}-container",
        f"{side}_pid": 4_000_001 if side == "src" else 2**40 + 3,
        f"{side}_comm": f"{side}-comm",
        f"{side}_node": f"{side}-node",
        f"{side}_labels": labels,
        f"{side}_identity_source": "cgroup" if side == "src" else "ip",
    }


def null_row(columns: dict[str, str]) -> dict[str, Any]:
    return dict.fromkeys(columns)


def only_labels(labels_src: dict[str, str] | None, labels_dst: dict[str, str] | None) -> dict[str, Any]:
    """A row whose only known columns are the label maps (identity sides with no other field)."""
    return {"src_labels": labels_src, "dst_labels": labels_dst}


FULL_FLOW: dict[str, Any] = {
    "time_start": T0,
    "time_end": T1,
    "node": "node-a",
    "ifname": "veth1234",
    "ifindex": 4_000_000_000,
    "netns": 4026531993,
    "direction": "egress",
    "ip_version": 6,
    "protocol": "ICMPv6",
    "src_ip": "fd00::1",
    "src_port": 65535,
    "dst_ip": "fd00::2",
    "dst_port": 1,
    "icmp_type": 128,
    "icmp_code": 255,
    "packets": 2**64 - 1,
    "bytes": 2**63 + 7,
    "tcp_flags": 0x1FF,
    "drop_packets": 3,
    "drop_bytes": 270,
    "drop_reason": "NO_SOCKET",
    "retransmits": 5,
    "resets": 6,
    "rtt_us": 4_294_967_295,
    "cgroup_id": 2**63 + 11,
    **identity("src", {}),
    **identity("dst", {"app": "shop", "k8s.io/tier": "front end", "é": "ü"}),
}

FULL_EVENT: dict[str, Any] = {
    "time": T1,
    "kind": "drop",
    "node": "node-b",
    "ifname": "eth0",
    "ifindex": 7,
    "netns": 4026532001,
    "ip_version": 4,
    "protocol": "TCP",
    "src_ip": "10.0.0.2",
    "src_port": 40000,
    "dst_ip": "10.0.0.1",
    "dst_port": 443,
    "bytes": 1514,
    "drop_reason": "TCP_INVALID_SEQUENCE",
    "location": "tcp_validate_incoming",
    "state": "ESTABLISHED",
    "reset_reason": "NOT_SPECIFIED",
    "duration_us": 2**60 + 1,
    "pid": 123_456,
    "comm": "curl",
    "cgroup_id": 9_876_543_210,
    **identity("src", {"app": "api"}),
    **identity("dst", {}),
}


def _frame(rows: list[dict[str, Any]], columns: dict[str, str], build) -> pd.DataFrame:
    data = {name: [row.get(name) for row in rows] for name in columns}
    for name, dtype in columns.items():
        if dtype == "object":
            data[name] = pd.array(data[name], dtype=object)
        elif dtype != UTC_TIME:
            data[name] = pd.array(data[name], dtype=dtype)
    return build(pd.DataFrame(data))


def test_every_flow_column_is_in_the_full_row():
    assert set(FULL_FLOW) == set(FLOW_COLUMNS)
    assert set(FULL_EVENT) == set(EVENT_COLUMNS)


def test_a_flow_frame_survives_the_round_trip_exactly():
    rows = [FULL_FLOW, null_row(FLOW_COLUMNS), only_labels({}, {"a": "b"}), only_labels({"x": "y"}, {})]
    frame = _frame(rows, FLOW_COLUMNS, flows_frame)
    assert list(frame.dtypes.astype(str)) == list(FLOW_COLUMNS.values())
    back = codec.flows_from(pb.FlowRecord.FromString(data) for data in codec.encoded_flows(frame))
    pd.testing.assert_frame_equal(back, frame, check_dtype=True, check_exact=True)
    # The label maps exactly: {} is "known to have none", None is "unknown".
    assert back["src_labels"].tolist() == [{}, None, {}, {"x": "y"}]
    assert back["dst_labels"].tolist() == [FULL_FLOW["dst_labels"], None, {"a": "b"}, {}]
    assert back.loc[0, "packets"] == 2**64 - 1
    assert back.loc[0, "tcp_flags"] == 0x1FF
    assert back.loc[1].isna().all()


def test_an_event_frame_survives_the_round_trip_exactly():
    rows = [FULL_EVENT, null_row(EVENT_COLUMNS), only_labels({}, None)]
    frame = _frame(rows, EVENT_COLUMNS, events_frame)
    assert list(frame.dtypes.astype(str)) == list(EVENT_COLUMNS.values())
    back = codec.events_from(pb.EventRecord.FromString(data) for data in codec.encoded_events(frame))
    pd.testing.assert_frame_equal(back, frame, check_dtype=True, check_exact=True)
    assert back["src_labels"].tolist() == [{"app": "api"}, None, {}]
    assert back["dst_labels"].tolist() == [{}, None, None]
    assert back.loc[1].isna().all()


def test_an_empty_label_map_is_present_on_the_wire():
    frame = _frame([only_labels({}, None)], FLOW_COLUMNS, flows_frame)
    (record,) = codec.flow_records(frame)
    assert (record.HasField("src"), record.src.HasField("labels"), dict(record.src.labels.items)) == (True, True, {})
    assert record.HasField("dst") is False
    assert codec.row_of(record) == {"src_labels": {}}

"""The decoders of the kernel's flow records (flowscope/kernel_records.py), on hand-built map entries."""

import numpy as np
import pandas as pd

from flowscope.decode.batch import build_batch
from flowscope.decode.context import AggregationContext
from flowscope.decode.flows import addresses_to_text, flows_from_map, merge_map_entries, spills_as_map_entries
from flowscope.kernel.catalog import TC_FLOWS
from flowscope.kernel.layouts import (
    COUNTER_EVENT_SENT_BASE,
    EVENT,
    EVENT_KIND_MAX,
    FLOW_KEY,
    FLOW_STATS,
    KEY_NO_PORTS,
    KIND_FLOW_SPILL,
)
from flowscope.readers.drain import KernelDrain
from tests.unit.kernel_entries import OFFSET_NS, address, counters, flow_stats

IFNAMES = {2: "eth0", 7: "veth7"}


def entry(src="", dst="", sport=0, dport=0, proto=17, version=4, ifindex=2, direction=1, flags=0):
    key = np.zeros(1, dtype=FLOW_KEY)
    if version:
        key["saddr"], key["daddr"] = np.void(address(src)), np.void(address(dst))
    key["sport"], key["dport"], key["proto"], key["ip_version"] = sport, dport, proto, version
    key["ifindex"], key["direction"], key["flags"] = ifindex, direction, flags
    return key


def spill(key: np.ndarray, length: int, ts: int, tcp_flags=0, cgroup=0, kind=KIND_FLOW_SPILL) -> np.ndarray:
    event = np.zeros(1, dtype=EVENT)
    for name in ("saddr", "daddr", "sport", "dport", "ifindex", "proto", "direction", "ip_version"):
        event[name] = key[name]
    event["key_flags"] = key["flags"]
    event["kind"], event["value"], event["ts_ns"], event["tcp_flags"], event["cgroup_id"] = (
        kind, length, ts, tcp_flags, cgroup,
    )  # fmt: skip
    return event


def decode(keys: list[np.ndarray], stats: list[np.ndarray]) -> pd.DataFrame:
    return flows_from_map(np.concatenate(keys), np.concatenate(stats), OFFSET_NS, IFNAMES, "node-a")


def row(frame: pd.DataFrame, index: int, *columns: str) -> list:
    return [None if pd.isna(frame.loc[index, c]) else frame.loc[index, c] for c in columns]


def test_addresses_are_text_in_their_own_family_and_none_when_not_ip() -> None:
    keys = np.concatenate(
        [
            entry("10.0.0.1", "192.168.7.254"),
            entry("fd00::2", "2001:db8::ff00:42:8329", version=6),
            entry(version=0),
            entry("10.0.0.1", "192.168.7.254"),
            entry("::ffff:10.0.0.1", "::1", version=6),  # a v4-mapped address seen in an IPv6 header stays IPv6
        ]
    )
    assert addresses_to_text(keys["saddr"], keys["ip_version"]).tolist() == [
        "10.0.0.1",
        "fd00::2",
        None,
        "10.0.0.1",
        "::ffff:10.0.0.1",
    ]
    assert addresses_to_text(keys["daddr"], keys["ip_version"]).tolist() == [
        "192.168.7.254",
        "2001:db8::ff00:42:8329",
        None,
        "192.168.7.254",
        "::1",
    ]
    assert addresses_to_text(keys["saddr"][:0], keys["ip_version"][:0]).tolist() == []


def test_udp_and_tcp_rows_carry_ports_counters_times_and_the_interface() -> None:
    frame = decode(
        [
            entry("10.0.0.1", "10.0.0.2", 40000, 53, ifindex=7, direction=1),
            entry("fd00::2", "fd00::1", 443, 51000, proto=6, version=6, direction=0),
        ],
        [flow_stats(3, 222, first=5, last=9, cgroup=4242), flow_stats(10, 15000, tcp_flags=0x1B)],
    )
    columns = ("ifname", "direction", "ip_version", "protocol", "src_ip", "src_port", "dst_ip", "dst_port")
    assert row(frame, 0, *columns) == ["veth7", "egress", 4, "UDP", "10.0.0.1", 40000, "10.0.0.2", 53]
    assert row(frame, 1, *columns) == ["eth0", "ingress", 6, "TCP", "fd00::2", 443, "fd00::1", 51000]
    assert row(frame, 0, "packets", "bytes", "tcp_flags", "cgroup_id", "icmp_type", "icmp_code") == [
        3, 222, None, 4242, None, None,
    ]  # fmt: skip
    assert row(frame, 1, "packets", "bytes", "tcp_flags", "cgroup_id") == [10, 15000, 0x1B, None]
    assert frame.loc[0, "time_start"] == pd.Timestamp(OFFSET_NS + 5, unit="ns", tz="UTC")
    assert frame.loc[0, "time_end"] == pd.Timestamp(OFFSET_NS + 9, unit="ns", tz="UTC")
    assert frame.loc[0, "node"] == "node-a"


def test_icmp_rows_carry_type_and_code_and_no_ports() -> None:
    frame = decode(
        [
            entry("10.0.0.1", "10.0.0.2", 8, 0, proto=1),
            entry("10.0.0.2", "10.0.0.1", 3, 13, proto=1, direction=0),
            entry("fd00::1", "fd00::2", 128, 0, proto=58, version=6),
            entry("fe80::1", "ff02::16", 143, 0, proto=58, version=6),
        ],
        [flow_stats()] * 4,
    )
    columns = ("protocol", "icmp_type", "icmp_code", "src_port", "dst_port")
    assert [row(frame, i, *columns) for i in range(4)] == [
        ["ICMP", 8, 0, None, None],
        ["ICMP", 3, 13, None, None],
        ["ICMPv6", 128, 0, None, None],
        ["ICMPv6", 143, 0, None, None],
    ]


def test_ports_are_null_where_there_are_none() -> None:
    frame = decode(
        [
            entry("10.0.0.1", "10.0.0.2", proto=17, flags=KEY_NO_PORTS),  # a non-first fragment of UDP
            entry("fd00::1", "fd00::2", proto=6, version=6, flags=KEY_NO_PORTS),  # a truncated TCP header
            entry("10.0.0.1", "10.0.0.2", proto=47),  # GRE: no ports
            entry("10.0.0.1", "10.0.0.2", proto=1, flags=KEY_NO_PORTS),  # ICMP without its header
            entry(version=0, proto=0, ifindex=7, direction=0),  # not IP (ARP)
            entry("10.0.0.1", "10.0.0.2", 0, 0, proto=17),  # UDP port 0 is a port (read from the header)
        ],
        [flow_stats(packets=p) for p in (1, 2, 3, 4, 5, 6)],
    )
    columns = ("protocol", "ip_version", "src_ip", "src_port", "dst_port", "icmp_type", "icmp_code", "packets")
    assert [row(frame, i, *columns) for i in range(6)] == [
        ["UDP", 4, "10.0.0.1", None, None, None, None, 1],
        ["TCP", 6, "fd00::1", None, None, None, None, 2],
        ["47", 4, "10.0.0.1", None, None, None, None, 3],
        ["ICMP", 4, "10.0.0.1", None, None, None, None, 4],
        [None, None, None, None, None, None, None, 5],
        ["UDP", 4, "10.0.0.1", 0, 0, None, None, 6],
    ]
    assert row(frame, 4, "ifname", "direction", "dst_ip") == ["veth7", "ingress", None]


def test_an_interface_that_is_gone_has_no_name() -> None:
    frame = decode([entry("10.0.0.1", "10.0.0.2", 1, 2, ifindex=99)], [flow_stats()])
    assert row(frame, 0, "ifname", "ifindex") == [None, 99]


def test_no_entries_give_an_empty_frame_with_the_schema() -> None:
    frame = flows_from_map(np.zeros(0, FLOW_KEY), np.zeros(0, FLOW_STATS), OFFSET_NS, IFNAMES, "node-a")
    assert frame.empty and "src_port" in frame.columns and str(frame["packets"].dtype) == "UInt64"


def test_spills_fold_into_one_entry_per_flow() -> None:
    dns = entry("10.0.0.1", "10.0.0.2", 40000, 53)
    web = entry("fd00::1", "fd00::2", 51000, 443, proto=6, version=6)
    fragment = entry("10.0.0.1", "10.0.0.2", proto=17, flags=KEY_NO_PORTS)
    events = np.concatenate(
        [
            spill(dns, 80, ts=30),
            spill(web, 1514, ts=12, tcp_flags=0x02, cgroup=77),
            spill(dns, 120, ts=25),
            spill(web, 66, ts=40, tcp_flags=0x10, cgroup=77),
            spill(dns, 999, ts=1, kind=4),  # a drop event: not a spill, not folded
            spill(fragment, 1500, ts=50),
            spill(dns, 60, ts=35),
        ]
    )
    keys, stats = spills_as_map_entries(events)
    frame = flows_from_map(keys, stats, OFFSET_NS, IFNAMES, "node-a").sort_values("bytes", ignore_index=True)
    columns = ("src_ip", "src_port", "dst_port", "packets", "bytes", "tcp_flags", "cgroup_id")
    assert [row(frame, i, *columns) for i in range(3)] == [
        ["10.0.0.1", 40000, 53, 3, 260, None, None],
        ["10.0.0.1", None, None, 1, 1500, None, None],
        ["fd00::1", 51000, 443, 2, 1580, 0x12, 77],
    ]
    assert frame.loc[0, "time_start"] == pd.Timestamp(OFFSET_NS + 25, unit="ns", tz="UTC")
    assert frame.loc[0, "time_end"] == pd.Timestamp(OFFSET_NS + 35, unit="ns", tz="UTC")


def test_no_spills_give_no_entries() -> None:
    keys, stats = spills_as_map_entries(np.zeros(0, EVENT))
    assert len(keys) == 0 and len(stats) == 0 and keys.dtype == FLOW_KEY and stats.dtype == FLOW_STATS


def test_merging_sums_shared_keys_and_keeps_the_others() -> None:
    dns = entry("10.0.0.1", "10.0.0.2", 40000, 53)
    web = entry("10.0.0.1", "10.0.0.2", 51000, 443, proto=6)
    other = entry("10.0.0.3", "10.0.0.2", 51001, 443, proto=6)
    keys, stats = merge_map_entries(
        np.concatenate([dns, web]),
        np.concatenate([flow_stats(5, 500, 10, 50, cgroup=3), flow_stats(2, 120, 7, 8, tcp_flags=0x02)]),
        np.concatenate([web, other]),
        np.concatenate([flow_stats(1, 60, 3, 60, tcp_flags=0x11, cgroup=9), flow_stats(1, 54, 4, 4)]),
    )
    merged = {(int(k["sport"]), int(k["proto"])): s for k, s in zip(keys, stats, strict=True)}
    assert len(keys) == 3
    assert merged[(40000, 17)].tolist() == (5, 500, 10, 50, 3, 0)
    assert merged[(51000, 6)].tolist() == (3, 180, 3, 60, 9, 0x13)
    assert merged[(51001, 6)].tolist() == (1, 54, 4, 4, 0, 0)


def test_byte_sums_stay_exact_beyond_float_precision() -> None:
    flow = entry("10.0.0.1", "10.0.0.2", 1, 2)
    big = 2**53 + 1  # a float64 sum would round this
    _keys, stats = merge_map_entries(flow, flow_stats(1, big), flow, flow_stats(1, big))
    assert int(stats["bytes"][0]) == 2 * big
    events = np.concatenate([spill(flow, 2**52 + 1, ts=1)] * 3)
    _keys, folded = spills_as_map_entries(events)
    assert int(folded["bytes"][0]) == 3 * (2**52 + 1)


def test_merging_nothing_returns_the_map_entries_unchanged() -> None:
    flow = entry("10.0.0.1", "10.0.0.2", 1, 2)
    keys, stats = merge_map_entries(flow, flow_stats(4, 400), np.zeros(0, FLOW_KEY), np.zeros(0, FLOW_STATS))
    assert keys.tolist() == flow.tolist() and stats["packets"].tolist() == [4]


def test_events_dropped_in_user_space_count_as_lost_and_keep_the_balance() -> None:
    # 5 packets: 2 in the map, 3 spilled; the kernel sent the 3 spills, the reader kept 2 and dropped 1.
    flow = entry("10.0.0.1", "10.0.0.2", 1000, 53)
    drained_counters = counters(tc_packets=5)
    drained_counters[COUNTER_EVENT_SENT_BASE + KIND_FLOW_SPILL] = 3
    dropped = np.zeros(EVENT_KIND_MAX, dtype=np.int64)
    dropped[KIND_FLOW_SPILL] = 1
    events = np.concatenate([spill(flow, 100, ts=30), spill(flow, 100, ts=40)])
    drain = KernelDrain(0, {"flows": (flow, flow_stats(2, 200))}, events, drained_counters, 0, dropped)
    context = AggregationContext(node="node-a", offset_ns=OFFSET_NS, ifnames=IFNAMES, active=[TC_FLOWS])
    window = (pd.Timestamp("2027-01-15T08:00:00Z"), pd.Timestamp("2027-01-15T08:00:01Z"))
    batch = build_batch(drain, context, window)
    assert batch.coverage.to_dict()["flow_map"] == {"produced": 5, "delivered": 4, "lost": 1}
    assert batch.coverage.to_dict()["events:flow_spill"] == {"produced": 3, "delivered": 2, "lost": 1}
    assert batch.coverage.unbalanced() == []
    assert batch.flows.loc[0, "packets"] == 4 and batch.flows.loc[0, "bytes"] == 400

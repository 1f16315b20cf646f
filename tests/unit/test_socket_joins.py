"""Drops, TCP counters and connection events: decoded from their kernel records and joined into the flow
rows by the aggregator, as the live source runs it (no BCC, no root)."""

import ipaddress

import numpy as np
import pandas as pd
import pytest

from flowscope.decode.batch import build_batch
from flowscope.decode.context import AggregationContext
from flowscope.kernel.catalog import SKB_DROP, SOCK_STATE, TC_FLOWS, TCP_EVENTS
from flowscope.kernel.layouts import (
    COUNTER_EVENT_SENT_BASE,
    DROP_KEY,
    DROP_STATS,
    EVENT,
    FLOW_KEY,
    FLOW_STATS,
    KEY_NO_PORTS,
    TCP_KEY,
    TCP_STATS,
)
from flowscope.kernel.names import UNKNOWN, KernelNames
from flowscope.readers.drain import KernelDrain
from flowscope.schema import FLOW_COLUMNS
from tests.unit.kernel_entries import OFFSET_NS, WINDOW, address, counters, flow_key, flow_stats

HERE, ELSEWHERE = 4026531840, 4026532999  # network namespace inodes: the agent's, a pod's
INGRESS, EGRESS = 0, 1
TCP, UDP = 6, 17
NAMES = KernelNames(
    drop_reasons={2: "NOT_SPECIFIED", 3: "NO_SOCKET", 12: "NETFILTER_DROP"},
    tcp_states={1: "ESTABLISHED", 2: "SYN_SENT", 7: "CLOSE", 9: "LAST_ACK"},
    reset_reasons={1: "NO_SOCKET"},
)
SYMBOLS = {0xFFFFFFFF81F2AF98: "nf_hook_slow+0x48", 0xFFFFFFFF81E0104C: "__udp4_lib_rcv+0x4bc"}


def flow_entry(key: np.ndarray, packets: int, nbytes: int, first: int, last: int):
    return key, flow_stats(packets, nbytes, first, last)


def drop_entry(key: np.ndarray, reason: int, packets: int, nbytes: int, first: int, last: int, netns: int = HERE):
    drop_key = np.zeros(1, dtype=DROP_KEY)
    drop_key["flow"], drop_key["netns"], drop_key["reason"] = key, netns, reason
    stats = np.zeros(1, dtype=DROP_STATS)
    stats["packets"], stats["bytes"], stats["first_seen_ns"], stats["last_seen_ns"] = packets, nbytes, first, last
    return drop_key, stats


def tcp_entry(key, retransmits=0, resets=0, srtt_us=0, samples=0, first=1, last=1, netns=HERE):
    tcp_key = np.zeros(1, dtype=TCP_KEY)
    tcp_key["flow"], tcp_key["netns"] = key, netns
    stats = np.zeros(1, dtype=TCP_STATS)
    stats["retransmits"], stats["resets"], stats["srtt_us"], stats["rtt_samples"] = (
        retransmits,
        resets,
        srtt_us,
        samples,
    )
    stats["srtt_sum_us"] = srtt_us * samples
    stats["first_seen_ns"], stats["last_seen_ns"] = first, last
    return tcp_key, stats


def join(*entries: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([e[0] for e in entries]), np.concatenate([e[1] for e in entries])


def context(*families) -> AggregationContext:
    return AggregationContext(
        node="node-a",
        offset_ns=OFFSET_NS,
        ifnames={2: "veth0", 3: "eth0"},
        active=list(families),
        symbolize=SYMBOLS.get,
        netns=HERE,
        extra={"kernel_names": NAMES},
    )


def batch(maps, events=None, families=(TC_FLOWS, SKB_DROP, TCP_EVENTS, SOCK_STATE), **counts):
    empty = {"flows": (FLOW_KEY, FLOW_STATS), "drops": (DROP_KEY, DROP_STATS), "tcp": (TCP_KEY, TCP_STATS)}
    full = {name: maps.get(name, (np.zeros(0, k), np.zeros(0, v))) for name, (k, v) in empty.items()}
    drain = KernelDrain(0, full, events if events is not None else np.zeros(0, EVENT), counters(**counts))
    return build_batch(drain, context(*families), WINDOW)


def ordered(flows: pd.DataFrame) -> pd.DataFrame:
    return flows.sort_values(["src_ip", "src_port", "dst_port", "ifindex", "drop_reason"], na_position="last")


def plain(frame: pd.DataFrame, columns: list[str]) -> list[list[object]]:
    """Rows as lists, nulls as None."""
    return frame[columns].astype(object).where(frame[columns].notna(), None).values.tolist()


COLUMNS = ["ifname", "direction", "src_ip", "src_port", "dst_ip", "dst_port", "packets", "drop_packets", "drop_reason"]


# ---- drops ---------------------------------------------------------------------------------------------


def test_a_drop_in_this_namespace_joins_the_flow_row_of_its_interface_and_direction() -> None:
    out = flow_key("10.0.0.1", 5000, "10.0.0.2", 9, ifindex=2, direction=EGRESS)
    seen_in = flow_key("10.0.0.1", 5000, "10.0.0.2", 9, ifindex=3, direction=INGRESS)
    flows = join(flow_entry(out, 5, 500, 10, 20), flow_entry(seen_in, 5, 500, 11, 30))  # eth0's row is later
    drops = drop_entry(out, 3, 4, 400, 12, 19)
    result = batch({"flows": flows, "drops": drops}, tc_packets=10, drops=4).flows
    assert plain(ordered(result), COLUMNS) == [
        ["veth0", "egress", "10.0.0.1", 5000, "10.0.0.2", 9, 5, 4, "NO_SOCKET"],
        ["eth0", "ingress", "10.0.0.1", 5000, "10.0.0.2", 9, 5, 0, None],
    ]
    assert result["drop_bytes"].sum() == 400


def test_a_drop_in_another_namespace_joins_the_latest_row_of_its_5_tuple() -> None:
    out = flow_key("10.0.0.1", 5000, "10.0.0.2", 9, ifindex=2, direction=EGRESS)
    later = flow_key("10.0.0.1", 5000, "10.0.0.2", 9, ifindex=3, direction=INGRESS)
    flows = join(flow_entry(out, 5, 500, 10, 20), flow_entry(later, 5, 500, 11, 30))
    # ifindex 2 in the pod's namespace is not this namespace's veth0.
    drops = drop_entry(
        flow_key("10.0.0.1", 5000, "10.0.0.2", 9, ifindex=2, direction=INGRESS), 3, 5, 500, 12, 19, ELSEWHERE
    )
    result = ordered(batch({"flows": flows, "drops": drops}, tc_packets=10, drops=5).flows)
    assert plain(result, COLUMNS) == [
        ["veth0", "egress", "10.0.0.1", 5000, "10.0.0.2", 9, 5, 0, None],
        ["eth0", "ingress", "10.0.0.1", 5000, "10.0.0.2", 9, 5, 5, "NO_SOCKET"],
    ]


def test_a_drop_without_a_flow_becomes_a_row_of_its_own() -> None:
    here = drop_entry(flow_key("10.0.0.5", 53, "10.0.0.6", 4000, ifindex=3, direction=INGRESS), 12, 2, 180, 40, 50)
    there = drop_entry(flow_key("fd00::1", 1, "fd00::2", 2, ifindex=2, direction=INGRESS), 3, 1, 90, 60, 60, ELSEWHERE)
    result = ordered(batch({"drops": join(here, there)}, drops=3).flows)
    assert plain(result, [*COLUMNS, "ifindex", "bytes", "drop_bytes"]) == [
        ["eth0", "ingress", "10.0.0.5", 53, "10.0.0.6", 4000, 0, 2, "NETFILTER_DROP", 3, 0, 180],
        [None, "ingress", "fd00::1", 1, "fd00::2", 2, 0, 1, "NO_SOCKET", 2, 0, 90],  # no name in another netns
    ]
    first = result.iloc[0]
    assert first["time_start"] == pd.Timestamp(OFFSET_NS + 40, unit="ns", tz="UTC")
    assert first["time_end"] == pd.Timestamp(OFFSET_NS + 50, unit="ns", tz="UTC")
    assert first["node"] == "node-a" and pd.isna(first["tcp_flags"])
    assert first["retransmits"] == 0 and pd.isna(first["rtt_us"])


def test_without_a_packet_probe_new_rows_have_null_packets() -> None:
    drops = drop_entry(flow_key("10.0.0.5", 53, "10.0.0.6", 4000), 3, 2, 180, 40, 50)
    result = batch({"drops": drops}, families=(SKB_DROP,), drops=2).flows
    assert result["packets"].isna().all() and result["bytes"].isna().all()
    assert result["drop_packets"].tolist() == [2]
    assert result["retransmits"].isna().all()  # the TCP probe did not run: unknown, not 0


def test_a_second_drop_reason_of_a_flow_becomes_its_own_row_with_no_packets() -> None:
    key = flow_key("10.0.0.1", 5000, "10.0.0.2", 80, proto=TCP)
    flows = flow_entry(key, 9, 900, 10, 20)
    flows[1]["tcp_flags"] = 0x18
    drops = join(drop_entry(key, 3, 1, 60, 11, 11), drop_entry(key, 12, 4, 240, 12, 15))
    tcp = tcp_entry(
        flow_key("10.0.0.1", 5000, "10.0.0.2", 80, proto=TCP, ifindex=0), retransmits=2, srtt_us=80, samples=1
    )
    result = ordered(batch({"flows": flows, "drops": drops, "tcp": tcp}, tc_packets=9, drops=5, tcp_counts=2).flows)
    columns = ["packets", "bytes", "tcp_flags", "drop_packets", "drop_bytes", "drop_reason", "retransmits", "rtt_us"]
    assert plain(result, columns) == [
        [9, 900, 0x18, 4, 240, "NETFILTER_DROP", 2, 80],  # the reason with the most drops stays on the flow
        [0, 0, None, 1, 60, "NO_SOCKET", 0, None],
    ]
    assert set(result["ifname"]) == {"veth0"} and set(result["time_end"]) == {
        pd.Timestamp(OFFSET_NS + 20, unit="ns", tz="UTC")
    }


def test_drops_of_non_ip_packets_join_their_interfaces_non_ip_row() -> None:
    arp = np.zeros(1, dtype=FLOW_KEY)
    arp["ifindex"], arp["direction"] = 2, INGRESS
    flows = flow_entry(arp, 3, 180, 1, 2)
    other = flow_entry(flow_key("10.0.0.1", 1, "10.0.0.2", 2), 1, 60, 1, 5)
    drops = drop_entry(arp.copy(), 2, 1, 60, 2, 2)
    result = batch({"flows": join(flows, other), "drops": drops}, tc_packets=4, drops=1).flows
    non_ip = result[result["ip_version"].isna()]
    assert non_ip[["ifname", "packets", "drop_packets", "drop_reason"]].values.tolist() == [
        ["veth0", 3, 1, "NOT_SPECIFIED"]
    ]


def test_drop_accounting() -> None:
    drops = drop_entry(flow_key("10.0.0.5", 53, "10.0.0.6", 4000), 3, 7, 420, 1, 2)
    coverage = batch({"drops": drops}, drops=9, drop_map_full=2, drop_events_sampled_out=6).coverage.to_dict()
    assert coverage["drop_map"] == {"produced": 9, "delivered": 7, "lost": 2}
    assert coverage["drop_event_sampling"] == {"produced": 9, "delivered": 3, "lost": 6}


def test_drops_neither_in_the_map_nor_counted_lost_leave_the_drop_map_unbalanced() -> None:
    # The kernel saw 10 drops; the map holds 7 and 2 found it full: one is unaccounted for, and says so.
    drops = drop_entry(flow_key("10.0.0.5", 53, "10.0.0.6", 4000), 3, 7, 420, 1, 2)
    coverage = batch({"drops": drops}, drops=10, drop_map_full=2).coverage
    assert coverage.to_dict()["drop_map"] == {"produced": 10, "delivered": 7, "lost": 2}
    assert "drop_map" in coverage.unbalanced()


# ---- TCP counters -----------------------------------------------------------------------------------------


def test_retransmits_rtt_and_resets_join_the_direction_they_belong_to() -> None:
    data = flow_key("10.0.0.1", 5000, "10.0.0.2", 80, proto=TCP)
    acks = flow_key("10.0.0.2", 80, "10.0.0.1", 5000, proto=TCP, direction=INGRESS)
    flows = join(flow_entry(data, 10, 15000, 1, 9), flow_entry(acks, 8, 480, 1, 9))
    unknown_if = flow_key("10.0.0.1", 5000, "10.0.0.2", 80, proto=TCP, ifindex=0)
    rst = flow_key("10.0.0.2", 80, "10.0.0.1", 5000, proto=TCP, ifindex=0, direction=INGRESS)
    tcp = join(
        tcp_entry(unknown_if, retransmits=3, srtt_us=120, samples=2, last=8),
        tcp_entry(unknown_if, srtt_us=95, samples=1, last=9, netns=ELSEWHERE),  # the same 5-tuple seen elsewhere, later
        tcp_entry(rst, resets=1),
    )
    result = ordered(batch({"flows": flows, "tcp": tcp}, tc_packets=18, tcp_counts=4).flows)
    assert plain(result, ["src_port", "packets", "retransmits", "resets", "rtt_us"]) == [
        [5000, 10, 3, 0, 95],  # the latest RTT sample of the flow
        [80, 8, 0, 1, None],
    ]


def test_tcp_counters_without_a_flow_row_and_accounting() -> None:
    rst = flow_key("10.0.0.2", 7, "10.0.0.1", 40000, proto=TCP, ifindex=0)
    result = batch({"tcp": tcp_entry(rst, resets=1, first=5, last=5)}, tcp_counts=2, tcp_map_full=1, rtt_map_full=3)
    assert list(result.flows.columns) == list(FLOW_COLUMNS)  # no helper column of the join leaks out
    row = result.flows.iloc[0]
    assert (row["src_port"], row["resets"], row["packets"], row["direction"]) == (7, 1, 0, "egress")
    assert pd.isna(row["ifindex"]) and pd.isna(row["ifname"])
    coverage = result.coverage.to_dict()
    assert coverage["tcp_map"] == {"produced": 2, "delivered": 1, "lost": 1}
    assert coverage["rtt_samples"] == {"produced": 3, "delivered": 0, "lost": 3}


# ---- events -------------------------------------------------------------------------------------------------


def event(kind: int, src: str, sport: int, dst: str, dport: int, proto: int = TCP, **fields) -> np.ndarray:
    record = np.zeros(1, dtype=EVENT)
    record["kind"], record["saddr"], record["daddr"] = kind, np.void(address(src)), np.void(address(dst))
    record["sport"], record["dport"], record["proto"] = sport, dport, proto
    record["ip_version"] = ipaddress.ip_address(src).version
    for name, value in fields.items():
        record[name] = value
    return record


def test_events_decode_with_the_kernels_names_owners_and_places() -> None:
    records = np.concatenate(
        [
            event(4, "10.0.0.1", 5000, "10.0.0.2", 9, UDP, ts_ns=5, reason=3, location=0xFFFFFFFF81E0104C,
                  value=142, ifindex=2, netns=HERE),
            event(4, "fd00::1", 5000, "fd00::2", 9, UDP, ts_ns=6, reason=12, location=0xFFFFFFFF81F2AF98,
                  value=98, ifindex=2, netns=ELSEWHERE),
            event(1, "10.0.0.1", 41000, "10.0.0.2", 80, ts_ns=7, pid=4242, comm=b"curl", cgroup_id=77,
                  old_state=2, new_state=1, netns=HERE),
            event(3, "10.0.0.1", 41000, "10.0.0.2", 80, ts_ns=8, pid=4242, comm=b"curl", cgroup_id=77,
                  old_state=9, new_state=7, value=1_500_000, netns=HERE),
            event(3, "10.0.0.1", 41001, "10.0.0.2", 80, ts_ns=9, old_state=1, new_state=7, netns=HERE),
            event(6, "10.0.0.2", 7, "10.0.0.1", 40000, ts_ns=10, reason=1, new_state=0, netns=HERE),
            event(6, "10.0.0.2", 80, "10.0.0.1", 40001, ts_ns=11, reason=UNKNOWN, new_state=1, netns=HERE),
            event(5, "10.0.0.1", 41000, "10.0.0.2", 80, ts_ns=12, new_state=1, value=2, netns=HERE),
            event(4, "10.0.0.1", 0, "10.0.0.2", 0, UDP, ts_ns=13, reason=2, key_flags=KEY_NO_PORTS, netns=HERE),
        ]
    )  # fmt: skip
    sent = counters()
    for kind in (1, 3, 4, 5, 6):
        sent[COUNTER_EVENT_SENT_BASE + kind] = int((records["kind"] == kind).sum())
    drain = KernelDrain(0, {}, records, sent)
    events = build_batch(drain, context(SKB_DROP, TCP_EVENTS, SOCK_STATE), WINDOW).events
    columns = ["kind", "ifname", "src_ip", "src_port", "dst_port", "bytes", "drop_reason", "location", "state",
               "duration_us", "pid", "comm", "cgroup_id", "reset_reason"]  # fmt: skip
    assert plain(events, columns) == [
        ["drop", "veth0", "10.0.0.1", 5000, 9, 142, "NO_SOCKET", "__udp4_lib_rcv+0x4bc", *[None] * 6],
        ["drop", None, "fd00::1", 5000, 9, 98, "NETFILTER_DROP", "nf_hook_slow+0x48", *[None] * 6],
        ["connect", None, "10.0.0.1", 41000, 80, None, None, None, None, None, 4242, "curl", 77, None],
        ["close", None, "10.0.0.1", 41000, 80, None, None, None, "LAST_ACK", 1500, 4242, "curl", 77, None],
        ["close", None, "10.0.0.1", 41001, 80, None, None, None, "ESTABLISHED", None, None, None, None, None],
        ["reset", None, "10.0.0.2", 7, 40000, None, None, None, None, None, None, None, None, "NO_SOCKET"],
        ["reset", None, "10.0.0.2", 80, 40001, None, None, None, "ESTABLISHED", None, None, None, None, None],
        ["retransmit", None, "10.0.0.1", 41000, 80, None, None, None, "ESTABLISHED", None, None, None, None, None],
        ["drop", None, "10.0.0.1", None, None, 0, "NOT_SPECIFIED", None, None, None, None, None, None, None],
    ]
    assert events["time"].iloc[0] == pd.Timestamp(OFFSET_NS + 5, unit="ns", tz="UTC")
    assert events["netns"].tolist()[:2] == [HERE, ELSEWHERE]


@pytest.mark.parametrize("families", [(SKB_DROP,), (TCP_EVENTS,), (SOCK_STATE,)])
def test_each_family_decodes_only_its_own_event_kinds(families) -> None:
    records = np.concatenate(
        [event(kind, "10.0.0.1", 1, "10.0.0.2", 2, ts_ns=kind, netns=HERE) for kind in (1, 2, 3, 4, 5, 6, 7)]
    )
    kinds = batch({}, records, families=families).events["kind"].tolist()
    expected = {SKB_DROP: ["drop"], TCP_EVENTS: ["retransmit", "reset"], SOCK_STATE: ["connect", "accept", "close"]}
    assert kinds == expected[families[0]]

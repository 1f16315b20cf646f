"""numpy mirrors of the kernel records in probes/include/flowscope.h, and their columnar decoding.

Everything here takes plain buffers, so it runs (and is tested) without root or BCC.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Mapping

import numpy as np
import pandas as pd

from flowscope.schema import FLOW_COLUMNS, conform, empty_frame

FLOW_KEY = np.dtype(
    [
        ("saddr", "V16"),
        ("daddr", "V16"),
        ("sport", "<u2"),
        ("dport", "<u2"),
        ("ifindex", "<u4"),
        ("proto", "u1"),
        ("direction", "u1"),
        ("ip_version", "u1"),
        ("flags", "u1"),
    ]
)
FLOW_STATS = np.dtype(
    [
        ("packets", "<u8"),
        ("bytes", "<u8"),
        ("first_seen_ns", "<u8"),
        ("last_seen_ns", "<u8"),
        ("cgroup_id", "<u8"),
        ("tcp_flags", "<u8"),
    ]
)
EVENT = np.dtype(
    [
        ("ts_ns", "<u8"),
        ("saddr", "V16"),
        ("daddr", "V16"),
        ("sport", "<u2"),
        ("dport", "<u2"),
        ("kind", "u1"),
        ("proto", "u1"),
        ("ip_version", "u1"),
        ("direction", "u1"),
        ("ifindex", "<u4"),
        ("netns", "<u4"),
        ("pid", "<u4"),
        ("reason", "<u4"),
        ("cgroup_id", "<u8"),
        ("location", "<u8"),
        ("value", "<u8"),
        ("old_state", "<i4"),
        ("new_state", "<i4"),
        ("comm", "S16"),
        ("tcp_flags", "<u2"),
        ("generation", "u1"),
        ("key_flags", "u1"),
        ("pad", "V4"),
    ]
)
assert FLOW_KEY.itemsize == 44 and FLOW_STATS.itemsize == 48 and EVENT.itemsize == 120

# enum fs_event_kind
EVENT_KINDS = {1: "connect", 2: "accept", 3: "close", 4: "drop", 5: "retransmit", 6: "reset", 7: "flow_spill"}
KIND_FLOW_SPILL = 7
EVENT_KIND_MAX = 8

# enum fs_counter
COUNTERS = (
    "tc_packets",
    "tc_bytes",
    "flow_map_full",
    "spill_lost_bytes",
    "drop_map_full",
    "drop_events_sampled_out",
    "tcp_map_full",
    "tcp_events_sampled_out",
    "sock_map_full",
    "drops",
    "tcp_counts",
    "rtt_map_full",
)
COUNTER_EVENT_SENT_BASE = 16
COUNTER_EVENT_LOST_BASE = COUNTER_EVENT_SENT_BASE + EVENT_KIND_MAX
COUNTER_MAX = COUNTER_EVENT_LOST_BASE + EVENT_KIND_MAX

# flow_key.flags
KEY_NO_PORTS = 0x01  # no transport header was read: ports and ICMP type/code are unknown

DIRECTIONS = np.array(["ingress", "egress"], dtype=object)

# IANA protocol numbers (a network standard, not a kernel enum).
PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP", 136: "UDPLite"}
ICMP_PROTOCOLS = (1, 58)
PORT_PROTOCOLS = (6, 17, 132, 136)  # TCP, UDP, SCTP, UDP-Lite


def protocol_names(numbers: np.ndarray) -> np.ndarray:
    unique, inverse = np.unique(numbers, return_inverse=True)
    names = np.array([PROTOCOL_NAMES.get(int(n), str(int(n))) for n in unique], dtype=object)
    return names[inverse]


def addresses_to_text(addresses: np.ndarray, ip_version: np.ndarray) -> np.ndarray:
    """16-byte addresses (IPv4 as IPv4-mapped IPv6) to text in their own family; None when not IP."""
    if len(addresses) == 0:
        return np.array([], dtype=object)
    # Hash-factorize rather than np.unique: sorting 16-byte voids is ~4x slower (100k flows: 140 -> 35 ms).
    # "S16" drops trailing NULs from each value, which stays exact because every value has 16 bytes.
    codes, unique = pd.factorize(np.ascontiguousarray(addresses).view("S16").reshape(-1))
    codes, keys = pd.factorize(codes.astype(np.int64) * 256 + np.asarray(ip_version, dtype=np.int64))
    texts = []
    for key in keys.tolist():
        data = unique[key >> 8].ljust(16, b"\0")
        version = key & 0xFF
        if version == 4:
            texts.append(socket.inet_ntop(socket.AF_INET, data[12:]))
        elif version == 6:
            # RFC 5952 text; a mapped IPv4 address dotted (section 5). inet_ntop also dots the deprecated
            # IPv4-compatible form (::a.b.c.d), which RFC 5952 writes in hex, as ipaddress does.
            text = socket.inet_ntop(socket.AF_INET6, data)
            texts.append(str(ipaddress.IPv6Address(data)) if "." in text and not text.startswith("::ffff:") else text)
        else:
            texts.append(None)
    return np.array(texts, dtype=object)[codes]


def monotonic_to_utc_offset_ns() -> int:
    """Add to bpf_ktime_get_ns() (CLOCK_MONOTONIC) to get UTC nanoseconds."""
    return time.time_ns() - time.monotonic_ns()


def utc_times(monotonic_ns: np.ndarray, offset_ns: int) -> pd.DatetimeIndex:
    return pd.to_datetime(monotonic_ns.astype(np.int64) + offset_ns, unit="ns", utc=True)


def _ports(keys: np.ndarray, icmp: np.ndarray, has_ports: np.ndarray) -> tuple[pd.Series, ...]:
    def masked(values: np.ndarray, keep: np.ndarray, dtype: str) -> pd.Series:
        return pd.Series(pd.array(values, dtype=dtype)).where(keep, pd.NA)

    return (
        masked(keys["sport"], has_ports, "UInt16"),
        masked(keys["dport"], has_ports, "UInt16"),
        masked(keys["sport"].astype(np.uint8), icmp, "UInt8"),
        masked(keys["dport"].astype(np.uint8), icmp, "UInt8"),
    )


def flows_from_map(
    keys: np.ndarray,
    stats: np.ndarray,
    offset_ns: int,
    ifnames: Mapping[int, str],
    node: str,
) -> pd.DataFrame:
    """One flow row per map entry (FLOW_COLUMNS); keys/stats are FLOW_KEY/FLOW_STATS arrays."""
    if len(keys) == 0:
        return empty_frame(FLOW_COLUMNS)
    proto = keys["proto"]
    ip = keys["ip_version"] > 0
    read = ip & (keys["flags"] & KEY_NO_PORTS == 0)
    icmp = read & np.isin(proto, ICMP_PROTOCOLS)
    has_ports = read & np.isin(proto, PORT_PROTOCOLS)
    sport, dport, icmp_type, icmp_code = _ports(keys, icmp, has_ports)
    tcp = proto == 6
    ifindex = keys["ifindex"]
    unique_if, if_inverse = np.unique(ifindex, return_inverse=True)
    names = np.array([ifnames.get(int(i)) for i in unique_if], dtype=object)[if_inverse]
    frame = pd.DataFrame(
        {
            "time_start": utc_times(stats["first_seen_ns"], offset_ns),
            "time_end": utc_times(stats["last_seen_ns"], offset_ns),
            "node": node,
            "ifname": names,
            "ifindex": ifindex,
            "direction": DIRECTIONS[keys["direction"] & 1],
            "ip_version": pd.Series(keys["ip_version"]).where(ip, pd.NA),
            "protocol": pd.Series(protocol_names(proto)).where(ip, pd.NA),
            "src_ip": addresses_to_text(keys["saddr"], keys["ip_version"]),
            "src_port": sport,
            "dst_ip": addresses_to_text(keys["daddr"], keys["ip_version"]),
            "dst_port": dport,
            "icmp_type": icmp_type,
            "icmp_code": icmp_code,
            "packets": stats["packets"],
            "bytes": stats["bytes"],
            "tcp_flags": pd.Series(stats["tcp_flags"].astype(np.uint16)).where(tcp, pd.NA),
            "cgroup_id": pd.Series(stats["cgroup_id"]).where(stats["cgroup_id"] != 0, pd.NA),
        }
    )
    return conform(frame, FLOW_COLUMNS)


# numpy copies structured records with void or byte-string fields one at a time (EVENT: ~330 ns each, 130 ms
# for 400k); as raw bytes it copies them at memory speed (20 ms). Selections and concatenations of many
# records go through their bytes.


def _rows(records: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(records).view(np.uint8).reshape(len(records), records.dtype.itemsize)


def select_records(records: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """records[keep] (a copy) of a structured array."""
    return _rows(records)[keep].reshape(-1).view(records.dtype)


def concat_records(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """np.concatenate of two structured arrays of one dtype."""
    return np.concatenate([_rows(first), _rows(second)]).reshape(-1).view(first.dtype)


def unique_records(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct records of a structured array (in order of first appearance) and, per record, the
    index of its distinct one: np.unique(records, return_inverse=True) without the sort. np.unique compares
    structured records one pair at a time, holding the GIL (400k spilled packets: 0.6-0.95 s, while the
    event pump thread could not run); hashing their bytes takes 45-100 ms."""
    codes, _ = pd.factorize(np.ascontiguousarray(records).view(f"S{records.dtype.itemsize}").reshape(-1))
    first = np.empty(codes.max(initial=-1) + 1, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)  # the last write wins: each code's first row
    return records[first], codes


def _fold(inverse: np.ndarray, groups: int, **columns: np.ndarray) -> np.ndarray:
    """FLOW_STATS per group: packets and bytes summed (exactly, in uint64), first/last seen min/max, TCP
    flags ORed, the cgroup id of any member (the largest)."""
    folded = np.zeros(groups, dtype=FLOW_STATS)
    folded["first_seen_ns"] = np.iinfo(np.uint64).max
    np.add.at(folded["packets"], inverse, columns["packets"])
    np.add.at(folded["bytes"], inverse, columns["bytes"])
    np.minimum.at(folded["first_seen_ns"], inverse, columns["first_seen_ns"])
    np.maximum.at(folded["last_seen_ns"], inverse, columns["last_seen_ns"])
    np.bitwise_or.at(folded["tcp_flags"], inverse, columns["tcp_flags"])
    np.maximum.at(folded["cgroup_id"], inverse, columns["cgroup_id"])
    return folded


def spills_as_map_entries(events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flow-spill events (one packet each) folded into FLOW_KEY/FLOW_STATS entries, one per key."""
    spills = select_records(events, events["kind"] == KIND_FLOW_SPILL)
    keys = np.zeros(len(spills), dtype=FLOW_KEY)
    for name in ("saddr", "daddr", "sport", "dport", "ifindex", "proto", "direction", "ip_version"):
        keys[name] = spills[name]
    keys["flags"] = spills["key_flags"]
    if len(keys) == 0:
        return keys, np.zeros(0, dtype=FLOW_STATS)
    unique, inverse = unique_records(keys)
    stats = _fold(
        inverse,
        len(unique),
        packets=np.ones(len(spills), dtype=np.uint64),
        bytes=spills["value"],
        first_seen_ns=spills["ts_ns"],
        last_seen_ns=spills["ts_ns"],
        tcp_flags=spills["tcp_flags"].astype(np.uint64),
        cgroup_id=spills["cgroup_id"],
    )
    return unique, stats


def merge_map_entries(
    keys_a: np.ndarray, stats_a: np.ndarray, keys_b: np.ndarray, stats_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sums two sets of flow entries that may share keys (the map's and the spill's)."""
    if len(keys_b) == 0:
        return keys_a, stats_a
    keys = np.concatenate([keys_a, keys_b])
    stats = np.concatenate([stats_a, stats_b])
    unique, inverse = unique_records(keys)
    return unique, _fold(inverse, len(unique), **{name: stats[name] for name in FLOW_STATS.names})

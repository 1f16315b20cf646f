"""numpy mirrors of the kernel records in probes/include/flowscope.h, and their columnar decoding.

Everything here takes plain buffers, so it runs (and is tested) without root or BCC.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from flowscope.kernel.layouts import FLOW_KEY, FLOW_STATS, KEY_NO_PORTS, KIND_FLOW_SPILL, record_bytes, select_records
from flowscope.kernel.names import UNKNOWN
from flowscope.schema import DIRECTIONS, FLOW_COLUMNS, PROTOCOL_NAMES, conform, empty_frame

DIRECTION_NAMES = np.array(DIRECTIONS, dtype=object)  # by the key's direction bit
ICMP_PROTOCOLS = (1, 58)
PORT_PROTOCOLS = (6, 17, 132, 136)  # TCP, UDP, SCTP, UDP-Lite


def protocol_names(numbers: np.ndarray) -> np.ndarray:
    unique, inverse = np.unique(numbers, return_inverse=True)
    names = np.array([PROTOCOL_NAMES.get(int(n), str(int(n))) for n in unique], dtype=object)
    return names[inverse]


def shown_ports(ip_version: np.ndarray, proto: np.ndarray, key_flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per record, whether its ICMP type and code are shown, and whether its ports are: for IP records whose
    transport header was read (no KEY_NO_PORTS), by protocol."""
    read = (ip_version > 0) & (key_flags & KEY_NO_PORTS == 0)
    return read & np.isin(proto, ICMP_PROTOCOLS), read & np.isin(proto, PORT_PROTOCOLS)


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


def nullable(values: np.ndarray, known: np.ndarray | bool, dtype: str) -> pd.api.extensions.ExtensionArray:
    """`values` where `known`, null elsewhere, as a pandas masked integer array of `dtype` ("UInt16", "Int64",
    ...), made from the arrays directly: Series(...).where(...) costs ~0.1 ms a column however few the rows."""
    data = np.asarray(values).astype(dtype.lower(), copy=False)
    mask = ~np.asarray(known, dtype=bool) if np.ndim(known) else np.full(len(data), not known)
    return pd.arrays.IntegerArray(data, mask)


@dataclass
class FlowRows:
    """The rows of a FlowBatch before they become a frame: one numpy column per field, the flow key's fields
    as the kernel wrote them. Joins, copies and new rows stay in numpy (a pandas operation costs ~0.1 ms
    however few the rows: an interval with drops and TCP counters took 50-100 ms), and the frame is decoded
    once (`flow_frame`). `*_known` mark where a nullable field is set; a drop_reason of UNKNOWN is none."""

    saddr: np.ndarray  # V16, IPv4 as IPv4-mapped IPv6
    daddr: np.ndarray
    sport: np.ndarray
    dport: np.ndarray
    ifindex: np.ndarray
    proto: np.ndarray
    direction: np.ndarray
    ip_version: np.ndarray
    key_flags: np.ndarray
    ifindex_known: np.ndarray  # counters seen with no interface have none
    named: np.ndarray  # ifindex is an interface of this network namespace: its name is looked up
    netns: np.ndarray
    netns_known: np.ndarray
    first_seen_ns: np.ndarray
    last_seen_ns: np.ndarray
    packets: np.ndarray
    bytes: np.ndarray
    packets_known: np.ndarray  # packets and bytes
    tcp_flags: np.ndarray
    tcp_flags_known: np.ndarray
    cgroup_id: np.ndarray  # 0: none
    drop_packets: np.ndarray
    drop_bytes: np.ndarray
    drop_reason: np.ndarray  # UNKNOWN: none
    retransmits: np.ndarray
    resets: np.ndarray
    rtt_us: np.ndarray
    rtt_known: np.ndarray

    @classmethod
    def from_keys(
        cls,
        keys: np.ndarray,
        first_seen_ns: np.ndarray,
        last_seen_ns: np.ndarray,
        *,
        ifindex_known: np.ndarray | bool,
        named: np.ndarray | bool,
        netns: np.ndarray | int | None,
        packets_known: bool,
    ) -> FlowRows:
        """Rows for FLOW_KEY `keys` with nothing counted yet (packets and bytes 0, known or not)."""
        n = len(keys)

        def column(value, dtype) -> np.ndarray:
            return np.array(np.broadcast_to(np.asarray(value, dtype=dtype), (n,)))

        zeros = np.zeros(n, dtype=np.uint64)
        return cls(
            saddr=np.ascontiguousarray(keys["saddr"]),
            daddr=np.ascontiguousarray(keys["daddr"]),
            sport=keys["sport"].copy(),
            dport=keys["dport"].copy(),
            ifindex=keys["ifindex"].copy(),
            proto=keys["proto"].copy(),
            direction=keys["direction"].copy(),
            ip_version=keys["ip_version"].copy(),
            key_flags=keys["flags"].copy(),
            ifindex_known=column(ifindex_known, bool),
            named=column(named, bool),
            netns=column(0 if netns is None else netns, np.uint32),
            netns_known=column(netns is not None, bool),
            first_seen_ns=column(first_seen_ns, np.uint64),
            last_seen_ns=column(last_seen_ns, np.uint64),
            packets=zeros,
            bytes=zeros.copy(),
            packets_known=column(packets_known, bool),
            tcp_flags=np.zeros(n, dtype=np.uint16),
            tcp_flags_known=np.zeros(n, dtype=bool),
            cgroup_id=zeros.copy(),
            drop_packets=zeros.copy(),
            drop_bytes=zeros.copy(),
            drop_reason=np.full(n, UNKNOWN, dtype=np.uint32),
            retransmits=zeros.copy(),
            resets=zeros.copy(),
            rtt_us=np.zeros(n, dtype=np.uint32),
            rtt_known=np.zeros(n, dtype=bool),
        )

    @classmethod
    def from_map(cls, keys: np.ndarray, stats: np.ndarray, netns: int | None = None) -> FlowRows:
        """One row per flow-map entry (FLOW_KEY/FLOW_STATS arrays), of the interfaces of `netns`."""
        rows = cls.from_keys(
            keys,
            stats["first_seen_ns"],
            stats["last_seen_ns"],
            ifindex_known=True,
            named=True,
            netns=netns,
            packets_known=True,
        )
        rows.packets, rows.bytes = stats["packets"].copy(), stats["bytes"].copy()
        rows.tcp_flags = stats["tcp_flags"].astype(np.uint16)
        rows.tcp_flags_known = rows.proto == 6
        rows.cgroup_id = stats["cgroup_id"].copy()
        return rows

    def __len__(self) -> int:
        return len(self.sport)

    def take(self, index: np.ndarray) -> FlowRows:
        return FlowRows(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def append(self, other: FlowRows) -> FlowRows:
        if len(other) == 0:
            return self
        return FlowRows(
            **{f.name: np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)}
        )


def flow_frame(
    rows: FlowRows,
    offset_ns: int,
    ifnames: Mapping[int, str],
    node: str,
    measured: Collection[str] = (),
    drop_reason_names: Callable[[np.ndarray], np.ndarray] | None = None,
) -> pd.DataFrame:
    """The rows as a frame of FLOW_COLUMNS. The counters in `measured` (drop_packets, drop_bytes,
    retransmits, resets) are numbers, the others null: their probe did not run. Drop reasons are named
    by `drop_reason_names`."""
    n = len(rows)
    if n == 0:
        return empty_frame(FLOW_COLUMNS)
    proto = rows.proto
    ip = rows.ip_version > 0
    icmp, has_ports = shown_ports(rows.ip_version, proto, rows.key_flags)
    unique_if, if_inverse = np.unique(rows.ifindex, return_inverse=True)
    names = np.array([ifnames.get(int(i)) for i in unique_if], dtype=object)[if_inverse]
    names[~rows.named] = None
    reasons = np.full(n, None, dtype=object)
    if drop_reason_names is not None and (rows.drop_reason != UNKNOWN).any():
        reasons = drop_reason_names(rows.drop_reason)
    frame = pd.DataFrame(
        {
            "time_start": utc_times(rows.first_seen_ns, offset_ns),
            "time_end": utc_times(rows.last_seen_ns, offset_ns),
            "node": np.full(n, node, dtype=object),
            "ifname": names,
            "ifindex": nullable(rows.ifindex, rows.ifindex_known, "UInt32"),
            "netns": nullable(rows.netns, rows.netns_known, "UInt32"),
            "direction": DIRECTION_NAMES[rows.direction & 1],
            "ip_version": nullable(rows.ip_version, ip, "UInt8"),
            "protocol": np.where(ip, protocol_names(proto), None),
            "src_ip": addresses_to_text(rows.saddr, rows.ip_version),
            "src_port": nullable(rows.sport, has_ports, "UInt16"),
            "dst_ip": addresses_to_text(rows.daddr, rows.ip_version),
            "dst_port": nullable(rows.dport, has_ports, "UInt16"),
            "icmp_type": nullable(rows.sport.astype(np.uint8), icmp, "UInt8"),
            "icmp_code": nullable(rows.dport.astype(np.uint8), icmp, "UInt8"),
            "packets": nullable(rows.packets, rows.packets_known, "UInt64"),
            "bytes": nullable(rows.bytes, rows.packets_known, "UInt64"),
            "tcp_flags": nullable(rows.tcp_flags, rows.tcp_flags_known, "UInt16"),
            "drop_packets": nullable(rows.drop_packets, "drop_packets" in measured, "UInt64"),
            "drop_bytes": nullable(rows.drop_bytes, "drop_bytes" in measured, "UInt64"),
            "drop_reason": reasons,
            "retransmits": nullable(rows.retransmits, "retransmits" in measured, "UInt64"),
            "resets": nullable(rows.resets, "resets" in measured, "UInt64"),
            "rtt_us": nullable(rows.rtt_us, rows.rtt_known, "UInt32"),
            "cgroup_id": nullable(rows.cgroup_id, rows.cgroup_id != 0, "UInt64"),
        },
        copy=False,  # the arrays are this frame's alone (`rows` is the caller's to drop): not copied twice
    )
    return conform(frame, FLOW_COLUMNS, copy=False)


def flows_from_map(
    keys: np.ndarray,
    stats: np.ndarray,
    offset_ns: int,
    ifnames: Mapping[int, str],
    node: str,
) -> pd.DataFrame:
    """One flow row per map entry (FLOW_COLUMNS); keys/stats are FLOW_KEY/FLOW_STATS arrays."""
    return flow_frame(FlowRows.from_map(keys, stats), offset_ns, ifnames, node)


# numpy copies structured records with void or byte-string fields one at a time (EVENT: ~330 ns each, 130 ms
# for 400k); as raw bytes it copies them at memory speed (20 ms). Selections and concatenations of many
# records go through their bytes.


def row_codes(matrix: np.ndarray) -> np.ndarray:
    """One integer per row of a 2-D uint8 array, equal for equal rows, numbered 0, 1, ... in order of first
    appearance. The rows' bytes are hashed: np.unique would sort them, comparing rows one pair at a time
    while holding the GIL (400k spilled packets: 0.6-0.95 s, while the event pump thread could not run);
    hashing takes 45-100 ms."""
    matrix = np.ascontiguousarray(matrix)
    # "S" drops trailing NULs from each value, which stays exact because every value has the same width.
    codes, _ = pd.factorize(matrix.view(f"S{matrix.shape[1]}").reshape(-1))
    return codes.astype(np.int64, copy=False)


def first_rows(codes: np.ndarray) -> np.ndarray:
    """For codes numbered 0, 1, ... (row_codes), the index of each code's first row."""
    first = np.full(codes.max(initial=-1) + 1, len(codes), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(codes)))
    return first


def unique_records(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct records of a structured array (in order of first appearance) and, per record, the
    index of its distinct one: np.unique(records, return_inverse=True) without the sort (row_codes)."""
    codes = row_codes(record_bytes(records))
    return records[first_rows(codes)], codes


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

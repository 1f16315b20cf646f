"""Hand-built kernel records for the decoder and aggregator tests: flow keys and stats as the tc program
writes them, and the per-CPU counters, so the tests need neither BCC nor root."""

from __future__ import annotations

import ipaddress

import numpy as np
import pandas as pd

from flowscope.kernel.layouts import COUNTER_MAX, COUNTERS, FLOW_KEY, FLOW_STATS

OFFSET_NS = 1_800_000_000 * 10**9  # monotonic 0 = 2027-01-15T08:00:00Z
WINDOW = (pd.Timestamp("2027-01-15T08:00:00Z"), pd.Timestamp("2027-01-15T08:00:01Z"))


def address(text: str) -> bytes:
    """16 bytes as the probes store an address: IPv4 as IPv4-mapped IPv6."""
    ip = ipaddress.ip_address(text)
    return (b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip.packed


def flow_key(src: str, sport: int, dst: str, dport: int, proto: int = 17, ifindex: int = 2, direction: int = 1):
    key = np.zeros(1, dtype=FLOW_KEY)
    key["saddr"], key["daddr"] = np.void(address(src)), np.void(address(dst))
    key["sport"], key["dport"], key["proto"] = sport, dport, proto
    key["ifindex"], key["direction"] = ifindex, direction
    key["ip_version"] = ipaddress.ip_address(src).version
    return key


def flow_stats(packets=1, nbytes=100, first=10, last=20, tcp_flags=0, cgroup=0) -> np.ndarray:
    stats = np.zeros(1, dtype=FLOW_STATS)
    stats["packets"], stats["bytes"], stats["first_seen_ns"], stats["last_seen_ns"] = packets, nbytes, first, last
    stats["tcp_flags"], stats["cgroup_id"] = tcp_flags, cgroup
    return stats


def counters(**values: int) -> np.ndarray:
    """The per-CPU counters summed, as a drain reads them: the named ones set, the rest zero."""
    array = np.zeros(COUNTER_MAX, dtype=np.uint64)
    for name, value in values.items():
        array[COUNTERS.index(name)] = value
    return array

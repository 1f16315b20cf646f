"""numpy mirrors of the records the probes share with user space (probes/include/flowscope.h and the
families' map keys and values in probes/*.c): the one place their layouts are written down in Python.

Readers use them to cut buffers into records; the catalog names the drained maps by them; the decoders read
their fields. A layout that differs from the C struct fails the size asserts below at import.
"""

from __future__ import annotations

import numpy as np

from flowscope.schema import EVENT_KINDS

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

# enum fs_event_kind: the record kinds of the schema in its order, numbered from 1, then the spilled packets
# of a full flow map (an internal kind that never becomes an event record).
KIND_NUMBER = {name: number for number, name in enumerate((*EVENT_KINDS, "flow_spill"), start=1)}
KIND_FLOW_SPILL = KIND_NUMBER["flow_spill"]
EVENT_KIND_MAX = len(KIND_NUMBER) + 1  # the size of per-kind tables, kind 0 unused

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

DROP_KEY = np.dtype([("flow", FLOW_KEY), ("netns", "<u4"), ("reason", "<u4")])
DROP_STATS = np.dtype(
    [
        ("packets", "<u8"),
        ("bytes", "<u8"),
        ("first_seen_ns", "<u8"),
        ("last_seen_ns", "<u8"),
        ("location", "<u8"),
    ]
)
TCP_KEY = np.dtype([("flow", FLOW_KEY), ("netns", "<u4")])
TCP_STATS = np.dtype(
    [
        ("retransmits", "<u8"),
        ("resets", "<u8"),
        ("rtt_samples", "<u8"),
        ("srtt_sum_us", "<u8"),
        ("first_seen_ns", "<u8"),
        ("last_seen_ns", "<u8"),
        ("srtt_us", "<u4"),
        ("pad", "<u4"),
    ]
)
assert DROP_KEY.itemsize == 52 and DROP_STATS.itemsize == 40
assert TCP_KEY.itemsize == 48 and TCP_STATS.itemsize == 56


# ---- structured arrays of these records ------------------------------------------------------------------


def record_bytes(records: np.ndarray) -> np.ndarray:
    """The records of a structured array as rows of bytes (for hashing, selecting, joining)."""
    return np.ascontiguousarray(records).view(np.uint8).reshape(len(records), records.dtype.itemsize)


def select_records(records: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """records[keep] (a copy) of a structured array."""
    return record_bytes(records)[keep].reshape(-1).view(records.dtype)


def concat_records(first: np.ndarray, *others: np.ndarray) -> np.ndarray:
    """np.concatenate of structured arrays of one dtype."""
    return (
        np.concatenate([record_bytes(first), *(record_bytes(other) for other in others)]).reshape(-1).view(first.dtype)
    )

"""The one schema of flowscope's record streams: flow rows (a FlowBatch) and event rows.

Every output (TUI, Prometheus, ClickHouse, gRPC, Parquet, pandas) consumes these columns, so they are
defined once here. Column names are the JSON field names. Missing values are null (pandas NA), never a
made-up default: a counter whose probe did not run is null, a counter whose probe ran and saw nothing is 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from flowscope.coverage import Coverage

UTC_TIME = "datetime64[ns, UTC]"
TEXT = "string"

IDENTITY_FIELDS: dict[str, str] = {
    "namespace": TEXT,
    "pod": TEXT,
    "workload": TEXT,
    "workload_kind": TEXT,
    "container": TEXT,
    "pid": "Int64",
    "comm": TEXT,
    "node": TEXT,
    "labels": "object",  # dict[str, str] or None
    "identity_source": TEXT,  # cgroup | netns | ip | static | none
}


def _identity_columns() -> dict[str, str]:
    return {f"{side}_{name}": dtype for side in ("src", "dst") for name, dtype in IDENTITY_FIELDS.items()}


FLOW_COLUMNS: dict[str, str] = {
    "time_start": UTC_TIME,
    "time_end": UTC_TIME,
    "node": TEXT,
    "ifname": TEXT,
    "ifindex": "UInt32",
    "netns": "UInt32",  # inode of the network namespace the interface (or, for drops, the drop) is in
    "direction": TEXT,  # ingress | egress
    "ip_version": "UInt8",
    "protocol": TEXT,  # TCP | UDP | ICMP | ICMPv6 | SCTP | the IP protocol number as text
    "src_ip": TEXT,
    "src_port": "UInt16",
    "dst_ip": TEXT,
    "dst_port": "UInt16",
    "icmp_type": "UInt8",
    "icmp_code": "UInt8",
    "packets": "UInt64",
    "bytes": "UInt64",  # L2 length as the hook saw it (skb->len)
    "tcp_flags": "UInt16",  # OR of the flags seen in the interval
    "drop_packets": "UInt64",
    "drop_bytes": "UInt64",
    "drop_reason": TEXT,  # the running kernel's name, e.g. NO_SOCKET
    "retransmits": "UInt64",
    "resets": "UInt64",
    "rtt_us": "UInt32",  # smoothed RTT of the latest sample in the interval
    "cgroup_id": "UInt64",  # cgroup v2 id of the local socket that sent the packet (egress), if any
    **_identity_columns(),
}

EVENT_KINDS = ("connect", "accept", "close", "drop", "retransmit", "reset")
DIRECTIONS = ("ingress", "egress")
# IANA protocol numbers (a network standard, not a kernel enum): the names of the protocol column.
PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP", 136: "UDPLite"}

EVENT_COLUMNS: dict[str, str] = {
    "time": UTC_TIME,
    "kind": TEXT,
    "node": TEXT,
    "ifname": TEXT,
    "ifindex": "UInt32",
    "netns": "UInt32",  # inode number of the network namespace
    "ip_version": "UInt8",
    "protocol": TEXT,
    "src_ip": TEXT,
    "src_port": "UInt16",
    "dst_ip": TEXT,
    "dst_port": "UInt16",
    "bytes": "UInt64",  # length of the dropped packet (drop events)
    "drop_reason": TEXT,
    "location": TEXT,  # kernel symbol (drops)
    "state": TEXT,  # TCP state where relevant (reset, retransmit; close: the state it closed from)
    "reset_reason": TEXT,  # the kernel's reason for a RST it sent (reset events), e.g. NO_SOCKET
    "duration_us": "UInt64",  # connection lifetime (close events)
    "pid": "Int64",
    "comm": TEXT,
    "cgroup_id": "UInt64",
    **_identity_columns(),
}

# Counter columns whose null means "no probe measured this" (see module docstring).
FLOW_COUNTERS = ("packets", "bytes", "drop_packets", "drop_bytes", "retransmits", "resets")


def empty_frame(columns: dict[str, str]) -> pd.DataFrame:
    # A copy of a frame built once per schema: building 45 typed columns takes ~6 ms, copying them 0.2.
    return _empty_template(tuple(columns.items())).copy()


@functools.cache
def _empty_template(columns: tuple[tuple[str, str], ...]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns})


def null_column(dtype: str, n: int) -> pd.api.extensions.ExtensionArray:
    """`n` nulls of an extension dtype. A scalar fills it without converting a list element by element (100k
    rows: ~4 ms less per column); .copy() of a text column is a new array over the same immutable buffers."""
    return pd.Series(pd.NA, index=pd.RangeIndex(n), dtype=dtype).array


def conform(frame: pd.DataFrame, columns: dict[str, str], *, copy: bool = True) -> pd.DataFrame:
    """Returns `frame` with exactly the schema's columns, in order and dtype; absent columns are null.

    Columns that are not in the schema are kept after the schema's own (add columns, never rename). With
    copy=False the result shares the columns already in their dtype with `frame`: for a caller that built
    `frame` itself and drops it (an interval's 100k flows: ~12 MB not copied).
    """
    n = len(frame)
    # Arrays, not Series: the frame is built from them positionally, where Series would each be reindexed
    # to the new index (a 3-row frame: 3.4 -> 1.1 ms).
    out: dict[str, pd.api.extensions.ExtensionArray | np.ndarray] = {}
    nulls: dict[str, pd.api.extensions.ExtensionArray] = {}
    for name, dtype in columns.items():
        if name in frame.columns:
            series = frame[name]
            if dtype == UTC_TIME:
                series = pd.to_datetime(series, utc=True).astype(UTC_TIME)
            elif str(series.dtype) != dtype:
                series = series.astype(dtype)
            out[name] = series.array
        elif dtype == "object":
            out[name] = np.full(n, None, dtype=object)  # broadcasting None through pandas would give NaN
        else:
            # One per dtype, copied: text columns share its immutable buffers (100k rows: 0.8 MB a column),
            # numbers get arrays of their own.
            if dtype not in nulls:
                nulls[dtype] = null_column(dtype, n)
            out[name] = nulls[dtype].copy()
    for name in frame.columns:
        if name not in columns:
            out[name] = frame[name].array
    return pd.DataFrame(out, index=pd.RangeIndex(n), copy=copy)


def flows_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return conform(frame, FLOW_COLUMNS)


def events_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return conform(frame, EVENT_COLUMNS)


@dataclass
class FlowBatch:
    """One interval of the stream: its flows (the FlowBatch proper), its events, and its loss accounting."""

    time_start: pd.Timestamp
    time_end: pd.Timestamp
    flows: pd.DataFrame
    events: pd.DataFrame
    coverage: Coverage = field(default_factory=Coverage)

    @classmethod
    def empty(cls, time_start: pd.Timestamp, time_end: pd.Timestamp) -> FlowBatch:
        return cls(time_start, time_end, empty_frame(FLOW_COLUMNS), empty_frame(EVENT_COLUMNS))

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

# The readers of recorded records (flowscope.analysis: read_flowlog, read_capture, read_clickhouse, read_grpc)
# give the schema's columns with the text of few distinct values — identity, the enums, the kernel's names:
# every text column but the addresses, whose number has no bound — as pandas categoricals. Their categories
# are the values present, sorted, so the same records give the same dtypes from every reader.
CATEGORY = "category"
STR = "str"  # the categories' dtype: pandas' default text
ADDRESS_COLUMNS = ("src_ip", "dst_ip")


def read_columns(columns: dict[str, str]) -> dict[str, str]:
    """`columns` as the readers type them: identity and enum text categorical."""
    return {
        name: CATEGORY if dtype == TEXT and name not in ADDRESS_COLUMNS else dtype for name, dtype in columns.items()
    }


READ_FLOW_COLUMNS = read_columns(FLOW_COLUMNS)
READ_EVENT_COLUMNS = read_columns(EVENT_COLUMNS)


def empty_frame(columns: dict[str, str]) -> pd.DataFrame:
    # A copy of a frame built once per schema: building 45 typed columns takes ~6 ms, copying them 0.2.
    return _empty_template(tuple(columns.items())).copy()


@functools.cache
def _empty_template(columns: tuple[tuple[str, str], ...]) -> pd.DataFrame:
    return pd.DataFrame(
        {name: pd.Series(categorical(pd.Series(dtype=TEXT)) if dtype == CATEGORY else pd.Series(dtype=dtype))
         for name, dtype in columns}
    )  # fmt: skip


def categorical(values: pd.Series) -> pd.Categorical:
    """Text (or a categorical) as a categorical whose categories are the values present, sorted: the same
    values give the same dtype whatever their source (a Parquet dictionary holds values a filter left out).
    Columnar: the rows are recoded through their codes, only the distinct values are compared."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes, categories = values.cat.codes.to_numpy(), values.cat.categories
    else:
        codes, categories = pd.factorize(values, use_na_sentinel=True)
    present = np.bincount(codes[codes >= 0], minlength=len(categories)) > 0
    kept = np.asarray(categories, dtype=object)[present]
    order = np.argsort(kept, kind="stable")
    canonical = isinstance(values.dtype, pd.CategoricalDtype) and categories.dtype == STR
    if canonical and present.all() and (order == np.arange(len(kept))).all():
        return values.array  # already so
    recode = np.full(len(categories) + 1, -1, dtype=np.int64)  # the last entry: code -1 (null) stays -1
    recode[np.flatnonzero(present)[order]] = np.arange(len(kept))
    dtype = pd.CategoricalDtype(pd.Index(kept[order], dtype=STR))
    return pd.Categorical.from_codes(recode[codes], dtype=dtype)


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
            if dtype == CATEGORY:
                out[name] = categorical(series)
                continue
            if dtype == UTC_TIME:
                series = pd.to_datetime(series, utc=True).astype(UTC_TIME)
            elif str(series.dtype) != dtype:
                series = series.astype(dtype)
            out[name] = series.array
        elif dtype == "object":
            out[name] = np.full(n, None, dtype=object)  # broadcasting None through pandas would give NaN
        elif dtype == CATEGORY:
            out[name] = categorical(pd.Series(null_column(TEXT, n)))
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


def as_read(frame: pd.DataFrame, records: str) -> pd.DataFrame:
    """A frame of flows or events (`records`) typed as the readers give it (READ_FLOW_COLUMNS, READ_EVENT_COLUMNS)."""
    return conform(frame, READ_FLOW_COLUMNS if records == "flows" else READ_EVENT_COLUMNS)


@dataclass
class FlowBatch:
    """One interval of the stream: its flows (the FlowBatch proper), its events, and its loss accounting.

    Every sink is handed the same batch, so none writes into its frames: a sink that changes rows works on a
    copy (as the Hubble view's verdict rows do)."""

    time_start: pd.Timestamp
    time_end: pd.Timestamp
    flows: pd.DataFrame
    events: pd.DataFrame
    coverage: Coverage = field(default_factory=Coverage)

    @classmethod
    def empty(cls, time_start: pd.Timestamp, time_end: pd.Timestamp) -> FlowBatch:
        return cls(time_start, time_end, empty_frame(FLOW_COLUMNS), empty_frame(EVENT_COLUMNS))

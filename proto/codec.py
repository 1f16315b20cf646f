"""flowscope's records on the wire of its own API: flow and event rows (flowscope.schema) to and from
FlowRecord / EventRecord messages, column for column, with presence: a null value is an absent field, never 0.

Rows become messages column-wise (one list per column, one message per row); messages become a typed frame
through the schema's conform(), so a record read from a server has the dtypes of one read from a flow log."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from google.protobuf.timestamp_pb2 import Timestamp

from flowscope.proto.flowscope.v1 import flowscope_pb2 as pb
from flowscope.schema import EVENT_COLUMNS, FLOW_COLUMNS, IDENTITY_FIELDS, UTC_TIME, events_frame, flows_frame

SIDES = ("src", "dst")
_IDENTITY = pb.Identity.DESCRIPTOR.fields_by_name


def _scalars(message: Any, columns: dict[str, str]) -> tuple[str, ...]:
    """The message's fields that are plain columns (not times, not an identity side)."""
    return tuple(f.name for f in message.DESCRIPTOR.fields if f.name in columns and columns[f.name] != UTC_TIME)


def _times(columns: dict[str, str]) -> tuple[str, ...]:
    return tuple(name for name, dtype in columns.items() if dtype == UTC_TIME)


FLOW_SCALARS = _scalars(pb.FlowRecord, FLOW_COLUMNS)
EVENT_SCALARS = _scalars(pb.EventRecord, EVENT_COLUMNS)
FLOW_TIMES, EVENT_TIMES = _times(FLOW_COLUMNS), _times(EVENT_COLUMNS)


def column_values(frame: pd.DataFrame, name: str) -> list[Any]:
    """A column as Python values, None for null (times as int nanoseconds)."""
    if name not in frame.columns:
        return [None] * len(frame)
    series = frame[name]
    if isinstance(series.dtype, pd.DatetimeTZDtype) or str(series.dtype).startswith("datetime64"):
        values = series.to_numpy(dtype="datetime64[ns]").view(np.int64).tolist()
        return [None if missing else value for value, missing in zip(values, series.isna().tolist(), strict=True)]
    if series.dtype == object:
        return [None if v is None or (not isinstance(v, dict) and pd.isna(v)) else v for v in series.tolist()]
    return series.astype(object).where(series.notna(), None).tolist()


def timestamp(nanoseconds: int) -> Timestamp:
    seconds, nanos = divmod(int(nanoseconds), 1_000_000_000)
    return Timestamp(seconds=seconds, nanos=nanos)


def nanoseconds(stamp: Timestamp) -> int:
    return stamp.seconds * 1_000_000_000 + stamp.nanos


def _identities(frame: pd.DataFrame, side: str) -> list[pb.Identity | None]:
    """One Identity per row of `side`; rows of one pod share one message (built once per distinct identity)."""
    names = list(IDENTITY_FIELDS)
    columns = [column_values(frame, f"{side}_{name}") for name in names]
    labels_at = names.index("labels")
    built: dict[tuple, pb.Identity | None] = {}
    out: list[pb.Identity | None] = []
    for row in zip(*columns, strict=True):
        labels = row[labels_at]
        key = (*row[:labels_at], None if labels is None else tuple(sorted(labels.items())), *row[labels_at + 1 :])
        identity = built.get(key, _MISSING)
        if identity is _MISSING:
            identity = built[key] = _identity(names, row)
        out.append(identity)
    return out


_MISSING: Any = object()


def _identity(names: list[str], row: tuple) -> pb.Identity | None:
    fields = {name: value for name, value in zip(names, row, strict=True) if value is not None}
    if not fields:
        return None
    labels = fields.pop("labels", None)
    identity = pb.Identity(**fields)
    if labels is not None:
        identity.labels.SetInParent()  # present even when empty: {} is "known to have no labels", None unknown
        identity.labels.items.update({str(k): str(v) for k, v in labels.items()})
    return identity


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_prefix(message: Any, name: str) -> bytes:
    """The tag of a length-delimited field (wire type 2)."""
    return varint(message.DESCRIPTOR.fields_by_name[name].number << 3 | 2)


def _encoded(frame: pd.DataFrame, message: Any, scalars: Sequence[str], times: Sequence[str]) -> list[bytes]:
    """Each row as its message's serialised bytes. Protobuf fields may be concatenated in any order, so an
    identity (the same for every row of a pod) is serialised once and appended as bytes."""
    if frame.empty:
        return []
    columns = [column_values(frame, name) for name in scalars]
    stamps = [column_values(frame, name) for name in times]
    sides = []
    for side in SIDES:
        prefix, cache = _field_prefix(message, side), {}
        encoded = []
        for identity in _identities(frame, side):
            if identity is None:
                encoded.append(b"")
                continue
            data = cache.get(id(identity))
            if data is None:
                body = identity.SerializeToString()
                data = cache[id(identity)] = prefix + varint(len(body)) + body
            encoded.append(data)
        sides.append(encoded)
    out = []
    for row, row_stamps, src, dst in zip(zip(*columns, strict=True), zip(*stamps, strict=True), *sides, strict=True):
        record = message(**{name: value for name, value in zip(scalars, row, strict=True) if value is not None})
        for name, value in zip(times, row_stamps, strict=True):
            if value is not None:
                stamp = getattr(record, name)
                stamp.seconds, stamp.nanos = divmod(value, 1_000_000_000)
        out.append(record.SerializeToString() + src + dst)
    return out


def encoded_flows(flows: pd.DataFrame) -> list[bytes]:
    """Each flow row as a serialised FlowRecord."""
    return _encoded(flows, pb.FlowRecord, FLOW_SCALARS, FLOW_TIMES)


def encoded_events(events: pd.DataFrame) -> list[bytes]:
    """Each event row as a serialised EventRecord."""
    return _encoded(events, pb.EventRecord, EVENT_SCALARS, EVENT_TIMES)


def flow_records(flows: pd.DataFrame) -> list[pb.FlowRecord]:
    """One FlowRecord per flow row."""
    return [pb.FlowRecord.FromString(data) for data in encoded_flows(flows)]


def event_records(events: pd.DataFrame) -> list[pb.EventRecord]:
    """One EventRecord per event row."""
    return [pb.EventRecord.FromString(data) for data in encoded_events(events)]


def _columns(messages: Sequence[Any], times: Sequence[str]) -> dict[str, list[Any]]:
    """The messages' fields column by column (None where absent); identities decoded once per distinct one."""
    count = len(messages)
    data: dict[str, list[Any]] = {}
    identities: dict[str, list[Any]] = {side: [None] * count for side in SIDES}
    for row, message in enumerate(messages):
        for field, value in message.ListFields():
            name = field.name
            if name in identities:
                identities[name][row] = value
                continue
            column = data.get(name)
            if column is None:
                column = data[name] = [None] * count
            column[row] = nanoseconds(value) if name in times else value
    for side, column in identities.items():
        cache: dict[bytes, dict[str, Any]] = {}
        present: set[str] = set()  # the identity fields any row of this side has (from its distinct identities)
        rows = []
        for identity in column:
            if identity is None:
                rows.append(None)
                continue
            key = identity.SerializeToString()
            decoded = cache.get(key)
            if decoded is None:
                decoded = cache[key] = {
                    field.name: dict(value.items) if field.name == "labels" else value
                    for field, value in identity.ListFields()
                }
                present.update(decoded)
            rows.append(decoded)
        for name in IDENTITY_FIELDS:
            if name in present:
                data[f"{side}_{name}"] = [None if row is None else row.get(name) for row in rows]
    return data


def _frame(messages: Iterable[Any], columns: dict[str, str], times: Sequence[str]) -> pd.DataFrame:
    listed = list(messages)
    data = _columns(listed, times)
    typed = {}
    for name, values in data.items():
        dtype = columns.get(name)
        if name in times:
            typed[name] = pd.to_datetime(pd.array(values, dtype="Int64"), unit="ns", utc=True)
        elif dtype is None or dtype == "object":
            typed[name] = pd.array(values, dtype=object)
        else:
            typed[name] = pd.array(values, dtype=dtype)
    return pd.DataFrame(typed, index=pd.RangeIndex(len(listed)))


def flows_from(messages: Iterable[pb.FlowRecord]) -> pd.DataFrame:
    """The flow rows of these messages, typed as flowscope.schema's FLOW_COLUMNS."""
    return flows_frame(_frame(messages, FLOW_COLUMNS, FLOW_TIMES))


def events_from(messages: Iterable[pb.EventRecord]) -> pd.DataFrame:
    """The event rows of these messages, typed as flowscope.schema's EVENT_COLUMNS."""
    return events_frame(_frame(messages, EVENT_COLUMNS, EVENT_TIMES))


def row_of(message: pb.FlowRecord | pb.EventRecord) -> dict[str, Any]:
    """One record as {column: value} (times as int nanoseconds, labels as a dict); absent columns are left out."""
    times = FLOW_TIMES if isinstance(message, pb.FlowRecord) else EVENT_TIMES
    row: dict[str, Any] = {}
    for field, value in message.ListFields():
        name = field.name
        if name in SIDES:
            for part, part_value in value.ListFields():
                row[f"{name}_{part.name}"] = dict(part_value.items) if part.name == "labels" else part_value
        else:
            row[name] = nanoseconds(value) if name in times else value
    return row

"""JSON lines: the machine format of `capture -o jsonl` and the input of `--replay`.

One object per line, told apart by "type":
  {"type": "flow", ...FLOW_COLUMNS}       one flow of one interval (counters are per interval)
  {"type": "event", ...EVENT_COLUMNS}     one event
  {"type": "interval", "time_start", "time_end", "coverage"}   closes an interval
  {"type": "summary", "time_start", "time_end", "intervals", "coverage", ...}   last line
Times are RFC 3339 UTC with nanoseconds; null is JSON null; protocol numbers are JSON numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

import numpy as np
import pandas as pd

from flowscope.coverage import Coverage
from flowscope.schema import EVENT_COLUMNS, FLOW_COLUMNS, UTC_TIME, FlowBatch, conform, empty_frame


class ReplayError(ValueError):
    """A replay file that is not flowscope JSON lines."""


def format_time(value: pd.Timestamp | None) -> str | None:
    if value is None or pd.isna(value):
        return None
    return np.datetime_as_string(np.datetime64(pd.Timestamp(value).tz_convert(None).value, "ns"), unit="ns") + "Z"


def _json_ready(frame: pd.DataFrame, columns: dict[str, str]) -> list[dict[str, Any]]:
    """Rows as plain dicts: times as text, NA as None, numeric protocols as numbers."""
    if frame.empty:
        return []
    data: dict[str, list[Any]] = {}
    for name in frame.columns:
        series = frame[name]
        if columns.get(name) == UTC_TIME:
            values = series.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]")
            text = np.datetime_as_string(values, unit="ns").astype(object)
            text[np.isnat(values)] = None
            data[name] = [t + "Z" if t is not None else None for t in text]
        elif name == "protocol":
            data[name] = [None if pd.isna(p) else (int(p) if str(p).isdigit() else p) for p in series]
        elif series.dtype == object:
            data[name] = [None if v is None or (not isinstance(v, dict) and pd.isna(v)) else v for v in series]
        else:
            data[name] = series.astype(object).where(series.notna(), None).tolist()
    names = list(data)
    return [dict(zip(names, row, strict=True)) for row in zip(*(data[n] for n in names), strict=True)]


def _dump(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def record_lines(batch: FlowBatch) -> list[str]:
    """The batch's flow and event records as JSON lines (no interval line)."""
    lines = [_dump({"type": "flow", **row}) for row in _json_ready(batch.flows, FLOW_COLUMNS)]
    return lines + [_dump({"type": "event", **row}) for row in _json_ready(batch.events, EVENT_COLUMNS)]


def write_batch(batch: FlowBatch, out: IO[str]) -> None:
    lines = record_lines(batch)
    lines.append(
        _dump(
            {
                "type": "interval",
                "time_start": format_time(batch.time_start),
                "time_end": format_time(batch.time_end),
                "coverage": batch.coverage.to_dict(),
            }
        )
    )
    out.write("\n".join(lines) + "\n")
    out.flush()


def write_summary(out: IO[str], summary: dict[str, Any]) -> None:
    out.write(_dump({"type": "summary", **summary}) + "\n")
    out.flush()


def frame_from_records(records: list[dict[str, Any]], columns: dict[str, str]) -> pd.DataFrame:
    if not records:
        return empty_frame(columns)
    frame = pd.DataFrame.from_records(records)
    frame = frame.drop(columns=[c for c in ("type",) if c in frame.columns])
    for name, dtype in columns.items():
        if name in frame.columns and dtype == UTC_TIME:
            frame[name] = pd.to_datetime(frame[name], utc=True, format="ISO8601")
        elif name == "protocol" and name in frame.columns:
            frame[name] = frame[name].map(lambda p: None if p is None else str(p))
    return conform(frame, columns)


def read_batches(lines: Iterable[str], source: str = "replay") -> Iterator[FlowBatch]:
    """Yields one FlowBatch per interval record; flows and events after the last interval form a last batch."""
    flows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReplayError(f"{source}:{number}: not JSON ({err.msg}).") from None
        if not isinstance(record, dict) or "type" not in record:
            raise ReplayError(f'{source}:{number}: not a flowscope record (no "type" field).')
        kind = record["type"]
        if kind == "flow":
            flows.append(record)
        elif kind == "event":
            events.append(record)
        elif kind == "interval":
            yield FlowBatch(
                pd.Timestamp(record["time_start"]),
                pd.Timestamp(record["time_end"]),
                frame_from_records(flows, FLOW_COLUMNS),
                frame_from_records(events, EVENT_COLUMNS),
                Coverage.from_dict(record.get("coverage") or {}),
            )
            flows, events = [], []
        elif kind == "summary":
            continue
        else:
            raise ReplayError(f"{source}:{number}: unknown record type {kind!r}.")
    if flows or events:
        times = [pd.Timestamp(r[k]) for r in flows for k in ("time_start", "time_end") if r.get(k)]
        times += [pd.Timestamp(r["time"]) for r in events if r.get("time")]
        start, end = (min(times), max(times)) if times else (pd.NaT, pd.NaT)
        yield FlowBatch(start, end, frame_from_records(flows, FLOW_COLUMNS), frame_from_records(events, EVENT_COLUMNS))


def open_replay(path: str) -> Iterator[FlowBatch]:
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed by the generator
    except OSError as err:
        raise ReplayError(f"cannot read replay file {path}: {err.strerror}.") from None
    with handle:
        yield from read_batches(handle, source=path)

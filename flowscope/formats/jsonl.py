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


BAD_RECORDS = "replay:bad_records"  # the coverage source of records skipped with --skip-bad-records
_INTEGER_RANGE = {"UInt8": (0, 2**8 - 1), "UInt16": (0, 2**16 - 1), "UInt32": (0, 2**32 - 1),
                  "UInt64": (0, 2**64 - 1), "Int64": (-(2**63), 2**63 - 1)}  # fmt: skip


def format_time(value: pd.Timestamp | None) -> str | None:
    if value is None or pd.isna(value):
        return None
    return np.datetime_as_string(np.datetime64(pd.Timestamp(value).tz_convert(None).value, "ns"), unit="ns") + "Z"


def _record_lines(frame: pd.DataFrame, kind: str, columns: dict[str, str]) -> list[str]:
    """The frame's rows as JSON lines {"type": kind, ...}, built a column at a time: each column becomes its
    '"name":value' fragments in one vectorised step (text through its distinct values, which are few), and a
    row is the join of its fragments. The same bytes as json.dumps of each row's dict, which took ~2.2 s of
    CPU for 100k rows here; this takes a tenth of it."""
    if frame.empty:
        return []
    fragments = [_fragments(frame[name], name, columns.get(name)) for name in frame.columns]
    head = '{"type":' + json.dumps(kind) + ","
    return [head + ",".join(row) + "}" for row in zip(*fragments, strict=True)]


def _fragments(series: pd.Series, name: str, dtype: str | None) -> np.ndarray:
    """A column as its '"name":value' JSON fragments: each distinct value encoded once (factorize), then
    taken for every row; null (the factorize sentinel, -1) takes the last entry."""
    prefix = json.dumps(name) + ":"
    if dtype == "object" or dtype is None:  # labels (dicts): the enricher shares one dict per pod
        encoded: dict[int, str] = {}
        return np.array(
            [prefix + "null" if _is_null(v) else encoded.get(id(v)) or encoded.setdefault(id(v), prefix + _dump(v))
             for v in series],
            dtype=object,
        )  # fmt: skip
    codes, distinct = pd.factorize(series, use_na_sentinel=True)
    if dtype == UTC_TIME:
        stamps = np.datetime_as_string(pd.DatetimeIndex(distinct).tz_convert(None).to_numpy("datetime64[ns]"), "ns")
        texts = [f'{prefix}"{stamp}Z"' for stamp in stamps]
    elif dtype in _INTEGER_RANGE:
        texts = [prefix + str(int(number)) for number in distinct]
    else:
        texts = [prefix + (p if name == "protocol" and str(p).isdigit() else json.dumps(p)) for p in distinct]
    return np.array([*texts, prefix + "null"], dtype=object)[codes]


def _is_null(value: Any) -> bool:
    return value is None or (not isinstance(value, dict | list) and pd.isna(value))


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
    return _record_lines(batch.flows, "flow", FLOW_COLUMNS) + _record_lines(batch.events, "event", EVENT_COLUMNS)


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


def _problem(name: str, dtype: str, value: Any) -> str | None:
    """Why `value` cannot be column `name` of type `dtype` (None: it can)."""
    if value is None:
        return None
    if dtype == UTC_TIME:
        if isinstance(value, str):
            try:
                pd.Timestamp(value)
                return None
            except ValueError:
                pass
        return f"field {name!r} is {_shown(value)}, not an RFC 3339 time"
    if dtype in _INTEGER_RANGE:
        low, high = _INTEGER_RANGE[dtype]
        integral = isinstance(value, int) and not isinstance(value, bool)
        if integral and low <= value <= high:
            return None
        what = "a non-negative integer" if low == 0 else "an integer"
        return f"field {name!r} is {_shown(value)}, not {what}" + (f" up to {high}" if integral else "")
    if dtype == "object":  # labels
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return None
        return f"field {name!r} is {_shown(value)}, not an object of text labels"
    if isinstance(value, str) or (name == "protocol" and isinstance(value, int) and not isinstance(value, bool)):
        return None
    return f"field {name!r} is {_shown(value)}, not text"


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad_rows(records: list[dict[str, Any]], columns: dict[str, str]) -> dict[int, str]:
    """The records that cannot be rows of `columns`, by position, with the first problem of each. Checked a
    column at a time: a column whose values have the expected types (and range, or time format) is settled in
    one pass; only a column that fails is looked at value by value."""
    bad: dict[int, str] = {}
    for name, dtype in columns.items():
        values = [record.get(name) for record in records]
        if _column_fits(name, dtype, values):
            continue
        for row, value in enumerate(values):
            if row not in bad and (problem := _problem(name, dtype, value)) is not None:
                bad[row] = problem
    return bad


def _column_fits(name: str, dtype: str, values: list[Any]) -> bool:
    kinds = set(map(type, values)) - {type(None)}
    if dtype in _INTEGER_RANGE:
        if not kinds <= {int}:
            return False
        numbers = [v for v in values if v is not None]
        low, high = _INTEGER_RANGE[dtype]
        return not numbers or (min(numbers) >= low and max(numbers) <= high)
    if dtype == UTC_TIME:
        if not kinds <= {str}:
            return False
        present = [v for v in values if v is not None]
        parsed = pd.to_datetime(pd.Series(present, dtype=object), utc=True, format="ISO8601", errors="coerce")
        return not parsed.isna().any()
    if dtype == "object":
        return kinds <= {dict} and all(_problem(name, dtype, v) is None for v in values if v is not None)
    return kinds <= ({str, int} if name == "protocol" else {str})


def frame_from_records(records: list[dict[str, Any]], columns: dict[str, str]) -> pd.DataFrame:
    """Records already checked (see _bad_rows) as a frame of the schema."""
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


class _Records:
    """The records of one interval as they are read: kept with their line numbers until the interval closes."""

    def __init__(self, source: str, skip_bad: bool) -> None:
        self.source, self.skip_bad = source, skip_bad
        self.flows: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.flow_lines: list[int] = []
        self.event_lines: list[int] = []
        self.read = self.skipped = 0  # records (and unusable lines) of this interval

    def bad(self, number: int, problem: str) -> None:
        """A line or record that cannot be used: the one error, or (skipping) counted."""
        if not self.skip_bad:
            raise ReplayError(
                f"{self.source}:{number}: {problem}; fix or remove it, or replay with --skip-bad-records."
            )
        self.read += 1
        self.skipped += 1

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        out = []
        for records, lines, columns in ((self.flows, self.flow_lines, FLOW_COLUMNS),
                                        (self.events, self.event_lines, EVENT_COLUMNS)):  # fmt: skip
            self.read += len(records)
            bad = _bad_rows(records, columns)
            for row in sorted(bad):
                self.bad(lines[row], bad[row])
                self.read -= 1  # counted once, above
            kept = [record for row, record in enumerate(records) if row not in bad] if bad else records
            out.append(frame_from_records(kept, columns))
        return out[0], out[1]

    def coverage(self, coverage: Coverage) -> Coverage:
        if self.skip_bad:
            coverage.add(BAD_RECORDS, produced=self.read, delivered=self.read - self.skipped, lost=self.skipped)
        return coverage


def _interval_time(record: dict[str, Any], name: str) -> pd.Timestamp | None:
    value = record.get(name)
    if _problem(name, UTC_TIME, value) is not None:
        return None
    return pd.Timestamp(value) if value is not None else pd.NaT


def read_batches(lines: Iterable[str | bytes], source: str = "replay", skip_bad: bool = False) -> Iterator[FlowBatch]:
    """Yields one FlowBatch per interval record; flows and events after the last interval form a last batch.
    A line or record that cannot be used is a ReplayError naming the file, line and field — or, with
    `skip_bad`, is counted in the coverage as `replay:bad_records` and left out."""
    pending = _Records(source, skip_bad)
    for number, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                pending.bad(number, f"not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1})")
                continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            message = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
            pending.bad(number, f"not JSON ({message})")
            continue
        if not isinstance(record, dict) or "type" not in record:
            pending.bad(number, 'not a flowscope record (no "type" field)')
            continue
        kind = record["type"]
        if kind == "flow":
            pending.flows.append(record)
            pending.flow_lines.append(number)
        elif kind == "event":
            pending.events.append(record)
            pending.event_lines.append(number)
        elif kind == "interval":
            start, end = _interval_time(record, "time_start"), _interval_time(record, "time_end")
            coverage = _coverage(record.get("coverage"))
            if start is None or end is None or coverage is None:
                field = "time_start" if start is None else "time_end" if end is None else "coverage"
                pending.bad(number, f"the interval's {field!r} is {_shown(record.get(field))}, not flowscope's")
                continue
            flows, events = pending.frames()
            yield FlowBatch(start, end, flows, events, pending.coverage(coverage))
            pending = _Records(source, skip_bad)
        elif kind == "summary":
            continue
        else:
            pending.bad(number, f"unknown record type {_shown(kind)}")
    if pending.flows or pending.events or pending.skipped:
        flows, events = pending.frames()
        times = [*flows["time_start"].dropna(), *flows["time_end"].dropna(), *events["time"].dropna()]
        start, end = (min(times), max(times)) if times else (pd.NaT, pd.NaT)
        yield FlowBatch(start, end, flows, events, pending.coverage(Coverage()))


def _coverage(value: Any) -> Coverage | None:
    """An interval's coverage, or None when it is not {source: {produced, delivered, lost}} of integers."""
    if value is None:
        return Coverage()
    if not isinstance(value, dict):
        return None
    for counts in value.values():
        if not isinstance(counts, dict) or any(
            not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in counts.values()
        ):
            return None
    return Coverage.from_dict(value)


def open_replay(path: str, skip_bad: bool = False) -> Iterator[FlowBatch]:
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the generator; lines decoded one by one
    except OSError as err:
        raise ReplayError(f"cannot read replay file {path}: {err.strerror}.") from None
    with handle:
        yield from read_batches(handle, source=path, skip_bad=skip_bad)

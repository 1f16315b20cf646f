"""pandas over the flow log (or one Parquet capture): `read_flowlog(path, since=, until=, filter=)` returns the
same typed DataFrame as the other readers (the columns of flowscope.schema, typed as schema.read_columns: the
identity and enum text categorical), reading only the files and row groups whose time range meets [since,
until] — a file's name carries its range, a row group's time statistics its own —, only the columns of the
records asked for, the text of few values as the Parquet dictionaries it is stored in, and converting to pandas
only the rows that the filter's terms, evaluated in Arrow first (flowscope.formats.prefilter), pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from flowscope.filters import parse_filter
from flowscope.formats.jsonl import ReplayError
from flowscope.schema import CATEGORY, READ_EVENT_COLUMNS, READ_FLOW_COLUMNS, conform, empty_frame

Records = Literal["flows", "events"]


def utc(value: Any) -> pd.Timestamp | None:
    if value is None:
        return None
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def planned_reads(path: str | Path, since: Any = None, until: Any = None) -> list[tuple[Path, int]]:
    """The (file, row group) pairs that can hold records between `since` and `until`, in time order."""
    import pyarrow.parquet as pq

    from flowscope.formats.parquet import log_files

    start, end = utc(since), utc(until)
    root = Path(path)
    if root.is_dir():
        files = [
            f
            for f, first, last in log_files(root)
            if (end is None or first <= end) and (start is None or last >= start)
        ]
    elif root.exists():
        files = [root]
    else:
        raise ReplayError(f"{root}: no such flow log file or directory.")
    reads = []
    for file in files:
        try:
            metadata = pq.ParquetFile(file).metadata
        except Exception as err:  # pyarrow's errors are ArrowInvalid / OSError
            raise ReplayError(f"{file}: not a readable Parquet file ({str(err).splitlines()[0]}).") from None
        names = [metadata.schema.column(i).name for i in range(metadata.num_columns)]
        for group in range(metadata.num_row_groups):
            first, last = _group_range(metadata.row_group(group), names)
            if (end is not None and first is not None and first > end) or (
                start is not None and last is not None and last < start
            ):
                continue
            reads.append((file, group))
    return reads


def _group_range(group: Any, names: list[str]) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    """The earliest start and the latest end of a row group, from its statistics (None: unknown)."""
    firsts, lasts = [], []
    for name in ("time_start", "time"):
        stats = _stats(group, names, name)
        if stats is not None:
            firsts.append(utc(stats.min))
    for name in ("time_end", "time"):
        stats = _stats(group, names, name)
        if stats is not None:
            lasts.append(utc(stats.max))
    return (min(firsts) if firsts else None), (max(lasts) if lasts else None)


def _stats(group: Any, names: list[str], name: str) -> Any:
    if name not in names:
        return None
    stats = group.column(names.index(name)).statistics
    return stats if stats is not None and stats.has_min_max else None


def read_flowlog(
    path: str | Path, since: Any = None, until: Any = None, filter: str = "", records: Records = "flows"
) -> pd.DataFrame:
    """The flows (or events) of a flow log directory or a Parquet capture between `since` and `until` (UTC;
    a flow is in when its interval meets the range) that `filter` (the filter language of `flowscope top`)
    passes, in time order. Raises flowscope.formats.jsonl.ReplayError, one sentence, for a file it cannot read."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from flowscope.formats.parquet import typed_frame
    from flowscope.formats.prefilter import prefilter

    chosen = parse_filter(filter)
    columns = READ_FLOW_COLUMNS if records == "flows" else READ_EVENT_COLUMNS
    kind = "flow" if records == "flows" else "event"
    tables = []
    wanted: dict[Path, list[str]] = {}
    handles: dict[Path, Any] = {}
    for file, group in planned_reads(path, since, until):
        if file not in handles:
            names = set(pq.ParquetFile(file).schema_arrow.names)
            wanted[file] = ["record", *(name for name in columns if name in names)]
            categorical = [name for name in wanted[file] if columns.get(name) == CATEGORY]
            handles[file] = pq.ParquetFile(file, read_dictionary=categorical)
        try:
            table = handles[file].read_row_group(group, columns=wanted[file])
        except (OSError, pa.ArrowException) as err:
            raise ReplayError(f"{file}: row group {group}: {str(err).splitlines()[0]}.") from None
        tables.append(prefilter(chosen, _records_of(table, kind, pc), records))
    return _selected(typed_frame(tables, columns), records, utc(since), utc(until), chosen)


def _records_of(table: Any, kind: str, pc: Any) -> Any:
    """The rows of one record kind of a row group, without the record column: a zero-copy slice when they are
    contiguous (the flow log writes an interval's flows, then its events, then its interval row), else a
    filtered copy."""
    rows = pc.indices_nonzero(pc.equal(table.column("record"), kind))
    table = table.drop_columns(["record"])
    if len(rows) == 0:
        return table.slice(0, 0)
    first, last = rows[0].as_py(), rows[-1].as_py()
    return table.slice(first, len(rows)) if last - first + 1 == len(rows) else table.take(rows)


def _selected(frame: pd.DataFrame, records: Records, start: Any, end: Any, chosen: Any) -> pd.DataFrame:
    """The records in [start, end] of a frame of the reader's own (dropped after: its arrays are reused) that
    the filter passes, in time order, typed as the readers type them."""
    if records == "flows":
        keep = _in_range(frame["time_end"], frame["time_start"], start, end) & chosen.flows_mask(frame)
        order, columns = ["time_start", "time_end"], READ_FLOW_COLUMNS
    else:
        keep = _in_range(frame["time"], frame["time"], start, end) & chosen.events_mask(frame)
        order, columns = ["time"], READ_EVENT_COLUMNS
    frame = frame if keep.all() else frame[keep]  # indexing copies every column: only when rows go
    if not _in_order(frame, order):  # a log's row groups come in time order: most reads are sorted already
        frame = frame.sort_values(order, kind="stable")
    return conform(frame.reset_index(drop=True), columns, copy=False)


def _in_order(frame: pd.DataFrame, order: list[str]) -> bool:
    """Whether the rows are sorted by the `order` columns (times, none null) as a stable sort leaves them."""
    keys = [frame[name] for name in order]
    if len(frame) < 2:
        return True
    if any(key.hasnans for key in keys):
        return False  # a sort puts them last
    ascending, tied = np.zeros(len(frame) - 1, dtype=bool), np.ones(len(frame) - 1, dtype=bool)
    for key in keys:
        step = np.diff(key.to_numpy(dtype="datetime64[ns]").view(np.int64))
        ascending |= tied & (step > 0)
        tied &= step == 0
    return bool((ascending | tied).all())


def _in_range(ends: pd.Series, starts: pd.Series, since: pd.Timestamp | None, until: pd.Timestamp | None) -> Any:
    keep = pd.Series(True, index=ends.index)
    if since is not None:
        keep &= (ends >= since).fillna(True)
    if until is not None:
        keep &= (starts <= until).fillna(True)
    return keep.to_numpy(dtype=bool)


def read_capture(
    path: str | Path, since: Any = None, until: Any = None, filter: str = "", records: Records = "flows"
) -> pd.DataFrame:
    """The flows (or events) of a capture file: Parquet (read as a flow log) or `capture -o jsonl` lines."""
    from flowscope.formats.jsonl import open_replay
    from flowscope.formats.parquet import is_parquet

    if is_parquet(str(path)):
        return read_flowlog(path, since, until, filter, records)
    batches = list(open_replay(str(path)))
    columns = READ_FLOW_COLUMNS if records == "flows" else READ_EVENT_COLUMNS
    frames = [getattr(batch, records) for batch in batches if len(getattr(batch, records))]
    frame = pd.concat(frames, ignore_index=True) if frames else empty_frame(columns)
    return _selected(frame, records, utc(since), utc(until), parse_filter(filter))

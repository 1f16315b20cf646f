"""Parquet: the flow log's files, `capture --file X.parquet`, and `--replay` of either.

One schema holds the whole record stream, told apart by the `record` column like the JSON lines' "type":
  record = "flow"       a flow of one interval: FLOW_COLUMNS
  record = "event"      an event: EVENT_COLUMNS (the columns it shares with flows, e.g. the 5-tuple, are the same)
  record = "interval"   closes an interval: time_start, time_end, coverage (JSON text)
Each interval is one row group, so a reader picks intervals by the row groups' time statistics. Text columns
are dictionary-encoded and pages zstd-compressed; integers keep the schema's exact widths and signedness;
labels are a map<string, string>.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flowscope.coverage import Coverage
from flowscope.formats.jsonl import ReplayError
from flowscope.schema import CATEGORY, EVENT_COLUMNS, FLOW_COLUMNS, UTC_TIME, FlowBatch, conform, empty_frame

PARQUET_MAGIC = b"PAR1"
RECORD_KINDS = ("flow", "event", "interval")
# Every column once: the flow columns, then what only events have, then the interval's coverage.
COLUMNS: dict[str, str] = {
    "record": "string",
    **FLOW_COLUMNS,
    **{name: dtype for name, dtype in EVENT_COLUMNS.items() if name not in FLOW_COLUMNS},
    "coverage": "string",
}
_ARROW_INTEGERS = ("UInt8", "UInt16", "UInt32", "UInt64", "Int64")
# A flow log directory's complete files: flows_<first instant>_<last instant>.parquet (UTC, nanoseconds).
STAMP = "%Y%m%dT%H%M%S"
FILE_NAME = re.compile(r"^flows_(\d{8}T\d{6}\.\d{9}Z)_(\d{8}T\d{6}\.\d{9}Z)(?:\.\d+)?\.parquet$")


def stamp(value: pd.Timestamp) -> str:
    value = pd.Timestamp(value).tz_convert("UTC")
    return f"{value.strftime(STAMP)}.{value.microsecond * 1000 + value.nanosecond:09d}Z"


def parse_stamp(text: str) -> pd.Timestamp:
    seconds, fraction = text[:-1].split(".")
    return pd.Timestamp(f"{seconds[:8]}T{seconds[9:]}", tz="UTC") + pd.Timedelta(int(fraction), "ns")


def log_file_name(first: pd.Timestamp, last: pd.Timestamp, copy: int = 0) -> str:
    """The name of a complete file; `copy` > 0 tells apart files of the same range (a recording replayed twice)."""
    return f"flows_{stamp(first)}_{stamp(last)}{f'.{copy}' if copy else ''}.parquet"


def log_files(directory: str | os.PathLike[str]) -> list[tuple[Path, pd.Timestamp, pd.Timestamp]]:
    """The complete files of a flow log directory with their time ranges, oldest first."""
    found = []
    for path in Path(directory).iterdir():
        match = FILE_NAME.match(path.name)
        if match:
            found.append((path, parse_stamp(match.group(1)), parse_stamp(match.group(2))))
    return sorted(found, key=lambda entry: (entry[1], entry[2], entry[0].name))


def is_parquet(path: str) -> bool:
    """A Parquet file, or a flow log directory of them."""
    if os.path.isdir(path):
        return True
    if not os.path.isfile(path):  # a pipe (a FIFO, /dev/stdin) is JSON lines: peeking would eat its first bytes
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def arrow_schema() -> Any:
    import pyarrow as pa

    def arrow_type(dtype: str) -> Any:
        if dtype == UTC_TIME:
            return pa.timestamp("ns", tz="UTC")
        if dtype == "string":
            return pa.string()
        if dtype == "object":  # labels
            return pa.map_(pa.string(), pa.string())
        if dtype in _ARROW_INTEGERS:
            return pa.from_numpy_dtype(np.dtype(dtype.lower()))
        raise TypeError(f"no Parquet type for column type {dtype}")

    return pa.schema([pa.field(name, arrow_type(dtype)) for name, dtype in COLUMNS.items()])


def batch_table(batch: FlowBatch) -> Any:
    """The batch's flows, events and interval row as one Arrow table in COLUMNS (one row group when written)."""
    import pyarrow as pa

    interval = pd.DataFrame(
        {
            "time_start": pd.Series([batch.time_start], dtype=UTC_TIME),
            "time_end": pd.Series([batch.time_end], dtype=UTC_TIME),
            "coverage": pd.Series([json.dumps(batch.coverage.to_dict(), separators=(",", ":"))], dtype="string"),
        }
    )
    parts = [(batch.flows, "flow"), (batch.events, "event"), (interval, "interval")]
    schema = arrow_schema()
    tables = [_arrow_table(frame, kind, schema) for frame, kind in parts if len(frame) or kind == "interval"]
    return pa.concat_tables(tables)


def _arrow_table(frame: pd.DataFrame, kind: str, schema: Any) -> Any:
    import pyarrow as pa

    arrays = []
    for field in schema:
        if field.name == "record":
            arrays.append(pa.array(np.full(len(frame), kind, dtype=object), type=field.type))
        elif field.name not in frame.columns:
            arrays.append(pa.nulls(len(frame), type=field.type))
        elif pa.types.is_map(field.type):
            values = [None if v is None else list(v.items()) for v in frame[field.name].array]
            arrays.append(pa.array(values, type=field.type))
        else:
            arrays.append(pa.array(frame[field.name].array, type=field.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_batch(writer: Any, batch: FlowBatch) -> int:
    """Writes the batch as one row group of `writer` (a pyarrow ParquetWriter over arrow_schema()); returns
    its rows."""
    table = batch_table(batch)
    writer.write_table(table, row_group_size=table.num_rows)
    return table.num_rows


def open_writer(sink: Any) -> Any:
    """A ParquetWriter of the flow log's layout over `sink` (a path or a binary file)."""
    import pyarrow.parquet as pq

    return pq.ParquetWriter(sink, arrow_schema(), compression="zstd", use_dictionary=True)


def frames_from_table(table: Any) -> tuple[pd.DataFrame, pd.DataFrame, list[tuple[pd.Timestamp, pd.Timestamp, str]]]:
    """(flows, events, intervals as (start, end, coverage JSON)) of a table in COLUMNS, typed as the schema."""
    import pyarrow.compute as pc

    kinds = table.column("record")
    flows = typed_frame([table.filter(pc.equal(kinds, "flow"))], FLOW_COLUMNS)
    events = typed_frame([table.filter(pc.equal(kinds, "event"))], EVENT_COLUMNS)
    if "coverage" not in table.column_names:
        return flows, events, []
    marks = table.filter(pc.equal(kinds, "interval")).select(["time_start", "time_end", "coverage"]).to_pylist()
    intervals = [(pd.Timestamp(m["time_start"]), pd.Timestamp(m["time_end"]), m["coverage"] or "{}") for m in marks]
    return flows, events, intervals


_PANDAS_TYPES: dict[Any, Any] = {}  # Arrow type -> pandas nullable type, filled at the first read


def typed_frame(tables: list[Any], columns: dict[str, str]) -> pd.DataFrame:
    """The rows of `tables` (Arrow tables, in order) as a frame of `columns`, typed as `columns` say (absent
    columns null). The list is emptied and each column's Arrow buffers are let go as soon as the column is
    converted, so the Arrow copy of the rows shrinks as the frame grows (36M flows: an 8.0 GiB frame, a ~13.5
    GiB peak). A categorical column comes from the tables' dictionaries (read with read_dictionary=, or
    encoded here) without a Python string per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not any(table.num_rows for table in tables):
        tables.clear()
        return empty_frame(columns)
    if not _PANDAS_TYPES:
        _PANDAS_TYPES.update({pa.string(): pd.StringDtype(), pa.large_string(): pd.StringDtype()})
        _PANDAS_TYPES.update(
            {pa.from_numpy_dtype(np.dtype(t.lower())): pd.api.types.pandas_dtype(t) for t in _ARROW_INTEGERS}
        )
    table = pa.concat_tables(tables, promote_options="default")
    tables.clear()
    arrow = {name: table.column(name) for name in columns if name in table.column_names}
    del table
    data: dict[str, Any] = {}
    while arrow:
        name, column = arrow.popitem()
        if columns[name] == "object":
            data[name] = _objects(column)
        elif columns[name] == CATEGORY:
            data[name] = (column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)).to_pandas()
        else:
            data[name] = column.to_pandas(types_mapper=_PANDAS_TYPES.get)
        del column
    return conform(pd.DataFrame(data, copy=False), columns, copy=False)


def _objects(column: Any) -> np.ndarray:
    """A map column (labels) as dicts, None for null: only the rows that hold a map become Python objects."""
    out = np.full(len(column), None, dtype=object)
    rows = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
    if len(rows):
        out[rows] = [dict(pairs) for pairs in column.take(rows).to_pylist()]
    return out


def read_recording(path: str) -> Iterator[FlowBatch]:
    """The FlowBatches of a Parquet file, or of every complete file of a flow log directory, in time order."""
    if not os.path.isdir(path):
        yield from read_batches(path)
        return
    for file, _, _ in log_files(path):
        yield from read_batches(str(file))


def read_batches(path: str) -> Iterator[FlowBatch]:
    """The FlowBatches of a flowscope Parquet file, one per interval, in the order written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ReplayError(f"{path}: not a readable Parquet file ({_first_line(err)}).") from None
    missing = [
        name for name in ("record", "time_start", "time_end", "coverage") if name not in handle.schema_arrow.names
    ]
    if missing:
        raise ReplayError(f"{path}: not a flowscope flow log (no column {missing[0]!r}).")
    for group in range(handle.num_row_groups):
        try:
            table = handle.read_row_group(group)
            flows, events, intervals = frames_from_table(table)
        except (OSError, pa.ArrowException, ValueError, TypeError) as err:
            raise ReplayError(f"{path}: row group {group}: {_first_line(err)}.") from None
        if not intervals:
            raise ReplayError(f"{path}: row group {group} has no interval row.")
        start, end, coverage = intervals[-1]
        try:
            counts = Coverage.from_dict(json.loads(coverage))
        except (ValueError, AttributeError, TypeError):
            raise ReplayError(f"{path}: row group {group}: its coverage is not flowscope's JSON.") from None
        yield FlowBatch(start, end, flows, events, counts)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")

"""The Parquet record stream (flowscope.formats.parquet): every column of flows and events comes back with its
value, its type and its nulls; the file's physical types are the schema's exact widths; bad files are one
sentence."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowscope.coverage import Coverage
from flowscope.formats import parquet
from flowscope.formats.jsonl import ReplayError
from flowscope.schema import EVENT_COLUMNS, FLOW_COLUMNS, UTC_TIME, FlowBatch, events_frame, flows_frame

MAXIMA = {"UInt8": 255, "UInt16": 65535, "UInt32": 2**32 - 1, "UInt64": 2**64 - 1, "Int64": -(2**63)}


def full_row(columns: dict[str, str], text: str) -> dict[str, object]:
    """One row with every column set: text columns to `text`-derived names, integers to their extremes."""
    row: dict[str, object] = {}
    for name, dtype in columns.items():
        if dtype == UTC_TIME:
            row[name] = pd.Timestamp("2026-12-03T15:00:00.123456789Z")
        elif dtype == "string":
            row[name] = f"{text}-{name}"
        elif dtype == "object":
            row[name] = {"app": "shop", "tier": "web"}
        else:
            row[name] = MAXIMA[dtype]
    return row


def typed(rows: list[dict[str, object]], columns: dict[str, str]) -> pd.DataFrame:
    frame = pd.DataFrame({name: pd.Series([row[name] for row in rows], dtype=dtype) for name, dtype in columns.items()})
    return flows_frame(frame) if columns is FLOW_COLUMNS else events_frame(frame)


def two_batches() -> list[FlowBatch]:
    null_flow = {name: None for name in FLOW_COLUMNS} | {"time_start": pd.Timestamp("2026-12-03T15:00:00Z")}
    flows = typed([full_row(FLOW_COLUMNS, "a"), null_flow], FLOW_COLUMNS)
    events = typed([full_row(EVENT_COLUMNS, "e")], EVENT_COLUMNS)
    coverage = Coverage()
    coverage.add("flow_map", produced=7, delivered=5, lost=2)
    first = FlowBatch(
        pd.Timestamp("2026-12-03T15:00:00Z"), pd.Timestamp("2026-12-03T15:00:01Z"), flows, events, coverage
    )
    second = FlowBatch.empty(pd.Timestamp("2026-12-03T15:00:01Z"), pd.Timestamp("2026-12-03T15:00:02Z"))
    return [first, second]


def write(path, batches: list[FlowBatch]) -> None:
    with parquet.open_writer(str(path)) as writer:
        for batch in batches:
            parquet.write_batch(writer, batch)


def test_every_column_round_trips_with_its_type_and_nulls(tmp_path):
    batches = two_batches()
    write(tmp_path / "log.parquet", batches)
    back = list(parquet.read_batches(str(tmp_path / "log.parquet")))
    assert len(back) == 2
    for written, read in zip(batches, back, strict=True):
        pd.testing.assert_frame_equal(read.flows, written.flows)
        pd.testing.assert_frame_equal(read.events, written.events)
        assert (read.time_start, read.time_end) == (written.time_start, written.time_end)
        assert read.coverage.to_dict() == written.coverage.to_dict()
    assert back[0].flows.loc[0, "bytes"] == 2**64 - 1 and back[0].events.loc[0, "pid"] == -(2**63)
    assert back[0].flows.loc[0, "src_labels"] == {"app": "shop", "tier": "web"}
    assert back[0].flows.loc[1, "src_labels"] is None and pd.isna(back[0].flows.loc[1, "packets"])
    assert back[1].flows.empty and back[1].events.empty


def test_the_file_keeps_exact_widths_one_row_group_per_interval_and_dictionary_text(tmp_path):
    write(tmp_path / "log.parquet", two_batches())
    handle = pq.ParquetFile(tmp_path / "log.parquet")
    assert handle.num_row_groups == 2
    assert [handle.metadata.row_group(i).num_rows for i in range(2)] == [4, 1]  # 2 flows + 1 event + 1 interval
    schema = handle.schema_arrow
    assert schema.field("bytes").type == pa.uint64() and schema.field("src_port").type == pa.uint16()
    assert schema.field("ip_version").type == pa.uint8() and schema.field("pid").type == pa.int64()
    assert schema.field("time_start").type == pa.timestamp("ns", tz="UTC")
    assert schema.field("src_labels").type == pa.map_(pa.string(), pa.string())
    column = handle.metadata.row_group(0).column(schema.get_field_index("src_pod"))
    assert column.compression == "ZSTD" and "RLE_DICTIONARY" in column.encodings


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PAR1 not really", "not a readable Parquet file"),
        (None, "not a flowscope flow log (no column 'record')"),
    ],
)
def test_a_bad_file_is_one_sentence(tmp_path, content, message):
    path = tmp_path / "bad.parquet"
    if content is None:
        pq.write_table(pa.table({"x": [1]}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(ReplayError) as raised:
        list(parquet.read_batches(str(path)))
    assert str(raised.value).startswith(f"{path}: {message}")
    assert "\n" not in str(raised.value)

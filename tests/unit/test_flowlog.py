"""The flow log sink (exporters/flowlog.py) and its reader (analysis.read_flowlog): files complete under their
final names with their time range, rotation by size and age, retention by total size and age, SIGHUP, a
failing write counted as loss, and reads that open only the row groups a time range needs."""

import errno
import os

import pandas as pd
import pytest

from flowscope.analysis.flowlog import planned_reads, read_flowlog
from flowscope.config import FlowLogConfig
from flowscope.exporters.flowlog import FlowLogSink
from flowscope.formats import parquet
from flowscope.pipeline.sink import SinkError, records
from flowscope.schema import as_read
from tests.ui.scenario import shop_batches

SHOP = shop_batches()  # 5 two-second intervals from 2025-03-01T12:00:00Z, 22 flows and 11 events


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sink_for(directory, clock: Clock | None = None, **settings) -> FlowLogSink:
    sink = FlowLogSink(FlowLogConfig(directory=str(directory), **settings), monotonic=clock or Clock())
    sink.open()
    return sink


def everything(kind: str) -> pd.DataFrame:
    frame = pd.concat([getattr(b, kind) for b in SHOP], ignore_index=True)
    order = ["time_start", "time_end"] if kind == "flows" else ["time"]
    return frame.sort_values(order, kind="stable").reset_index(drop=True)


def test_the_log_reads_back_every_record_and_settles_when_a_file_is_complete(tmp_path):
    sink = sink_for(tmp_path)
    for batch in SHOP:
        sink.write(batch)
    assert sink.settled() == (0, 0)  # all in the open file: not readable yet, not settled
    assert next(p.name for p in tmp_path.iterdir()).startswith(".partial-")
    sink.close()
    assert sink.settled() == (33, 0)
    (name,) = [p.name for p in tmp_path.iterdir()]
    assert name == "flows_20250301T120000.000000000Z_20250301T120010.000000000Z.parquet"
    pd.testing.assert_frame_equal(read_flowlog(tmp_path), as_read(everything("flows"), "flows"))
    pd.testing.assert_frame_equal(read_flowlog(tmp_path, records="events"), as_read(everything("events"), "events"))


def test_rotation_by_age_and_by_size_and_sighup(tmp_path):
    clock = Clock()
    sink = sink_for(tmp_path / "age", clock, rotate_age=2.0)
    for second, batch in enumerate(SHOP):
        clock.now = float(second)
        sink.write(batch)
    sink.close()
    assert len(parquet.log_files(tmp_path / "age")) == 3  # intervals 0-1, 2-3 and 4 (by the agent's clock)
    sink = sink_for(tmp_path / "size", rotate_size=1)  # every file is past 1 byte after its first interval
    for batch in SHOP:
        sink.write(batch)
    sink.reopen()
    assert len(parquet.log_files(tmp_path / "size")) == 5 and sink.current is None
    assert sink.settled() == (33, 0)
    sink.close()
    assert len(read_flowlog(tmp_path / "size")) == 22


def test_retention_deletes_the_oldest_files_past_the_total_size(tmp_path):
    sink = sink_for(tmp_path, rotate_size=1)
    for batch in SHOP:
        sink.write(batch)
    sink.close()
    sizes = [f.stat().st_size for f, _, _ in parquet.log_files(tmp_path)]
    # Room for the newest two and one more of the first one's size (the new file holds the same interval).
    sink = sink_for(tmp_path, rotate_size=1, retain_size=sum(sizes[-2:]) + sizes[0])
    sink.write(SHOP[0])
    sink.close()  # six files; the size keeps the three written last (two of the first run, this one)
    kept = parquet.log_files(tmp_path)
    assert [first.second for _, first, _ in kept] == [0, 6, 8] and sink.files_deleted == 3


def test_retention_by_age_counts_when_files_were_written_not_their_records_times(tmp_path):
    sink = sink_for(tmp_path, rotate_size=1)
    for batch in SHOP[:3]:
        sink.write(batch)
    sink.close()
    old = parquet.log_files(tmp_path)[0][0]
    os.utime(old, (0, 0))  # written in 1970
    sink = sink_for(tmp_path, rotate_size=1, retain_age="1d")
    sink.write(SHOP[3])
    sink.close()
    assert [first.second for _, first, _ in parquet.log_files(tmp_path)] == [2, 4, 6]  # 2025's records stay


def test_a_failed_write_abandons_the_file_and_counts_its_records_lost(tmp_path, monkeypatch):
    sink = sink_for(tmp_path)
    sink.write(SHOP[0])
    sink.write(SHOP[1])

    def full(writer, batch):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(parquet, "write_batch", full)
    sink.write(SHOP[2])
    lost = records(SHOP[0]) + records(SHOP[1]) + records(SHOP[2])
    assert sink.settled() == (0, lost)
    assert sink.health()["state"] == "failing"
    assert sink.health()["error"] == f"cannot write the flow log in {tmp_path} (No space left on device)"
    assert [p.name for p in tmp_path.iterdir()] == []  # the abandoned partial file is gone
    monkeypatch.undo()
    sink.write(SHOP[3])
    sink.close()
    assert sink.settled() == (records(SHOP[3]), 0) and sink.health()["state"] == "ok"
    assert len(read_flowlog(tmp_path)) == len(SHOP[3].flows)


def test_an_unwritable_directory_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SinkError) as raised:
        sink_for(tmp_path / "file" / "log")
    assert (
        str(raised.value)
        == f"cannot write the flow log in {tmp_path}/file/log (Not a directory); choose a writable --data-dir."
    )


def test_a_partial_file_left_by_a_kill_is_ignored_by_readers_and_removed_at_start(tmp_path):
    sink = sink_for(tmp_path)
    sink.write(SHOP[0])
    sink.close()
    (tmp_path / ".partial-20261126T100001.000000000Z-99.parquet").write_bytes(b"PAR1 cut short")
    assert len(read_flowlog(tmp_path)) == len(SHOP[0].flows)
    sink_for(tmp_path).close()
    assert [p.name.startswith("flows_") for p in tmp_path.iterdir()] == [True]


def test_a_time_range_reads_only_its_row_groups_and_rows(tmp_path):
    sink = sink_for(tmp_path, rotate_age=1e9)
    for batch in SHOP:
        sink.write(batch)
    sink.close()
    since, until = "2025-03-01T12:00:03Z", "2025-03-01T12:00:05Z"
    assert [group for _, group in planned_reads(tmp_path, since, until)] == [1, 2]  # of row groups 0..4
    frame = read_flowlog(tmp_path, since=since, until=until)
    flows = everything("flows")
    inside = (flows["time_end"] >= pd.Timestamp(since)) & (flows["time_start"] <= pd.Timestamp(until))
    pd.testing.assert_frame_equal(frame, as_read(flows[inside], "flows"))
    assert 0 < len(frame) < 22


def test_the_filter_language_selects_what_top_selects(tmp_path):
    sink = sink_for(tmp_path)
    for batch in SHOP:
        sink.write(batch)
    sink.close()
    from flowscope.filters import parse_filter

    chosen = parse_filter("namespace=shop verdict=dropped")
    expected = as_read(chosen.flows(everything("flows")), "flows")
    pd.testing.assert_frame_equal(read_flowlog(tmp_path, filter="namespace=shop verdict=dropped"), expected)
    assert len(expected) > 0

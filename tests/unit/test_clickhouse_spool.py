"""The ClickHouse sink's disk spool (exporters/clickhouse_spool.py) on a real directory: inserts read back
exactly and in order after a restart, the size bound drops the oldest files, what a crash leaves half-written
is removed at the next start, and a file that no longer reads is an error that says why. With a server that
refuses connections (loopback port 1), the sink spools what waits and the next start adopts it."""

from __future__ import annotations

import logging
import os
import uuid

import pandas as pd
import pytest

from flowscope.config import ClickHouseConfig
from flowscope.exporters.clickhouse import ClickHouseSink
from flowscope.exporters.clickhouse_spool import SPOOL_DIRECTORY, Spool, SpoolFileError
from flowscope.pipeline.sink import SinkError, records
from tests.ui.scenario import shop_batches

SHOP = shop_batches()  # 22 flows and 11 events in 5 intervals
BIG = 1 << 30


def block_id() -> str:
    return uuid.uuid4().hex


def inserts() -> list[tuple[str, pd.DataFrame, str]]:
    return [
        (table, getattr(b, table), block_id()) for b in SHOP for table in ("flows", "events") if len(getattr(b, table))
    ]


def test_inserts_read_back_exactly_and_in_order_after_a_restart(tmp_path):
    spool = Spool(tmp_path, BIG)
    assert spool.open() == 0
    written = inserts()
    for table, frame, ident in written:
        assert spool.add(table, frame, ident) == []
    again = Spool(tmp_path, BIG)
    assert again.open() == 33 == sum(records(b) for b in SHOP)
    assert [(e.table, e.rows, e.block_id) for e in again.entries] == [(t, len(f), i) for t, f, i in written]
    for entry, (_, frame, _) in zip(again.entries, written, strict=True):
        pd.testing.assert_frame_equal(again.load(entry), frame.reset_index(drop=True), check_dtype=True)
    again.add("flows", SHOP[0].flows, block_id())  # numbered after what it took over
    assert [e.sequence for e in again.entries] == list(range(len(written) + 1))


def test_past_its_size_the_oldest_files_are_dropped(tmp_path):
    spool = Spool(tmp_path, BIG)
    spool.open()
    spool.add("flows", SHOP[0].flows, block_id())
    size = spool.entries[0].size  # the same records make the same file: three of them take 3 * size
    bounded = Spool(tmp_path / "bounded", 2 * size + size // 2)
    bounded.open()
    kept = [block_id() for _ in range(3)]
    assert bounded.add("flows", SHOP[0].flows, kept[0]) == []
    assert bounded.add("flows", SHOP[0].flows, kept[1]) == []
    (dropped,) = bounded.add("flows", SHOP[0].flows, kept[2])
    assert (dropped.block_id, dropped.rows) == (kept[0], len(SHOP[0].flows))
    assert not dropped.path.exists()
    assert [e.block_id for e in bounded.entries] == kept[1:]
    assert sorted(p.name for p in (tmp_path / "bounded").iterdir()) == [e.path.name for e in bounded.entries]
    assert bounded.size == sum(p.stat().st_size for p in (tmp_path / "bounded").iterdir()) == 2 * size


def test_an_insert_larger_than_the_spool_is_dropped_alone(tmp_path):
    spool = Spool(tmp_path, BIG)
    spool.open()
    spool.add("events", SHOP[1].events, block_id())
    small = Spool(tmp_path / "small", spool.entries[0].size + 1)
    small.open()
    small.add("events", SHOP[1].events, block_id())
    (dropped,) = small.add("flows", everything_flows(), block_id())
    assert dropped.rows == 22 and [e.table for e in small.entries] == ["events"]
    assert [p.name for p in (tmp_path / "small").iterdir()] == [small.entries[0].path.name]


def everything_flows() -> pd.DataFrame:
    return pd.concat([b.flows for b in SHOP], ignore_index=True)


def test_the_next_start_removes_a_half_written_file_and_leaves_strangers_alone(tmp_path, caplog):
    spool = Spool(tmp_path, BIG)
    spool.open()
    spool.add("flows", SHOP[0].flows, block_id())
    partial = f".partial-000000000001-flows-4-{block_id()}.parquet"
    (tmp_path / partial).write_bytes(b"PAR1 half")
    (tmp_path / "notes.txt").write_text("mine")
    with caplog.at_level(logging.INFO, logger="flowscope.exporters.clickhouse_spool"):
        again = Spool(tmp_path, BIG)
        assert again.open() == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [spool.entries[0].path.name, "notes.txt"]
    assert [r.getMessage() for r in caplog.records] == [
        f"ClickHouse spool: removed {partial}, which a stopped agent left half-written",
        f"ClickHouse spool: {tmp_path / 'notes.txt'} is not a spool file; it is left alone",
        f"ClickHouse spool: 4 rows in 1 file(s) that an earlier run left in {tmp_path} are written first",
    ]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda path: path.write_bytes(path.read_bytes()[:100]), r"^not a readable Parquet file \(.+\)$"),
        (lambda path: path.write_bytes(b""), r"^not a readable Parquet file \(.+\)$"),
        (
            lambda path: path.rename(path.with_name(path.name.replace("-4-", "-5-"))),
            "^it holds 4 flows rows, not the 5 its name says$",
        ),
    ],
)
def test_a_file_that_does_not_read_back_is_an_error_that_says_why(tmp_path, damage, reason):
    spool = Spool(tmp_path, BIG)
    spool.open()
    spool.add("flows", SHOP[0].flows, block_id())
    damage(spool.entries[0].path)
    again = Spool(tmp_path, BIG)
    again.open()
    with pytest.raises(SpoolFileError, match=reason):
        again.load(again.entries[0])


def test_an_unwritable_spool_directory_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SinkError) as raised:
        Spool(tmp_path / "file" / SPOOL_DIRECTORY, BIG).open()
    assert str(raised.value) == (
        f"cannot write the ClickHouse spool in {tmp_path}/file/{SPOOL_DIRECTORY} (Not a directory); choose a "
        "writable --data-dir or --clickhouse-spool-size 0."
    )


def unreachable_sink(tmp_path, **settings) -> ClickHouseSink:
    config = ClickHouseConfig(url="clickhouse://flowscope@127.0.0.1:1/db", batch_age=0, **settings)
    sink = ClickHouseSink(config, data_dir=str(tmp_path))
    sink.open()  # connection refused: an outage, waited for
    return sink


def test_what_waits_for_an_unreachable_server_is_spooled_and_adopted_by_the_next_start(tmp_path):
    sink = unreachable_sink(tmp_path, spool_size=BIG)
    assert sink.adopted() == 0 and sink.health()["state"] == "degraded"
    for batch in SHOP:
        sink.write(batch)
    health = sink.health()
    assert (health["rows_buffered"], health["spool"]["rows"], health["spool"]["files"]) == (0, 33, 10)
    sink.close()
    assert sink.settled() == (0, 0)  # neither written nor lost: they wait for the next start
    names = sorted(os.listdir(tmp_path / SPOOL_DIRECTORY))
    assert [name.split("-")[1:3] for name in names] == [
        [t, str(len(getattr(b, t)))] for b in SHOP for t in ("flows", "events") if len(getattr(b, t))
    ]
    assert unreachable_sink(tmp_path, spool_size=BIG).adopted() == 33


def test_without_a_spool_nothing_is_written_to_the_data_dir(tmp_path):
    sink = unreachable_sink(tmp_path)
    for batch in SHOP:
        sink.write(batch)
    assert sink.health()["rows_buffered"] == 33 and "spool" not in sink.health()
    sink.close()
    assert sink.settled() == (0, 33)
    assert list(tmp_path.iterdir()) == []

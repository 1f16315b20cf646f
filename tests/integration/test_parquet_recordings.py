"""Parquet recordings on the command line, as a user runs them: `capture --replay shop.jsonl --file out.parquet`
writes one file that reads back (read_flowlog, read_capture, pyarrow) with exactly the recording's flows,
events and totals; `--replay out.parquet` gives, through `capture` and through the agent, exactly the records
of the JSON lines it was made from; and a replay counts its own outputs only, not those of the run that made
the recording."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from flowscope.analysis.flowlog import read_capture, read_flowlog
from flowscope.coverage import Coverage
from flowscope.formats.parquet import read_recording
from tests.integration.replay_agent import SHOP, STOPPED, ReplayAgent, everything, run_flowscope
from tests.ui.scenario import write_replay

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

COMMITTED = Path(__file__).parents[1] / "data" / "shop.parquet"  # the shop recording, as Parquet


def capture(*argv: str) -> str:
    """Runs `flowscope capture ARGV`; its stderr (where the summary goes when the records go to a Parquet file)."""
    result = run_flowscope("capture", *argv)
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    return result.stderr


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["type"] == kind]


def data_path_intervals(records: list[dict]) -> list[dict]:
    """The interval lines with the data path's coverage only: `sink:<name>` counts an output of the run that
    wrote the lines, settled when its thread got to it (an interval's share is the threads' timing)."""
    return [r | {"coverage": {n: c for n, c in r["coverage"].items() if not n.startswith("sink:")}}
            for r in of_type(records, "interval")]  # fmt: skip


def test_capture_to_parquet_reads_back_with_exactly_the_recordings_flows_events_and_totals(tmp_path):
    recording = write_replay(tmp_path / "shop.jsonl", SHOP)
    out = tmp_path / "out.parquet"
    summary = capture("--replay", str(recording), "--file", str(out))
    assert summary == "=== 5 intervals; lost 2 of 35 produced; identity: as recorded\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "shop.jsonl"]  # no partial file left

    for kind in ("flows", "events"):
        pd.testing.assert_frame_equal(read_flowlog(out, records=kind), everything(kind))
        pd.testing.assert_frame_equal(read_capture(out, records=kind), everything(kind))
        pd.testing.assert_frame_equal(read_flowlog(COMMITTED, records=kind), everything(kind))

    table = pq.read_table(out)
    assert pq.ParquetFile(out).metadata.num_row_groups == 5  # one per interval
    assert Counter(table.column("record").to_pylist()) == {"flow": 22, "event": 11, "interval": 5}
    flows = table.filter(pc.equal(table.column("record"), "flow"))
    totals = {name: pc.sum(flows.column(name)).as_py() for name in ("packets", "bytes", "drop_packets", "drop_bytes",
                                                                    "retransmits", "resets")}  # fmt: skip
    assert totals == {name: int(everything("flows")[name].sum()) for name in totals}
    assert totals == {"packets": 1120, "bytes": 1281388, "drop_packets": 15, "drop_bytes": 2794, "retransmits": 3,
                      "resets": 1}  # fmt: skip
    recorded = [(b.time_start, b.time_end, b.coverage.without_sinks().to_dict()) for b in read_recording(str(out))]
    assert recorded == [(b.time_start, b.time_end, b.coverage.to_dict()) for b in SHOP]


def test_a_parquet_recording_replays_through_capture_to_the_records_of_its_json_lines(tmp_path):
    recording = write_replay(tmp_path / "shop.jsonl", SHOP)
    capture("--replay", str(recording), "--file", str(tmp_path / "out.parquet"))
    for name in ("out.parquet", "shop.jsonl"):
        capture("--replay", str(tmp_path / name), "-o", "jsonl", "--file", str(tmp_path / f"{name}.replayed"))
    from_parquet, from_jsonl = lines(tmp_path / "out.parquet.replayed"), lines(tmp_path / "shop.jsonl.replayed")
    recorded = lines(recording)

    for kind in ("flow", "event"):
        assert of_type(from_parquet, kind) == of_type(from_jsonl, kind) == of_type(recorded, kind)
    assert data_path_intervals(from_parquet) == data_path_intervals(from_jsonl) == data_path_intervals(recorded)
    (parquet_summary,), (jsonl_summary,) = of_type(from_parquet, "summary"), of_type(from_jsonl, "summary")
    assert parquet_summary.pop("probes") == [
        {"name": "replay", "active": True, "hook": f"file {tmp_path}/out.parquet", "reason": None, "remedy": None}
    ]
    jsonl_summary.pop("probes")
    assert parquet_summary == jsonl_summary
    assert parquet_summary["coverage"] == {
        "event_ring": {"produced": 13, "delivered": 11, "lost": 2},
        "sink:jsonl": {"produced": 33, "delivered": 33, "lost": 0},
        "tc_flows": {"produced": 22, "delivered": 22, "lost": 0},
    }
    # the committed Parquet recording is the same shop
    capture("--replay", str(COMMITTED), "-o", "jsonl", "--file", str(tmp_path / "committed.replayed"))
    for kind in ("flow", "event"):
        assert of_type(lines(tmp_path / "committed.replayed"), kind) == of_type(recorded, kind)


def test_a_replay_counts_its_own_outputs_not_those_of_the_run_that_made_the_recording(tmp_path):
    # a recording made by a run with outputs of its own: its intervals carry their sink:<name> counts
    recorded_with_outputs = []
    for batch in SHOP:
        coverage = Coverage()
        coverage.merge(batch.coverage)
        coverage.add("sink:jsonl", 100, 90, 10)
        coverage.add("sink:clickhouse", 100, 100, 0)
        recorded_with_outputs.append(replace(batch, coverage=coverage))
    recording = write_replay(tmp_path / "shop.jsonl", recorded_with_outputs)
    capture("--replay", str(recording), "-o", "jsonl", "--file", str(tmp_path / "replayed.jsonl"))
    # before: the recording's counts were added to this run's (sink:jsonl 533 produced, and a sink:clickhouse)
    (summary,) = of_type(lines(tmp_path / "replayed.jsonl"), "summary")
    assert summary["coverage"] == {
        "event_ring": {"produced": 13, "delivered": 11, "lost": 2},
        "sink:jsonl": {"produced": 33, "delivered": 33, "lost": 0},
        "tc_flows": {"produced": 22, "delivered": 22, "lost": 0},
    }


def test_the_agent_replays_a_parquet_recording_into_its_flow_log_as_it_does_the_json_lines(tmp_path):
    recording = write_replay(tmp_path / "shop.jsonl", SHOP)
    capture("--replay", str(recording), "--file", str(tmp_path / "out.parquet"))
    with ReplayAgent.start(tmp_path / "agent", "--exit-at-end", recording=tmp_path / "out.parquet") as agent:
        assert agent.process.wait(120) == 0, agent.stderr()
    assert agent.stderr_lines()[-1] == f"flowscope: {STOPPED}"
    for kind in ("flows", "events"):
        pd.testing.assert_frame_equal(read_flowlog(agent.data_dir, records=kind), everything(kind))

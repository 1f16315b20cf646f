"""`flowscope agent` with its default output, the Parquet flow log, as a process: a replay ends up in the log
exactly, SIGHUP completes the file being written (and the status page shows its records settled), a SIGKILL
mid-run leaves a log that read_flowlog reads, and the next start clears what the kill left."""

from __future__ import annotations

import signal

import pandas as pd
import pytest

from flowscope.analysis.flowlog import read_flowlog
from flowscope.formats import parquet
from flowscope.schema import as_read
from tests.integration.replay_agent import SHOP, STOPPED, ReplayAgent, everything, run_flowscope
from tests.ui.scenario import write_replay
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_a_replay_lands_in_the_log_exactly_and_sighup_completes_the_file(tmp_path):
    with ReplayAgent.start(tmp_path) as agent:
        agent.wait_replayed()
        assert parquet.log_files(tmp_path / "log") == []  # everything is in the file still being written
        agent.process.send_signal(signal.SIGHUP)
        wait_for(lambda: len(parquet.log_files(tmp_path / "log")) == 1, what="the file to be completed")
        # The sink settles at its next write or at close; the status settles into the next interval, so stop.
        assert agent.stop() == 0, agent.stderr()
    pd.testing.assert_frame_equal(read_flowlog(tmp_path / "log"), everything("flows"))
    pd.testing.assert_frame_equal(read_flowlog(tmp_path / "log", records="events"), everything("events"))
    assert agent.stderr_lines()[-1] == f"flowscope: {STOPPED}"


def test_exit_at_end_settles_every_record_as_written(tmp_path):
    with ReplayAgent.start(tmp_path, "--exit-at-end") as agent:
        assert agent.process.wait(timeout=120) == 0
    assert agent.stderr_lines()[-1] == f"flowscope: {STOPPED}", agent.stderr()
    (only,) = parquet.log_files(tmp_path / "log")
    assert len(read_flowlog(only[0])) == 22 and len(read_flowlog(only[0], records="events")) == 11


def test_a_sigkill_leaves_a_log_that_reads_and_the_next_start_clears_the_partial_file(tmp_path):
    with ReplayAgent.start(tmp_path, "--flowlog-rotate-size", "1") as agent:  # a complete file per interval
        agent.wait_replayed()
        wait_for(lambda: len(parquet.log_files(tmp_path / "log")) >= 4, what="four complete files")
        assert agent.flowlog_counts()[2] == 0
        agent.kill()  # the fifth interval is in a partial file
    names = sorted(p.name for p in (tmp_path / "log").iterdir())
    assert len(names) == 5 and names[0].startswith(".partial-")
    frame = read_flowlog(tmp_path / "log")
    expected = everything("flows")
    pd.testing.assert_frame_equal(frame, as_read(expected[expected["time_start"] < SHOP[4].time_start], "flows"))
    with ReplayAgent.start(tmp_path, "--exit-at-end") as again:
        assert again.process.wait(timeout=120) == 0
    assert "removed 1 partial file(s)" in again.stderr()
    assert not any(p.name.startswith(".partial-") for p in (tmp_path / "log").iterdir())
    before_the_kill = expected[expected["time_start"] < SHOP[4].time_start]
    assert len(read_flowlog(tmp_path / "log")) == len(before_the_kill) + 22 == 17 + 22


def test_an_unwritable_data_dir_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_flowscope(
        "agent", "--replay", str(write_replay(tmp_path / "r.jsonl", SHOP)), "--data-dir",
        str(tmp_path / "file" / "log"), "--status-socket", str(tmp_path / "a.sock"), "--exit-at-end",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"flowscope agent: cannot write the flow log in {tmp_path}/file/log (Not a directory); choose a writable "
        "--data-dir."
    )

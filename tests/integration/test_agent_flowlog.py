"""`flowscope agent` with its default output, the Parquet flow log, as a process: a replay ends up in the log
exactly, SIGHUP completes the file being written (and the status page shows its records settled), a SIGKILL
mid-run leaves a log that read_flowlog reads, and the next start clears what the kill left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flowscope.analysis.flowlog import read_flowlog
from flowscope.formats import parquet
from flowscope.pipeline.status import fetch
from flowscope.schema import as_read
from tests.ui.scenario import shop_batches, write_replay
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
SHOP = shop_batches()
# The recording's own losses (its kernel side lost two events); the flow log adds none.
STOPPED = "agent stopped after 5 intervals; lost {'event_ring': 2}"
ENVIRONMENT = {**os.environ, "FLOWSCOPE_GRPC_ENABLED": "false"}  # the flow log is the only output


def everything(kind: str) -> pd.DataFrame:
    frame = pd.concat([getattr(b, kind) for b in SHOP], ignore_index=True)
    order = ["time_start", "time_end"] if kind == "flows" else ["time"]
    return as_read(frame.sort_values(order, kind="stable"), kind)


def start_agent(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    recording = write_replay(tmp_path / "shop.jsonl", SHOP)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        [FLOWSCOPE, "agent", "--replay", str(recording), "--data-dir", str(tmp_path / "log"),
         "--status-socket", str(sock), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT,
    )  # fmt: skip
    return agent, sock


def status(sock: Path) -> dict:
    return json.loads(fetch(str(sock))[1])


def answering(sock: Path) -> bool:
    try:
        return fetch(str(sock))[0] == 200
    except Exception:
        return False


def flowlog_counts(sock: Path) -> tuple[int, int, int]:
    sink = status(sock)["sinks"]["flowlog"]
    return sink["produced"], sink["delivered"], sink["lost"]


def test_a_replay_lands_in_the_log_exactly_and_sighup_completes_the_file(tmp_path):
    agent, sock = start_agent(tmp_path)
    try:
        wait_for(lambda: answering(sock) and status(sock)["source_ended"], what="the replay to end")
        assert parquet.log_files(tmp_path / "log") == []  # everything is in the file still being written
        agent.send_signal(signal.SIGHUP)
        wait_for(lambda: len(parquet.log_files(tmp_path / "log")) == 1, what="the file to be completed")
        # The sink settles at its next write or at close; the status settles into the next interval, so stop.
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, agent.stderr.read()
    finally:
        agent.kill()
        agent.wait()
    pd.testing.assert_frame_equal(read_flowlog(tmp_path / "log"), everything("flows"))
    pd.testing.assert_frame_equal(read_flowlog(tmp_path / "log", records="events"), everything("events"))
    assert agent.stderr.read().splitlines()[-1] == f"flowscope: {STOPPED}"


def test_exit_at_end_settles_every_record_as_written(tmp_path):
    agent, _ = start_agent(tmp_path, "--exit-at-end")
    assert agent.wait(timeout=120) == 0
    stderr = agent.stderr.read()
    assert stderr.splitlines()[-1] == f"flowscope: {STOPPED}", stderr
    (only,) = parquet.log_files(tmp_path / "log")
    assert len(read_flowlog(only[0])) == 22 and len(read_flowlog(only[0], records="events")) == 11


def test_a_sigkill_leaves_a_log_that_reads_and_the_next_start_clears_the_partial_file(tmp_path):
    agent, sock = start_agent(tmp_path, "--flowlog-rotate-size", "1")  # a complete file per interval
    try:
        wait_for(lambda: answering(sock) and status(sock)["source_ended"], what="the replay to end")
        wait_for(lambda: len(parquet.log_files(tmp_path / "log")) >= 4, what="four complete files")
        assert flowlog_counts(sock)[2] == 0
        agent.kill()  # the fifth interval is in a partial file
        agent.wait()
    finally:
        agent.kill()
        agent.wait()
    names = sorted(p.name for p in (tmp_path / "log").iterdir())
    assert len(names) == 5 and names[0].startswith(".partial-")
    frame = read_flowlog(tmp_path / "log")
    expected = everything("flows")
    pd.testing.assert_frame_equal(frame, as_read(expected[expected["time_start"] < SHOP[4].time_start], "flows"))
    again, _ = start_agent(tmp_path, "--exit-at-end")
    assert again.wait(timeout=120) == 0
    assert "removed 1 partial file(s)" in again.stderr.read()
    assert not any(p.name.startswith(".partial-") for p in (tmp_path / "log").iterdir())
    before_the_kill = expected[expected["time_start"] < SHOP[4].time_start]
    assert len(read_flowlog(tmp_path / "log")) == len(before_the_kill) + 22 == 17 + 22


def test_an_unwritable_data_dir_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("")
    result = subprocess.run(
        [FLOWSCOPE, "agent", "--replay", str(write_replay(tmp_path / "r.jsonl", SHOP)), "--data-dir",
         str(tmp_path / "file" / "log"), "--status-socket", str(tmp_path / "a.sock"), "--exit-at-end"],
        capture_output=True, text=True, timeout=60, env=ENVIRONMENT,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"flowscope agent: cannot write the flow log in {tmp_path}/file/log (Not a directory); choose a writable "
        "--data-dir."
    )

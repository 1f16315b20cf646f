"""The agent's status API and `flowscope agent status`, on an agent replaying the shop recording into its flow
log: /healthz is 200 "ok" while every output writes and 503 with the failing output's name once the flow log
cannot write; /status counts every record of the replay (each source's and each output's produced = delivered +
lost); the API answers the same on a loopback TCP port (port 0: the port the agent took, which it logs) as on
its unix socket; `agent status` shows the same numbers as a table and as JSON; the logs are JSON objects with
--log-format json (a start that fails included: its one sentence) and plain text lines by default."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest

from tests.integration.replay_agent import SHOP, SHOP_RECORDS, STOPPED, ReplayAgent, run_flowscope
from tests.ui.scenario import write_replay
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SOURCES = {
    "event_ring": {"produced": 13, "delivered": 11, "lost": 2},
    "tc_flows": {"produced": 22, "delivered": 22, "lost": 0},
}


def over_tcp(port: int, path: str) -> tuple[int, str, bytes]:
    """GET `path` from the status API on 127.0.0.1:`port`: (HTTP status, Content-Type, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def tcp_port(agent: ReplayAgent) -> int:
    """The loopback port the agent's status API took for --status-addr 127.0.0.1:0, from its log line."""
    line = re.compile(rf"flowscope: status API on {re.escape(str(agent.status_socket))} and 127\.0\.0\.1:(\d+)")
    found: list[int] = []

    def logged() -> bool:
        found.extend(int(m[1]) for m in map(line.fullmatch, agent.stderr_lines()) if m)
        return bool(found)

    wait_for(logged, what="the status API's address in the log")
    return found[0]


def flowlog_status(agent: ReplayAgent, **changes: object) -> dict:
    """The flow log's entry of /status for the shop replay: every record in one complete file, unless changed."""
    health = {
        "state": "ok", "directory": str(agent.data_dir), "writing": None, "pending_records": 0, "files_written": 1,
        "files_deleted": 0, "errors": 0, "error": None,
    }  # fmt: skip
    health |= changes.pop("health", {})
    sink = {"produced": SHOP_RECORDS, "delivered": SHOP_RECORDS, "lost": 0, "queued": 0, "capacity": 64,
            "pending": 0, "health": health, "error": None}  # fmt: skip
    return sink | changes


def without_uptime(status: dict) -> dict:
    uptime = status.pop("uptime_seconds")
    assert isinstance(uptime, float) and uptime > 0
    return status


def expected_status(agent: ReplayAgent, flowlog: dict) -> dict:
    return {
        "node": "node-a",  # the recording's
        "intervals": 5,
        "source_ended": True,
        "last_interval_end": "2025-03-01T12:00:10.000000000Z",
        "probes": [{"name": "replay", "active": True, "hook": f"file {agent.recording}", "reason": None}],
        "coverage": SOURCES,
        "sinks": {"flowlog": flowlog},
        "identity": None,  # a replay keeps the identity it was recorded with
    }


def wait_written(agent: ReplayAgent) -> None:
    """Until the flow log holds every record of the replay in the file it is writing (the replay's end means
    only that every batch was queued)."""
    wait_for(lambda: agent.status()["sinks"]["flowlog"]["pending"] == SHOP_RECORDS, what="the flow log to write")


def wait_settled(agent: ReplayAgent) -> None:
    """Until the flow log's file is complete and every record in it is delivered (SIGHUP completes it)."""
    wait_for(lambda: agent.flowlog_counts() == (SHOP_RECORDS, SHOP_RECORDS, 0), what="the flow log's file")


def test_healthz_and_status_answer_on_the_socket_and_on_a_loopback_port(tmp_path):
    with ReplayAgent.start(tmp_path, "--status-addr", "127.0.0.1:0") as agent:
        port = tcp_port(agent)
        agent.wait_replayed()
        wait_written(agent)
        agent.process.send_signal(signal.SIGHUP)  # completes the flow log's file: its records are delivered
        wait_settled(agent)

        assert agent.fetch("/healthz") == (200, b"ok\n")
        assert over_tcp(port, "/healthz") == (200, "text/plain", b"ok\n")
        code, kind, body = over_tcp(port, "/status")
        assert (code, kind) == (200, "application/json")
        status = without_uptime(json.loads(body))
        assert status == expected_status(agent, flowlog_status(agent))
        assert without_uptime(agent.status()) == status
        # Every source balances, and the flow log wrote every record the sources delivered.
        for counts in [*status["coverage"].values(), status["sinks"]["flowlog"]]:
            assert counts["produced"] == counts["delivered"] + counts["lost"]
        assert sum(c["delivered"] for c in SOURCES.values()) == status["sinks"]["flowlog"]["produced"] == 33
        not_found = b"not found: the status API has /healthz and /status\n"
        assert over_tcp(port, "/metrics") == (404, "text/plain", not_found)

        assert agent.stop() == 0
    lines = agent.stderr_lines()
    assert (lines[1], lines[-1]) == (f"flowscope: status API on {agent.status_socket} and 127.0.0.1:{port}",
                                     f"flowscope: {STOPPED}")  # fmt: skip
    assert not agent.status_socket.exists()


def test_a_flow_log_that_cannot_complete_its_file_makes_healthz_503_and_counts_its_records_lost(tmp_path):
    with ReplayAgent.start(tmp_path, "--log-format", "json") as agent:
        agent.wait_replayed()
        wait_written(agent)
        assert agent.fetch("/healthz") == (200, b"ok\n")
        shutil.rmtree(agent.data_dir)  # the file being written goes with it
        agent.process.send_signal(signal.SIGHUP)  # completing it fails: its records are lost
        wait_for(lambda: agent.flowlog_counts() == (SHOP_RECORDS, 0, SHOP_RECORDS), what="the records counted lost")

        assert agent.fetch("/healthz") == (503, b"sink flowlog failing\n")
        why = f"cannot complete the flow log's file in {agent.data_dir} (No such file or directory)"
        failing = flowlog_status(
            agent, delivered=0, lost=SHOP_RECORDS, health={"state": "failing", "files_written": 0, "errors": 1,
                                                           "error": why},
        )  # fmt: skip
        assert without_uptime(agent.status()) == expected_status(agent, failing)
        table = run_flowscope("agent", "status", "--status-socket", str(agent.status_socket))
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[-1] == (
            f"  flowlog                          33            0         33  0/64  failing: {why}"
        )
        assert agent.stop() == 0
    logged = [json.loads(line) for line in agent.stderr_lines()]
    assert [(entry["level"], entry["logger"], entry["message"]) for entry in logged][-2:] == [
        ("warning", "flowscope.exporters.flowlog", f"flow log: {why}; 33 records lost"),
        ("info", "flowscope", "agent stopped after 5 intervals; lost {'event_ring': 2, 'sink:flowlog': 33}"),
    ]


def test_agent_status_shows_the_replay_as_a_table_and_as_json(tmp_path):
    def agent_status(*argv: str) -> str:
        result = run_flowscope("agent", "status", "--status-socket", str(agent.status_socket), *argv)
        assert (result.returncode, result.stderr) == (0, "")
        return result.stdout

    def table_without_uptime() -> list[str]:
        lines = agent_status().splitlines()
        assert re.fullmatch(r"uptime        \d+ s, 5 intervals \(the recording ended\)", lines.pop(1)), lines
        return lines

    sources = [
        "node          node-a",
        "probes        replay",
        "sources       produced / delivered / lost",
        "  event_ring                       13           11          2",
        "  tc_flows                         22           22          0",
        "sinks         produced / delivered / lost, queue",
    ]
    with ReplayAgent.start(tmp_path) as agent:
        agent.wait_replayed()
        wait_written(agent)
        # the flow log holds every record in the file it is writing: none settled yet
        holding = "  flowlog                           0            0          0  0/64  ok, 33 pending"
        assert table_without_uptime() == [*sources, holding]
        agent.process.send_signal(signal.SIGHUP)
        wait_settled(agent)
        written = "  flowlog                          33           33          0  0/64  ok"
        assert table_without_uptime() == [*sources, written]
        shown = json.loads(agent_status("-o", "json"))
        assert without_uptime(shown) == expected_status(agent, flowlog_status(agent))
        assert agent.stop() == 0


def test_agent_status_without_an_agent_is_one_sentence(tmp_path):
    result = run_flowscope("agent", "status", "--status-socket", str(tmp_path / "none.sock"))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"flowscope agent: no agent serves {tmp_path}/none.sock; start one with `flowscope agent`.\n"
    )


# A replay's node is the recording's once its first rows are read; the start line comes before, naming this machine.
STARTED = f"agent running on {socket.gethostname()}: replay -> flowlog"


def test_json_logs_are_one_object_a_line_and_text_logs_are_not(tmp_path: Path):
    with ReplayAgent.start(tmp_path / "json", "--exit-at-end", "--log-format", "json") as agent:
        assert agent.process.wait(120) == 0, agent.stderr()
    logged = [json.loads(line) for line in agent.stderr_lines()]
    assert [sorted(entry) for entry in logged] == [["level", "logger", "message", "time"]] * 3
    assert [(entry["level"], entry["logger"], entry["message"]) for entry in logged] == [
        ("info", "flowscope", STARTED),
        ("info", "flowscope", f"status API on {agent.status_socket}"),
        ("info", "flowscope", STOPPED),
    ]
    for entry in logged:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry

    with ReplayAgent.start(tmp_path / "text", "--exit-at-end") as agent:
        assert agent.process.wait(120) == 0, agent.stderr()
    assert agent.stderr_lines() == [
        f"flowscope: {STARTED}",
        f"flowscope: status API on {agent.status_socket}",
        f"flowscope: {STOPPED}",
    ]


def test_an_agent_that_cannot_start_says_why_in_one_json_line_with_json_logs(tmp_path: Path):
    (tmp_path / "file").write_text("")
    recording = write_replay(tmp_path / "shop.jsonl", SHOP)
    argv = ("agent", "--replay", str(recording), "--data-dir", str(tmp_path / "file" / "log"), "--status-socket",
            str(tmp_path / "a.sock"), "--exit-at-end")  # fmt: skip
    why = f"cannot write the flow log in {tmp_path}/file/log (Not a directory); choose a writable --data-dir."
    text, logged = run_flowscope(*argv), run_flowscope(*argv, "--log-format", "json")
    assert (text.returncode, text.stderr) == (1, f"flowscope agent: {why}\n")
    assert logged.returncode == 1
    (line,) = logged.stderr.splitlines()  # before: the sentence as text, the one line a collector could not parse
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == ("error", "flowscope", why)

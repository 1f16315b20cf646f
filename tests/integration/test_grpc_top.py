"""`flowscope top --server` over TLS across processes: a remote agent's recent intervals come first, each as
it was recorded, and through a relay the same records add up to the recording's totals."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path

import pandas as pd
import pytest

from tests.integration.grpc_agents import (
    ENVIRONMENT,
    FLOWSCOPE,
    Agent,
    free_port,
    interval_batches,
    recording,
    run_flowscope,
)
from tests.integration.test_grpc_tls import issue
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)
INTERVALS, SECONDS, FLOWS = 3, 2.0, 3


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    issue(directory, "server", issue(directory, "ca"), server=True)
    return directory


def recent_batches() -> list:
    """Three 2 s intervals that ended a few seconds ago (top --server starts from the recent ones)."""
    start = pd.Timestamp.now(tz="UTC").floor("s") - pd.Timedelta(seconds=INTERVALS * SECONDS + 4)
    return interval_batches(start, INTERVALS, SECONDS, FLOWS, "a")


def tls_server(pki: Path, port: int) -> list[str]:
    return ["--grpc-addr", f"127.0.0.1:{port}", "--tls-cert", str(pki / "server.pem"), "--tls-key",
            str(pki / "server-key.pem")]  # fmt: skip


def key(i: int) -> str:
    return f"UDP 10.205.0.1:{10000 + i} -> 10.205.0.2:8443"


def test_top_shows_a_remote_agent_over_tls_from_its_recent_intervals(tmp_path, pki):
    batches = recent_batches()
    port = free_port()
    path = recording(tmp_path / "a.jsonl", batches)
    with Agent.start(tmp_path, path, "--speed", "0", *tls_server(pki, port), name="a") as agent:
        wait_for(lambda: agent.client().status().seen == INTERVALS * FLOWS, 60, "the agent holding the recording")
        top = run_flowscope("top", "--server", f"127.0.0.1:{port}", "--tls-ca", str(pki / "ca.pem"), "-o", "jsonl",
                            "1", str(INTERVALS))  # fmt: skip
    assert top.returncode == 0, top.stderr
    rows = [json.loads(line) for line in top.stdout.splitlines()]
    got = sorted((r["time_end"], r["seconds"], r["node"], r["key"], r["bytes"], r["packets"]) for r in rows)
    # interval k: FLOWS flows of k + 1 packets and 100 (k + 1) bytes each, as interval_batches recorded them
    want = sorted(
        (b.time_end.strftime("%Y-%m-%dT%H:%M:%S.%f000Z"), SECONDS, "a", key(i), 100 * (k + 1), k + 1)
        for k, b in enumerate(batches) for i in range(FLOWS)
    )  # fmt: skip
    assert got == want
    plain = run_flowscope("top", "--server", f"127.0.0.1:{port}.x", "-o", "jsonl", "1", "1")
    assert (plain.returncode, plain.stderr) == (1, f"flowscope top: --server '127.0.0.1:{port}.x' is not unix:///PATH "
                                                   "or HOST:PORT.\n")  # fmt: skip


def test_top_shows_a_relay_over_tls(tmp_path, pki):
    batches = recent_batches()
    port = free_port()
    relay_argv = ["--peer", f"unix://{tmp_path / 'a.sock'}", "--relay-interval", "0.1", "--node-name", "relay"]
    with (
        Agent.start(tmp_path, recording(tmp_path / "a.jsonl", batches), "--speed", "0", name="a"),
        Agent.start(tmp_path, None, *relay_argv, *tls_server(pki, port), name="relay", command="relay") as relay,
    ):
        wait_for(lambda: relay.client().status().seen == INTERVALS * FLOWS, 60, "the relay holding a's records")
        argv = [FLOWSCOPE, "top", "--server", f"127.0.0.1:{port}", "--tls-ca", str(pki / "ca.pem"), "-o", "jsonl"]
        top = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
        rows: list[dict] = []
        reader = threading.Thread(target=lambda: rows.extend(json.loads(line) for line in top.stdout), daemon=True)
        reader.start()

        def totals() -> dict[str, tuple[int, int]]:
            keys = {r["key"] for r in list(rows)}
            return {k: (sum(r["bytes"] for r in list(rows) if r["key"] == k),
                        sum(r["packets"] for r in list(rows) if r["key"] == k)) for k in keys}  # fmt: skip

        everything = {key(i): (600, 6) for i in range(FLOWS)}  # 100 + 200 + 300 bytes, 1 + 2 + 3 packets
        try:
            wait_for(lambda: totals() == everything, 60, "the recording's totals in top's rows")
        finally:
            top.send_signal(signal.SIGINT)
            _, errors = top.communicate(timeout=60)
            reader.join(10)
    assert top.returncode == 0, errors
    assert totals() == everything
    assert {r["node"] for r in rows} == {"relay"}

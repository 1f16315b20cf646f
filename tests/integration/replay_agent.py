"""`flowscope agent --replay` of the shop recording as a process, with the flow log as its only output and its
status API on a socket of the test's own; its stderr goes to a file, which the test reads while it runs.

    agent = ReplayAgent.start(tmp_path, "--status-addr", "127.0.0.1:0")
    agent.wait_replayed()                  # the status API answers and the recording has ended
    agent.status()                         # GET /status, as a dict
    agent.stop()                           # SIGTERM; the exit status
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flowscope.pipeline.status import fetch
from flowscope.schema import as_read
from tests.ui.scenario import shop_batches, write_replay
from tests.waiting import wait_for

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
SHOP = shop_batches()
SHOP_RECORDS = sum(len(batch.flows) + len(batch.events) for batch in SHOP)  # 22 flows + 11 events
# The recording's own losses (its kernel side lost two events); the flow log adds none.
STOPPED = "agent stopped after 5 intervals; lost {'event_ring': 2}"
# The flow log is the only output; the node is named by the recording (or this machine's host name), not by
# whatever NODE_NAME the test runner has.
ENVIRONMENT = {name: value for name, value in os.environ.items() if name != "NODE_NAME"} | {
    "FLOWSCOPE_GRPC_ENABLED": "false"
}


def everything(kind: str) -> pd.DataFrame:
    """The shop recording's flows (or events) in time order, as read_flowlog returns them."""
    frame = pd.concat([getattr(b, kind) for b in SHOP], ignore_index=True)
    order = ["time_start", "time_end"] if kind == "flows" else ["time"]
    return as_read(frame.sort_values(order, kind="stable").reset_index(drop=True), kind)


def run_flowscope(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLOWSCOPE, *argv], capture_output=True, text=True, timeout=timeout, env=ENVIRONMENT)


def status(sock: Path) -> dict:
    """GET /status from the agent's status socket, as a dict."""
    return json.loads(fetch(str(sock))[1])


def answering(sock: Path) -> bool:
    try:
        return fetch(str(sock))[0] == 200
    except Exception:
        return False


@dataclass
class ReplayAgent:
    process: subprocess.Popen
    status_socket: Path
    data_dir: Path
    recording: Path
    log: Path  # its stderr

    @classmethod
    def start(cls, directory: Path, *extra: str, recording: Path | None = None) -> ReplayAgent:
        """An agent replaying `recording` (by default the shop recording, as JSON lines) into a flow log under
        `directory`, with its status socket there too."""
        directory.mkdir(parents=True, exist_ok=True)
        recording = recording or write_replay(directory / "shop.jsonl", SHOP)
        sock, data_dir, log = directory / "agent.sock", directory / "log", directory / "agent.log"
        argv = [FLOWSCOPE, "agent", "--replay", str(recording), "--data-dir", str(data_dir), "--status-socket",
                str(sock), *extra]  # fmt: skip
        with open(log, "w") as stderr:
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=ENVIRONMENT)
        return cls(process, sock, data_dir, recording, log)

    def fetch(self, path: str = "/status") -> tuple[int, bytes]:
        return fetch(str(self.status_socket), path)

    def status(self) -> dict:
        return status(self.status_socket)

    def answering(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the agent exited {self.process.returncode}: {self.stderr()}")
        return answering(self.status_socket)

    def wait_replayed(self) -> None:
        wait_for(lambda: self.answering() and self.status()["source_ended"], what="the replay to end")

    def flowlog_counts(self) -> tuple[int, int, int]:
        sink = self.status()["sinks"]["flowlog"]
        return sink["produced"], sink["delivered"], sink["lost"]

    def stderr(self) -> str:
        return self.log.read_text()

    def stderr_lines(self) -> list[str]:
        return self.stderr().splitlines()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def __enter__(self) -> ReplayAgent:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.kill()

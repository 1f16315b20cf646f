"""`flowscope capture -o jsonl` as users run it, as a subprocess inside a lab namespace, read as it writes.

run = Capture.start(netns, ["fstcA"], interval=0.5)   # returns once the first interval is out
... traffic ...
result = run.stop()                                   # SIGINT: the interval under way is drained too
result.flows                                          # every interval's flow rows (a DataFrame)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from flowscope.formats.jsonl import read_batches
from flowscope.schema import FlowBatch
from tests.kernel.lab import Netns

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
BPF_PROG_TYPE_SCHED_CLS = 3
# Compiling the probes takes a few seconds here, a busy CI machine more, and ~100 s in an emulated (TCG) guest
# of the kernel matrix with another capture running: this only bounds a hang.
READY_TIMEOUT = 400.0


@dataclass
class CaptureResult:
    returncode: int
    batches: list[FlowBatch]
    summary: dict
    stderr: str
    lines: list[str] = field(repr=False)

    @property
    def flows(self) -> pd.DataFrame:
        frames = [batch.flows for batch in self.batches if not batch.flows.empty]
        return pd.concat(frames, ignore_index=True) if frames else self.batches[0].flows

    @property
    def events(self) -> pd.DataFrame:
        """Every interval's event rows (a DataFrame)."""
        frames = [batch.events for batch in self.batches if not batch.events.empty]
        return pd.concat(frames, ignore_index=True) if frames else self.batches[0].events

    def coverage(self, source: str) -> list[dict[str, int]]:
        """One {"produced", "delivered", "lost"} per interval for `source` (zeros where it reported nothing)."""
        empty = {"produced": 0, "delivered": 0, "lost": 0}
        return [batch.coverage.to_dict().get(source, empty) for batch in self.batches]


@dataclass
class Held:
    """The BPF objects a process holds, from its fdinfo."""

    programs: dict[int, int]  # program id -> program type
    raw_tracepoints: dict[str, int]  # tracepoint -> program id, of the raw tracepoint links

    @property
    def tc_programs(self) -> set[int]:
        return {id_ for id_, kind in self.programs.items() if kind == BPF_PROG_TYPE_SCHED_CLS}


def held_by(pid: int) -> Held:
    """What process `pid` holds open: the kernel's own record of which probes it runs."""
    programs: dict[int, int] = {}
    links: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fields = dict(
                line.split(":\t", 1)
                for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
                if ":\t" in line
            )
        except OSError:
            continue
        if "prog_type" in fields:
            programs[int(fields["prog_id"])] = int(fields["prog_type"])
        elif fields.get("link_type") == "raw_tracepoint":
            links[fields["tp_name"]] = int(fields["prog_id"])
    return Held(programs, links)


class Capture:
    def __init__(self, netns: Netns, argv: list[str]) -> None:
        self.argv = argv
        self.process = netns.popen(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._first_interval = threading.Event()
        self._reading = threading.Event()  # cleared: capture's output is left unread (a stuck consumer)
        self._reading.set()
        self._stdout = threading.Thread(target=self._read_stdout, daemon=True)
        self._stderr_text: list[str] = []
        self._stderr = threading.Thread(target=lambda: self._stderr_text.append(self.process.stderr.read()))
        self._stdout.start()
        self._stderr.start()

    @classmethod
    def start(
        cls, netns: Netns, interfaces: list[str], interval: float = 0.5, *extra: str, wait: bool = True
    ) -> Capture:
        """Starts capture; with `wait`, returns once the first interval is written (probes attached, event
        reader open), so traffic sent from then on is all seen."""
        argv = [FLOWSCOPE, "capture", "-o", "jsonl", "--interval", str(interval)]
        for name in interfaces:
            argv += ["-i", name]
        run = cls(netns, [*argv, *extra])
        if wait:
            run.wait_ready()
        return run

    def _read_stdout(self) -> None:
        while self._reading.wait() and (line := self.process.stdout.readline()):
            self.lines.append(line)
            if line.startswith('{"type":"interval"'):
                self._first_interval.set()
        self._first_interval.set()  # ended: wait_ready looks at the exit status

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        if not self._first_interval.wait(timeout):
            self.process.kill()
            raise AssertionError(f"capture wrote no interval within {timeout} s")
        if self.process.poll() is not None and not any(line.startswith('{"type":"interval"') for line in self.lines):
            self._stderr.join(timeout=5)
            raise AssertionError(f"capture exited {self.process.returncode}: {''.join(self._stderr_text)}")

    def pause_reading(self) -> None:
        """Stops reading capture's output: once the pipe is full, its writes block."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def intervals_written(self) -> int:
        return sum(1 for line in list(self.lines) if line.startswith('{"type":"interval"'))

    def wait_intervals(self, count: int, timeout: float = 120.0) -> None:
        """Waits until capture has written `count` intervals in all."""
        deadline = time.monotonic() + timeout
        while self.intervals_written() < count:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"capture wrote {self.intervals_written()} of {count} intervals")
            time.sleep(0.02)

    def stop(self, signum: int = signal.SIGINT, timeout: float = 60.0) -> CaptureResult:
        """Sends `signum` (SIGINT: Ctrl-C) and collects everything capture wrote."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.wait(timeout)

    def wait(self, timeout: float = 60.0) -> CaptureResult:
        """Waits for capture to end by itself (--duration) and collects everything it wrote."""
        returncode = self.process.wait(timeout=timeout)
        self._stdout.join(timeout=10)
        self._stderr.join(timeout=10)
        summaries = [json.loads(line) for line in self.lines if line.startswith('{"type":"summary"')]
        return CaptureResult(
            returncode=returncode,
            batches=list(read_batches(self.lines, source="capture")),
            summary=summaries[-1] if summaries else {},
            stderr="".join(self._stderr_text),
            lines=self.lines,
        )

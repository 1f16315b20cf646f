"""Where FlowBatches come from: live probes or a replay file. Consumers (capture, top, agent) take a
BatchSource and never care which one it is."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Protocol

from flowscope.formats.jsonl import open_replay
from flowscope.formats.parquet import is_parquet, read_recording
from flowscope.kernel.catalog import ProbeStatus
from flowscope.schema import FlowBatch


class BatchSource(Protocol):
    node: str
    interval: float

    def probes(self) -> list[ProbeStatus]: ...

    def batches(self, stop: threading.Event) -> Iterator[FlowBatch]:
        """One FlowBatch per interval until the source ends or `stop` is set."""
        ...

    def close(self) -> None: ...


class ReplaySource:
    """Batches from capture JSON lines or Parquet, paced as recorded (speed 2 = twice as fast; 0 = no waiting).
    With `skip_bad_records`, JSON lines that cannot be read are counted (coverage `replay:bad_records`) and
    left out instead of stopping the replay."""

    def __init__(
        self, path: str, speed: float = 0.0, node: str | None = None, skip_bad_records: bool = False,
        until_named: str | None = None,
    ) -> None:  # fmt: skip
        self.path = path
        self.skip_bad_records = skip_bad_records
        self.speed = speed
        # Without a node name given, the recording's own (from its first rows), not this machine's; until the
        # first rows are read, `until_named`.
        self.node = node or until_named or socket.gethostname()
        self._node_given = node is not None
        self.interval = 0.0

    def probes(self) -> list[ProbeStatus]:
        return [ProbeStatus("replay", True, f"file {self.path}")]

    def batches(self, stop: threading.Event) -> Iterator[FlowBatch]:
        previous_end = None
        recording = (
            read_recording(self.path) if is_parquet(self.path) else open_replay(self.path, self.skip_bad_records)
        )
        for batch in recording:
            if stop.is_set():
                return
            if previous_end is not None and self.speed > 0 and batch.time_end is not None:
                gap = (batch.time_end - previous_end).total_seconds()
                if gap > 0 and self.pause(stop, gap / self.speed):
                    return
            if not self._node_given:
                self._learn_node(batch)
            if batch.time_start is not None and batch.time_end is not None and self.interval == 0.0:
                self.interval = max((batch.time_end - batch.time_start).total_seconds(), 0.0)
            previous_end = batch.time_end
            yield batch

    def _learn_node(self, batch: FlowBatch) -> None:
        for frame in (batch.flows, batch.events):
            nodes = frame["node"].dropna()
            if len(nodes):
                self.node = str(nodes.iloc[0])
                self._node_given = True
                return

    @staticmethod
    def pause(stop: threading.Event, seconds: float) -> bool:
        """Waits out a recorded gap; True when stopped meanwhile (a seam for tests' clocks)."""
        return stop.wait(seconds)

    def close(self) -> None:
        return None

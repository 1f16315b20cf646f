"""A sink is an output of the pipeline (a file, a socket, a screen); each runs on a thread of its own behind a
bounded queue, so a slow or dead sink never stalls the kernel readers or the other sinks.

    open()          once, on the sink's thread, before the first batch
    write(batch)    one FlowBatch; an exception counts the batch's records as lost (the sink keeps going)
    close()         once, on the sink's thread, after the last batch (flush here)
    health()        {"state": "ok" | "degraded" | "failing", ...} for status pages, from any thread
    reopen()        optional: reopen files (SIGHUP, log rotation), on the sink's thread
    bind(pipeline)  optional: the pipeline it is an output of, once, before open() (its source's node, probes)
    settled()       optional, for sinks that write later than write() returns (a buffer that waits for a
                    server): (written, lost) records since the last call; write() then only hands over
    adopted()       optional, with settled(): records an earlier run left to this one (a disk spool), asked once
                    after open(); they are settled like the records handed over
    idle()          optional, on the sink's thread, when no batch came for IDLE_SECONDS (a source that ended or
                    stalls): what waits for time or for a server goes on (batch ages, retries)

What a sink could not write — its queue full, or its write failed — is counted in records (flow rows plus
event rows) as loss of `sink:<name>`: produced = delivered + lost for every sink.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from flowscope.coverage import SourceCount
from flowscope.schema import FlowBatch

log = logging.getLogger(__name__)


class SinkError(RuntimeError):
    """An output cannot start as configured; the message is one sentence saying what to do."""


PARTIAL_PREFIX = ".partial-"  # a file an output is still writing: renamed when whole, removed at the next start


def writable_directory(directory: Path, what: str, remedy: str) -> None:
    """Creates `directory` (0750) and proves it writable, or raises the SinkError naming `what` and `remedy`."""
    try:
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        probe = directory / f"{PARTIAL_PREFIX}probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise SinkError(f"cannot write {what} in {directory} ({err.strerror}); {remedy}.") from None


@runtime_checkable
class Sink(Protocol):
    name: str

    def open(self) -> None: ...

    def write(self, batch: FlowBatch) -> None: ...

    def close(self) -> None: ...

    def health(self) -> dict[str, Any]: ...


def records(batch: FlowBatch) -> int:
    return len(batch.flows) + len(batch.events)


IDLE_SECONDS = 1.0  # a sink with idle() is called this long after its last batch, and as often after that
_REOPEN = object()  # a queue item: reopen the sink's files
_STOP = object()  # a queue item: no more batches


@dataclass
class SinkState:
    """What a runner reports: its counts so far and how full its queue is."""

    name: str
    counts: SourceCount
    queued: int
    capacity: int
    pending: int  # records a deferred sink holds, not yet written nor lost
    health: dict[str, Any]
    error: str | None


class SinkRunner:
    """Runs one sink on its own thread behind a queue of at most `capacity` batches."""

    def __init__(self, sink: Sink, capacity: int) -> None:
        self.sink = sink
        self.capacity = capacity
        self._queue: queue.Queue[object] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._total = SourceCount()  # everything resolved so far
        self._unreported = SourceCount()  # resolved since the pipeline last asked (see take_resolved)
        self._error: str | None = None
        self._failures = 0
        self._thread = threading.Thread(target=self._run, name=f"flowscope-sink-{sink.name}", daemon=True)
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self._writing = 0  # records of the batch being written now
        self._pending = 0  # records a deferred sink holds, not yet settled
        self._abandoned = False  # closed without the thread: what it settles later is already counted

    @property
    def name(self) -> str:
        return self.sink.name

    def start(self, timeout: float = 30.0) -> None:
        """Starts the thread and waits for the sink's open(); an open() that fails raises here."""
        self._thread.start()
        self._opened.wait(timeout)
        error = self._open_error
        if isinstance(error, SinkError | KeyboardInterrupt):
            raise error
        if error is not None:
            raise SinkError(f"the {self.name} output cannot start: {error}") from error

    def offer(self, batch: FlowBatch) -> bool:
        """Queues the batch, or counts its records as lost when the queue is full; never blocks."""
        count = records(batch)
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self._resolve(count, delivered=0)
            return False
        return True

    def reopen(self) -> None:
        try:
            self._queue.put_nowait(_REOPEN)
        except queue.Full:
            log.warning("sink %s: its queue is full; its files are reopened after the batches queued", self.name)
            threading.Thread(target=self._queue.put, args=(_REOPEN,), daemon=True).start()

    def take_resolved(self) -> SourceCount:
        """The records whose fate was settled (written, failed or dropped) since the last call."""
        with self._lock:
            taken, self._unreported = self._unreported, SourceCount()
        return taken

    def state(self) -> SinkState:
        with self._lock:
            counts = SourceCount(self._total.produced, self._total.delivered, self._total.lost)
            error, pending = self._error, self._pending
        try:
            health = self.sink.health()
        except Exception as err:  # a status page must not fail because a sink's health() does
            health = {"state": "failing", "error": f"health() failed: {err}"}
        return SinkState(self.name, counts, self._queue.qsize(), self.capacity, pending, health, error)

    def request_stop(self) -> None:
        """No more batches: the thread writes what is queued, then closes the sink (see finish())."""
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:  # behind the batches queued: a thread waits for the room, finish() bounds the wait
            threading.Thread(target=self._queue.put, args=(_STOP,), daemon=True).start()

    def finish(self, deadline: float) -> bool:
        """Waits until `deadline` (time.monotonic()) for the thread to write what is queued and close the sink.
        What it still holds then is counted as lost; returns whether the sink closed in time."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive():
            return True
        self._discard_queued()
        with self._lock:  # the batch under way is lost too, and nothing the thread settles later counts
            writing, self._writing = self._writing + self._pending, 0
            self._pending = 0
            for total in (self._total, self._unreported):
                total.produced += writing
                total.lost += writing
            self._abandoned = True
        log.warning("sink %s did not finish in time; what it still held is counted as lost", self.name)
        return False

    # ---- the sink's thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.sink.open()
        except BaseException as err:
            self._open_error = err
            self._opened.set()
            return
        adopted = getattr(self.sink, "adopted", None)
        if adopted is not None:
            with self._lock:
                self._pending += adopted()
        self._opened.set()
        idle = getattr(self.sink, "idle", None)
        try:
            while True:
                try:
                    item = self._queue.get(timeout=IDLE_SECONDS if idle is not None else None)
                except queue.Empty:
                    self._call("idle")
                    self._take_settled()
                    continue
                if item is _STOP:
                    break
                if item is _REOPEN:
                    self._call("reopen")
                    self._take_settled()  # the files it completed (no batch may come to settle them)
                    continue
                assert isinstance(item, FlowBatch)
                self._write(item)
                del item  # not held while waiting for the next batch
        finally:
            self._call("close")
            self._take_settled()  # what the close wrote or gave up

    def _write(self, batch: FlowBatch) -> None:
        count = records(batch)
        with self._lock:
            self._writing = count
        deferred = getattr(self.sink, "settled", None)
        try:
            self.sink.write(batch)
        except Exception as err:
            self._failures += 1
            with self._lock:
                self._error = f"{type(err).__name__}: {err}"
            if self._failures == 1 or self._failures % 100 == 0:  # a sink failing every interval logs now and then
                log.warning("sink %s: a write failed (%s); its records are counted as lost", self.name, err)
            self._resolve(count, delivered=0, written=True)
            return
        with self._lock:
            self._error = None
        if deferred is None:
            self._resolve(count, delivered=count, written=True)
            return
        with self._lock:
            self._writing = 0  # handed over: the sink settles it, now or later
            self._pending += count
        self._take_settled()

    def _take_settled(self) -> None:
        settled = getattr(self.sink, "settled", None)
        if settled is None:
            return
        try:
            written, lost = settled()
        except Exception as err:
            log.warning("sink %s: settled() failed: %s", self.name, err)
            return
        with self._lock:
            self._pending -= written + lost
        self._resolve(written + lost, delivered=written)

    def _call(self, method: str) -> None:
        function = getattr(self.sink, method, None)
        if function is None:
            return
        try:
            function()
        except Exception as err:
            with self._lock:
                self._error = f"{method}() failed: {type(err).__name__}: {err}"
            log.warning("sink %s: %s() failed: %s", self.name, method, err)

    def _resolve(self, count: int, delivered: int, written: bool = False) -> None:
        """Counts `count` records as settled, `delivered` of them written; `written`: the thread's write ended."""
        with self._lock:
            if self._abandoned:
                return
            if written:
                self._writing = 0
            for total in (self._total, self._unreported):
                total.produced += count
                total.delivered += delivered
                total.lost += count - delivered

    def _discard_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, FlowBatch):
                self._resolve(records(item), delivered=0)

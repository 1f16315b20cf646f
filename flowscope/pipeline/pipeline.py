"""The one pipeline every command runs: a BatchSource (live probes or a recording) -> identity -> every sink.

    pipeline = Pipeline(source, sinks, enricher=enricher)
    pipeline.start()                       opens the sinks (each on its thread), raises if one cannot open
    pipeline.run(stop, duration=10)        batches until the source ends, `duration` passes or `stop` is set
    summary = pipeline.close(timeout=10)   detaches the source, flushes and closes every sink in bounded time

The source and the fan-out run on the thread that calls run(); handing a batch to a sink never blocks (its
queue is bounded), so the kernel readers never wait for an output. The records each sink wrote, failed to
write or could not queue are settled into the coverage of the next interval as `sink:<name>`, so every
interval's coverage balances (produced = delivered + lost) for every stage, every sink included.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd

from flowscope.coverage import SINK_PREFIX, Coverage
from flowscope.enrich import Enricher
from flowscope.formats.jsonl import format_time
from flowscope.kernel.catalog import ProbeStatus
from flowscope.pipeline.memory import trim_heap
from flowscope.pipeline.sink import Sink, SinkRunner
from flowscope.pipeline.source import BatchSource
from flowscope.schema import FlowBatch

log = logging.getLogger(__name__)

DEFAULT_QUEUE = 64  # batches a sink's queue holds: a minute of 1-s intervals


def batches(source: BatchSource, stop: threading.Event, duration: float | None = None) -> Iterator[FlowBatch]:
    """The source's batches until it ends, `duration` seconds have passed (the last interval is cut short to
    fit) or `stop` is set. A live source then cuts the interval under way short and drains once more, so
    that what it counted up to the stop is reported (a stop can come while a drain is under way)."""
    next_batch: Callable[..., FlowBatch] | None = getattr(source, "next_batch", None)
    if next_batch is None:
        for batch in source.batches(stop):
            yield batch
            del batch  # not held while the source makes the next one (a batch of 100k flows is ~40 MB)
            if stop.is_set():
                return
        return
    remaining = math.inf if duration is None else duration
    while remaining > 1e-6:
        if stop.is_set():
            yield next_batch(0.0, stop)
            return
        step = min(source.interval, remaining)
        yield next_batch(step, stop)
        remaining -= step


class Pipeline:
    def __init__(
        self,
        source: BatchSource,
        sinks: Sequence[Sink],
        *,
        enricher: Enricher | None = None,
        queue_batches: int | Mapping[str, int] = DEFAULT_QUEUE,
    ) -> None:
        names = [sink.name for sink in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"two sinks have the same name: {names}")
        self.source = source
        self.enricher = enricher
        capacities = queue_batches if isinstance(queue_batches, Mapping) else {}
        default = queue_batches if isinstance(queue_batches, int) else DEFAULT_QUEUE
        self.runners = [SinkRunner(sink, capacities.get(sink.name, default)) for sink in sinks]
        self.coverage = Coverage()  # every interval so far, sinks included
        self.intervals = 0
        # the run's span: only the times, since a batch of 100k flows held here would be ~40 MB kept alive
        self.time_start: pd.Timestamp | None = None
        self.time_end: pd.Timestamp | None = None
        self.started = time.monotonic()
        self.source_ended = False
        self._lock = threading.Lock()
        self._open: list[SinkRunner] = []

    # ---- running ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Opens every sink on its thread; if one cannot open, those already open are closed and it raises."""
        try:
            for runner in self.runners:
                bind = getattr(runner.sink, "bind", None)
                if bind is not None:
                    bind(self)
                runner.start()
                self._open.append(runner)
        except BaseException:
            self._close_sinks(time.monotonic() + 5.0)
            raise

    def run(self, stop: threading.Event, duration: float | None = None, count: int | None = None) -> None:
        """Moves batches from the source to the sinks until the source ends, `duration` passes, `count`
        batches were moved or `stop` is set."""
        for batch in batches(self.source, stop, duration):
            self.publish(batch)
            del batch  # not held through the next drain
            trim_heap()
            if count is not None and self.intervals >= count:
                break
        else:
            self.source_ended = not stop.is_set()

    def publish(self, batch: FlowBatch) -> None:
        """One batch through identity to every sink, with the sinks' settled counts in its coverage."""
        if self.enricher is not None:
            batch = self.enricher.enrich(batch)
        coverage = Coverage()  # the source's batch stays as it was: the sinks' counts go on a copy
        coverage.merge(batch.coverage)
        self._settle(coverage)
        batch = replace(batch, coverage=coverage)
        with self._lock:
            self.coverage.merge(batch.coverage)
            self.intervals += 1
            self.time_start = batch.time_start if self.time_start is None else self.time_start
            self.time_end = batch.time_end
        for runner in self._open:
            runner.offer(batch)

    def reopen(self) -> None:
        """Asks every sink that has files to reopen them (SIGHUP)."""
        for runner in self._open:
            runner.reopen()

    def close(self, timeout: float = 10.0) -> Coverage:
        """Detaches the source, then lets every sink write what it holds and close, within `timeout` seconds
        in all; returns the whole run's coverage, the sinks' last settled counts included."""
        deadline = time.monotonic() + timeout
        try:
            self.source.close()
        finally:
            self._close_sinks(deadline)
            if self.enricher is not None:
                self.enricher.close()
        tail = Coverage()
        self._settle(tail)
        with self._lock:
            self.coverage.merge(tail)
        return self.coverage

    def _close_sinks(self, deadline: float) -> None:
        for runner in self._open:  # all at once: a stuck sink must not spend the others' time
            runner.request_stop()
        for runner in self._open:
            runner.finish(deadline)

    def _settle(self, coverage: Coverage) -> None:
        for runner in self._open:
            counts = runner.take_resolved()
            if counts.produced or SINK_PREFIX + runner.name not in self.coverage.sources:
                coverage.add(SINK_PREFIX + runner.name, counts.produced, counts.delivered, counts.lost)

    # ---- reading its state -------------------------------------------------------------------------------

    def probes(self) -> list[ProbeStatus]:
        return self.source.probes()

    def status(self) -> dict[str, Any]:
        """What `flowscope agent status` shows: uptime, probes, coverage by source and by sink, queue fill."""
        with self._lock:
            coverage = Coverage()
            coverage.merge(self.coverage)
            intervals, last_end = self.intervals, self.time_end
        sinks = {}
        for runner in self._open:
            state = runner.state()
            sinks[state.name] = {
                "produced": state.counts.produced,
                "delivered": state.counts.delivered,
                "lost": state.counts.lost,
                "queued": state.queued,
                "capacity": state.capacity,
                "pending": state.pending,
                "health": state.health,
                "error": state.error,
            }
        return {
            "node": self.source.node,
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "intervals": intervals,
            "source_ended": self.source_ended,
            "last_interval_end": None if last_end is None else format_time(last_end),
            "probes": [
                {"name": p.name, "active": p.active, "hook": p.hook, "reason": p.reason or None} for p in self.probes()
            ],
            "coverage": {n: c for n, c in coverage.to_dict().items() if not n.startswith(SINK_PREFIX)},
            "sinks": sinks,
            "identity": self.enricher.health() if self.enricher is not None else None,
        }

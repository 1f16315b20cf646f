"""Runs the pipeline (source -> identity -> this feed) and the TopModel off the UI thread and hands ready
snapshots to a callback.

The pipeline's thread takes every batch the source yields (so the kernel side never backs up, even while the
display is paused); the feed, a sink of that pipeline, adds each to the model and computes a snapshot for the
current view. View changes
(grouping, sort, filter, detail, pause) are applied by `change()`, which the app calls from a worker
thread. Snapshots carry a sequence number so that an older one arriving late is not shown.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from flowscope.analysis.top import Detail, DropsTable, TopModel, TopRows, Totals
from flowscope.enrich import Enricher
from flowscope.filters import Filter
from flowscope.kernel.catalog import ProbeStatus
from flowscope.pipeline.pipeline import Pipeline
from flowscope.pipeline.source import BatchSource
from flowscope.schema import FlowBatch

UNCHANGED = object()  # change(detail_key=...) left out


@dataclass(frozen=True)
class Snapshot:
    sequence: int
    node: str
    totals: Totals
    rows: TopRows
    drops: DropsTable | None  # computed while the drops view is shown
    detail: Detail | None  # computed while a detail is open
    probes: tuple[ProbeStatus, ...]
    paused: bool
    waiting: int  # intervals received while paused, shown on resume
    state: str  # "" while the source runs; "finished" or the error that stopped it
    filter_text: str


class TopFeed:
    name = "top"

    def __init__(
        self,
        source: BatchSource,
        model: TopModel,
        on_snapshot: Callable[[Snapshot], None],
        limit: int = 50,
        enricher: Enricher | None = None,
    ) -> None:
        self.source = source
        self.model = model
        self.on_snapshot = on_snapshot
        self.limit = limit
        self.show_drops = False
        self.detail_key: tuple | None = None
        self.paused = False
        self.state = ""
        self._waiting: deque[FlowBatch] = deque(maxlen=model.history)
        self._lock = threading.Lock()
        self._sequence = 0
        self.published = 0  # sequence of the newest snapshot handed to on_snapshot
        self._probes: tuple[ProbeStatus, ...] = ()
        self._stop = threading.Event()
        self.pipeline = Pipeline(source, [self], enricher=enricher)
        self._reader = threading.Thread(target=self._read, name="flowscope-top-reader", daemon=True)
        self.finished = threading.Event()  # set when the source has ended or failed

    def start(self) -> None:
        self._probes = tuple(self.source.probes())
        self._reader.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stops the pipeline (which detaches the probes) and the snapshots."""
        self._stop.set()
        if self._reader.is_alive() and threading.current_thread() is not self._reader:
            self._reader.join(timeout)

    def _read(self) -> None:
        try:
            self.pipeline.start()
            self.pipeline.run(self._stop)
            state = "finished"
        except Exception as err:  # a failing source is shown in the header, not a traceback
            state = f"source failed: {err}"
        finally:
            self.pipeline.close()  # writes what is queued to the model first
        if self._stop.is_set():
            return
        self.state = state
        self.publish()
        self.finished.set()

    # ---- the pipeline's sink ------------------------------------------------------------------------------

    def open(self) -> None:
        return None

    def write(self, batch: FlowBatch) -> None:
        self._probes = tuple(self.source.probes())
        with self._lock:
            self.model.account(batch)
            if self.paused:
                self._waiting.append(batch)  # beyond the window's length the oldest goes
            else:
                self.model.keep(batch)
        self.publish()

    def close(self) -> None:
        return None

    def health(self) -> dict[str, object]:
        return {"state": "ok", "intervals": self.model.intervals}

    def change(
        self,
        *,
        grouping: str | None = None,
        filter: Filter | None = None,
        sort: str | None = None,
        descending: bool | None = None,
        rate_window: float | None = None,
        limit: int | None = None,
        show_drops: bool | None = None,
        detail_key: tuple | object | None = UNCHANGED,  # None closes the detail
        paused: bool | None = None,
    ) -> None:
        """Applies a view change and publishes a snapshot of it (call it off the UI thread)."""
        with self._lock:
            self.model.set_view(
                grouping=grouping, filter=filter, sort=sort, descending=descending, rate_window=rate_window
            )
            if grouping is not None:
                self.detail_key = None  # a key of another grouping means nothing here
            self.limit = self.limit if limit is None else limit
            self.show_drops = self.show_drops if show_drops is None else show_drops
            if detail_key is not UNCHANGED:
                self.detail_key = detail_key  # type: ignore[assignment]
            if paused is not None and paused != self.paused:
                self.paused = paused
                if not paused:
                    while self._waiting:
                        self.model.keep(self._waiting.popleft())
        self.publish()
        # The trends of a new view, one interval per turn of the lock: the reader's next batch waits for
        # one interval's grouping at most, not for all of them.
        regrouped = False
        while True:
            with self._lock:
                if not self.model.backfill(limit=1):
                    break
            regrouped = True
        if regrouped:
            self.publish()

    def snapshot(self) -> Snapshot:
        with self._lock:
            self._sequence += 1
            detail = self.model.detail(self.detail_key) if self.detail_key is not None else None
            return Snapshot(
                sequence=self._sequence,
                node=self.source.node,
                totals=self.model.totals(),
                rows=self.model.rows(self.limit),
                drops=self.model.drops() if self.show_drops else None,
                detail=detail,
                probes=self._probes,
                paused=self.paused,
                waiting=len(self._waiting),
                state=self.state,
                filter_text=str(self.model.filter),
            )

    def publish(self) -> None:
        if not self._stop.is_set():
            snapshot = self.snapshot()
            self.published = max(self.published, snapshot.sequence)
            self.on_snapshot(snapshot)

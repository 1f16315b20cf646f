"""The API sink's memory: a ring of recent records (the last `capacity`, oldest dropped first) that serves
`number` / `first` / `since` / `until`, and one bounded queue per following client.

Records stay in the interval's DataFrames (a Chunk); a filter is evaluated column-wise on them, and a record is
encoded for the wire only when a client is sent it, once per API, shared by every client (the chunk caches
it). An API (own, Hubble) shows a chunk through a View: its own frames (Hubble's splits a flow row into its
forwarded and dropped parts), the records' times in order, and their encoding.

A follower's queue holds at most `client_queue` records; what does not fit is lost for that client alone,
counted, and told to it in-band (a lost notice, in order, once it reads again). Offering a chunk to a queue
never blocks, so a client that does not read never slows ingest or the other clients.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import pandas as pd

from flowscope.filters import FilterSet
from flowscope.schema import FlowBatch

CLIENT_SOURCE = "client"  # the lost notices of a client that read too slowly
LATE_SOURCE = "late"  # a relay's: records older than what it already let out


def time_ns(column: pd.Series) -> np.ndarray:
    """A time column as int64 nanoseconds (a missing time sorts first)."""
    values = column.to_numpy(dtype="datetime64[ns]", na_value=np.datetime64("NaT")).view(np.int64).copy()
    values[values == np.iinfo(np.int64).min] = 0
    return values


@dataclass
class Notice:
    """Records lost at `source` between two times (nanoseconds)."""

    source: str
    count: int
    time_start: int
    time_end: int


@dataclass
class NodeNotice:
    """A change of the nodes behind a relay: state "connected" or "unavailable"."""

    state: str
    nodes: tuple[str, ...]
    message: str = ""


@dataclass
class View:
    """A chunk as one API shows it: rows of `flows` then `events`, `order` their positions in time order."""

    flows: pd.DataFrame
    events: pd.DataFrame
    times: np.ndarray  # nanoseconds, ascending, one per position of `order`
    order: np.ndarray  # row numbers into flows (< len(flows)) and events (len(flows) + row)
    encode_rows: Callable[[np.ndarray], list[bytes]]  # rows -> wire bytes
    # per row (of flows then events), the chunk's record it shows: a flow row's number, an event's flows + row
    # (None: the rows are the chunk's records themselves, as in the own API's view)
    sources: np.ndarray | None = None
    _cache: dict[int, bytes] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def select(self, filters: FilterSet) -> np.ndarray:
        """Positions (into `order`) of the records the filters pass, ascending."""
        if not filters:
            return np.arange(len(self.order))
        mask = np.concatenate([filters.flows_mask(self.flows), filters.events_mask(self.events)])
        return np.flatnonzero(mask[self.order])

    def encode(self, positions: np.ndarray) -> list[bytes]:
        rows = self.order[positions]
        with self._lock:
            missing = np.array([row for row in rows.tolist() if row not in self._cache], dtype=np.int64)
            if len(missing):
                self._cache.update(zip(missing.tolist(), self.encode_rows(missing), strict=True))
            return [self._cache[row] for row in rows.tolist()]


def view_of(flows: pd.DataFrame, events: pd.DataFrame, flow_times: np.ndarray, event_times: np.ndarray,
            encode_rows: Callable[[np.ndarray], list[bytes]], sources: np.ndarray | None = None) -> View:  # fmt: skip
    times = np.concatenate([flow_times, event_times])
    order = np.argsort(times, kind="stable")
    return View(flows, events, times[order], order, encode_rows, sources)


def record_order(batch: FlowBatch) -> np.ndarray:
    """The batch's records (flow rows, then event rows numbered after them) in time order: the own view's."""
    times = np.concatenate([time_ns(batch.flows["time_end"]), time_ns(batch.events["time"])])
    return np.argsort(times, kind="stable")


class Api(Protocol):
    """How one API shows records and notices (flowscope's own, Hubble's)."""

    name: str

    def view(self, chunk: Chunk) -> View: ...

    def notice(self, notice: Notice, node: str) -> bytes | None: ...

    def progress(self, time_ns: int, node: str) -> bytes | None: ...

    def node_status(self, notice: NodeNotice) -> bytes | None: ...

    def pack(self, records: list[bytes]) -> list[bytes]: ...  # records' responses -> the stream's messages


@dataclass
class Chunk:
    """One interval's records (a FlowBatch: as they came, or the part the ring kept), with its losses and the
    sequence number of the interval's first record."""

    seq: int
    node: str
    batch: FlowBatch
    notices: list[Notice]
    end: int  # nanoseconds: every record of the interval is at or before it
    records: int
    _views: dict[str, View] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def view(self, api: Api) -> View:
        with self._lock:
            view = self._views.get(api.name)
            if view is None:
                view = self._views[api.name] = api.view(self)
            return view

    def kept(self, dropped: np.ndarray) -> Chunk:
        """This chunk without the records marked in `dropped` (flow rows, then event rows numbered after them):
        a copy, so that the ring holds no more than it counts while followers still send the whole chunk."""
        flows = len(self.batch.flows)
        batch = replace(
            self.batch,
            flows=self.batch.flows[~dropped[:flows]].reset_index(drop=True),
            events=self.batch.events[~dropped[flows:]].reset_index(drop=True),
        )
        return Chunk(self.seq, self.node, batch, self.notices, self.end, self.records - int(dropped.sum()))


def batch_notices(batch: FlowBatch) -> list[Notice]:
    """The data path's losses of one interval, by source."""
    start = 0 if batch.time_start is None or pd.isna(batch.time_start) else pd.Timestamp(batch.time_start).value
    end = 0 if batch.time_end is None or pd.isna(batch.time_end) else pd.Timestamp(batch.time_end).value
    return [
        Notice(name, count.lost, start, end) for name, count in sorted(batch.coverage.sources.items()) if count.lost
    ]


@dataclass
class Item:
    """One entry of a follower's queue: records of a chunk, a lost notice, a node notice or a progress mark."""

    chunk: Chunk | None = None
    positions: np.ndarray | None = None
    view: View | None = None
    notice: Notice | None = None
    node_notice: NodeNotice | None = None
    progress: int | None = None


class Follower:
    """One client's bounded queue of what it is to be sent next."""

    def __init__(self, api: Api, query: Query, limit: int) -> None:
        self.api = api
        self.filters = query.filters
        self.limit = limit
        self.since = query.since
        self.until = query.until
        self.items: deque[Item] = deque()
        self.queued = 0  # records in `items`
        self.delivered = 0
        self.lost = 0
        self.closed = False
        self.latest = 0  # the end of the latest chunk offered, and of the latest progress mark taken
        self.marked = 0
        self.condition = threading.Condition()

    def offer(self, chunk: Chunk, node_notices: Sequence[NodeNotice] = ()) -> None:
        """Queues the records of `chunk` that pass the filters (never blocks)."""
        view = chunk.view(self.api)
        positions = view.select(self.filters)
        if self.since is not None:
            positions = positions[view.times[positions] >= self.since]
        if self.until is not None:
            positions = positions[view.times[positions] <= self.until]
        with self.condition:
            self.latest = max(self.latest, chunk.end)
            for notice in chunk.notices:
                self._append_notice(notice)
            room = max(0, self.limit - self.queued)
            if len(positions) > room:
                lost = positions[room:]
                positions = positions[:room]
                self._lose(len(lost), int(view.times[lost[0]]), int(view.times[lost[-1]]))
            if len(positions):
                self.items.append(Item(chunk=chunk, positions=positions, view=view))
                self.queued += len(positions)
            if self.items and self.items[-1].progress is not None:
                self.items[-1].progress = chunk.end  # marks with nothing between them: the latest says it all
            elif not self._losing():
                self.items.append(Item(progress=chunk.end))
            self.condition.notify()

    def offer_node_notice(self, notice: NodeNotice) -> None:
        with self.condition:
            self.items.append(Item(node_notice=notice))
            self.condition.notify()

    def _losing(self) -> bool:
        return bool(self.items) and self.items[-1].notice is not None and self.items[-1].notice.source == CLIENT_SOURCE

    def _lose(self, count: int, start: int, end: int) -> None:
        self.lost += count
        tail = self.items[-1] if self.items else None
        if tail is not None and tail.notice is not None and tail.notice.source == CLIENT_SOURCE:
            tail.notice.count += count
            tail.notice.time_end = max(tail.notice.time_end, end)
            return
        self.items.append(Item(notice=Notice(CLIENT_SOURCE, count, start, end)))

    def _append_notice(self, notice: Notice) -> None:
        # While this client is losing records, the data path's notices join in the tail, so a client that never
        # reads holds a bounded queue (its records, one lost notice of its own and one per data-path source).
        for item in reversed(self.items):
            if item.notice is None or item.notice.source == CLIENT_SOURCE:
                if not self._losing():
                    break
                continue
            if item.notice.source == notice.source:
                item.notice.count += notice.count
                item.notice.time_end = max(item.notice.time_end, notice.time_end)
                return
        self.items.append(Item(notice=Notice(notice.source, notice.count, notice.time_start, notice.time_end)))

    def take(self, timeout: float) -> list[Item]:
        """Everything queued (waits up to `timeout` seconds for something)."""
        with self.condition:
            if not self.items and not self.closed:
                self.condition.wait(timeout)
            taken = list(self.items)
            self.items.clear()
            self.queued = 0
            marks = [item.progress for item in taken if item.progress is not None]
            self.marked = max([self.marked, *marks])
            if self.latest > self.marked:  # marks left out while this client was losing records
                taken.append(Item(progress=self.latest))
                self.marked = self.latest
            return taken

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()


@dataclass
class Query:
    """What a GetFlows asks: the last (or first) `number` passing records (0: all), in [since, until], and
    with `follow` what comes next."""

    filters: FilterSet = field(default_factory=FilterSet)
    number: int = 0
    first: bool = False
    follow: bool = False
    since: int | None = None  # nanoseconds
    until: int | None = None


class Ring:
    """The last `capacity` records, in chunks, and the followers to hand each new chunk to."""

    def __init__(self, capacity: int, client_queue: int) -> None:
        self.capacity = capacity
        self.client_queue = client_queue
        self.chunks: deque[Chunk] = deque()
        self.buffered = 0
        self.seen = 0
        self.followers: list[Follower] = []
        self.client_lost = 0  # of followers that have gone
        self.started = time.monotonic()
        self.last_rate = 0.0  # records per second over the latest interval
        self._lock = threading.Lock()

    # ---- ingest (the sink's thread) ------------------------------------------------------------------------

    def add(self, batch: FlowBatch, node: str) -> Chunk:
        records = len(batch.flows) + len(batch.events)
        end = 0 if batch.time_end is None or pd.isna(batch.time_end) else pd.Timestamp(batch.time_end).value
        with self._lock:
            chunk = Chunk(self.seen, node, batch, batch_notices(batch), end, records)
            self.seen += records
            self.chunks.append(chunk)
            self.buffered += records
            self._trim()
            followers = list(self.followers)
            if batch.time_start is not None and batch.time_end is not None and not pd.isna(batch.time_start):
                seconds = (pd.Timestamp(batch.time_end) - pd.Timestamp(batch.time_start)).total_seconds()
                self.last_rate = records / seconds if seconds > 0 else 0.0
        for follower in followers:
            follower.offer(chunk)
        return chunk

    def _trim(self) -> None:
        while self.buffered > self.capacity and self.chunks:
            oldest = self.chunks[0]
            excess = self.buffered - self.capacity
            if excess >= oldest.records:
                self.chunks.popleft()
                self.buffered -= oldest.records
                continue
            # its first records in time order go (ties in the batch's order); readers holding it keep it whole
            dropped = np.zeros(oldest.records, dtype=bool)
            dropped[record_order(oldest.batch)[:excess]] = True
            self.chunks[0] = oldest.kept(dropped)
            self.buffered -= excess

    def announce(self, notice: NodeNotice) -> None:
        """A node notice to every follower (a relay's nodes coming and going)."""
        with self._lock:
            followers = list(self.followers)
        for follower in followers:
            follower.offer_node_notice(notice)

    # ---- reading (the clients' threads) --------------------------------------------------------------------

    def stream(self, api: Api, query: Query, active: Callable[[], bool], poll: float = 0.5) -> Iterator[bytes]:
        """The wire bytes of what `query` asks, from the ring then (with follow) as chunks come."""
        follower = Follower(api, query, self.client_queue) if query.follow else None
        with self._lock:
            chunks = list(self.chunks)
            if follower is not None:
                self.followers.append(follower)
        try:
            yield from self._history(api, query, chunks)
            if follower is None:
                return
            while active() and not follower.closed:
                for item in follower.take(poll):
                    yield from self._item(api, item, follower)
                    if query.until is not None and item.progress is not None and item.progress > query.until:
                        return
        finally:
            if follower is not None:
                with self._lock:
                    self.followers.remove(follower)
                    self.client_lost += follower.lost
                follower.close()

    def _history(self, api: Api, query: Query, chunks: list[Chunk]) -> Iterator[bytes]:
        picked: list[tuple[Chunk, View, np.ndarray]] = []
        if query.follow and not query.number and query.since is None:
            return  # following from now on: nothing of the past
        remaining = query.number or None
        for chunk in chunks if query.first else reversed(chunks):
            view = chunk.view(api)
            positions = view.select(query.filters)
            if query.since is not None:
                positions = positions[view.times[positions] >= query.since]
            if query.until is not None:
                positions = positions[view.times[positions] <= query.until]
            if remaining is not None:
                positions = positions[:remaining] if query.first else positions[-remaining:] if remaining else []
                remaining -= len(positions)
            picked.append((chunk, view, np.asarray(positions, dtype=np.int64)))
            if remaining == 0:
                break
        if not query.first:
            picked.reverse()
        for chunk, view, positions in picked:
            for notice in chunk.notices:
                if (query.since is None or notice.time_end >= query.since) and (
                    query.until is None or notice.time_start <= query.until
                ):
                    encoded = api.notice(notice, chunk.node)
                    if encoded is not None:
                        yield encoded
            if len(positions):
                yield from api.pack(view.encode(positions))
            if query.follow:  # a follower sees the past in its intervals, as it sees what comes (top --server)
                encoded = api.progress(chunk.end, chunk.node)
                if encoded is not None:
                    yield encoded

    def _item(self, api: Api, item: Item, follower: Follower) -> Iterator[bytes]:
        if item.positions is not None and item.view is not None:
            follower.delivered += len(item.positions)
            yield from api.pack(item.view.encode(item.positions))
        elif item.notice is not None:
            encoded = api.notice(item.notice, "")
            if encoded is not None:
                yield encoded
        elif item.node_notice is not None:
            encoded = api.node_status(item.node_notice)
            if encoded is not None:
                yield encoded
        elif item.progress is not None:
            encoded = api.progress(item.progress, "")
            if encoded is not None:
                yield encoded

    # ---- state -----------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "seen": self.seen,
                "buffered": self.buffered,
                "capacity": self.capacity,
                "clients": len(self.followers),
                "client_lost": self.client_lost + sum(f.lost for f in self.followers),
                "uptime_ns": int((time.monotonic() - self.started) * 1e9),
                "rate": self.last_rate,
            }

    def namespaces(self) -> dict[str, int]:
        """Namespace -> the latest time (ns) a record of the ring named it, on either side."""
        with self._lock:
            chunks = list(self.chunks)
        latest: dict[str, int] = {}
        for chunk in chunks:
            for frame, column in ((chunk.batch.flows, "time_end"), (chunk.batch.events, "time")):
                times = time_ns(frame[column])
                for side in ("src", "dst"):
                    names = frame[f"{side}_namespace"]
                    known = names.notna().to_numpy()
                    for name, when in zip(names[known].tolist(), times[known].tolist(), strict=True):
                        latest[name] = max(latest.get(name, 0), when)
        return latest

    def close(self) -> None:
        with self._lock:
            followers = list(self.followers)
        for follower in followers:
            follower.close()

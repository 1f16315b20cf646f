"""`flowscope relay`'s source: the streams of many agents merged in time order, each record tagged with its
node, as one BatchSource for the relay's pipeline (whose API sink serves both APIs and GetNodes).

Each agent is followed on a thread of its own (reconnecting with backoff when it goes away: from the time of
its last record on, so nothing comes twice). The merge holds records in a heap and lets out those no
connected agent can still precede: an agent's progress marks say that it has sent everything up to a time,
so the watermark is the lowest mark of the agents that are connected and have spoken within the drain
timeout. Past `sort_window` held records the oldest go out early.

The merged stream is in time order, always: a record that arrives older than the latest record already let out
(an agent that was unavailable, silent past the drain timeout or behind by more than the sort window) is late.
It is not sent out of order: it is counted as lost at source "<node>/late" (produced = lost), which the relay's
clients receive in-band (a lost notice; Hubble's LostEvent) and ServerStatus shows. Records at the same time
as the latest let out are not late.
An agent that goes or comes back is announced in-band (node notices) and shown by ServerStatus/GetNodes.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pandas as pd

from flowscope.config import ClientConfig, RelayConfig
from flowscope.coverage import Coverage
from flowscope.exporters.grpc.ring import NodeNotice
from flowscope.exporters.grpc.server import NodeInfo
from flowscope.kernel.catalog import ProbeStatus
from flowscope.proto import codec
from flowscope.proto.client import Client, ClientError, request
from flowscope.schema import FlowBatch

log = logging.getLogger(__name__)
MAX_BACKOFF = 30.0
LATE_SOURCE = "late"  # the lost notices of records older than what the relay already let out


@dataclass
class Peer:
    address: str
    info: NodeInfo
    watermark: int = 0  # nanoseconds: the agent has sent everything up to it
    heard: float = 0.0  # monotonic time of its latest message
    connected: bool = False
    last_time: int | None = None  # the time of its latest record, and the records at that time
    last_records: set[bytes] = field(default_factory=set)
    client: Client | None = None


class RelaySource:
    """The merged stream of the agents at `config.peers`."""

    def __init__(self, config: RelayConfig, client: ClientConfig, node: str = "relay") -> None:
        self.config = config
        self.client_config = client
        self.node = node
        self.interval = config.interval
        self.peers = [
            Peer(address, NodeInfo(address, state="unavailable", address=address)) for address in config.peers
        ]
        self._heap: list[tuple[int, int, str, bytes, str]] = []  # (time, arrival, kind, record bytes, node)
        self._arrivals = 0
        self._released = 0  # nanoseconds: the time of the latest record let out
        self._coverage = Coverage()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listeners: list[Callable[[NodeNotice], None]] = []
        self._threads = [
            threading.Thread(target=self._follow, args=(peer,), name=f"relay-{peer.address}", daemon=True)
            for peer in self.peers
        ]
        self._started = False

    # ---- what the relay's sink asks ------------------------------------------------------------------------

    def probes(self) -> list[ProbeStatus]:
        return [ProbeStatus("relay", True, f"{len(self.peers)} agents: {', '.join(self.config.peers)}")]

    def nodes(self) -> list[NodeInfo]:
        with self._lock:
            return [NodeInfo(**vars(peer.info)) for peer in self.peers]

    def subscribe(self, listener: Callable[[NodeNotice], None]) -> None:
        self._listeners.append(listener)

    # ---- the batches -----------------------------------------------------------------------------------------

    def batches(self, stop: threading.Event) -> Iterator[FlowBatch]:
        if not self._started:
            self._started = True
            for thread in self._threads:
                thread.start()
        start = pd.Timestamp.now(tz="UTC")
        while not stop.is_set() and not self._stop.is_set():
            stop.wait(self.interval)
            end = pd.Timestamp.now(tz="UTC")
            yield self._batch(start, end)
            start = end

    def _batch(self, start: pd.Timestamp, end: pd.Timestamp) -> FlowBatch:
        with self._lock:
            released = self._release()
            coverage, self._coverage = self._coverage, Coverage()
        flows = [codec.pb.FlowRecord.FromString(data) for kind, data, _node in released if kind == "flow"]
        events = [codec.pb.EventRecord.FromString(data) for kind, data, _node in released if kind == "event"]
        delivered = len(flows) + len(events)
        coverage.add("relay", delivered, delivered, 0)
        return FlowBatch(start, end, codec.flows_from(flows), codec.events_from(events), coverage)

    def _release(self) -> list[tuple[str, bytes, str]]:
        now = time.monotonic()
        live = [p.watermark for p in self.peers if p.connected and now - p.heard <= self.config.drain_timeout]
        watermark = min(live) if live else None
        out = []
        while self._heap and (
            (watermark is not None and self._heap[0][0] <= watermark)
            or len(self._heap) > self.config.sort_window
            or not live
        ):
            when, _arrival, kind, data, node = heapq.heappop(self._heap)
            self._released = when
            out.append((kind, data, node))
        return out

    # ---- one agent ---------------------------------------------------------------------------------------------

    def _follow(self, peer: Peer) -> None:
        backoff = self.config.backoff
        while not self._stop.is_set():
            try:
                self._stream(peer)
                backoff = self.config.backoff
            except ClientError as err:
                message = str(err)
            else:
                message = "the stream ended"
            if self._stop.is_set():
                return
            self._set_state(peer, False, message)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _stream(self, peer: Peer) -> None:
        config = self.client_config.model_copy(update={"server": peer.address})
        client = Client(config)
        peer.client = client
        try:
            status = client.status()
            with self._lock:
                peer.info = NodeInfo(
                    status.node, "connected", peer.address, status.version, bool(config.tls or config.tls_ca),
                    config.tls_server_name or "", status.uptime_ns, status.seen, status.buffered, status.capacity,
                )  # fmt: skip
            since = (
                pd.Timestamp(peer.last_time, unit="ns", tz="UTC")
                if peer.last_time is not None
                else pd.Timestamp(0, tz="UTC")
            )
            responses = client.flows(request(follow=True, since=since))
            self._set_state(peer, True, "")
            for response in responses:
                if self._stop.is_set():
                    return
                self._take(peer, response)
        finally:
            peer.client = None
            client.close()

    def _take(self, peer: Peer, response: codec.pb.GetFlowsResponse) -> None:
        kind = response.WhichOneof("response")
        with self._lock:
            peer.heard = time.monotonic()
            if kind in ("flow", "event"):
                record = getattr(response, kind)
                if not record.HasField("node"):
                    record.node = response.node or peer.info.name
                when = codec.nanoseconds(record.time_end if kind == "flow" else record.time)
                data = record.SerializeToString()
                if peer.last_time is not None and when <= peer.last_time:
                    if when < peer.last_time or data in peer.last_records:
                        return  # sent again after a reconnection
                    peer.last_records.add(data)
                else:
                    peer.last_time, peer.last_records = when, {data}
                if when < self._released:
                    self._coverage.add(f"{record.node}/{LATE_SOURCE}", 1, 0, 1)
                    return
                self._arrivals += 1
                heapq.heappush(self._heap, (when, self._arrivals, kind, data, record.node))
            elif kind == "progress":
                peer.watermark = max(peer.watermark, codec.nanoseconds(response.progress.time))
            elif kind == "lost":
                lost = response.lost
                self._coverage.add(f"{response.node or peer.info.name}/{lost.source}", lost.count, 0, lost.count)

    def _set_state(self, peer: Peer, connected: bool, message: str) -> None:
        with self._lock:
            changed = peer.connected != connected or (not connected and peer.info.state == "connected")
            peer.connected = connected
            peer.info.state = "connected" if connected else "unavailable"
            peer.info.message = message
            name = peer.info.name
        if changed:
            log.info("relay: %s (%s) %s %s", name, peer.address, peer.info.state, message)
            notice = NodeNotice(peer.info.state, (name,), message)
            for listener in self._listeners:
                listener(notice)

    def close(self) -> None:
        self._stop.set()
        for peer in self.peers:
            if peer.client is not None:
                peer.client.cancel()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(5.0)

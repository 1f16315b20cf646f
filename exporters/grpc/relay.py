"""`flowscope relay`'s source: the streams of many agents merged in time order, each record tagged with its
node, as one BatchSource for the relay's pipeline (whose API sink serves both APIs and GetNodes).

Each agent is followed on a thread of its own (reconnecting with backoff when it goes away: from the time of
its last record on, so nothing comes twice). The merge holds records in a heap and lets out those no
connected agent can still precede: an agent's progress marks say that it has sent everything up to a time,
so the watermark is the lowest mark of the agents that are connected and have spoken within the drain
timeout (a connection counts as speaking: one just made holds the others back until its first records come).
An agent still on its first attempt to connect holds them back too (within the drain timeout), so that the
relay's start, or an agent's joining, does not make the records of the agents slower to answer late.
Past `sort_window` held records the oldest go out early.

The merged stream is in time order, always: a record that arrives older than the latest record already let out
(an agent that was unavailable, silent past the drain timeout or behind by more than the sort window) is late.
It is not sent out of order: it is counted as lost at source "<node>/late" (produced = lost), which the relay's
clients receive in-band (a lost notice; Hubble's LostEvent) and ServerStatus shows. Records at the same time
as the latest let out are not late.
An agent that goes or comes back is announced in-band (node notices) and shown by ServerStatus/GetNodes.

The agents are the `--peer` list, or the pods a label selector finds through the Kubernetes API (list + watch,
as the identity source does; in every namespace, or in --discover-namespace alone): every pod of the selection
that is not terminated and has an IP is an agent at IP:--discover-port (a number, or the name of the pod's
container port), named by its node until it answers. A pod that goes takes its agent out of the merge and of
GetNodes; one that comes (again) brings it in, and an address seen before resumes after its last record.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from flowscope.config import ClientConfig, RelayConfig
from flowscope.coverage import Coverage
from flowscope.exporters.grpc.ring import LATE_SOURCE, NodeNotice
from flowscope.exporters.grpc.server import NodeInfo
from flowscope.kernel.catalog import ProbeStatus
from flowscope.proto import codec
from flowscope.proto.client import Client, ClientError, request
from flowscope.schema import FlowBatch

log = logging.getLogger(__name__)
MAX_BACKOFF = 30.0


def peer_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class AgentPods:
    """The catalog of the relay's Kubernetes source: the agent pods its label selector finds, told to `changed` as
    {address: node name} whenever they change."""

    def __init__(self, port: int | str, changed: Callable[[dict[str, str]], None]) -> None:
        self.port = port  # a number, or the name of the agents' container port
        self.changed = changed
        self.pods: dict[str, Any] = {}  # uid -> PodMeta
        self._portless: set[str] = set()  # pods without the named port, told once
        self._lock = threading.Lock()

    def replace(self, _kind: str, pods: list[Any]) -> None:
        with self._lock:
            self.pods = {pod.uid: pod for pod in pods}
        self._publish()

    def put(self, _kind: str, pod: Any) -> None:
        with self._lock:
            self.pods[pod.uid] = pod
        self._publish()

    def remove(self, _kind: str, uid: Any) -> None:
        with self._lock:
            self.pods.pop(uid, None)
        self._publish()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"pods": len(self.pods)}

    def _publish(self) -> None:
        with self._lock:
            pods = sorted(self.pods.values(), key=lambda pod: (pod.namespace, pod.name))
        agents = {}
        for pod in pods:
            if not pod.ips or pod.terminated:
                continue
            port = self.port if isinstance(self.port, int) else pod.ports.get(self.port)
            if port is None:
                if pod.uid not in self._portless:
                    self._portless.add(pod.uid)
                    log.warning("relay: pod %s/%s has no container port named %s", pod.namespace, pod.name, self.port)
                continue
            agents[peer_address(pod.ips[0], port)] = pod.node or pod.name
        self.changed(agents)


def reached_with(config: ClientConfig) -> tuple[bool, str]:
    """GetNodes' TLS of an agent: whether the relay reaches it over TLS (as the client decides: --tls, or
    implied by --tls-ca or --tls-client-cert) and the server name it asks for (empty: the address's host)."""
    tls = config.tls or bool(config.tls_ca or config.tls_client_cert)
    return tls, (config.tls_server_name or "") if tls else ""


@dataclass
class Peer:
    address: str
    info: NodeInfo
    watermark: int = 0  # nanoseconds: the agent has sent everything up to it
    heard: float = 0.0  # monotonic time of its latest message, or of its connection
    connected: bool = False
    attempted: bool = False  # its first attempt to connect (since it became one of the agents) has ended
    last_time: int | None = None  # the time of its latest record, and the records at that time
    last_records: set[bytes] = field(default_factory=set)
    client: Client | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # set: it is no longer one of the agents


class RelaySource:
    """The merged stream of the agents at `config.peers` or found with `config.discover_selector`."""

    def __init__(
        self, config: RelayConfig, client: ClientConfig, node: str = "relay", kubeconfig: str | None = None
    ) -> None:
        self.config = config
        self.client_config = client
        self.node = node
        self.interval = config.interval
        self.peers: dict[str, Peer] = {}  # address -> the agents now
        self._known: dict[str, Peer] = {}  # every agent so far: one that comes back resumes after its last record
        self._heap: list[tuple[int, int, str, bytes, str]] = []  # (time, arrival, kind, record bytes, node)
        self._arrivals = 0
        self._released = 0  # nanoseconds: the time of the latest record let out
        self._coverage = Coverage()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listeners: list[Callable[[NodeNotice], None]] = []
        self._threads: list[threading.Thread] = []
        self._started = False
        self.discovery = None
        if config.discover_selector:
            from flowscope.enrich.kube import KubernetesSource

            self.discovery = KubernetesSource(
                AgentPods(config.discover_port, self.set_peers), kubeconfig, resources=("pods",),
                label_selector=config.discover_selector, namespace=config.discover_namespace,
            )  # fmt: skip
        self.set_peers({address: address for address in config.peers})

    # ---- the agents ------------------------------------------------------------------------------------------

    def set_peers(self, wanted: dict[str, str]) -> None:
        """The agents are now those at `wanted`'s addresses (address -> a name until it answers)."""
        with self._lock:
            gone = [peer for address, peer in self.peers.items() if address not in wanted]
            for peer in gone:
                del self.peers[peer.address]
                peer.stop.set()
            new = []
            for address, name in wanted.items():
                if address in self.peers:
                    continue
                peer = self._known.get(address)
                if peer is None:
                    # not answered yet: no version is known (not the relay's own); TLS is how it is reached
                    tls, server_name = reached_with(self.client_config)
                    info = NodeInfo(name, "unavailable", address, version="", tls=tls, server_name=server_name)
                    peer = self._known[address] = Peer(address, info)
                peer.stop, peer.connected, peer.info.state = threading.Event(), False, "unavailable"
                peer.attempted, peer.heard = False, time.monotonic()
                self.peers[address] = peer
                new.append(peer)
            started = self._started
        for peer in gone:
            log.info("relay: %s (%s) is no longer an agent", peer.info.name, peer.address)
            if peer.client is not None:
                peer.client.cancel()
        for peer in new:
            log.info("relay: agent %s at %s", peer.info.name, peer.address)
            if started:
                self._start(peer)

    def _start(self, peer: Peer) -> None:
        thread = threading.Thread(
            target=self._follow, args=(peer, peer.stop), name=f"relay-{peer.address}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    # ---- what the relay's sink asks ------------------------------------------------------------------------

    def probes(self) -> list[ProbeStatus]:
        with self._lock:
            addresses = list(self.peers)
        agents = f"{len(addresses)} agents: {', '.join(addresses)}"
        if self.discovery is None:
            return [ProbeStatus("relay", True, agents)]
        health = self.discovery.health()
        error = health["resources"]["pods"]["last_error"]
        where = f" in {self.config.discover_namespace}" if self.config.discover_namespace else ""
        pods = f"pods {self.config.discover_selector}{where}"
        return [ProbeStatus("relay", True, f"{agents} ({pods}: {health['state']})",
                            error if health["state"] != "synced" and error else "")]  # fmt: skip

    def nodes(self) -> list[NodeInfo]:
        with self._lock:
            return [NodeInfo(**vars(peer.info)) for peer in self.peers.values()]

    def subscribe(self, listener: Callable[[NodeNotice], None]) -> None:
        self._listeners.append(listener)

    # ---- the batches -----------------------------------------------------------------------------------------

    def batches(self, stop: threading.Event) -> Iterator[FlowBatch]:
        if not self._started:
            with self._lock:
                self._started = True
                peers = list(self.peers.values())
            for peer in peers:
                self._start(peer)
            if self.discovery is not None:
                self.discovery.start()
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
        live = [
            p.watermark
            for p in self.peers.values()
            if (p.connected or not p.attempted) and now - p.heard <= self.config.drain_timeout
        ]
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

    def _follow(self, peer: Peer, stop: threading.Event) -> None:
        backoff = self.config.backoff
        while not self._stop.is_set() and not stop.is_set():
            try:
                self._stream(peer, stop)
                backoff = self.config.backoff
            except ClientError as err:
                message = str(err)
            else:
                message = "the stream ended"
            if self._stop.is_set() or stop.is_set():
                return
            self._set_state(peer, False, message)
            stop.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _stream(self, peer: Peer, stop: threading.Event) -> None:
        config = self.client_config.model_copy(update={"server": peer.address})
        client = Client(config)
        peer.client = client
        if stop.is_set():  # taken out of the agents while connecting
            client.close()
            return
        try:
            status = client.status()
            with self._lock:
                peer.info = NodeInfo(
                    status.node, "connected", peer.address, status.version, *reached_with(config), status.uptime_ns,
                    status.seen, status.buffered, status.capacity,
                )  # fmt: skip
            since = (
                pd.Timestamp(peer.last_time, unit="ns", tz="UTC")
                if peer.last_time is not None
                else pd.Timestamp(0, tz="UTC")
            )
            responses = client.flows(request(follow=True, since=since))
            self._set_state(peer, True, "")
            for response in responses:
                if self._stop.is_set() or stop.is_set():
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
            peer.connected, peer.attempted = connected, True
            if connected:
                peer.heard = time.monotonic()
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
        if self.discovery is not None:
            self.discovery.close()
        with self._lock:
            peers = list(self.peers.values())
        for peer in peers:
            if peer.client is not None:
                peer.client.cancel()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(5.0)

"""Identity on every flow and event: what the kernel knows first (cgroup, network namespace, interface),
the IP address last, and which of them named each side (`<side>_identity_source`).

Per side of a row, the first of these that names someone wins:
  cgroup  the local socket's cgroup: from the event itself (connect/accept/close: src is the local
          socket), from the socket table those events fill (any flow or event on a known 5-tuple), or
          from tc egress, where the sending socket's cgroup is on the flow
  netns   the event's network namespace, or the socket's; for tc flows, the interface: a pod's host-side
          veth (ingress: the pod sent it; egress: the pod receives it)
  ip      the cluster-wide, time-aware IP index (pods, services, nodes); `static` when the metadata
          file named the address
Work is per distinct key (cgroup id, interface, address), never per row, and only reads caches that
background threads fill: enrich never waits for the API or the file system.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from flowscope.enrich.catalog import Catalog
from flowscope.enrich.ipindex import AMBIGUOUS, Owner, changes_within, resolve_claims
from flowscope.enrich.model import PodMeta
from flowscope.enrich.node import NodeScanner, NodeView
from flowscope.enrich.sockets import LOCAL_SOCKET_KINDS, SocketTable
from flowscope.schema import IDENTITY_FIELDS, FlowBatch

# The identity columns that come from the resolved identity (pid and comm come from the socket).
_TABLE_FIELDS = ("namespace", "pod", "workload", "workload_kind", "container", "node", "labels")
PURGE_EVERY = 5.0  # seconds between purges of expired catalog entries


class IdentitySource(Protocol):
    def health(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class _Side:
    """Resolution state of one side (src or dst) of the rows being enriched."""

    code: np.ndarray  # identity code per row, -1 while unresolved
    source: np.ndarray  # object: "cgroup" | "netns" | "ip" | "static" | None
    pid: np.ndarray  # int64, -1 when unknown
    comm: np.ndarray  # object

    @classmethod
    def empty(cls, n: int) -> _Side:
        return cls(
            np.full(n, -1, np.int64), np.full(n, None, object), np.full(n, -1, np.int64), np.full(n, None, object)
        )


class _Identities:
    """The distinct identities of one batch: a small table whose row number is the code rows carry."""

    def __init__(self) -> None:
        self._codes: dict[Hashable, int] = {}
        self.rows: list[tuple[Any, ...]] = []

    def code(self, key: Hashable, build: Callable[[], tuple[Any, ...] | None]) -> int:
        code = self._codes.get(key)
        if code is None:
            row = build()
            code = -1 if row is None else len(self.rows)
            if row is not None:
                self.rows.append(row)
            self._codes[key] = code
        return code

    def column(self, index: int, codes: np.ndarray) -> np.ndarray:
        values = np.array([row[index] for row in self.rows] + [None], dtype=object)
        return values[codes]  # code -1 picks the trailing None


def _epoch_seconds(times: pd.Series, fallback: float) -> np.ndarray:
    values = times.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]")
    seconds = values.astype("int64") / 1e9
    seconds[np.isnat(values)] = fallback
    return seconds


class Enricher:
    def __init__(
        self,
        node_name: str,
        catalogs: Sequence[Catalog] = (),
        node: NodeScanner | None = None,
        sources: dict[str, IdentitySource] | None = None,
        grace: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_name = node_name
        self.catalogs = list(catalogs)  # in order of trust: Kubernetes, then the static file
        self.node = node
        self.sources = sources or {}
        self.grace = grace
        self.clock = clock
        self.sockets = SocketTable(grace)
        self.resolved: Counter[str] = Counter()  # sides named, by source
        self.unresolved = 0  # sides nobody named
        self.misses: Counter[str] = Counter()  # failed lookups, by kind (a side can fail several)
        self.batches = 0
        self.rows = 0
        self.last_enrich_ms: float | None = None
        self._last_purge = 0.0
        self._lock = threading.Lock()  # enrich may be called from more than one consumer thread

    # ---- the public interface ------------------------------------------------------------------------------

    def enrich(self, batch: FlowBatch) -> FlowBatch:
        """The batch with both sides of every flow and event attributed (a new batch; the input is unchanged)."""
        with self._lock:
            started = time.monotonic()
            now = self.clock()
            fallback = batch.time_end if batch.time_end is not None and not pd.isna(batch.time_end) else None
            fallback_s = pd.Timestamp(fallback).timestamp() if fallback is not None else now
            if now - self._last_purge >= PURGE_EVERY:
                for catalog in self.catalogs:
                    catalog.purge(now)
                self._last_purge = now
            self.sockets.learn(batch.events, now)
            view = self.node.view if self.node is not None else NodeView()
            flows = self._enrich_frame(batch.flows, "flows", view, fallback_s)
            events = self._enrich_frame(batch.events, "events", view, fallback_s)
            self.batches += 1
            self.rows += len(flows) + len(events)
            self.last_enrich_ms = (time.monotonic() - started) * 1000
            return FlowBatch(batch.time_start, batch.time_end, flows, events, batch.coverage)

    def health(self) -> dict[str, Any]:
        sources = {name: source.health() for name, source in self.sources.items()}
        if self.node is not None:
            sources["node"] = self.node.health()
        return {
            "node_name": self.node_name,
            "grace_seconds": self.grace,
            "sources": sources,
            "resolved": dict(sorted(self.resolved.items())),
            "unresolved": self.unresolved,
            "misses": dict(sorted(self.misses.items())),
            "socket_table": {"entries": len(self.sockets), "evicted": self.sockets.evicted},
            "batches": self.batches,
            "rows": self.rows,
            "last_enrich_ms": None if self.last_enrich_ms is None else round(self.last_enrich_ms, 2),
        }

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        if self.node is not None:
            self.node.close()

    # ---- one frame -------------------------------------------------------------------------------------------

    def _enrich_frame(self, frame: pd.DataFrame, kind: str, view: NodeView, fallback: float) -> pd.DataFrame:
        n = len(frame)
        if n == 0:
            return frame
        if kind == "flows":
            lo = _epoch_seconds(frame["time_start"], fallback)
            hi = _epoch_seconds(frame["time_end"], fallback)
        else:
            lo = hi = _epoch_seconds(frame["time"], fallback)
        identities = _Identities()
        with contextlib.ExitStack() as stack:
            for catalog in self.catalogs:
                stack.enter_context(catalog.lock)
            resolver = _Resolver(self, view, identities, lo, hi)
            sides = {}
            for side in ("src", "dst"):
                existing = frame[f"{side}_identity_source"]
                todo = (existing.isna() | (existing == "none")).to_numpy(dtype=bool)
                if todo.any():
                    sides[side] = (todo, self._resolve_side(frame, kind, side, todo, resolver))
        out = frame.copy(deep=False)
        for side, (todo, state) in sides.items():
            self._write_side(out, side, todo, state, identities)
        return out

    def _resolve_side(self, frame: pd.DataFrame, kind: str, side: str, todo: np.ndarray, resolver: _Resolver) -> _Side:
        n = len(frame)
        state = _Side.empty(n)
        other = "dst" if side == "src" else "src"
        local = self.sockets.lookup(
            frame["protocol"], frame[f"{side}_ip"], frame[f"{side}_port"], frame[f"{other}_ip"], frame[f"{other}_port"]
        )
        cgroup = local["cgroup_id"]
        netns = local["netns"]
        pid, comm = local["pid"], local["comm"]
        if kind == "events" and side == "src":
            own = frame["kind"].isin(LOCAL_SOCKET_KINDS).fillna(False).to_numpy(dtype=bool)
            cgroup = frame["cgroup_id"].where(own, cgroup.to_numpy())
            netns = frame["netns"].where(own, netns.to_numpy())
            pid = frame["pid"].where(own, pid.to_numpy())
            comm = frame["comm"].where(own, comm.to_numpy())
        state.pid[:] = pid.fillna(-1).to_numpy(dtype=np.int64)
        state.comm[:] = comm.astype(object).where(comm.notna(), None).to_numpy()
        if kind == "flows":
            egress = (frame["direction"] == "egress").fillna(False).to_numpy(dtype=bool)
            if side == "src":
                # tc egress: the packet still carries the socket (and so the cgroup) that sent it.
                cgroup = cgroup.where(cgroup.notna().to_numpy(), frame["cgroup_id"].where(egress).to_numpy())
            pod_side_of_veth = ~egress if side == "src" else egress
            ifindex = frame["ifindex"].where(pod_side_of_veth)
        resolver.by_cgroup(state, todo, cgroup.to_numpy())
        resolver.by_netns(state, todo, netns.to_numpy())
        if kind == "flows":
            resolver.by_interface(state, todo, ifindex.to_numpy())
        resolver.by_ip(state, todo, frame[f"{side}_ip"])
        resolver.processes_of_cgroups(state, todo, cgroup.to_numpy())
        return state

    def _write_side(
        self, out: pd.DataFrame, side: str, todo: np.ndarray, state: _Side, identities: _Identities
    ) -> None:
        rows = np.flatnonzero(todo)
        codes = state.code[rows]
        for index, name in enumerate(_TABLE_FIELDS):
            column = f"{side}_{name}"
            values = out[column].astype(object).to_numpy(copy=True)
            values[rows] = identities.column(index, codes)
            out[column] = pd.array(values, dtype=IDENTITY_FIELDS[name]) if name != "labels" else values
        sources = state.source[rows]
        named = sources != None  # noqa: E711 - elementwise comparison on an object array
        for source, count in Counter(sources[named].tolist()).items():
            self.resolved[source] += count
        self.unresolved += int((~named).sum())
        values = out[f"{side}_identity_source"].astype(object).to_numpy(copy=True)
        values[rows] = np.where(named, sources, "none")
        out[f"{side}_identity_source"] = pd.array(values, dtype="string")
        pids = out[f"{side}_pid"].to_numpy(dtype=object, na_value=None, copy=True)
        known_pid = state.pid[rows] >= 0
        pids[rows[known_pid]] = state.pid[rows[known_pid]]
        out[f"{side}_pid"] = pd.array(pids, dtype="Int64")
        comms = out[f"{side}_comm"].astype(object).to_numpy(copy=True)
        known_comm = state.comm[rows] != None  # noqa: E711
        comms[rows[known_comm]] = state.comm[rows[known_comm]]
        out[f"{side}_comm"] = pd.array(comms, dtype="string")


class _Resolver:
    """The lookups of one frame, over the caches as they are now (catalog locks held by the caller).

    Key resolvers return (identity code, miss): code -1 when the key names nobody; miss is the counter to
    bump (per row) when that is a failed lookup rather than a key that is not meant to name anyone.
    """

    def __init__(
        self, enricher: Enricher, view: NodeView, identities: _Identities, lo: np.ndarray, hi: np.ndarray
    ) -> None:
        self.enricher = enricher
        self.view = view
        self.identities = identities
        self.lo = lo
        self.hi = hi

    # ---- stages --------------------------------------------------------------------------------------------

    def _stage(
        self,
        state: _Side,
        todo: np.ndarray,
        keys: np.ndarray,
        source: str,
        resolve: Callable[[Any], tuple[int, str | None]],
    ) -> None:
        """Resolves the distinct keys of the rows still unnamed, then names those rows."""
        pending = todo & (state.code < 0) & pd.notna(keys)
        if not pending.any():
            return
        rows = np.flatnonzero(pending)
        inverse, unique = pd.factorize(keys[rows])
        answers = [resolve(key) for key in unique]
        rows_per_key = np.bincount(inverse, minlength=len(unique))
        for (_, miss), count in zip(answers, rows_per_key, strict=True):
            if miss is not None:
                self.enricher.misses[miss] += int(count)
        codes = np.array([code for code, _ in answers], dtype=np.int64)[inverse]
        hit = codes >= 0
        state.code[rows[hit]] = codes[hit]
        state.source[rows[hit]] = source

    def by_cgroup(self, state: _Side, todo: np.ndarray, cgroup_ids: np.ndarray) -> None:
        self._stage(state, todo, cgroup_ids, "cgroup", self._cgroup)

    def by_netns(self, state: _Side, todo: np.ndarray, inodes: np.ndarray) -> None:
        self._stage(state, todo, inodes, "netns", self._netns)

    def by_interface(self, state: _Side, todo: np.ndarray, ifindexes: np.ndarray) -> None:
        self._stage(state, todo, ifindexes, "netns", self._interface)

    def by_ip(self, state: _Side, todo: np.ndarray, addresses: pd.Series) -> None:
        pending = todo & (state.code < 0) & addresses.notna().to_numpy()
        if not pending.any():
            return
        rows = np.flatnonzero(pending)
        inverse, unique = pd.factorize(addresses.to_numpy()[rows])
        lo, hi = self.lo[rows], self.hi[rows]
        span = (float(lo.min()), float(hi.max()))
        codes = np.full(len(rows), -1, np.int64)
        sources = np.full(len(rows), None, object)
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(unique)))])
        for position, ip in enumerate(unique):
            members = order[bounds[position] : bounds[position + 1]]
            self._ip_rows(ip, members, lo, hi, span, codes, sources)
        hit = codes >= 0
        state.code[rows[hit]] = codes[hit]
        state.source[rows[hit]] = sources[hit]

    def _ip_rows(
        self,
        ip: str,
        members: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        span: tuple[float, float],
        codes: np.ndarray,
        sources: np.ndarray,
    ) -> None:
        misses = self.enricher.misses
        for catalog in self.enricher.catalogs:
            claims = catalog.ips.claims(ip)
            if not claims:
                continue
            sources[members] = "ip" if catalog.name == "kubernetes" else "static"
            if not changes_within(claims, *span):
                # The usual case: one answer for every row of the batch with this address.
                code, miss = self._owner(catalog, resolve_claims(claims, *span))
                codes[members] = code
                if miss is not None:
                    misses[miss] += len(members)
                return
            # The address changed hands during the batch: one answer per distinct time window.
            windows = {}
            for a, b in zip(lo[members], hi[members], strict=True):
                if (a, b) not in windows:
                    windows[(a, b)] = self._owner(catalog, resolve_claims(claims, a, b))
            answers = [windows[(a, b)] for a, b in zip(lo[members], hi[members], strict=True)]
            codes[members] = [code for code, _ in answers]
            for miss, count in Counter(miss for _, miss in answers if miss is not None).items():
                misses[miss] += count
            return
        for catalog in self.enricher.catalogs:
            owner = catalog.ips.network_owner(ip)
            if owner is not None:
                codes[members] = self._owner(catalog, owner)[0]
                sources[members] = "ip" if catalog.name == "kubernetes" else "static"
                return
        misses["ip_unknown"] += len(members)

    def processes_of_cgroups(self, state: _Side, todo: np.ndarray, cgroup_ids: np.ndarray) -> None:
        """pid and comm of rows named by cgroup whose socket did not say (a cgroup with one process)."""
        wanted = todo & (state.source == "cgroup") & (state.pid < 0) & pd.notna(cgroup_ids)
        if not wanted.any():
            return
        rows = np.flatnonzero(wanted)
        inverse, unique = pd.factorize(cgroup_ids[rows])
        infos = [self.view.processes.get(int(cgroup_id)) for cgroup_id in unique]
        state.pid[rows] = np.array([i.pid if i is not None and i.pid is not None else -1 for i in infos])[inverse]
        comms = np.array([i.comm if i is not None else None for i in infos], dtype=object)[inverse]
        fill = np.array([comm is None for comm in state.comm[rows]], dtype=bool)
        state.comm[rows[fill]] = comms[fill]

    # ---- keys -> identity codes ---------------------------------------------------------------------------------

    def _cgroup(self, cgroup_id: Any) -> tuple[int, str | None]:
        entry = self.view.cgroups.get(int(cgroup_id))
        if entry is None:
            if self.enricher.node is not None:
                self.enricher.node.request_rescan()  # a cgroup created since the last scan
            return -1, "cgroup_unknown"
        if entry.pod_uid is None:
            return self._node_code(self.enricher.node_name), None  # a host process, outside any pod
        return self._local_pod(entry.pod_uid, entry.container_id)

    def _netns(self, inode: Any) -> tuple[int, str | None]:
        inode = int(inode)
        if inode in self.view.host_netns:
            return self._node_code(self.enricher.node_name), None
        uid = self.view.netns_pods.get(inode)
        return (-1, "netns_unknown") if uid is None else self._local_pod(uid, None)

    def _interface(self, ifindex: Any) -> tuple[int, str | None]:
        uid = self.view.ifindex_pods.get(int(ifindex))
        return (-1, None) if uid is None else self._local_pod(uid, None)  # most interfaces are no pod's

    def _local_pod(self, uid: str, container_id: str | None) -> tuple[int, str | None]:
        for catalog in self.enricher.catalogs:
            pod = catalog.pod(uid)
            if pod is None and container_id:
                pod = catalog.pod_of_container(container_id)
            if pod is not None:
                container = pod.containers.get(container_id) if container_id else pod.sole_container
                node = pod.node or self.enricher.node_name
                return self.identities.code(
                    ("pod", catalog.name, pod.uid, container),
                    lambda catalog=catalog, pod=pod, container=container, node=node: _pod_row(
                        catalog, pod, container, node
                    ),
                ), None
        return -1, "pod_unknown"

    def _node_code(self, name: str) -> int:
        def build() -> tuple[Any, ...]:
            labels = next((n.labels for c in self.enricher.catalogs if (n := c.node(name)) is not None), None)
            return (None, None, None, None, None, name, labels)

        return self.identities.code(("node", name), build)

    def _owner(self, catalog: Catalog, owner: Owner | Any) -> tuple[int, str | None]:
        if owner is None:
            return -1, "ip_unknown"
        if owner is AMBIGUOUS:
            return -1, "ip_ambiguous"
        if owner[0] == "node":
            return self._node_code(owner[1]), None
        if owner[0] == "service":
            service = catalog.service(owner[1], owner[2])
            if service is None:
                return -1, "ip_unknown"
            return self.identities.code(
                ("service", catalog.name, owner[1], owner[2]),
                lambda: (service.namespace, None, service.name, "Service", None, None, service.labels),
            ), None
        pod = catalog.pod(owner[1])
        if pod is None:
            return -1, "ip_unknown"
        return self.identities.code(
            ("pod", catalog.name, pod.uid, pod.sole_container),
            lambda: _pod_row(catalog, pod, pod.sole_container, pod.node),
        ), None


def _pod_row(catalog: Catalog, pod: PodMeta, container: str | None, node: str | None) -> tuple[Any, ...]:
    workload = catalog.workload(pod)
    return (pod.namespace, pod.name, workload.name, workload.kind, container, node, pod.labels)

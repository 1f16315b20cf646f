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
from flowscope.enrich.ipindex import AMBIGUOUS, VARIES, Owner
from flowscope.enrich.node import NodeScanner, NodeView
from flowscope.enrich.sockets import LOCAL_SOCKET_KINDS, SocketTable, TupleHashes
from flowscope.schema import FlowBatch

# The identity columns that come from the resolved identity (pid and comm come from the socket).
_TABLE_FIELDS = ("namespace", "pod", "workload", "workload_kind", "container", "node", "labels")
PURGE_EVERY = 5.0  # seconds between purges of expired catalog entries
Row = tuple[Any, ...]  # one identity: the values of _TABLE_FIELDS


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
        self.rows: list[Row] = []

    def code(self, key: Hashable, row: Row) -> int:
        code = self._codes.get(key)
        if code is None:
            code = self._codes[key] = len(self.rows)
            self.rows.append(row)
        return code

    def strings(self, index: int, codes: np.ndarray) -> pd.api.extensions.ExtensionArray:
        return pd.array([row[index] for row in self.rows], dtype="string").take(codes, allow_fill=True)

    def objects(self, index: int, codes: np.ndarray) -> np.ndarray:
        return np.array([row[index] for row in self.rows] + [None], dtype=object)[codes]  # -1: the trailing None


def _epoch_seconds(times: pd.Series, fallback: float) -> np.ndarray:
    values = times.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]")
    seconds = values.astype("int64") / 1e9
    seconds[np.isnat(values)] = fallback
    return seconds


def _objects(series: pd.Series) -> np.ndarray:
    """Values as Python objects, None where missing."""
    return series.to_numpy(dtype=object, na_value=None)


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
        # Identity rows by (catalog, kind, key, container), with the objects they were built from: reused
        # while the catalog still holds those very objects.
        self._row_cache: dict[Hashable, tuple[Row, tuple[Any, ...]]] = {}
        self._last_purge = 0.0
        self._lock = threading.Lock()  # enrich may be called from more than one consumer thread

    # ---- the public interface ------------------------------------------------------------------------------

    def enrich(self, batch: FlowBatch) -> FlowBatch:
        """The batch with both sides of every flow and event attributed (a new batch; the input is unchanged)."""
        with self._lock:
            started = time.monotonic()
            now = self.clock()
            fallback = now if batch.time_end is None or pd.isna(batch.time_end) else batch.time_end.timestamp()
            if now - self._last_purge >= PURGE_EVERY:
                for catalog in self.catalogs:
                    catalog.purge(now)
                self._row_cache.clear()
                self._last_purge = now
            self.sockets.learn(batch.events, now)
            view = self.node.view if self.node is not None else NodeView()
            flows = self._enrich_frame(batch.flows, "flows", view, fallback)
            events = self._enrich_frame(batch.events, "events", view, fallback)
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
        if frame.empty:
            return frame
        if kind == "flows":
            lo = _epoch_seconds(frame["time_start"], fallback)
            hi = _epoch_seconds(frame["time_end"], fallback)
        else:
            lo = hi = _epoch_seconds(frame["time"], fallback)
        identities = _Identities()
        sides = {}
        with contextlib.ExitStack() as stack:
            for catalog in self.catalogs:
                stack.enter_context(catalog.lock)
            resolver = _Resolver(self, view, identities, lo, hi)
            tuples = TupleHashes(frame) if len(self.sockets) else None
            for side in ("src", "dst"):
                existing = frame[f"{side}_identity_source"]
                todo = (existing.isna() | (existing == "none")).to_numpy(dtype=bool)
                if todo.any():
                    sides[side] = (todo, self._resolve_side(frame, kind, side, todo, resolver, tuples))
        out = frame.copy(deep=False)
        for side, (todo, state) in sides.items():
            self._write_side(out, side, todo, state, identities)
        return out

    def _resolve_side(
        self,
        frame: pd.DataFrame,
        kind: str,
        side: str,
        todo: np.ndarray,
        resolver: _Resolver,
        tuples: TupleHashes | None,
    ) -> _Side:
        state = _Side.empty(len(frame))
        cgroup = netns = np.full(len(frame), None, object)
        if tuples is not None:  # the socket table knows some sockets
            local = self.sockets.lookup(tuples, side)
            cgroup, netns, state.pid, state.comm = local.cgroup_id, local.netns, local.pid, local.comm
        if kind == "events" and side == "src":
            own = frame["kind"].isin(LOCAL_SOCKET_KINDS).fillna(False).to_numpy(dtype=bool)
            cgroup = np.where(own, _objects(frame["cgroup_id"]), cgroup)
            netns = np.where(own, _objects(frame["netns"]), netns)
            state.pid = np.where(own, frame["pid"].to_numpy(dtype=np.int64, na_value=-1), state.pid)
            state.comm = np.where(own, _objects(frame["comm"]), state.comm)
        ifindex = None
        if kind == "flows":
            egress = (frame["direction"] == "egress").fillna(False).to_numpy(dtype=bool)
            if side == "src":
                # tc egress: the packet still carries the socket (and so the cgroup) that sent it.
                cgroup = np.where(pd.isna(cgroup) & egress, _objects(frame["cgroup_id"]), cgroup)
            # Only interfaces of this namespace have a name here: an ifindex without one (a counter row from
            # another namespace) numbers some other namespace's interface.
            here = frame["ifname"].notna().to_numpy(dtype=bool)
            pod_end_of_veth = here & (~egress if side == "src" else egress)
            ifindex = np.where(pod_end_of_veth, _objects(frame["ifindex"]), None)
        resolver.by_cgroup(state, todo, cgroup)
        resolver.by_netns(state, todo, netns)
        if ifindex is not None:
            resolver.by_interface(state, todo, ifindex)
        resolver.by_ip(state, todo, frame[f"{side}_ip"])
        resolver.processes_of_cgroups(state, todo, cgroup)
        return state

    def _write_side(
        self, out: pd.DataFrame, side: str, todo: np.ndarray, state: _Side, identities: _Identities
    ) -> None:
        rows = np.flatnonzero(todo)
        whole = len(rows) == len(out)
        codes = state.code[rows]
        sources = state.source[rows]
        named = pd.notna(sources)
        for source, count in Counter(sources[named].tolist()).items():
            self.resolved[source] += count
        self.unresolved += int((~named).sum())
        pid_values = state.pid[rows]
        columns = {
            name: (identities.objects(index, codes) if name == "labels" else identities.strings(index, codes))
            for index, name in enumerate(_TABLE_FIELDS)
        }
        columns["identity_source"] = pd.array(np.where(named, sources, "none"), dtype="string")
        columns["pid"] = pd.arrays.IntegerArray(pid_values, pid_values < 0)
        columns["comm"] = pd.array(state.comm[rows], dtype="string")
        for name, values in columns.items():
            column = f"{side}_{name}"
            if whole:
                out[column] = values
            else:
                merged = out[column].array.copy()
                merged[rows] = values
                out[column] = merged


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
        self._count_misses([miss for _, miss in answers], inverse)
        codes = np.array([code for code, _ in answers], dtype=np.int64)[inverse]
        hit = codes >= 0
        state.code[rows[hit]] = codes[hit]
        state.source[rows[hit]] = source

    def _count_misses(self, misses: list[str | None], inverse: np.ndarray) -> None:
        """Adds, per kind of miss, the rows whose key missed (misses: one per distinct key)."""
        if any(misses):
            rows_per_key = np.bincount(inverse, minlength=len(misses))
            for miss, count in zip(misses, rows_per_key.tolist(), strict=True):
                if miss is not None:
                    self.enricher.misses[miss] += count

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
        span_lo, span_hi = float(lo.min()), float(hi.max())
        codes = np.full(len(unique), -1, np.int64)
        sources: list[str | None] = [None] * len(unique)
        misses: list[str | None] = [None] * len(unique)
        varying: list[int] = []  # addresses that changed hands during the batch: answered per row
        for position, ip in enumerate(unique.tolist()):
            for catalog in self.enricher.catalogs:
                timeline = catalog.ips.timeline(ip)
                if timeline is None:
                    continue
                sources[position] = "ip" if catalog.name == "kubernetes" else "static"
                answer = timeline.single_answer(span_lo, span_hi)
                if answer is VARIES:  # the address changed hands during the batch
                    varying.append(position)
                else:
                    codes[position], misses[position] = self._owner(catalog, answer)
                break
            else:
                codes[position], sources[position], misses[position] = self._network(ip)
        self._count_misses(misses, inverse)
        row_codes = codes[inverse]
        for position in varying:
            self._per_row(unique[position], np.flatnonzero(inverse == position), lo, hi, row_codes)
        hit = row_codes >= 0
        state.code[rows[hit]] = row_codes[hit]
        state.source[rows[hit]] = np.array(sources, dtype=object)[inverse][hit]

    def _per_row(self, ip: str, members: np.ndarray, lo: np.ndarray, hi: np.ndarray, codes: np.ndarray) -> None:
        """Rows of an address that changed hands within the batch: one answer per distinct time window."""
        catalog = next(c for c in self.enricher.catalogs if c.ips.timeline(ip) is not None)
        timeline = catalog.ips.timeline(ip)
        answers: dict[tuple[float, float], tuple[int, str | None]] = {}
        for member in members.tolist():
            window = (lo[member], hi[member])
            if window not in answers:
                answers[window] = self._owner(catalog, timeline.answer(*window))
            codes[member], miss = answers[window]
            if miss is not None:
                self.enricher.misses[miss] += 1

    def _network(self, ip: str) -> tuple[int, str | None, str | None]:
        """(code, source, miss) for an address nobody claimed: a network of the static file, or nobody."""
        for catalog in self.enricher.catalogs:
            owner = catalog.ips.network_owner(ip)
            if owner is not None:
                code, miss = self._owner(catalog, owner)
                return code, "ip" if catalog.name == "kubernetes" else "static", miss
        return -1, None, "ip_unknown"

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
        state.comm[rows] = np.where(pd.isna(state.comm[rows]), comms, state.comm[rows])

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
                return self._pod_code(catalog, pod.uid, container, pod.node or self.enricher.node_name), None
        return -1, "pod_unknown"

    def _owner(self, catalog: Catalog, owner: Owner | Any) -> tuple[int, str | None]:
        if owner is None:
            return -1, "ip_unknown"
        if owner is AMBIGUOUS:
            return -1, "ip_ambiguous"
        if owner[0] == "node":
            return self._node_code(owner[1]), None
        if owner[0] == "service":
            return self._service_code(catalog, owner[1], owner[2]), None
        pod = catalog.pod(owner[1])
        return (-1, "ip_unknown") if pod is None else (self._pod_code(catalog, pod.uid, pod.sole_container, None), None)

    # ---- identity rows, cached while the catalog holds the same objects ------------------------------------------

    def _cached(self, key: Hashable, sources: tuple[Any, ...], build: Callable[[], Row]) -> int:
        cache = self.enricher._row_cache
        cached = cache.get(key)
        if cached is None or any(a is not b for a, b in zip(cached[1], sources, strict=True)):
            cached = cache[key] = (build(), sources)
        return self.identities.code(key, cached[0])

    def _pod_code(self, catalog: Catalog, uid: str, container: str | None, node: str | None) -> int:
        pod = catalog.pod(uid)
        owner = catalog.controller_of(pod)  # the ReplicaSet or Job between the pod and its workload, if known

        def build() -> Row:
            workload = catalog.workload(pod)
            return (pod.namespace, pod.name, workload.name, workload.kind, container, node or pod.node, pod.labels)

        return self._cached(("pod", catalog.name, uid, container, node), (pod, owner), build)

    def _service_code(self, catalog: Catalog, namespace: str, name: str) -> int:
        service = catalog.service(namespace, name)
        if service is None:
            return -1
        return self._cached(
            ("service", catalog.name, namespace, name),
            (service,),
            lambda: (service.namespace, None, service.name, "Service", None, None, service.labels),
        )

    def _node_code(self, name: str) -> int:
        known = next((node for c in self.enricher.catalogs if (node := c.node(name)) is not None), None)
        labels = known.labels if known is not None else None
        return self._cached(("node", name), (known,), lambda: (None, None, None, None, None, name, labels))

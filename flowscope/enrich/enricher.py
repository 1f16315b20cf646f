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
Nothing is done in Python per row: cgroup ids, namespaces and interfaces are resolved per distinct key;
addresses, the bulk of the keys, in numpy (the IP index's flat timelines), with Python only for the rows
of an address that changed hands during the batch and for owners whose identity is new or changed. Enrich
only reads caches that background threads fill: it never waits for the API or the file system.
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
from flowscope.enrich.ipindex import ANSWER_AMBIGUOUS, ANSWER_NONE, ANSWER_UNCLAIMED, ANSWER_VARIES, Owner
from flowscope.enrich.model import NodeMeta, PodMeta
from flowscope.enrich.node import NodeScanner, NodeView
from flowscope.enrich.sockets import LOCAL_SOCKET_KINDS, Keys, SocketTable, TextColumns, TupleHashes, epoch_seconds
from flowscope.schema import FlowBatch, null_column

# The identity columns that come from the resolved identity (pid and comm come from the socket).
_TABLE_FIELDS = ("namespace", "pod", "workload", "workload_kind", "container", "node", "labels")
_LABELS = _TABLE_FIELDS.index("labels")
SOURCES = ("none", "cgroup", "netns", "ip", "static")  # <side>_identity_source, by the codes rows carry
CGROUP, NETNS, BY_IP, STATIC = (SOURCES.index(name) for name in ("cgroup", "netns", "ip", "static"))
PURGE_EVERY = 5.0  # seconds between purges of expired catalog entries
TABLE_SHIFT = 32  # identity codes: the owner table in the bits above, the row below (see _Identities)
Row = tuple[Any, ...]  # one identity: the values of _TABLE_FIELDS


class IdentitySource(Protocol):
    def health(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class _Side:
    """Resolution state of one side (src or dst) of the rows being enriched."""

    code: np.ndarray  # identity code per row (see _Identities), -1 while unresolved
    source: np.ndarray  # int8: index into SOURCES, 0 while unresolved
    pid: np.ndarray  # int64, -1 when unknown
    comm: np.ndarray  # object

    @classmethod
    def empty(cls, n: int) -> _Side:
        return cls(np.full(n, -1, np.int64), np.zeros(n, np.int8), np.full(n, -1, np.int64), np.full(n, None, object))


class _OwnerTable:
    """The identity of every owner in one catalog's IP index, by owner id.

    An owner's identity is built the first time a batch names it and again after the catalog logs a change
    to it, so a batch costs Python only for owners that are new or changed, not for every address.
    """

    NAMED, UNKNOWN, NOBODY = 0, 1, 2  # NOBODY: a service deleted beyond its grace names nobody, and no miss

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.reset()

    def reset(self) -> None:
        self.epoch = self.catalog.ips.epoch
        self.version = self.catalog.version
        self.built = np.zeros(0, bool)
        self.state = np.zeros(0, np.int8)
        self.columns = [np.zeros(0, object) for _ in _TABLE_FIELDS]

    def __len__(self) -> int:
        return len(self.built)

    def forget(self, owner_ids: list[int]) -> None:
        self.built[[i for i in owner_ids if i < len(self.built)]] = False

    def states(
        self, owner_ids: np.ndarray, build: Callable[[Catalog, Owner], tuple[Row | None, str | None]]
    ) -> np.ndarray:
        """The state of each of `owner_ids`, building the identities not built yet."""
        size = len(self.catalog.ips.owners)
        if size > len(self.built):  # room for every owner numbered so far, and then some
            grown = max(size, 2 * len(self.built))
            self.built = np.concatenate([self.built, np.zeros(grown - len(self.built), bool)])
            self.state = np.concatenate([self.state, np.zeros(grown - len(self.state), np.int8)])
            self.columns = [np.concatenate([c, np.full(grown - len(c), None, object)]) for c in self.columns]
        unbuilt = owner_ids[~self.built[owner_ids]]
        if len(unbuilt):
            missing = pd.unique(unbuilt)
            owners = self.catalog.ips.owners
            built = [build(self.catalog, owners[i]) for i in missing.tolist()]
            rows = [row for row, _ in built if row is not None]
            named = np.array([row is not None for row, _ in built], bool)
            self.state[missing] = np.where(
                named, self.NAMED, [self.NOBODY if miss is None else self.UNKNOWN for _, miss in built]
            )
            for index, column in enumerate(self.columns):
                values = np.empty(len(rows), object)
                values[:] = [row[index] for row in rows]
                column[missing[named]] = values
            self.built[missing] = True
        return self.state[owner_ids]


class _Identities:
    """The identities the rows of one frame name, by code.

    Codes below 2**TABLE_SHIFT are rows made for this frame (by cgroup and netns); above, the owner tables
    (by IP): the table's number (from 1) in the high bits, the owner id in the low ones. Rows of a table are
    never copied: a column is the take of the rows' and the tables' columns laid end to end.
    """

    def __init__(self) -> None:
        self._codes: dict[Hashable, int] = {}
        self.rows: list[Row] = []
        self.tables: list[_OwnerTable] = []
        self._strings: dict[int, pd.api.extensions.ExtensionArray] = {}
        self._nulls: pd.api.extensions.ExtensionArray | None = None

    def code(self, key: Hashable, row: Row) -> int:
        code = self._codes.get(key)
        if code is None:
            code = self._codes[key] = len(self.rows)
            self.rows.append(row)
        return code

    def table_base(self, table: _OwnerTable) -> int:
        """What to add to an owner id of `table` to make it an identity code."""
        for number, known in enumerate(self.tables, start=1):
            if known is table:
                return number << TABLE_SHIFT
        self.tables.append(table)
        return len(self.tables) << TABLE_SHIFT

    def positions(self, codes: np.ndarray) -> np.ndarray:
        """Where each code's identity is in the columns `strings` and `objects` take from (-1 stays -1)."""
        if not self.tables:
            return codes
        sizes = [len(self.rows), *(len(table) for table in self.tables)]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        positions = starts[np.maximum(codes >> TABLE_SHIFT, 0)] + (codes & ((1 << TABLE_SHIFT) - 1))
        return np.where(codes < 0, -1, positions)

    def _values(self, index: int) -> np.ndarray:
        own = np.empty(len(self.rows), object)
        own[:] = [row[index] for row in self.rows]
        return np.concatenate([own, *(table.columns[index] for table in self.tables)])

    def strings(self, index: int, positions: np.ndarray) -> pd.api.extensions.ExtensionArray:
        if not (positions >= 0).any():
            # a column of nulls (nobody's identity known): every such column of the frame shares one
            if self._nulls is None or len(self._nulls) != len(positions):
                self._nulls = null_column("string", len(positions))
            return self._nulls.copy()
        if index not in self._strings:  # both sides of the frame take from the same table
            self._strings[index] = pd.array(self._values(index), dtype="string")
        return self._strings[index].take(positions, allow_fill=True)

    def objects(self, index: int, positions: np.ndarray) -> np.ndarray:
        return np.append(self._values(index), None)[positions]  # -1: the trailing None


def _text_column(values: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """Text (an object array, None where missing) as a string column, converting each distinct value once."""
    codes, distinct = pd.factorize(values)
    return pd.array(distinct, dtype="string").take(codes, allow_fill=True)


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
        # Identity rows of pods and nodes named by cgroup or netns, by (catalog, kind, key, container), with the
        # objects they were built from: reused while the catalog still holds those very objects.
        self._row_cache: dict[Hashable, tuple[Row, tuple[Any, ...]]] = {}
        self._owner_tables = [_OwnerTable(catalog) for catalog in self.catalogs]  # identities named by IP
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
            lo = epoch_seconds(frame["time_start"], fallback)
            hi = epoch_seconds(frame["time_end"], fallback)
        else:
            lo = hi = epoch_seconds(frame["time"], fallback)
        identities = _Identities()
        sides = {}
        with contextlib.ExitStack() as stack:
            for catalog in self.catalogs:
                stack.enter_context(catalog.lock)
            self._forget_changed_owners()
            resolver = _Resolver(self, view, identities, lo, hi)
            local = _LocalKeys(frame, kind, self.sockets)
            for side in ("src", "dst"):
                existing = frame[f"{side}_identity_source"]
                todo = existing.isna().to_numpy(dtype=bool)
                if not todo.all():  # rows that already carry identity keep it, unless it says "none"
                    todo = todo | (existing == "none").fillna(False).to_numpy(dtype=bool)
                if todo.any():
                    sides[side] = (todo, self._resolve_side(frame, side, todo, resolver, local))
        written: dict[str, Any] = {}
        for side, (todo, state) in sides.items():
            written.update(self._side_columns(frame, side, todo, state, identities))
        if not written:
            return frame.copy(deep=False)
        # The columns it does not write are shared with `frame` as copy-on-write views (a write to either frame
        # copies first); the written ones are new. Assigning a column at a time would copy each again.
        kept = frame.drop(columns=list(written))
        out = pd.concat([kept, pd.DataFrame(written, index=frame.index, copy=False)], axis=1)
        return out[list(frame.columns)]

    def _forget_changed_owners(self) -> None:
        """Drops the identities of owners the catalogs changed since the last frame (catalog locks held)."""
        logs = [table.catalog.changes_since(table.version) for table in self._owner_tables]
        # A node's identity comes from whichever catalog knows it: a change in one is a change in all.
        nodes = [owner for log in logs if log is not None for owner in log if owner[0] == "node"]
        for table, log in zip(self._owner_tables, logs, strict=True):
            if None in logs or table.epoch != table.catalog.ips.epoch:
                table.reset()
            elif log or nodes:
                table.forget(table.catalog.ips.known_owner_ids([*log, *nodes]))
                table.version = table.catalog.version

    def _resolve_side(
        self, frame: pd.DataFrame, side: str, todo: np.ndarray, resolver: _Resolver, local: _LocalKeys
    ) -> _Side:
        state = _Side.empty(len(frame))
        cgroup, netns, ifindex = local.keys(side, state)
        resolver.by_cgroup(state, todo, cgroup)
        resolver.by_netns(state, todo, netns)
        if ifindex is not None:
            resolver.by_interface(state, todo, ifindex)
        resolver.by_ip(state, todo, local.texts[f"{side}_ip"])
        resolver.processes_of_cgroups(state, todo, cgroup)
        return state

    def _side_columns(
        self, frame: pd.DataFrame, side: str, todo: np.ndarray, state: _Side, identities: _Identities
    ) -> dict[str, Any]:
        """The identity columns of one side, new arrays: the rows in `todo` resolved, the others as they were."""
        whole = bool(todo.all())
        rows = slice(None) if whole else np.flatnonzero(todo)
        sources = state.source[rows]
        counts = np.bincount(sources, minlength=len(SOURCES))
        for source, count in zip(SOURCES[1:], counts[1:].tolist(), strict=True):
            if count:
                self.resolved[source] += count
        self.unresolved += int(counts[0])
        positions = identities.positions(state.code[rows])
        pid_values = state.pid[rows]
        columns = {
            name: (identities.objects if index == _LABELS else identities.strings)(index, positions)
            for index, name in enumerate(_TABLE_FIELDS)
        }
        columns["identity_source"] = pd.array(SOURCES, dtype="string").take(sources)
        columns["pid"] = pd.arrays.IntegerArray(pid_values, pid_values < 0)
        columns["comm"] = _text_column(state.comm[rows])
        written = {}
        for name, values in columns.items():
            column = f"{side}_{name}"
            if whole:
                written[column] = values
            else:
                merged = frame[column].array.copy()
                merged[rows] = values
                written[column] = merged
        return written

    # ---- identity rows ---------------------------------------------------------------------------------------

    def _known_node(self, name: str) -> NodeMeta | None:
        return next((node for c in self.catalogs if (node := c.node(name)) is not None), None)

    def _owner_row(self, catalog: Catalog, owner: Owner) -> tuple[Row | None, str | None]:
        """The identity of an owner of an address in `catalog`, or None and the miss to count (if any)."""
        if owner[0] == "node":
            return _node_row(owner[1], self._known_node(owner[1])), None
        if owner[0] == "service":
            service = catalog.service(owner[1], owner[2])
            if service is None:
                return None, None
            return (service.namespace, None, service.name, "Service", None, None, service.labels), None
        pod = catalog.pod(owner[1])
        return (None, "ip_unknown") if pod is None else (_pod_row(catalog, pod, pod.sole_container, None), None)


def _pod_row(catalog: Catalog, pod: PodMeta, container: str | None, node: str | None) -> Row:
    workload = catalog.workload(pod)
    return (pod.namespace, pod.name, workload.name, workload.kind, container, node or pod.node, pod.labels)


def _node_row(name: str, known: NodeMeta | None) -> Row:
    return (None, None, None, None, None, name, known.labels if known is not None else None)


class _LocalKeys:
    """What the node knows of a frame's rows, per side: the local socket's cgroup and netns (socket table,
    socket events, tc egress) and the pod end of a host-side veth (tc flows)."""

    def __init__(self, frame: pd.DataFrame, kind: str, sockets: SocketTable) -> None:
        self.frame = frame
        self.kind = kind
        self.sockets = sockets
        self.texts = TextColumns(frame)
        self.tuples = TupleHashes(frame, self.texts) if len(sockets) else None  # the table knows some sockets
        if kind == "events":
            self.own = frame["kind"].isin(LOCAL_SOCKET_KINDS).fillna(False).to_numpy(dtype=bool)
        else:
            self.egress = frame["direction"].to_numpy(dtype=object, na_value=None) == "egress"
            # Only interfaces of this namespace have a name here: an ifindex without one (a counter row from
            # another namespace) numbers some other namespace's interface.
            self.here = frame["ifname"].notna().to_numpy(dtype=bool)

    def keys(self, side: str, state: _Side) -> tuple[Keys, Keys, Keys | None]:
        """(cgroup, netns, pod-side ifindex or None) of each row; pid and comm go straight into `state`."""
        frame, n = self.frame, len(self.frame)
        cgroup = netns = Keys.absent(n)
        if self.tuples is not None:
            found = self.sockets.lookup(self.tuples, side)
            cgroup, netns, state.pid, state.comm = found.cgroup_id, found.netns, found.pid, found.comm
        if self.kind == "events":
            if side == "src":  # connect/accept/close: the event's own process is the local socket's
                own = self.own
                cgroup = cgroup.where(own, Keys.of(frame["cgroup_id"]))
                netns = netns.where(own, Keys.of(frame["netns"]))
                state.pid = np.where(own, frame["pid"].to_numpy(dtype=np.int64, na_value=-1), state.pid)
                state.comm = np.where(own, frame["comm"].to_numpy(dtype=object, na_value=None), state.comm)
            return cgroup, netns, None
        if side == "src":
            # tc egress: the packet still carries the socket (and so the cgroup) that sent it.
            cgroup = cgroup.where(~cgroup.present & self.egress, Keys.of(frame["cgroup_id"]))
        pod_end_of_veth = self.here & (~self.egress if side == "src" else self.egress)
        return cgroup, netns, Keys.of(frame["ifindex"]).only(pod_end_of_veth)


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
        self, state: _Side, todo: np.ndarray, keys: Keys, source: int, resolve: Callable[[int], tuple[int, str | None]]
    ) -> None:
        """Resolves the distinct keys of the rows still unnamed, then names those rows."""
        pending = todo & (state.code < 0) & keys.present
        if not pending.any():
            return
        rows = np.flatnonzero(pending)
        inverse, unique = pd.factorize(keys.values[rows])
        answers = [resolve(key) for key in unique.tolist()]
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

    def by_cgroup(self, state: _Side, todo: np.ndarray, cgroup_ids: Keys) -> None:
        self._stage(state, todo, cgroup_ids, CGROUP, self._cgroup)

    def by_netns(self, state: _Side, todo: np.ndarray, inodes: Keys) -> None:
        self._stage(state, todo, inodes, NETNS, self._netns)

    def by_interface(self, state: _Side, todo: np.ndarray, ifindexes: Keys) -> None:
        self._stage(state, todo, ifindexes, NETNS, self._interface)

    def by_ip(self, state: _Side, todo: np.ndarray, addresses: tuple[np.ndarray, np.ndarray]) -> None:
        """Names rows by address (the column factorized: codes, distinct values): per distinct address over the
        frame's whole time span, in numpy; per row only for addresses that changed hands within the span; in
        Python only for owners new or changed."""
        address_codes, distinct = addresses
        rows = np.flatnonzero(todo & (state.code < 0) & (address_codes >= 0))
        if not len(rows):
            return
        # The distinct addresses of these rows only: the others may be named by cgroup or netns already.
        used = np.bincount(address_codes[rows], minlength=len(distinct)) > 0
        inverse, unique = (np.cumsum(used) - 1)[address_codes[rows]], distinct[used]
        catalogs = self.enricher.catalogs
        # Per distinct address: the first catalog that ever saw it claimed answers, then networks.
        answers = np.full(len(unique), ANSWER_UNCLAIMED, np.int64)
        answered_by = np.full(len(unique), -1, np.int64)  # position in catalogs
        span = (float(self.lo.min()), float(self.hi.max()))
        for ask in (lambda c, u: c.ips.lookup(u, *span), lambda c, u: c.ips.network_answers(u)):
            for number, catalog in enumerate(catalogs):
                open_ = np.flatnonzero(answered_by < 0)
                found = ask(catalog, unique[open_])
                claimed = found != ANSWER_UNCLAIMED
                answers[open_[claimed]] = found[claimed]
                answered_by[open_[claimed]] = number
        varying = np.flatnonzero(answers == ANSWER_VARIES)
        if len(varying):  # each row of an address that changed hands becomes an entry of its own
            members = np.flatnonzero(np.isin(inverse, varying))
            owner_of = answered_by[inverse[members]]
            resolved = np.empty(len(members), np.int64)
            for number, catalog in enumerate(catalogs):
                mine = owner_of == number
                at = rows[members[mine]]
                resolved[mine] = catalog.ips.resolve(unique[inverse[members[mine]]], self.lo[at], self.hi[at])
            inverse[members] = len(answers) + np.arange(len(members))
            answers = np.concatenate([answers, resolved])
            answered_by = np.concatenate([answered_by, owner_of])
        # Per entry (address, or row of a varying address): identity code, source and miss.
        codes = np.full(len(answers), -1, np.int64)
        sources = np.zeros(len(answers), np.int8)
        unknown = (answers == ANSWER_NONE) | (answers == ANSWER_UNCLAIMED)
        for number, catalog in enumerate(catalogs):
            owned = np.flatnonzero((answered_by == number) & (answers >= 0))
            if not len(owned):
                continue
            table = self.enricher._owner_tables[number]
            owner_ids = answers[owned]
            states = table.states(owner_ids, self.enricher._owner_row)
            named = owned[states == _OwnerTable.NAMED]
            codes[named] = self.identities.table_base(table) + answers[named]
            sources[named] = BY_IP if catalog.name == "kubernetes" else STATIC
            unknown[owned[states == _OwnerTable.UNKNOWN]] = True
        state.code[rows] = codes[inverse]
        state.source[rows] = sources[inverse]
        rows_per_entry = np.bincount(inverse, minlength=len(answers))
        for miss, entries in (("ip_unknown", unknown), ("ip_ambiguous", answers == ANSWER_AMBIGUOUS)):
            count = int(rows_per_entry[entries].sum())
            if count:
                self.enricher.misses[miss] += count

    def processes_of_cgroups(self, state: _Side, todo: np.ndarray, cgroup_ids: Keys) -> None:
        """pid and comm of rows named by cgroup whose socket did not say (a cgroup with one process)."""
        wanted = todo & (state.source == CGROUP) & (state.pid < 0) & cgroup_ids.present
        if not wanted.any():
            return
        rows = np.flatnonzero(wanted)
        inverse, unique = pd.factorize(cgroup_ids.values[rows])
        infos = [self.view.processes.get(cgroup_id) for cgroup_id in unique.tolist()]
        state.pid[rows] = np.array([i.pid if i is not None and i.pid is not None else -1 for i in infos])[inverse]
        comms = np.array([i.comm if i is not None else None for i in infos], dtype=object)[inverse]
        state.comm[rows] = np.where(pd.isna(state.comm[rows]), comms, state.comm[rows])

    # ---- keys -> identity codes ---------------------------------------------------------------------------------

    def _cgroup(self, cgroup_id: int) -> tuple[int, str | None]:
        entry = self.view.cgroups.get(cgroup_id)
        if entry is None:
            if self.enricher.node is not None:
                self.enricher.node.request_rescan()  # a cgroup created since the last scan
            return -1, "cgroup_unknown"
        if entry.pod_uid is None:
            return self._node_code(self.enricher.node_name), None  # a host process, outside any pod
        return self._local_pod(entry.pod_uid, entry.container_id)

    def _netns(self, inode: int) -> tuple[int, str | None]:
        if inode in self.view.host_netns:
            return self._node_code(self.enricher.node_name), None
        uid = self.view.netns_pods.get(inode)
        return (-1, "netns_unknown") if uid is None else self._local_pod(uid, None)

    def _interface(self, ifindex: int) -> tuple[int, str | None]:
        uid = self.view.ifindex_pods.get(ifindex)
        return (-1, None) if uid is None else self._local_pod(uid, None)  # most interfaces are no pod's

    def _local_pod(self, uid: str, container_id: str | None) -> tuple[int, str | None]:
        for catalog in self.enricher.catalogs:
            pod = catalog.pod(uid)
            if pod is None and container_id:
                pod = catalog.pod_of_container(container_id)
            if pod is not None:
                container = pod.containers.get(container_id) if container_id else pod.sole_container
                return self._pod_code(catalog, pod, container, pod.node or self.enricher.node_name), None
        return -1, "pod_unknown"

    # ---- identity rows, cached while the catalog holds the same objects ------------------------------------------

    def _cached(self, key: Hashable, sources: tuple[Any, ...], build: Callable[[], Row]) -> int:
        cache = self.enricher._row_cache
        cached = cache.get(key)
        if cached is None or any(a is not b for a, b in zip(cached[1], sources, strict=True)):
            cached = cache[key] = (build(), sources)
        return self.identities.code(key, cached[0])

    def _pod_code(self, catalog: Catalog, pod: PodMeta, container: str | None, node: str) -> int:
        owner = catalog.controller_of(pod)  # the ReplicaSet or Job between the pod and its workload, if known
        key = ("pod", catalog.name, pod.uid, container, node)
        return self._cached(key, (pod, owner), lambda: _pod_row(catalog, pod, container, node))

    def _node_code(self, name: str) -> int:
        known = self.enricher._known_node(name)
        return self._cached(("node", name), (known,), lambda: _node_row(name, known))

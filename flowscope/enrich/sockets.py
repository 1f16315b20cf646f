"""Local sockets learned from connect/accept/close events: 5-tuple -> cgroup, netns, pid and comm.

A socket event knows which process (and so which container) owns its end of a connection; tc flows on
the same 5-tuple do not. Joining the flows to this table names both ends of a connection between two
local processes, including two hostNetwork pods that share the node's address, with pid and command.

The table is keyed by a 64-bit hash of the 5-tuple, computed for whole columns at once: learning costs
one dictionary update per socket event; lookups read a columnar copy of the table (a hash index over the
keys and one array per fact), brought up to date with the sockets learned or forgotten since, so a batch
is joined to it in numpy whatever its number of rows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

LOCAL_SOCKET_KINDS = ("connect", "accept", "close")  # for these, the event's src is the local socket
PRUNE_EVERY = 5.0  # seconds between sweeps for sockets closed longer than the grace period
_MIX = np.uint64(0x100000001B3)


def epoch_seconds(times: pd.Series, fallback: float) -> np.ndarray:
    """A UTC time column as float epoch seconds, `fallback` where it is missing."""
    values = times.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]")
    seconds = values.astype("int64") / 1e9
    seconds[np.isnat(values)] = fallback
    return seconds


class Socket(NamedTuple):
    cgroup_id: int | None
    netns: int | None
    pid: int | None
    comm: str | None
    closed: float | None  # epoch seconds of the close event
    seen: float  # epoch seconds of the latest event


class Keys(NamedTuple):
    """A column of integer keys (cgroup ids, netns inodes, ifindexes) and the rows that have one."""

    values: np.ndarray  # uint64, 0 where absent
    present: np.ndarray  # bool

    @classmethod
    def absent(cls, n: int) -> Keys:
        return cls(np.zeros(n, np.uint64), np.zeros(n, bool))

    @classmethod
    def of(cls, column: pd.Series) -> Keys:
        return cls(column.to_numpy(dtype=np.uint64, na_value=0), column.notna().to_numpy(dtype=bool))

    def where(self, rows: np.ndarray, other: Keys) -> Keys:
        """These keys, with `other`'s on `rows` (a mask)."""
        return Keys(np.where(rows, other.values, self.values), np.where(rows, other.present, self.present))

    def only(self, rows: np.ndarray) -> Keys:
        """These keys on `rows` (a mask), none elsewhere."""
        return Keys(self.values, self.present & rows)


class SocketColumns(NamedTuple):
    """Per row: the local socket's cgroup id, netns, pid (-1 unknown) and comm (None unknown)."""

    cgroup_id: Keys
    netns: Keys
    pid: np.ndarray  # int64, -1 when unknown
    comm: np.ndarray  # object


class TextColumns:
    """A frame's text columns, each factorized on first use into (codes, -1 where missing; distinct values):
    shared by the stages that hash or look up the same columns."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self._factorized: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._factorized:
            self._factorized[name] = pd.factorize(self.frame[name].to_numpy(dtype=object))
        return self._factorized[name]


class TupleHashes:
    """64-bit hashes of the 5-tuples of a frame's rows, with either side as the local end.

    Each column is hashed once, text per distinct value; the two directions only combine them in a different
    order. A missing value hashes as the empty text or -1.
    """

    def __init__(self, frame: pd.DataFrame, texts: TextColumns | None = None) -> None:
        texts = TextColumns(frame) if texts is None else texts
        missing_text = pd.util.hash_array(np.array([""], dtype=object))

        def text(name: str) -> np.ndarray:
            codes, distinct = texts[name]
            return np.concatenate([pd.util.hash_array(distinct), missing_text])[codes]  # -1: the last

        def number(name: str) -> np.ndarray:
            return pd.util.hash_array(frame[name].to_numpy(dtype=np.int64, na_value=-1))

        self.protocol = text("protocol")
        self.ip = {"src": text("src_ip"), "dst": text("dst_ip")}
        self.port = {"src": number("src_port"), "dst": number("dst_port")}
        complete = frame[["src_port", "dst_port"]].notna().all(axis=1).to_numpy(dtype=bool)
        self.complete = complete & np.logical_and.reduce(
            [texts[name][0] >= 0 for name in ("protocol", "src_ip", "dst_ip")]
        )

    def local(self, side: str) -> np.ndarray:
        other = "dst" if side == "src" else "src"
        hashes = self.protocol
        with np.errstate(over="ignore"):
            for part in (self.ip[side], self.port[side], self.ip[other], self.port[other]):
                hashes = (hashes * _MIX) ^ part
        return hashes


class _Columns(NamedTuple):
    """The sockets as arrays, in no particular order: what lookups join to."""

    keys: pd.Index  # uint64 5-tuple hashes
    facts: dict[str, np.ndarray]  # cgroup_id, has_cgroup_id, netns, has_netns (uint64, bool), pid, comm

    @classmethod
    def of(cls, sockets: dict[int, Socket]) -> _Columns:
        values = list(sockets.values())
        facts = {}
        for name in ("cgroup_id", "netns"):
            known = [getattr(s, name) for s in values]
            facts[name] = np.array([0 if k is None else k for k in known], np.uint64)
            facts[f"has_{name}"] = np.array([k is not None for k in known], bool)
        facts["pid"] = np.array([-1 if s.pid is None else s.pid for s in values], np.int64)
        facts["comm"] = np.empty(len(values), object)
        facts["comm"][:] = [s.comm for s in values]
        return cls(pd.Index(np.array(list(sockets), np.uint64)), facts)

    def without(self, keys: np.ndarray) -> _Columns:
        kept = np.ones(len(self.keys), bool)
        positions = self.keys.get_indexer(keys)
        kept[positions[positions >= 0]] = False
        return _Columns(self.keys[kept], {name: values[kept] for name, values in self.facts.items()})

    def plus(self, other: _Columns) -> _Columns:
        facts = {name: np.concatenate([values, other.facts[name]]) for name, values in self.facts.items()}
        return _Columns(self.keys.append(other.keys), facts)


class SocketTable:
    def __init__(self, grace: float, capacity: int = 1 << 18) -> None:
        self.grace = grace
        self.capacity = capacity
        self.evicted = 0  # sockets forgotten because the table was full (least recently seen first)
        self._sockets: dict[int, Socket] = {}
        self._last_prune = 0.0
        self._columns = _Columns.of({})
        self._changed: set[int] = set()  # keys learned or forgotten since _columns was brought up to date

    def __len__(self) -> int:
        return len(self._sockets)

    def learn(self, events: pd.DataFrame, now: float) -> None:
        """Adds the sockets of this batch's connect/accept events and marks closed ones."""
        if not events.empty:
            local = events[events["kind"].isin(LOCAL_SOCKET_KINDS).fillna(False).to_numpy(dtype=bool)]
            tuples = TupleHashes(local)
            hashes, complete = tuples.local("src"), tuples.complete
            times = epoch_seconds(local["time"], now)
            rows = zip(
                hashes[complete].tolist(),
                local["kind"].to_numpy()[complete],
                local["cgroup_id"].to_numpy(dtype=object, na_value=None)[complete],
                local["netns"].to_numpy(dtype=object, na_value=None)[complete],
                local["pid"].to_numpy(dtype=object, na_value=None)[complete],
                local["comm"].to_numpy(dtype=object, na_value=None)[complete],
                times[complete].tolist(),
                strict=True,
            )
            sockets = self._sockets
            for key, kind, cgroup_id, netns, pid, comm, seen in rows:
                self._changed.add(key)
                known = sockets.get(key)
                if kind == "close" and known is not None:
                    # A close may run in softirq or timer context: the socket's process facts stay the ones
                    # its connect or accept reported; the close only marks it closed.
                    sockets[key] = known._replace(closed=seen, seen=seen)
                else:
                    sockets[key] = Socket(cgroup_id, netns, pid, comm, seen if kind == "close" else None, seen)
        if now - self._last_prune >= PRUNE_EVERY or len(self._sockets) > self.capacity:
            self._prune(now)

    def _prune(self, now: float) -> None:
        self._last_prune = now
        expired = [key for key, s in self._sockets.items() if s.closed is not None and s.closed + self.grace < now]
        for key in expired:
            del self._sockets[key]
        excess = len(self._sockets) - self.capacity
        if excess > 0:
            self.evicted += excess
            oldest = sorted(self._sockets, key=lambda k: self._sockets[k].seen)[:excess]
            for key in oldest:
                del self._sockets[key]
            expired += oldest
        self._changed.update(expired)

    def _columns_now(self) -> _Columns:
        """The columnar copy, with the sockets changed since the last lookup replaced."""
        if self._changed:
            changed = np.array(list(self._changed), np.uint64)
            fresh = {key: s for key in self._changed if (s := self._sockets.get(key)) is not None}
            self._columns = self._columns.without(changed).plus(_Columns.of(fresh))
            self._changed = set()
        return self._columns

    def lookup(self, tuples: TupleHashes, side: str) -> SocketColumns:
        """The local socket on each row's 5-tuple, with `side` ("src" or "dst") as the local end."""
        n = len(tuples.complete)
        found = SocketColumns(Keys.absent(n), Keys.absent(n), np.full(n, -1, np.int64), np.full(n, None, object))
        if not self._sockets or n == 0:
            return found
        rows = np.flatnonzero(tuples.complete)
        columns = self._columns_now()
        positions = columns.keys.get_indexer(tuples.local(side)[rows])
        rows, positions = rows[positions >= 0], positions[positions >= 0]
        facts = columns.facts
        for keys, name in ((found.cgroup_id, "cgroup_id"), (found.netns, "netns")):
            keys.values[rows] = facts[name][positions]
            keys.present[rows] = facts[f"has_{name}"][positions]
        found.pid[rows] = facts["pid"][positions]
        found.comm[rows] = facts["comm"][positions]
        return found

"""The ClickHouse sink: flows and events inserted in columns over the native protocol (clickhouse-driver),
gathered into inserts of up to --clickhouse-batch-rows rows or --clickhouse-batch-age seconds, off the data
path (the sink's own thread).

Outages: an insert that fails stays in a bounded buffer (--clickhouse-buffer-rows) and is retried with
backoff (1 s doubling to 60 s); past the buffer the oldest inserts are dropped and counted as loss of
`sink:clickhouse`. Every insert carries a `block_id`: one whose outcome is unknown (the connection broke while
it was sent) is looked up by it before it is sent again, its rows counted by second (an insert spanning two days
is two parts, and one may be written without the other): only the rows not stored are sent, so an outage never
writes a row twice nor loses one uncounted. The sink
settles records only when ClickHouse has them (or they are dropped): produced = delivered + lost counts rows
that are really stored.

With a spool (--clickhouse-spool-size, exporters/clickhouse_spool.py) the inserts that wait for an unreachable
server, and those past the memory buffer, go to disk under the data dir instead; past the spool's size its
oldest are dropped and counted. The spool is older than the memory buffer and is sent first, each file looked
up by its block_id like an insert of unknown outcome. A stop while inserts still wait leaves them in the spool
(not settled in that run); the next start takes them over as its own records (adopted()) and writes them first.
A SIGKILL loses only what memory held.

At start, a URL that does not parse or a server that refuses the user or password is one sentence and the
agent stops; a server that is merely unreachable is waited for like any outage (the tables are created,
or migrated, at the first connection).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flowscope.config import ClickHouseConfig
from flowscope.exporters.clickhouse_spool import SPOOL_DIRECTORY, Spool, Spooled, SpoolFileError
from flowscope.formats.clickhouse import (
    AUTHENTICATION_CODES,
    ConnectionSettingsError,
    Layout,
    SchemaError,
    bootstrap,
    client,
    connection,
    error_code,
    first_line,
    insert_columns,
    is_network_error,
    migrations,
    parse_version,
    time_seconds,
)
from flowscope.pipeline.sink import SinkError
from flowscope.schema import FlowBatch

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_MAX = 1.0, 60.0
REFUSALS_MAX = 5  # an insert the server refuses this often (over about a minute of backoff) is dropped


class ClickHouseError(SinkError):
    """ClickHouse cannot be used as configured; the message is one sentence saying what to do."""


@dataclass
class Insert:
    """One INSERT: its rows, its id, and the records (flow and event rows) it settles."""

    table: str
    frame: pd.DataFrame
    block_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    maybe_written: bool = False  # sent once, outcome unknown: look it up by block_id before sending again
    refusals: int = 0  # times the server refused it (a table not there yet, too many parts, ZooKeeper down)
    spooled: Spooled | None = None  # read back from this spool file

    @property
    def rows(self) -> int:
        return len(self.frame)


class ClickHouseSink:
    name = "clickhouse"

    def __init__(self, config: ClickHouseConfig, clock: Any = time.monotonic, data_dir: str | None = None) -> None:
        self.config = config
        try:
            self.target = connection(config)  # a bad URL is an error before anything starts
        except ConnectionSettingsError as err:
            raise ClickHouseError(str(err)) from None
        self._clock = clock
        self._client: Any = None
        self.layout: Layout | None = None
        self._gathering: dict[str, list[pd.DataFrame]] = {"flows": [], "events": []}
        self._gathered_since: float | None = None
        self._inserts: deque[Insert] = deque()  # newer than the spool's
        self._spool: Spool | None = None
        if config.spool_size:
            if data_dir is None:
                raise ValueError("a ClickHouse spool needs the data dir to spool under")
            self._spool = Spool(Path(data_dir) / SPOOL_DIRECTORY, int(config.spool_size))
        self._head: Insert | None = None  # the spool's oldest file, read back
        self._adopted = 0
        self._next_attempt = 0.0
        self._backoff = RETRY_FIRST
        self._written = self._lost = 0  # records settled since settled() was last asked
        self.rows_written = self.rows_dropped = 0
        self.state, self.detail = "starting", ""
        self.outage_since: float | None = None

    # ---- the Sink protocol -------------------------------------------------------------------------------

    def open(self) -> None:
        """Takes over the spool an earlier run left, connects and creates or migrates the tables; a refused user
        or password raises, an outage waits."""
        if self._spool is not None:
            self._adopted = self._spool.open()
        try:
            self._connect()
        except ClickHouseError:
            raise
        except Exception as err:
            if not is_network_error(err):
                raise ClickHouseError(
                    f"ClickHouse at {self.target.shown} refused flowscope: {first_line(err)}."
                ) from None
            self._outage(err)

    def write(self, batch: FlowBatch) -> None:
        for table, frame in (("flows", batch.flows), ("events", batch.events)):
            if len(frame):
                self._gathering[table].append(frame)
        if self._gathered_since is None and (len(batch.flows) or len(batch.events)):
            self._gathered_since = self._clock()
        if self._gathered_rows() >= self.config.batch_rows:
            self._cut()
        self.idle()

    def idle(self) -> None:
        """What time alone moves on (after each write, and when no batch came for a while: a replay that ended,
        a source that stalls): rows gathered batch_age seconds go out, and a retry whose backoff has passed."""
        if self._gathered_since is not None and self._gathered_age() >= self.config.batch_age:
            self._cut()
        self._make_room()
        self._send()
        self._make_room()  # an outage this send found: what waits goes to the spool

    def close(self) -> None:
        """Sends what memory holds (one attempt per insert while the server answers, unless the spool still
        waits: it is older); the rest goes to the spool for the next start, or is lost without one."""
        self._cut()
        if self._spool is None or not self._spool.entries:
            self._next_attempt = 0.0
            self._send(final=True)
        if self._spool is not None:
            while self._inserts:
                self._spill(self._inserts.popleft())
            if self._spool.entries:
                log.warning(
                    "ClickHouse: %d rows wait in the spool %s for the next start", self._spool.rows,
                    self._spool.directory,
                )  # fmt: skip
        for insert in self._inserts:
            self._settle_lost(insert.rows, insert.table, "the agent stopped while ClickHouse was unreachable")
        self._inserts.clear()
        if self._client is not None:
            self._client.disconnect()

    def settled(self) -> tuple[int, int]:
        written, lost, self._written, self._lost = self._written, self._lost, 0, 0
        return written, lost

    def adopted(self) -> int:
        """The records an earlier run left in the spool, which this run settles (known once open() ran)."""
        return self._adopted

    def health(self) -> dict[str, Any]:
        buffered = sum(i.rows for i in self._inserts) + self._gathered_rows()
        health: dict[str, Any] = {
            "state": self.state, "server": self.target.shown, "rows_written": self.rows_written,
            "rows_buffered": buffered, "rows_dropped": self.rows_dropped,
        }  # fmt: skip
        spool = self._spool
        if spool is not None:
            entries = list(spool.entries)  # health() runs on another thread than the sink's
            health["spool"] = {
                "directory": str(spool.directory), "files": len(entries), "rows": sum(e.rows for e in entries),
                "bytes": sum(e.size for e in entries), "limit_bytes": spool.limit,
            }  # fmt: skip
        if self.detail:
            health["detail"] = self.detail
        if self.layout is not None:
            health["version"] = ".".join(map(str, self.layout.version))
        return health

    # ---- connecting and the schema -------------------------------------------------------------------------

    def _connect(self) -> None:
        connected = client(self.target)
        try:
            version = parse_version(connected.execute("SELECT version()")[0][0])
        except Exception as err:
            connected.disconnect()
            if error_code(err) in AUTHENTICATION_CODES:
                raise ClickHouseError(
                    f"ClickHouse at {self.target.shown} refused user {self.target.user!r}: {first_line(err)}; "
                    "check the user and --clickhouse-password-file."
                ) from None
            raise
        layout = Layout(self.target.database, version, self.config.cluster, self.config.ttl_days)
        try:
            self._migrate(connected, layout)
        except SchemaError as err:
            raise ClickHouseError(str(err)) from None
        self._client, self.layout = connected, layout
        if self.outage_since is not None:
            log.info("ClickHouse at %s is back after %.0f s", self.target.shown, self._clock() - self.outage_since)
        self.state, self.detail, self.outage_since = "ok", "", None
        self._backoff = RETRY_FIRST

    def _migrate(self, connected: Any, layout: Layout) -> None:
        for statement in bootstrap(layout):
            connected.execute(statement)
        versions = layout.table("schema_versions")
        applied = {row[0] for row in connected.execute(f"SELECT version FROM {versions}")}
        for version, statements in migrations(layout):
            if version in applied:
                continue
            for statement in statements:
                connected.execute(statement)
            connected.execute(f"INSERT INTO {versions} (version, applied) VALUES", [(version, int(time.time()))])
            log.info("ClickHouse %s: schema version %d applied", self.target.shown, version)

    def _outage(self, err: BaseException) -> None:
        now = self._clock()
        if self.outage_since is None:
            self.outage_since = now
            log.warning("ClickHouse at %s is unreachable (%s); buffering", self.target.shown, first_line(err))
        self.state, self.detail = "degraded", f"unreachable: {first_line(err)}"
        self._next_attempt = now + self._backoff
        self._backoff = min(self._backoff * 2, RETRY_MAX)
        if self._client is not None:
            self._client.disconnect()
            self._client = None

    # ---- gathering, sending, settling ----------------------------------------------------------------------

    def _gathered_rows(self) -> int:
        return sum(len(frame) for frames in self._gathering.values() for frame in frames)

    def _gathered_age(self) -> float:
        return 0.0 if self._gathered_since is None else self._clock() - self._gathered_since

    def _cut(self) -> None:
        """Turns what was gathered into inserts (at most batch_rows rows each)."""
        for table, frames in self._gathering.items():
            if not frames:
                continue
            whole = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
            for start in range(0, len(whole), self.config.batch_rows):
                self._inserts.append(Insert(table, whole.iloc[start : start + self.config.batch_rows]))
            frames.clear()
        self._gathered_since = None

    def _make_room(self) -> None:
        """Keeps memory within the buffer: past it the oldest inserts go to the spool, or are dropped without
        one; during an outage, with a spool, every insert waits on disk (it survives a restart)."""
        while self._inserts and (
            sum(i.rows for i in self._inserts) > self.config.buffer_rows
            or (self._spool is not None and self.outage_since is not None)
        ):
            insert = self._inserts.popleft()
            if self._spool is None:
                self._settle_lost(insert.rows, insert.table, "the buffer is full")
            else:
                self._spill(insert)

    def _spill(self, insert: Insert) -> None:
        """Writes an insert to the spool (the newest file); what the spool drops to stay in its size is lost."""
        assert self._spool is not None
        try:
            dropped = self._spool.add(insert.table, insert.frame, insert.block_id)
        except OSError as err:
            self._settle_lost(
                insert.rows, insert.table, f"cannot write it to the spool in {self._spool.directory} ({err})"
            )
            return
        for entry in dropped:
            if self._head is not None and self._head.spooled == entry:
                self._head = None
            self._settle_lost(entry.rows, entry.table, "the spool is full")

    def _next(self) -> Insert | None:
        """The oldest insert: the spool's oldest file (read back once), else memory's; a spool file that does
        not read back is dropped and counted."""
        while self._spool is not None and (entry := self._spool.oldest()) is not None:
            if self._head is not None and self._head.spooled == entry:
                return self._head
            try:
                frame = self._spool.load(entry)
            except SpoolFileError as err:
                self._spool.remove(entry)
                self._settle_lost(entry.rows, entry.table, f"the spool file {entry.path} cannot be read ({err})")
                continue
            # its outcome is unknown: it may have been sent before a stop or a kill
            self._head = Insert(entry.table, frame, entry.block_id, maybe_written=True, spooled=entry)
            return self._head
        return self._inserts[0] if self._inserts else None

    def _done(self, insert: Insert) -> None:
        """Removes the insert from where it waits (the spool or memory)."""
        if insert.spooled is None:
            self._inserts.popleft()
            return
        assert self._spool is not None
        self._spool.remove(insert.spooled)
        self._head = None

    def _send(self, final: bool = False) -> None:
        while (insert := self._next()) is not None and self._clock() >= self._next_attempt:
            if self._client is None:
                try:
                    self._connect()
                except ClickHouseError as err:  # the server changed its mind about us: say so, keep buffering
                    self.state, self.detail = "failing", str(err)
                    self._next_attempt = self._clock() + RETRY_MAX
                    return
                except Exception as err:
                    self._outage(err)
                    return
            missing, unknown = insert.frame, 0
            try:
                if insert.maybe_written:
                    missing, unknown = self._unstored(insert)
                if len(missing):
                    self._insert(insert, missing)
            except Exception as err:
                if is_network_error(err):
                    insert.maybe_written = True
                    self._outage(err)
                    if final:
                        return
                    continue
                insert.refusals += 1
                if insert.refusals < REFUSALS_MAX and not final:
                    self._refused(err)
                    return
                self._done(insert)
                # of an insert of unknown outcome, what the lookup found stored is written all the same
                self._settle_written(insert.rows - len(missing) - unknown)
                why = f"ClickHouse refused the insert {insert.refusals} times: {first_line(err)}"
                self._settle_lost(len(missing) + unknown, insert.table, why)
                continue
            self._done(insert)
            self._settle_written(insert.rows - unknown)
            if unknown:
                why = "an insert of unknown outcome was stored in part and the rest cannot be told apart"
                self._settle_lost(unknown, insert.table, why)
            self._backoff = RETRY_FIRST
            if self.outage_since is None and self.state != "ok":  # the refusals are over
                self.state, self.detail = "ok", ""

    def _refused(self, err: BaseException) -> None:
        """The server refused an insert (it may pass later): retry it after the backoff."""
        log.warning("ClickHouse at %s refused an insert (%s); retrying", self.target.shown, first_line(err))
        self.state, self.detail = "degraded", f"refused an insert: {first_line(err)}"
        self._next_attempt = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, RETRY_MAX)

    def _insert(self, insert: Insert, frame: pd.DataFrame) -> None:
        assert self.layout is not None
        names, data = insert_columns(insert.table, frame, insert.block_id)
        target = self.layout.table(insert.table)
        self._client.execute(f"INSERT INTO {target} ({', '.join(names)}) VALUES", data, columnar=True)

    def _unstored(self, insert: Insert) -> tuple[pd.DataFrame, int]:
        """The rows of an insert sent before an outage that did not arrive, and how many rows arrived only in
        part (lost: which of them are stored cannot be told). The server writes an insert as one part per
        partition (a day), each whole or not at all: an insert spanning two days may be half written. So its
        rows are counted by second (`time`) under its block_id: a second with all its rows stored is done, one
        with none is sent again, one with some (a part split otherwise) is counted as lost, the rest stored.

        On a cluster it is sent again whole instead: a shard may have it and another not, and the replicated
        tables drop a block they already have (the Distributed table splits the same rows into the same
        blocks)."""
        assert self.layout is not None
        if self.layout.cluster:
            return insert.frame, 0
        seconds = time_seconds(insert.table, insert.frame)  # the primary key's range: not a scan of the table
        stored = dict(
            self._client.execute(
                f"SELECT toUInt32(time) AS second, count() FROM {self.layout.table(insert.table)} "
                "WHERE time >= toDateTime(%(first)s) AND time <= toDateTime(%(last)s) AND block_id = %(id)s "
                "GROUP BY second",
                {"first": int(seconds.min()), "last": int(seconds.max()), "id": insert.block_id},
            )
        )
        if not stored:
            return insert.frame, 0
        expected = pd.Series(seconds).value_counts()
        unknown = sum(max(int(expected.get(second, 0)) - count, 0) for second, count in stored.items())
        resend = ~np.isin(seconds, np.fromiter(stored, dtype="int64", count=len(stored)))
        log.info(
            "ClickHouse: an insert of unknown outcome (%d %s rows) was stored in part: %d rows are sent again",
            insert.rows, insert.table, int(resend.sum()),
        )  # fmt: skip
        return insert.frame[resend], unknown

    def _settle_written(self, rows: int) -> None:
        self._written += rows
        self.rows_written += rows

    def _settle_lost(self, rows: int, table: str, why: str) -> None:
        self._lost += rows
        self.rows_dropped += rows
        log.warning("ClickHouse: %d %s rows dropped: %s", rows, table, why)

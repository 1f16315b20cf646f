"""The ClickHouse sink's disk spool (--clickhouse-spool-size): inserts that wait for the server, on disk under
the data dir so that they survive a restart, oldest first.

One file per insert, in flowscope's Parquet layout (flowscope.formats.parquet), named
<sequence>-<table>-<rows>-<block_id>.parquet: the order, where it goes, how many records it settles and the id
that keeps a replay from writing it twice are in the name, so a file that no longer reads is still counted
exactly. A file is written under a partial name, made durable and renamed: a crash leaves at most a partial
file, which the next start removes (its records were still in the dead agent's memory). Past the size the
oldest files are dropped; the sink counts their records as lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flowscope.coverage import Coverage
from flowscope.formats import parquet
from flowscope.formats.jsonl import ReplayError
from flowscope.pipeline.sink import PARTIAL_PREFIX, writable_directory
from flowscope.schema import EVENT_COLUMNS, FLOW_COLUMNS, FlowBatch, empty_frame

log = logging.getLogger(__name__)

SPOOL_DIRECTORY = "clickhouse-spool"  # under the data dir
FILE_NAME = re.compile(r"^(\d{12})-(flows|events)-(\d+)-([0-9a-f]{32})\.parquet$")
_EPOCH = pd.Timestamp(0, tz="UTC")  # the interval a spool file's one batch claims (nothing reads it)


class SpoolFileError(ValueError):
    """A spool file that cannot be read back; the message says why."""


@dataclass(frozen=True)
class Spooled:
    """One insert on disk."""

    path: Path
    sequence: int
    table: str
    rows: int
    block_id: str
    size: int


class Spool:
    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.entries: list[Spooled] = []  # oldest first
        self._next_sequence = 0

    def open(self) -> int:
        """Creates the directory, removes what a crash left half-written and takes over the files an earlier
        run spooled; returns their records."""
        writable_directory(
            self.directory, "the ClickHouse spool", "choose a writable --data-dir or --clickhouse-spool-size 0"
        )
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(PARTIAL_PREFIX):
                path.unlink(missing_ok=True)
                log.warning("ClickHouse spool: removed %s, which a stopped agent left half-written", path.name)
                continue
            match = FILE_NAME.match(path.name)
            if match is None:
                log.warning("ClickHouse spool: %s is not a spool file; it is left alone", path)
                continue
            sequence, table, rows, block_id = match.groups()
            size = path.stat().st_size
            self.entries.append(Spooled(path, int(sequence), table, int(rows), block_id, size))
        self._next_sequence = self.entries[-1].sequence + 1 if self.entries else 0
        if self.entries:
            log.info(
                "ClickHouse spool: %d rows in %d file(s) that an earlier run left in %s are written first",
                self.rows, len(self.entries), self.directory,
            )  # fmt: skip
        return self.rows

    @property
    def rows(self) -> int:
        return sum(entry.rows for entry in self.entries)

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.entries)

    def oldest(self) -> Spooled | None:
        return self.entries[0] if self.entries else None

    def add(self, table: str, frame: pd.DataFrame, block_id: str) -> list[Spooled]:
        """Writes one insert as the newest file; returns the files dropped to stay within the size (the oldest,
        or this one when it alone is larger). Raises OSError when the disk refuses it."""
        sequence, self._next_sequence = self._next_sequence, self._next_sequence + 1
        name = f"{sequence:012d}-{table}-{len(frame)}-{block_id}.parquet"
        partial = self.directory / f"{PARTIAL_PREFIX}{name}"
        empty = {"flows": empty_frame(FLOW_COLUMNS), "events": empty_frame(EVENT_COLUMNS)}
        empty[table] = frame
        try:
            writer = parquet.open_writer(str(partial))
            parquet.write_batch(writer, FlowBatch(_EPOCH, _EPOCH, empty["flows"], empty["events"], Coverage()))
            writer.close()
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            entry = Spooled(self.directory / name, sequence, table, len(frame), block_id, partial.stat().st_size)
            if entry.size > self.limit:
                partial.unlink()
                return [entry]
            dropped = []
            while self.size + entry.size > self.limit:
                dropped.append(self.entries[0])
                self.remove(self.entries[0])
            os.replace(partial, entry.path)
            self._sync_directory()
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        self.entries.append(entry)
        return dropped

    def load(self, entry: Spooled) -> pd.DataFrame:
        """The records of a spooled insert; raises SpoolFileError for a file that does not read back whole."""
        try:
            batches = list(parquet.read_batches(str(entry.path)))
        except ReplayError as err:
            raise SpoolFileError(str(err).removeprefix(f"{entry.path}: ").rstrip(".")) from None
        if len(batches) != 1:
            raise SpoolFileError(f"it holds {len(batches)} inserts, not one")
        batch = batches[0]
        frame = batch.flows if entry.table == "flows" else batch.events
        if len(frame) != entry.rows:
            raise SpoolFileError(f"it holds {len(frame)} {entry.table} rows, not the {entry.rows} its name says")
        return frame

    def remove(self, entry: Spooled) -> None:
        self.entries.remove(entry)
        with contextlib.suppress(FileNotFoundError):
            entry.path.unlink()

    def _sync_directory(self) -> None:
        descriptor = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

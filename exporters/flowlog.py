"""The flow log: the agent's embedded history, rotating Parquet files of flows and events under a data dir
(flowscope.formats.parquet: one row group per interval, zstd, dictionary-encoded text).

Files are written under a hidden partial name and renamed to flows_<first>_<last>.parquet when they are
complete (rotation by size or age, SIGHUP, stop), so a reader never opens a file without its footer, and a
SIGKILL leaves only a partial file that readers ignore and the next start removes. Records settle when
their file is renamed (written) or abandoned (lost): produced = delivered + lost counts rows a reader can
really read. A write that fails (a full disk, the directory gone) abandons the file, counts its records as
lost and shows the error in health(); the next interval starts a new file. Retention deletes the oldest
complete files past the total size, and files last written longer ago than the age (a replay of an old
recording is kept as long as a live capture).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from flowscope.config import FlowLogConfig
from flowscope.formats import parquet
from flowscope.pipeline.sink import PARTIAL_PREFIX, SinkError, records, writable_directory
from flowscope.schema import FlowBatch

log = logging.getLogger(__name__)


@dataclass
class OpenFile:
    partial: Path
    writer: Any
    opened: float  # monotonic
    first: pd.Timestamp
    last: pd.Timestamp
    records: int = 0  # flow and event rows, settled when the file is renamed


class FlowLogSink:
    name = "flowlog"

    def __init__(self, config: FlowLogConfig, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.directory = Path(config.directory)
        self.monotonic = monotonic
        self.current: OpenFile | None = None
        self._written = self._lost = 0  # settled since settled() was last asked
        self.files_written = self.files_deleted = self.errors = 0
        self.last_error: str | None = None

    # ---- the sink's life ---------------------------------------------------------------------------------

    def open(self) -> None:
        writable_directory(self.directory, "the flow log", "choose a writable --data-dir")
        stale = [p for p in self.directory.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.warning(
                "flow log: removed %d partial file(s) that a stopped agent left in %s", len(stale), self.directory
            )

    def write(self, batch: FlowBatch) -> None:
        count = records(batch)
        try:
            if self.current is not None and self._due():
                self._complete()
            if self.current is None:
                self.current = self._start(batch)
            parquet.write_batch(self.current.writer, batch)
        except OSError as err:
            self._fail(f"cannot write the flow log in {self.directory} ({err.strerror or err})", count)
            return
        self.current.records += count
        first, last = batch_range(batch)
        self.current.first, self.current.last = min(self.current.first, first), max(self.current.last, last)

    def reopen(self) -> None:
        """SIGHUP: the file being written is completed now; the next interval starts a new one."""
        if self.current is not None:
            self._safely(self._complete)

    def close(self) -> None:
        if self.current is not None:
            self._safely(self._complete)

    def settled(self) -> tuple[int, int]:
        settled = self._written, self._lost
        self._written = self._lost = 0
        return settled

    def health(self) -> dict[str, Any]:
        current = self.current
        return {
            "state": "failing" if self.last_error else "ok",
            "directory": str(self.directory),
            "writing": current.partial.name if current else None,
            "pending_records": current.records if current else 0,
            "files_written": self.files_written,
            "files_deleted": self.files_deleted,
            "errors": self.errors,
            "error": self.last_error,
        }

    # ---- files -------------------------------------------------------------------------------------------

    def _due(self) -> bool:
        assert self.current is not None
        if self.monotonic() - self.current.opened >= self.config.rotate_age:
            return True
        try:
            return self.current.partial.stat().st_size >= int(self.config.rotate_size)
        except OSError:
            return True

    def _start(self, batch: FlowBatch) -> OpenFile:
        first, last = batch_range(batch)
        partial = self.directory / f"{PARTIAL_PREFIX}{parquet.stamp(first)}-{os.getpid()}.parquet"
        return OpenFile(partial, parquet.open_writer(str(partial)), self.monotonic(), first, last)

    def _complete(self) -> None:
        """Closes the file (its footer), makes it durable and gives it its final name; then retention."""
        current, self.current = self.current, None
        assert current is not None
        try:
            current.writer.close()
            with open(current.partial, "rb") as handle:
                os.fsync(handle.fileno())
            copy = 0
            while (final := self.directory / parquet.log_file_name(current.first, current.last, copy)).exists():
                copy += 1
            os.replace(current.partial, final)
        except OSError as err:
            current.partial.unlink(missing_ok=True)
            self._fail(
                f"cannot complete the flow log's file in {self.directory} ({err.strerror or err})", current.records
            )
            return
        self._written += current.records
        self.files_written += 1
        self.last_error = None
        self._retain()

    def _fail(self, sentence: str, lost_records: int) -> None:
        """A write failed: the open file (if any) is abandoned and its records lost with the batch's."""
        current, self.current = self.current, None
        if current is not None:
            with contextlib.suppress(Exception):
                current.writer.close()
            current.partial.unlink(missing_ok=True)
            lost_records += current.records
        self._lost += lost_records
        self.errors += 1
        if self.last_error is None or self.errors % 100 == 0:
            log.warning("flow log: %s; %d records lost", sentence, lost_records)
        self.last_error = sentence

    def _safely(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as err:  # a close must not take the sink's thread down: counted in _fail
            self._fail(f"the flow log failed: {err}", 0)

    def _retain(self) -> None:
        """Deletes the complete files written longest ago past the total size, and those written longer ago
        than the age (by when they were written: a replayed recording's records may be old)."""
        files = []
        for path, _, _ in parquet.log_files(self.directory):
            with contextlib.suppress(OSError):
                info = path.stat()
                files.append((path, info.st_size, info.st_mtime))
        files.sort(key=lambda entry: entry[2])
        total = sum(size for _, size, _ in files)
        oldest_kept = time.time() - self.config.retain_age
        for path, size, modified in files:
            if total <= int(self.config.retain_size) and modified >= oldest_kept:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                self.files_deleted += 1


def batch_range(batch: FlowBatch) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The first and last instants a batch covers: its interval, widened to its rows' own times."""
    starts = [batch.time_start, batch.flows["time_start"].min(), batch.events["time"].min()]
    ends = [batch.time_end, batch.flows["time_end"].max(), batch.events["time"].max()]
    starts = [t for t in starts if not pd.isna(t)]
    ends = [t for t in ends if not pd.isna(t)]
    now = pd.Timestamp.now(tz="UTC")
    return (min(starts) if starts else now), (max(ends) if ends else min(starts) if starts else now)


class ParquetFileSink:
    """One Parquet file of the whole run (`capture --file X.parquet`): written under a partial name beside it
    and renamed at the end, so a reader never sees a file without its footer."""

    name = "parquet"

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(f"{PARTIAL_PREFIX}{self.path.name}")
        self.writer: Any = None
        self.batches = 0

    def open(self) -> None:
        try:
            self.writer = parquet.open_writer(str(self.partial))
        except OSError as err:
            raise SinkError(f"cannot write {self.path} ({err.strerror or err}); choose another --file.") from None

    def write(self, batch: FlowBatch) -> None:
        parquet.write_batch(self.writer, batch)
        self.batches += 1

    def close(self) -> None:
        self.writer.close()
        os.replace(self.partial, self.path)

    def health(self) -> dict[str, Any]:
        return {"state": "ok", "file": str(self.path), "batches": self.batches}

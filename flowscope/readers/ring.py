"""Reads the BPF event ring buffer through its mmap'd pages into numpy: no Python call, no object per event.

Layout (kernel/bpf/ringbuf.c): page 0 holds consumer_pos, the only page user space may write; page 1
holds producer_pos; the data area follows, mapped twice in a row, so a record that wraps around its end
is contiguous in memory. Positions only grow; a record starts at `position & (size - 1)` with an 8-byte
header: u32 length (bit 31: still being written, bit 30: discarded) and u32 page offset; the next record
starts at the next multiple of 8 after it.

Every record flowscope writes has one size (struct fs_event), so the pending part of the ring is an
array of fixed slots, read with one vectorised pass. A record of another length is skipped by its own
length and counted; a record still being written stops the read (records behind it wait for it, as the
kernel's commit order requires).

Memory ordering: the kernel clears the busy bit with xchg after writing the record, and moves
producer_pos before that. The reader loads producer_pos, then the headers, then the records, and stores
consumer_pos last. x86-64 keeps loads in order and never moves a store before an earlier load, so these
plain accesses are correct there; a weakly ordered CPU (arm64) needs acquire loads and a release store,
which Python cannot issue, so `supported()` is true only on x86-64 and other machines keep BCC's reader.

The walker (`walk_records`) takes plain arrays, so it is tested on synthetic ring memory without root.
"""

from __future__ import annotations

import mmap
import platform
from dataclasses import dataclass

import numpy as np

from flowscope.kernel.layouts import EVENT, EVENT_KIND_MAX

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
LENGTH_MASK = ~(BUSY_BIT | DISCARD_BIT) & 0xFFFFFFFF
HEADER_SIZE = 8  # BPF_RINGBUF_HDR_SZ
EVENT_KIND_OFFSET = EVENT.fields["kind"][1]
EVENT_GENERATION_OFFSET = EVENT.fields["generation"][1]


class RingError(RuntimeError):
    """The ring buffer cannot be mapped as this reader expects; the message says why."""


def supported() -> bool:
    """Whether this machine's memory ordering makes the plain loads and stores of the reader correct."""
    return platform.machine() in ("x86_64", "AMD64")


def record_span(length: int) -> int:
    """Bytes a record of `length` occupies in the ring: header and data, rounded up to 8."""
    return (length + HEADER_SIZE + 7) & ~7


@dataclass
class RingRead:
    records: np.ndarray  # (n, record size) uint8, a copy, in commit order
    consumer: int  # the position after the last record read or skipped
    malformed: int  # committed records of another length, skipped
    lost: int = 0  # the ring reports no losses here: the probes count what did not fit


def walk_records(data: np.ndarray, consumer: int, producer: int, record_size: int) -> RingRead:
    """The committed records of `record_size` bytes from `consumer` up to `producer` (or up to the first
    record still being written) in `data`, the ring's data area mapped twice (2 x a power of two bytes).
    Discarded records are skipped; records of another length are skipped and counted."""
    mask = len(data) // 2 - 1
    slot = record_span(record_size)
    chunks = []
    malformed = 0
    position = consumer
    while position < producer:
        start = position & mask
        whole = (producer - position) // slot
        if whole:
            rows = data[start : start + whole * slot].reshape(whole, slot)
            headers = np.ascontiguousarray(rows[:, :4]).view("<u4").reshape(-1)
            # Busy or of another length: the regular run of records ends there.
            irregular = np.flatnonzero((headers & np.uint32(~DISCARD_BIT & 0xFFFFFFFF)) != record_size)
            regular = int(irregular[0]) if len(irregular) else whole
            if regular:
                kept = (headers[:regular] & np.uint32(DISCARD_BIT)) == 0
                body = rows[:regular, HEADER_SIZE : HEADER_SIZE + record_size]
                chunks.append(body.copy() if kept.all() else body[kept])
                position += regular * slot
                if regular == whole:
                    continue
                start = position & mask
        header = int(data[start : start + 4].view("<u4")[0])
        span = record_span(header & LENGTH_MASK)
        if header & BUSY_BIT or position + span > producer:
            break  # still being written (a committed record never reaches past producer_pos)
        if not header & DISCARD_BIT:
            malformed += 1
        position += span
    if not chunks:
        return RingRead(np.zeros((0, record_size), dtype=np.uint8), position, malformed)
    return RingRead(chunks[0] if len(chunks) == 1 else np.concatenate(chunks), position, malformed)


class MmapRing:
    """A BPF ring buffer map's pages, mapped from its fd: consumer page read-write, the rest read-only."""

    def __init__(self, map_fd: int, data_size: int, record_size: int) -> None:
        page = mmap.PAGESIZE
        if data_size <= 0 or data_size & (data_size - 1) or data_size % page:
            raise RingError(f"a ring buffer holds a power-of-two number of pages, not {data_size} bytes")
        self.record_size = record_size
        try:
            self._consumer_page = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._shared_pages = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError as err:
            raise RingError(f"cannot map the event ring buffer ({err.strerror})") from None
        self._consumer = np.frombuffer(self._consumer_page, dtype="<u8", count=1)
        self._producer = np.frombuffer(self._shared_pages, dtype="<u8", count=1)
        self._data = np.frombuffer(self._shared_pages, dtype=np.uint8, offset=page)

    @property
    def consumer(self) -> int:
        return int(self._consumer[0])

    @property
    def producer(self) -> int:
        return int(self._producer[0])

    def reserved(self) -> int:
        """The position up to which records are reserved now (the last ones may still be being written)."""
        return self.producer

    def read_past(self, position: int) -> bool:
        return self.consumer >= position

    def read(self) -> RingRead:
        """Every committed record from the consumer position on; frees their space in the ring."""
        producer = self.producer  # first: every record below it was reserved before the headers are read
        read = walk_records(self._data, self.consumer, producer, self.record_size)
        self._consumer[0] = read.consumer  # last: the records were copied out
        return read

    def close(self) -> None:
        del self._consumer, self._producer, self._data  # the maps refuse to close while arrays view them
        self._consumer_page.close()
        self._shared_pages.close()


class PendingEvents:
    """Event records read from the ring and not yet taken, up to `capacity`; records beyond it are dropped
    and counted per generation and kind, so the interval they belong to shows them as lost."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._chunks: list[np.ndarray] = []
        self._count = 0
        self._dropped = np.zeros((2, EVENT_KIND_MAX), dtype=np.int64)

    def add(self, records: np.ndarray) -> None:
        """`records`: (n, EVENT.itemsize) uint8 rows."""
        room = self.capacity - self._count
        if len(records) > room:
            extra = records[room:]
            kinds = extra[:, EVENT_KIND_OFFSET]
            np.add.at(
                self._dropped,
                (extra[:, EVENT_GENERATION_OFFSET] & 1, np.where(kinds < EVENT_KIND_MAX, kinds, 0)),
                1,
            )
            records = records[:room]
        if len(records):
            self._chunks.append(records)
            self._count += len(records)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """The records kept (EVENT, in the order read) and the drops per generation and kind since the last
        take; both start again from nothing."""
        rows = np.concatenate(self._chunks) if self._chunks else np.zeros((0, EVENT.itemsize), np.uint8)
        dropped = self._dropped
        self._chunks, self._count, self._dropped = [], 0, np.zeros_like(dropped)
        return np.ascontiguousarray(rows).reshape(-1).view(EVENT), dropped

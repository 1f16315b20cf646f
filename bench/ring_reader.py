"""Prototype: read the event ring buffer's mmap'd pages directly into numpy, no Python call per event.

Every record flowscope writes has one size (struct fs_event, 120 bytes) behind the ring's 8-byte header,
so the pending part of the ring is an array of fixed 128-byte slots. The kernel maps the data area twice
in a row, so the slots from the consumer position on are contiguous even where the ring wraps.

Layout (kernel/bpf/ringbuf.c): page 0 holds consumer_pos (the only page user space may write), page 1
producer_pos, then the data area (twice). A record header is u32 len (bit 31: still being written,
bit 30: discarded) and u32 page offset. Ordering: the producer clears the busy bit with a release store
after writing the record; x86 keeps loads in order and stores after earlier loads, so reading the
lengths, then the records, then storing consumer_pos is correct there. A weakly ordered CPU (arm64)
needs acquire/release fences around those accesses, which Python cannot issue: the integrated reader
must check the architecture, or do these three steps in a small C helper.
"""

from __future__ import annotations

import mmap
import platform
import threading

import numpy as np

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8
# The pump reads the ring every READ_EVERY_MS rather than on each kernel notification: the kernel
# notifies whenever the reader has caught up, which at 100k+ events/s means a wakeup and a small read
# every few records. 10 ms of records (1750 at 175k/s) fit a 1 MiB ring five times over.
READ_EVERY_MS = 10


class RingFormatError(RuntimeError):
    pass


class MmapRing:
    def __init__(self, map_fd: int, data_size: int, record: np.dtype) -> None:
        page = mmap.PAGESIZE
        if data_size & (data_size - 1) or data_size % page:
            raise RingFormatError(f"a ring buffer's size is a power-of-two number of pages, not {data_size}")
        self.record = record
        self.slot = (HEADER_SIZE + record.itemsize + 7) & ~7
        self.mask = data_size - 1
        self.data_size = data_size
        self._consumer_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer_map = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.consumer_pos = np.frombuffer(self._consumer_map, dtype="<u8", count=1)
        self.producer_pos = np.frombuffer(self._producer_map, dtype="<u8", count=1)
        self.data = np.frombuffer(self._producer_map, dtype=np.uint8, offset=page)

    def read(self) -> np.ndarray:
        """Every committed record from the consumer position on, as raw bytes (one row per record, a copy);
        frees their space in the ring. Raw rows, because numpy copies and concatenates structured arrays
        with padding fields element by element (~300 ns a record), and plain bytes at memory speed."""
        consumer = int(self.consumer_pos[0])
        pending = (int(self.producer_pos[0]) - consumer) // self.slot
        if pending <= 0:
            return np.zeros((0, self.record.itemsize), dtype=np.uint8)
        start = consumer & self.mask
        rows = self.data[start : start + pending * self.slot].reshape(pending, self.slot)
        lengths = rows[:, :4].copy().view("<u4").reshape(-1)
        busy = np.flatnonzero(lengths & BUSY_BIT)
        ready = int(busy[0]) if len(busy) else pending  # records after one still being written must wait
        sizes = lengths[:ready] & ~np.uint32(BUSY_BIT | DISCARD_BIT)
        if np.any(sizes != self.record.itemsize):
            raise RingFormatError(f"a record of {int(sizes[sizes != self.record.itemsize][0])} bytes in the ring")
        kept = rows[:ready][(lengths[:ready] & DISCARD_BIT) == 0, HEADER_SIZE : HEADER_SIZE + self.record.itemsize]
        kept = kept.copy()
        self.consumer_pos[0] = consumer + ready * self.slot
        return kept

    def close(self) -> None:
        del self.consumer_pos, self.producer_pos, self.data
        self._consumer_map.close()
        self._producer_map.close()


class MmapPump(threading.Thread):
    """Stands in for KernelReader's event pump: the same flush() contract, with MmapRing doing the reading.

    The thread keeps the ring empty while the agent's thread builds a FlowBatch; it holds the GIL only
    for the vectorised copy. flush() reads once more itself (under the lock), so every record written
    before the call is in its answer, and hands all records over as one bytes object."""

    def __init__(self, ring: MmapRing, pending: list[bytes]) -> None:
        super().__init__(name="flowscope-events-mmap", daemon=True)
        self.ring = ring
        self._lock = threading.Lock()
        carried = np.frombuffer(b"".join(pending), dtype=np.uint8).reshape(-1, ring.record.itemsize)
        self._rows: list[np.ndarray] = [carried]
        self._closing = threading.Event()

    def _read_once(self) -> None:
        with self._lock:
            rows = self.ring.read()
            if len(rows):
                self._rows.append(rows)

    def run(self) -> None:
        while not self._closing.wait(READ_EVERY_MS / 1000):
            self._read_once()

    def flush(self) -> tuple[list[bytes], np.ndarray, int]:
        from flowscope.kernel_records import EVENT_KIND_MAX

        self._read_once()
        with self._lock:
            rows, self._rows = self._rows, []
        return [np.concatenate(rows).tobytes()] if rows else [], np.zeros((2, EVENT_KIND_MAX), dtype=np.int64), 0

    def close(self) -> None:
        self._closing.set()
        self.join(timeout=5)
        self.ring.close()


def install(source) -> None:
    """Makes a LiveSource read its events with MmapPump instead of the reader's BCC callback pump.

    The BCC pump is stopped first (its ring buffer stays open but is never polled again, so the two never
    compete for records); what it had read and not yet handed over is carried into the new pump."""
    from flowscope.kernel_records import EVENT

    reader = source._reader
    old = getattr(reader, "_pump", None)
    if old is None or not hasattr(old, "flush") or not hasattr(old, "_raw"):
        raise RingFormatError("flowscope/kernel_reader.py has no event pump this prototype knows how to replace")
    if source.loaded.perf_events:
        raise RingFormatError("this kernel uses the perf buffer; the mmap reader reads ring buffers only")
    if platform.machine() != "x86_64":
        raise RingFormatError(f"the mmap reader relies on x86's memory ordering, not {platform.machine()}'s")
    old.close()
    ring = MmapRing(reader.bpf["fs_events"].map_fd, source.loaded.options.ring_pages * mmap.PAGESIZE, EVENT)
    pump = MmapPump(ring, [record.ljust(EVENT.itemsize, b"\0") for record in old._raw])
    reader._pump = pump
    pump.start()

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
import select
import threading

import numpy as np

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8
READER_WAKE_MS = 20  # the thread also wakes this often without a notification


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
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def wait(self, timeout_ms: int) -> None:
        """Sleeps until the kernel signals new records (or the timeout passes)."""
        self._epoll.poll(timeout_ms / 1000)

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
        self._epoll.close()
        del self.consumer_pos, self.producer_pos, self.data
        self._consumer_map.close()
        self._producer_map.close()


def install(source) -> None:
    """Makes a LiveSource's KernelReader read its events with MmapRing on a thread of its own, instead of
    BCC's per-event callback on the agent's thread.

    The thread keeps the ring empty while the agent's thread builds a FlowBatch (hundreds of ms at 100k
    rows, during which a 1 MiB ring of 8192 records overflows at 100k events/s); it holds the GIL only
    for the vectorised copy. The reader's ring methods are replaced on the instance; BCC's ring buffer
    (opened by the reader) stays open but is never polled again, so the two never compete for records."""
    from flowscope.kernel_records import EVENT

    reader = source._reader
    if source.loaded.perf_events:
        raise RingFormatError("this kernel uses the perf buffer; the mmap reader reads ring buffers only")
    ring = MmapRing(reader.bpf["fs_events"].map_fd, source.loaded.options.ring_pages * mmap.PAGESIZE, EVENT)
    read: list[np.ndarray] = []
    lock = threading.Lock()
    stop = threading.Event()

    def read_once() -> None:
        with lock:
            rows = ring.read()
            if len(rows):
                read.append(rows)

    def read_forever() -> None:
        while not stop.is_set():
            ring.wait(READER_WAKE_MS)
            read_once()

    thread = threading.Thread(target=read_forever, name="flowscope-ring-reader", daemon=True)

    def poll(timeout_ms: int) -> None:
        stop.wait(timeout_ms / 1000)  # the thread does the reading

    def take_events() -> np.ndarray:
        with lock:
            fresh = np.concatenate(read).reshape(-1).view(EVENT) if read else np.zeros(0, dtype=EVENT)
            read.clear()
        return np.concatenate([reader._carried, fresh]) if len(reader._carried) else fresh

    close = reader.close

    def close_both() -> None:
        stop.set()
        thread.join()
        ring.close()
        close()

    # flip_and_drain calls _consume after the grace period: the last records of the old generation are
    # committed by then, and one more read under the lock collects them.
    reader.poll, reader._consume, reader._take_events, reader.close = poll, read_once, take_events, close_both
    thread.start()

"""Reads the kernel side every interval: flips the generation, drains the maps, collects the events.

The only module that touches live BPF objects; it hands plain numpy arrays to the aggregator.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowscope.kernel import bpf_syscall
from flowscope.kernel.layouts import (
    COUNTER_EVENT_LOST_BASE,
    COUNTER_MAX,
    COUNTERS,
    EVENT,
    EVENT_KIND_MAX,
    concat_records,
    select_records,
)
from flowscope.kernel.loader import LoadedProbes, LoaderError
from flowscope.readers import perf as perf_reader
from flowscope.readers import ring as ring_reader

PUMP_POLL_MS = 20  # how long a drain may wait for BCC's pump to come round
PENDING_EVENTS_MAX = 1 << 20  # events held between drains (128 MiB); more are dropped and counted
# The mmap pump reads the ring at most this often: the kernel wakes a reader that has caught up at every
# record, which at 100k+ events/s would mean a wakeup and a tiny read every few records. 10 ms of records
# at 400k/s (4000) fit a 1 MiB ring (8192) twice over.
READ_EVERY_S = 0.01
# A drain waits this long at most for a record reserved before it to be committed (bpf_ringbuf_output
# commits within microseconds); a record still busy after it is read by the next drain.
COMMIT_WAIT_S = 0.01


def cpu_list(which: str) -> list[int]:
    """The CPUs of /sys/devices/system/cpu/<which> ("possible", "online"): "0-3,8" -> [0, 1, 2, 3, 8]."""
    cpus = []
    for part in Path(f"/sys/devices/system/cpu/{which}").read_text().strip().split(","):
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


@dataclass
class KernelDrain:
    """What one interval produced in the kernel, as plain arrays."""

    generation: int
    maps: dict[str, tuple[np.ndarray, np.ndarray]]  # base map name -> (keys, values)
    events: np.ndarray  # EVENT records of this generation
    counters: np.ndarray  # COUNTER_MAX counts of the interval, summed over CPUs
    perf_lost_reported: int = 0  # what perf's PERF_RECORD_LOST said (a cross-check; the kernel counts)
    # Per event kind: events of this generation read from the kernel but dropped here, the buffer of
    # pending events being full.
    events_dropped: np.ndarray = field(default_factory=lambda: np.zeros(EVENT_KIND_MAX, dtype=np.int64))
    events_malformed: int = 0  # ring records of an unexpected length, skipped (kind and interval unknown)

    def counter(self, name: str) -> int:
        """The interval's count of one of COUNTERS."""
        return int(self.counters[COUNTERS.index(name)])

    def events_lost(self, kind: int) -> int:
        """Events of one kind that never reached the aggregator: ring or perf buffer full, or dropped here."""
        return int(self.counters[COUNTER_EVENT_LOST_BASE + kind]) + int(self.events_dropped[kind])


class _Counters:
    """fs_counters: a per-CPU array with one block of COUNTER_MAX counters per generation, read whole with
    one batch lookup per interval. The kernel only adds to them, so a generation's counts for an interval
    are its sums now less its sums at its previous read (no write back, and uint64 wraps as the kernel's do)."""

    def __init__(self, fd: int, cpus: int) -> None:
        self.fd = fd
        self.cpus = cpus
        self._buffers = bpf_syscall.BatchBuffers(4, 8 * cpus, 2 * COUNTER_MAX)
        self._sums_before = np.zeros(2 * COUNTER_MAX, dtype=np.uint64)

    def take(self, generation: int) -> np.ndarray:
        _keys, values, count = bpf_syscall.drain_batch(self.fd, self._buffers, delete=False)
        if count != 2 * COUNTER_MAX:
            raise bpf_syscall.BpfSyscallError(0, f"the counter map returned {count} of {2 * COUNTER_MAX} entries")
        sums = values.view("<u8").reshape(count, self.cpus).sum(axis=1, dtype=np.uint64)
        block = slice(generation * COUNTER_MAX, (generation + 1) * COUNTER_MAX)
        taken = sums[block] - self._sums_before[block]
        self._sums_before[block] = sums[block]
        return taken


@dataclass
class EventsRead:
    """What an event pump hands to a drain."""

    events: np.ndarray  # EVENT records, in the order read
    dropped: np.ndarray  # (2, EVENT_KIND_MAX): records dropped in user space, per generation and kind
    perf_lost: int = 0  # what perf's PERF_RECORD_LOST said
    malformed: int = 0  # ring records of an unexpected length, skipped


class _MmapPump(threading.Thread):
    """Reads the event buffers through their mapped pages (the ring with flowscope.readers.ring, perf
    buffers with flowscope.readers.perf) on a thread of its own, so that a slow interval in the main thread
    does not leave them unread until they overflow. The thread sleeps in epoll until the kernel signals
    records, then reads at most every READ_EVERY_S; a drain reads the buffers itself too (the two take
    turns on a lock), so it needs no round trip to the thread. Records wait in PendingEvents until a drain
    takes them."""

    def __init__(self, buffers: ring_reader.MmapRing | perf_reader.PerfBuffers, fds: list[int], pending_max: int):
        super().__init__(name="flowscope-events", daemon=True)
        self.buffers = buffers
        self._pending = ring_reader.PendingEvents(pending_max)
        self._malformed = 0
        self._lost = 0
        self._lock = threading.Lock()
        self._epoll = select.epoll()
        for fd in fds:
            self._epoll.register(fd, select.EPOLLIN)
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC)  # close() writes it to end the epoll wait
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._closing = False
        self.error: BaseException | None = None

    def _read(self) -> None:
        """Takes what the buffers hold (the caller holds the lock)."""
        read = self.buffers.read()
        self._pending.add(read.records)
        self._malformed += read.malformed
        self._lost += read.lost

    def run(self) -> None:
        try:
            while not self._closing:
                self._epoll.poll()
                with self._lock:
                    if self._closing:
                        break
                    self._read()
                time.sleep(READ_EVERY_S)
        except BaseException as err:  # handed to the main thread by the next flush
            self.error = err

    def flush(self) -> EventsRead:
        """Every event committed to the ring before this call, and the drops since the last flush."""
        if self.error is not None:
            raise RuntimeError(f"the event reader failed: {self.error}") from self.error
        with self._lock:
            reserved = self.buffers.reserved()
            deadline = time.monotonic() + COMMIT_WAIT_S
            self._read()
            while not self.buffers.read_past(reserved) and time.monotonic() < deadline:
                time.sleep(0.0001)  # a record reserved before the call is still being written
                self._read()
            events, dropped = self._pending.take()
            malformed, self._malformed = self._malformed, 0
            lost, self._lost = self._lost, 0
        return EventsRead(events, dropped, lost, malformed)

    def close(self) -> None:
        with self._lock:
            self._closing = True
        os.eventfd_write(self._wakeup, 1)
        self.join(timeout=5)
        if self.is_alive():
            return  # unmapping the ring under a thread still reading it would crash the process
        self._epoll.close()
        os.close(self._wakeup)
        self.buffers.close()


class _BccPump(threading.Thread):
    """Reads the perf buffers (or, where the mmap reader cannot run, the ring) with libbcc's C readers and
    a callback per event, on a thread of its own. Nothing is compiled here, but loading libbcc maps LLVM
    with it (~60 MB resident). Events wait here until the next drain takes them; beyond `pending_max` they
    are dropped and counted per kind (shown as lost in the interval's accounting)."""

    def __init__(self, events_fd: int, perf_events: bool, perf_pages: int, pending_max: int) -> None:
        super().__init__(name="flowscope-events", daemon=True)
        from bcc.libbcc import _LOST_CB_TYPE, _RAW_CB_TYPE, _RINGBUF_CB_TYPE, lib

        self._lib = lib
        self.perf_events = perf_events
        self.pending_max = pending_max
        self._changed = threading.Condition()
        self._raw: list[bytes] = []
        self._dropped = np.zeros((2, EVENT_KIND_MAX), dtype=np.int64)  # per generation and kind
        self._perf_lost = 0
        self._requested = self._served = 0  # flush tickets
        self._closing = False
        self.error: BaseException | None = None
        self._readers: list[int] = []
        self._ring = None
        if perf_events:
            self._callbacks = (_RAW_CB_TYPE(self._on_perf_event), _LOST_CB_TYPE(self._on_lost))
            try:
                for cpu in cpu_list("online"):
                    reader = lib.bpf_open_perf_buffer(*self._callbacks, None, -1, cpu, perf_pages)
                    if not reader:
                        raise LoaderError(f"cannot open the perf buffer of CPU {cpu}")
                    self._readers.append(reader)
                    bpf_syscall.map_update(
                        events_fd, struct.pack("<I", cpu), struct.pack("<I", lib.perf_reader_fd(reader))
                    )
            except BaseException:
                self._free()
                raise
            self._reader_array = (ctypes.c_void_p * len(self._readers))(*self._readers)
        else:
            self._callbacks = (_RINGBUF_CB_TYPE(self._on_ring_event),)
            self._ring = lib.bpf_new_ringbuf(events_fd, self._callbacks[0], None)
            if not self._ring:
                raise LoaderError("cannot open the event ring buffer with libbcc")

    def _keep(self, data, size: int) -> None:
        record = ctypes.string_at(data, min(size, EVENT.itemsize))
        with self._changed:
            if len(self._raw) < self.pending_max:
                self._raw.append(record)
            elif len(record) == EVENT.itemsize:
                kind = record[ring_reader.EVENT_KIND_OFFSET]
                generation = record[ring_reader.EVENT_GENERATION_OFFSET] & 1
                self._dropped[generation, kind if kind < EVENT_KIND_MAX else 0] += 1

    def _on_ring_event(self, _ctx, data, size) -> int:
        self._keep(data, size)
        return 0

    def _on_perf_event(self, _cookie, data, size) -> None:
        self._keep(data, size)

    def _on_lost(self, _cookie, count: int) -> None:
        with self._changed:
            self._perf_lost += count

    def _read(self, timeout_ms: int) -> None:
        if self.perf_events:
            self._lib.perf_reader_poll(len(self._readers), self._reader_array, timeout_ms)
        else:
            self._lib.bpf_poll_ringbuf(self._ring, timeout_ms)

    def _read_all(self) -> None:
        """Everything in the buffers now, whether or not a wakeup was signalled."""
        if self.perf_events:
            self._lib.perf_reader_consume(len(self._readers), self._reader_array)
        else:
            self._lib.bpf_consume_ringbuf(self._ring)

    def run(self) -> None:
        try:
            while not self._closing:
                self._read(PUMP_POLL_MS)
                with self._changed:
                    ticket = self._requested
                if ticket != self._served:
                    self._read_all()
                    with self._changed:
                        self._served = ticket
                        self._changed.notify_all()
        except BaseException as err:  # handed to the main thread by the next flush
            self.error = err
            with self._changed:
                self._changed.notify_all()

    def flush(self) -> EventsRead:
        """Every event written to the buffers before this call, the drops since the last flush (per
        generation and kind), and what perf reported lost."""
        with self._changed:
            self._requested += 1
            ticket = self._requested
            while self._served < ticket and self.error is None:
                self._changed.wait()
            if self.error is not None:
                raise RuntimeError(f"the event reader failed: {self.error}") from self.error
            raw, self._raw = self._raw, []
            dropped, self._dropped = self._dropped, np.zeros_like(self._dropped)
            perf_lost, self._perf_lost = self._perf_lost, 0
        events = np.frombuffer(b"".join(r.ljust(EVENT.itemsize, b"\0") for r in raw), dtype=EVENT)
        return EventsRead(events, dropped, perf_lost)

    def _free(self) -> None:
        for reader in self._readers:
            self._lib.perf_reader_free(reader)
        self._readers = []
        if self._ring:
            self._lib.bpf_free_ringbuf(self._ring)
            self._ring = None

    def close(self) -> None:
        self._closing = True
        if self.is_alive():
            self.join(timeout=5)
        if not self.is_alive():  # never free the buffers under a thread still reading them
            self._free()


class KernelReader:
    def __init__(self, loaded: LoadedProbes, pending_events_max: int = PENDING_EVENTS_MAX) -> None:
        self.loaded = loaded
        self.generation = 0
        maps = loaded.maps
        self._generation_fd = maps["fs_generation"].fd
        self._counters = _Counters(maps["fs_counters"].fd, len(cpu_list("possible")))
        self._maps: dict[str, tuple[tuple[int, int], int, np.dtype, np.dtype]] = {}  # fds, capacity, dtypes
        for family in loaded.active:
            for drained in family.drained_maps:
                halves = (maps[f"{drained.name}_0"], maps[f"{drained.name}_1"])
                if (halves[0].key_size, halves[0].value_size) != (drained.key.itemsize, drained.value.itemsize):
                    raise LoaderError(
                        f"the probes' map {drained.name} has {halves[0].key_size}-byte keys and "
                        f"{halves[0].value_size}-byte values where flowscope reads {drained.key.itemsize} and "
                        f"{drained.value.itemsize}; reinstall flowscope (its probes and readers differ)."
                    )
                fds = (halves[0].fd, halves[1].fd)
                self._maps[drained.name] = (fds, halves[0].max_entries, drained.key, drained.value)
        self._carried = np.zeros(0, dtype=EVENT)  # events of the generation under way, read early
        self._carried_dropped = np.zeros(EVENT_KIND_MAX, dtype=np.int64)
        options = loaded.options
        events_fd = maps["fs_events"].fd
        self.mmap_ring = not loaded.perf_events and options.ring_reader == "mmap" and ring_reader.supported()
        self._pump: _MmapPump | _BccPump
        if self.mmap_ring:
            try:
                ring = ring_reader.MmapRing(events_fd, options.ring_pages * mmap.PAGESIZE, EVENT.itemsize)
            except ring_reader.RingError as err:
                raise LoaderError(f"{err}; --perf-buffer reads events through perf buffers instead.") from None
            self._pump = _MmapPump(ring, [events_fd], pending_events_max)
        elif loaded.perf_events and ring_reader.supported():  # the ring reader's memory ordering argument holds
            try:
                perf = perf_reader.PerfBuffers(events_fd, cpu_list("online"), options.perf_pages, EVENT.itemsize)
            except ring_reader.RingError as err:
                raise LoaderError(f"{err}; run `flowscope doctor` and report the output.") from None
            self._pump = _MmapPump(perf, perf.fds, pending_events_max)
        else:
            self._pump = _BccPump(events_fd, loaded.perf_events, options.perf_pages, pending_events_max)
        self._grace = bpf_syscall.GracePeriod()
        self._pump.start()

    def capacities(self) -> dict[str, int]:
        """Entries each drained map holds at most (its fill is what a drain read over this)."""
        return {name: capacity for name, (_fds, capacity, _key, _value) in self._maps.items()}

    def wait(self, timeout_ms: int) -> None:
        """Lets an interval pass (the events are read meanwhile, on the pump's thread)."""
        time.sleep(timeout_ms / 1000)

    def flip_and_drain(self) -> KernelDrain:
        old = self.generation
        self.generation = 1 - old
        bpf_syscall.map_update(self._generation_fd, struct.pack("<I", 0), struct.pack("<I", self.generation))
        self._grace.wait()  # from here on, no program writes generation `old`
        read = self._pump.flush()
        events = concat_records(self._carried, read.events) if len(self._carried) else read.events
        mine = events["generation"] == old
        self._carried = select_records(events, ~mine)
        dropped_now, self._carried_dropped = self._carried_dropped + read.dropped[old], read.dropped[1 - old]
        maps = {}
        for name, (fds, capacity, key_dtype, value_dtype) in self._maps.items():
            # Buffers of their own per drain, handed on as they are (no copy): the pages the kernel did not
            # write are never touched, so they cost no memory; the drained entries are alive once, not twice.
            buffers = bpf_syscall.BatchBuffers(key_dtype.itemsize, value_dtype.itemsize, capacity)
            keys, values, _count = bpf_syscall.drain_batch(fds[old], buffers)
            maps[name] = (keys.view(key_dtype), values.view(value_dtype))
        counters = self._counters.take(old)
        return KernelDrain(
            old, maps, select_records(events, mine), counters, read.perf_lost, dropped_now, read.malformed
        )

    def close(self) -> None:
        self._pump.close()
        self._grace.close()

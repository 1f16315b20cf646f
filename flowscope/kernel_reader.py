"""Reads the kernel side every interval: flips the generation, drains the maps, collects the events.

The only module that touches live BPF objects; it hands plain numpy arrays to the aggregator.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowscope import bpf_syscall
from flowscope.kernel_records import COUNTER_EVENT_LOST_BASE, COUNTER_MAX, EVENT, EVENT_KIND_MAX
from flowscope.loader import LoadedProbes

BPF_MAP_LOOKUP_ELEM = 1
PUMP_POLL_MS = 20  # how long a drain may wait for the pump to come round
PENDING_EVENTS_MAX = 1 << 20  # events held between drains (128 MiB); more are dropped and counted
EVENT_KIND_OFFSET = EVENT.fields["kind"][1]
EVENT_GENERATION_OFFSET = EVENT.fields["generation"][1]


def possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


@dataclass
class KernelDrain:
    """What one interval produced in the kernel, as plain arrays."""

    generation: int
    maps: dict[str, tuple[np.ndarray, np.ndarray]]  # base map name -> (keys, values)
    events: np.ndarray  # EVENT records of this generation
    counters: np.ndarray  # COUNTER_MAX sums over CPUs
    perf_lost_reported: int = 0  # what perf's PERF_RECORD_LOST said (a cross-check; the kernel counts)
    # Per event kind: events of this generation read from the kernel but dropped here, the buffer of
    # pending events being full.
    events_dropped: np.ndarray = field(default_factory=lambda: np.zeros(EVENT_KIND_MAX, dtype=np.int64))

    def events_lost(self, kind: int) -> int:
        """Events of one kind that never reached the aggregator: ring or perf buffer full, or dropped here."""
        return int(self.counters[COUNTER_EVENT_LOST_BASE + kind]) + int(self.events_dropped[kind])


@dataclass
class _PerCpuArray:
    fd: int
    cpus: int
    value: ctypes.Array = field(init=False)

    def __post_init__(self) -> None:
        self.value = ctypes.create_string_buffer(8 * self.cpus)
        self.zero = bytes(8 * self.cpus)

    def read_and_zero(self, indexes: range) -> np.ndarray:
        sums = np.zeros(len(indexes), dtype=np.uint64)
        key = ctypes.c_uint32()
        for position, index in enumerate(indexes):
            key.value = index
            attr = struct.pack("<IIQQQ", self.fd, 0, ctypes.addressof(key), ctypes.addressof(self.value), 0)
            bpf_syscall.bpf(BPF_MAP_LOOKUP_ELEM, attr)
            sums[position] = np.frombuffer(self.value.raw, dtype="<u8").sum()
            bpf_syscall.map_update(self.fd, struct.pack("<I", index), self.zero)
        return sums


class _EventPump(threading.Thread):
    """Reads the event ring (or the perf buffers) on a thread of its own, so that a slow interval in the
    main thread (a large batch, a sink that blocks) does not leave the kernel buffers unread until they
    overflow. Events wait here until the next drain takes them; beyond PENDING_EVENTS_MAX they are dropped
    and counted per kind (shown as lost in the interval's accounting)."""

    def __init__(self, bpf, perf_events: bool, perf_pages: int) -> None:
        super().__init__(name="flowscope-events", daemon=True)
        self.bpf = bpf
        self.perf_events = perf_events
        self._changed = threading.Condition()
        self._raw: list[bytes] = []
        self._dropped = np.zeros((2, EVENT_KIND_MAX), dtype=np.int64)  # per generation and kind
        self._perf_lost = 0
        self._requested = self._served = 0  # flush tickets
        self._closing = False
        self.error: BaseException | None = None
        events = bpf["fs_events"]
        if perf_events:
            events.open_perf_buffer(self._on_perf_event, page_cnt=perf_pages, lost_cb=self._on_lost)
        else:
            events.open_ring_buffer(self._on_ring_event)

    def _keep(self, data, size: int) -> None:
        record = ctypes.string_at(data, min(size, EVENT.itemsize))
        with self._changed:
            if len(self._raw) < PENDING_EVENTS_MAX:
                self._raw.append(record)
            elif len(record) == EVENT.itemsize:
                kind = record[EVENT_KIND_OFFSET]
                self._dropped[record[EVENT_GENERATION_OFFSET] & 1, kind if kind < EVENT_KIND_MAX else 0] += 1

    def _on_ring_event(self, _ctx, data, size) -> int:
        self._keep(data, size)
        return 0

    def _on_perf_event(self, _cpu, data, size) -> None:
        self._keep(data, size)

    def _on_lost(self, count: int) -> None:
        with self._changed:
            self._perf_lost += count

    def _read(self, timeout_ms: int) -> None:
        if self.perf_events:
            self.bpf.perf_buffer_poll(timeout=timeout_ms)
        else:
            self.bpf.ring_buffer_poll(timeout=timeout_ms)

    def _read_all(self) -> None:
        """Everything in the buffers now, whether or not a wakeup was signalled."""
        if self.perf_events:
            self.bpf.perf_buffer_consume()
        else:
            self.bpf.ring_buffer_consume()

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

    def flush(self) -> tuple[list[bytes], np.ndarray, int]:
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
        return raw, dropped, perf_lost

    def close(self) -> None:
        self._closing = True
        self.join(timeout=5)


class KernelReader:
    def __init__(self, loaded: LoadedProbes) -> None:
        self.loaded = loaded
        self.bpf = loaded.bpf
        self.generation = 0
        self._grace = bpf_syscall.GracePeriod()
        self._generation_fd = self.bpf["fs_generation"].map_fd
        self._counters = _PerCpuArray(self.bpf["fs_counters"].map_fd, possible_cpus())
        self._maps: dict[str, tuple[tuple[int, int], bpf_syscall.BatchBuffers, np.dtype, np.dtype]] = {}
        for family in loaded.active:
            for drained in family.drained_maps:
                fds = (self.bpf[f"{drained.name}_0"].map_fd, self.bpf[f"{drained.name}_1"].map_fd)
                capacity = getattr(loaded.options, drained.size_option)
                buffers = bpf_syscall.BatchBuffers(drained.key.itemsize, drained.value.itemsize, capacity)
                self._maps[drained.name] = (fds, buffers, drained.key, drained.value)
        self._carried = np.zeros(0, dtype=EVENT)  # events of the generation under way, read early
        self._carried_dropped = np.zeros(EVENT_KIND_MAX, dtype=np.int64)
        self._pump = _EventPump(self.bpf, loaded.perf_events, loaded.options.perf_pages)
        self._pump.start()

    def wait(self, timeout_ms: int) -> None:
        """Lets an interval pass (the events are read meanwhile, on the pump's thread)."""
        time.sleep(timeout_ms / 1000)

    def flip_and_drain(self) -> KernelDrain:
        old = self.generation
        self.generation = 1 - old
        bpf_syscall.map_update(self._generation_fd, struct.pack("<I", 0), struct.pack("<I", self.generation))
        self._grace.wait()  # from here on, no program writes generation `old`
        raw, dropped, perf_lost = self._pump.flush()
        fresh = np.frombuffer(b"".join(r.ljust(EVENT.itemsize, b"\0") for r in raw), dtype=EVENT)
        events = np.concatenate([self._carried, fresh]) if len(self._carried) else fresh.copy()
        mine = events["generation"] == old
        self._carried = events[~mine].copy()
        dropped_now, self._carried_dropped = self._carried_dropped + dropped[old], dropped[1 - old]
        maps = {}
        for name, (fds, buffers, key_dtype, value_dtype) in self._maps.items():
            keys, values, _count = bpf_syscall.drain_batch(fds[old], buffers)
            maps[name] = (keys.view(key_dtype).copy(), values.view(value_dtype).copy())
        counters = self._counters.read_and_zero(range(old * COUNTER_MAX, (old + 1) * COUNTER_MAX))
        return KernelDrain(old, maps, events[mine], counters, perf_lost, dropped_now)

    def close(self) -> None:
        self._pump.close()
        self._grace.close()

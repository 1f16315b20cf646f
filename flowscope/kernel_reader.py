"""Reads the kernel side every interval: flips the generation, drains the maps, collects the events.

The only module that touches live BPF objects; it hands plain numpy arrays to the aggregator.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowscope import bpf_syscall
from flowscope.kernel_records import COUNTER_MAX, EVENT
from flowscope.loader import LoadedProbes

BPF_MAP_LOOKUP_ELEM = 1


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
        self._raw: list[bytes] = []
        self._carried = np.zeros(0, dtype=EVENT)
        self.perf_lost_reported = 0
        events = self.bpf["fs_events"]
        if loaded.perf_events:
            events.open_perf_buffer(self._on_perf_event, page_cnt=loaded.options.perf_pages, lost_cb=self._on_lost)
        else:
            events.open_ring_buffer(self._on_ring_event)

    def _on_ring_event(self, _ctx, data, size) -> int:
        self._raw.append(ctypes.string_at(data, min(size, EVENT.itemsize)))
        return 0

    def _on_perf_event(self, _cpu, data, size) -> None:
        self._raw.append(ctypes.string_at(data, min(size, EVENT.itemsize)))

    def _on_lost(self, count: int) -> None:
        self.perf_lost_reported += count

    def poll(self, timeout_ms: int) -> None:
        """Waits up to timeout_ms for events and collects what arrived."""
        if self.loaded.perf_events:
            self.bpf.perf_buffer_poll(timeout=timeout_ms)
        else:
            self.bpf.ring_buffer_poll(timeout=timeout_ms)

    def _consume(self) -> None:
        if self.loaded.perf_events:
            self.bpf.perf_buffer_poll(timeout=0)
        else:
            self.bpf.ring_buffer_consume()

    def _take_events(self) -> np.ndarray:
        raw, self._raw = self._raw, []
        fresh = np.frombuffer(b"".join(r.ljust(EVENT.itemsize, b"\0") for r in raw), dtype=EVENT)
        return np.concatenate([self._carried, fresh]) if len(self._carried) else fresh.copy()

    def flip_and_drain(self) -> KernelDrain:
        old = self.generation
        self.generation = 1 - old
        bpf_syscall.map_update(self._generation_fd, struct.pack("<I", 0), struct.pack("<I", self.generation))
        self._grace.wait()  # from here on, no program writes generation `old`
        self._consume()
        events = self._take_events()
        mine = events["generation"] == old
        self._carried = events[~mine].copy()
        maps = {}
        for name, (fds, buffers, key_dtype, value_dtype) in self._maps.items():
            keys, values, _count = bpf_syscall.drain_batch(fds[old], buffers)
            maps[name] = (keys.view(key_dtype).copy(), values.view(value_dtype).copy())
        counters = self._counters.read_and_zero(range(old * COUNTER_MAX, (old + 1) * COUNTER_MAX))
        lost, self.perf_lost_reported = self.perf_lost_reported, 0
        return KernelDrain(old, maps, events[mine], counters, lost)

    def close(self) -> None:
        self._grace.close()

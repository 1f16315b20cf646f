"""Reads the BPF perf event output buffers (one per CPU) through their mmap'd pages into numpy, as
flowscope.readers.ring reads the ring: no libbcc (which maps LLVM, ~60 MB resident) and no Python call per
event.

Layout (include/uapi/linux/perf_event.h): page 0 of each buffer is struct perf_event_mmap_page, with
data_head at byte 1024 and data_tail at 1032; the data area (a power of two of pages) follows, mapped
once, so a record may wrap around its end. A record starts with struct perf_event_header (u32 type, u16
misc, u16 size). PERF_RECORD_SAMPLE with PERF_SAMPLE_RAW carries u32 size and the raw bytes, padded so
that the record is a multiple of 8; PERF_RECORD_LOST carries u64 id and u64 lost.

Every sample flowscope writes has one size (struct fs_event), so the pending part of a buffer is read as
fixed slots in one vectorised pass, as long as the records are regular; a LOST record is counted, any
other record is skipped by its size (a sample of another length is counted as malformed).

Memory ordering: the kernel writes a record, then (after a write barrier) data_head; a record below
data_head is complete. The reader loads data_head, then the records, and stores data_tail last: plain
accesses are correct on x86-64 (see flowscope.readers.ring), so `ring_reader.supported()` gates this
reader too, and other machines keep libbcc's.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from flowscope.kernel import bpf_syscall
from flowscope.readers.ring import RingError

PERF_EVENT_OPEN_X86_64 = 298
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5; the fields flowscope sets are all in the first 56 bytes
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
DATA_HEAD_OFFSET = 1024
HEADER_SIZE = 8  # struct perf_event_header
RAW_OFFSET = HEADER_SIZE + 4  # the raw bytes follow the header and their u32 size

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def sample_span(raw_length: int) -> int:
    """Bytes a PERF_SAMPLE_RAW record of `raw_length` bytes occupies: header, u32 size, data, padding to 8."""
    return HEADER_SIZE + ((raw_length + 4 + 7) & ~7)


@dataclass
class PerfRead:
    records: np.ndarray  # (n, record size) uint8, a copy, in the order written
    lost: int  # what PERF_RECORD_LOST records said
    malformed: int  # samples of another length, skipped


def walk_records(data: np.ndarray, record_size: int) -> PerfRead:
    """The samples of `record_size` raw bytes in `data`, the bytes of whole perf records in order."""
    slot = sample_span(record_size)
    chunks = []
    lost = malformed = 0
    position, end = 0, len(data)
    while position < end:
        whole = (end - position) // slot
        if whole:
            rows = data[position : position + whole * slot].reshape(whole, slot)
            headers = np.ascontiguousarray(rows[:, :8]).view("<u4")  # (type, misc | size << 16)
            regular_rows = (headers[:, 0] == PERF_RECORD_SAMPLE) & (headers[:, 1] >> 16 == slot)
            irregular = np.flatnonzero(~regular_rows)
            regular = int(irregular[0]) if len(irregular) else whole
            if regular:
                chunks.append(rows[:regular, RAW_OFFSET : RAW_OFFSET + record_size].copy())
                position += regular * slot
                if regular == whole:
                    continue
        if end - position < HEADER_SIZE:
            break
        kind, size = struct.unpack_from("<I2xH", data, position)
        if size < HEADER_SIZE or position + size > end:
            break  # not a record: the rest cannot be walked
        if kind == PERF_RECORD_LOST:
            lost += struct.unpack_from("<Q", data, position + HEADER_SIZE + 8)[0]
        elif kind == PERF_RECORD_SAMPLE:
            malformed += 1
        position += size
    records = np.concatenate(chunks) if chunks else np.zeros((0, record_size), dtype=np.uint8)
    return PerfRead(records, lost, malformed)


def pending_bytes(data: np.ndarray, tail: int, head: int) -> np.ndarray:
    """The bytes from position `tail` up to `head` of a data area mapped once: a view, or a copy where they
    wrap around its end."""
    size = len(data)
    start, length = tail % size, head - tail
    if start + length <= size:
        return data[start : start + length]
    return np.concatenate((data[start:], data[: start + length - size]))


def _perf_event_open(cpu: int, wakeup_events: int) -> int:
    attr = bytearray(PERF_ATTR_SIZE)
    struct.pack_into(
        "<IIQQQ", attr, 0, PERF_TYPE_SOFTWARE, PERF_ATTR_SIZE, PERF_COUNT_SW_BPF_OUTPUT, 1, PERF_SAMPLE_RAW
    )
    struct.pack_into("<I", attr, 48, wakeup_events)
    buffer = ctypes.create_string_buffer(bytes(attr), PERF_ATTR_SIZE)
    fd = _libc.syscall(PERF_EVENT_OPEN_X86_64, buffer, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        error = ctypes.get_errno()
        raise RingError(f"cannot open the perf buffer of CPU {cpu} ({os.strerror(error)})")
    return fd


class PerfBuffers:
    """One BPF output perf buffer per CPU, each of `pages` data pages, put into the perf event array
    `map_fd` so the probes write to them, and mapped here."""

    def __init__(self, map_fd: int, cpus: list[int], pages: int, record_size: int) -> None:
        if pages <= 0 or pages & (pages - 1):
            raise RingError(f"a perf buffer holds a power-of-two number of pages, not {pages}")
        self.record_size = record_size
        self.fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        self._positions: list[np.ndarray] = []  # (data_head, data_tail) of each buffer, as a view
        self._data: list[np.ndarray] = []
        page = mmap.PAGESIZE
        try:
            for cpu in cpus:
                fd = _perf_event_open(cpu, wakeup_events=1)
                self.fds.append(fd)
                try:
                    mapped = mmap.mmap(fd, page * (1 + pages), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                except OSError as err:
                    raise RingError(f"cannot map the perf buffer of CPU {cpu} ({err.strerror})") from None
                self._maps.append(mapped)
                self._positions.append(np.frombuffer(mapped, dtype="<u8", count=2, offset=DATA_HEAD_OFFSET))
                self._data.append(np.frombuffer(mapped, dtype=np.uint8, offset=page))
                bpf_syscall.map_update(map_fd, struct.pack("<I", cpu), struct.pack("<I", fd))
        except BaseException:
            self.close()
            raise

    def reserved(self) -> int:
        """Perf records become visible only once written: nothing is ever reserved and unread."""
        return 0

    def read_past(self, _position: int) -> bool:
        return True

    def read(self) -> PerfRead:
        """Every record written since the last read, from every CPU's buffer; frees their space."""
        records, lost, malformed = [], 0, 0
        for positions, data in zip(self._positions, self._data, strict=True):
            head, tail = int(positions[0]), int(positions[1])  # head first: every record below it is complete
            if head == tail:
                continue
            read = walk_records(pending_bytes(data, tail, head), self.record_size)
            positions[1] = head  # last: the records were copied out
            records.append(read.records)
            lost += read.lost
            malformed += read.malformed
        rows = np.concatenate(records) if records else np.zeros((0, self.record_size), dtype=np.uint8)
        return PerfRead(rows, lost, malformed)

    def close(self) -> None:
        del self._positions, self._data  # the maps refuse to close while arrays view them
        for mapped in self._maps:
            mapped.close()
        for fd in self.fds:
            os.close(fd)
        self._maps, self.fds, self._positions, self._data = [], [], [], []

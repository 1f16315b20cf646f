"""The few bpf(2) commands flowscope issues itself, through ctypes.

BCC's Python tables hand out one ctypes object per entry; draining 100k flows that way costs seconds. Here
the batch commands fill numpy buffers that the readers decode with structured dtypes in one step.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

import numpy as np

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}
ATTR_SIZE = 128

BPF_MAP_CREATE = 0
BPF_MAP_UPDATE_ELEM = 2
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
BPF_ENABLE_STATS = 32

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_RINGBUF = 27

BPF_STATS_RUN_TIME = 0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfSyscallError(OSError):
    pass


def bpf(cmd: int, attr: bytes | bytearray) -> int:
    """Issues bpf(cmd, attr); returns the result or raises BpfSyscallError with errno set."""
    return _bpf_in_place(cmd, ctypes.create_string_buffer(bytes(attr).ljust(ATTR_SIZE, b"\0"), ATTR_SIZE))


def _bpf_in_place(cmd: int, buffer: ctypes.Array) -> int:
    """bpf(cmd) on an attribute buffer of ATTR_SIZE bytes, which the commands that answer write into."""
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise BpfSyscallError(errno.ENOSYS, f"bpf syscall number unknown on {platform.machine()}")
    result = _libc.syscall(nr, cmd, buffer, ATTR_SIZE)
    if result < 0:
        err = ctypes.get_errno()
        raise BpfSyscallError(err, os.strerror(err))
    return result


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "", inner_map_fd: int = 0
) -> int:
    attr = struct.pack(
        "<IIIIIII16s", map_type, key_size, value_size, max_entries, 0, inner_map_fd, 0, name.encode()[:15]
    )
    return bpf(BPF_MAP_CREATE, attr)


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value, len(value))
    attr = struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(key_buf), ctypes.addressof(value_buf), flags)
    bpf(BPF_MAP_UPDATE_ELEM, attr)


@dataclass
class BatchBuffers:
    """Reusable buffers for draining one map: keys and values of up to `capacity` entries."""

    key_size: int
    value_size: int
    capacity: int

    def __post_init__(self) -> None:
        self.keys = np.empty(self.key_size * self.capacity, dtype=np.uint8)
        self.values = np.empty(self.value_size * self.capacity, dtype=np.uint8)
        self.token = ctypes.create_string_buffer(max(self.key_size, 8))
        self.next_token = ctypes.create_string_buffer(max(self.key_size, 8))


def drain_batch(map_fd: int, buffers: BatchBuffers, delete: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Reads (and deletes) every entry of a hash map with the batch commands.

    Returns the key bytes, the value bytes and the number of entries read. The buffers must hold the
    whole map (capacity >= max_entries), so that one bucket never overflows a call (ENOSPC).
    """
    cmd = BPF_MAP_LOOKUP_AND_DELETE_BATCH if delete else BPF_MAP_LOOKUP_BATCH
    total = 0
    first = True
    while total < buffers.capacity:
        count = ctypes.c_uint32(buffers.capacity - total)
        attr = struct.pack(
            "<QQQQIIQQ",
            0 if first else ctypes.addressof(buffers.token),
            ctypes.addressof(buffers.next_token),
            buffers.keys.ctypes.data + total * buffers.key_size,
            buffers.values.ctypes.data + total * buffers.value_size,
            count.value,
            map_fd,
            0,
            0,
        )
        attr_buf = ctypes.create_string_buffer(attr, ATTR_SIZE)
        try:
            _bpf_in_place(cmd, attr_buf)
            at_end = False
        except BpfSyscallError as err:
            if err.errno != errno.ENOENT:
                raise BpfSyscallError(err.errno, f"batch read of map fd {map_fd} failed: {err.strerror}") from None
            at_end = True  # the map's end, with the last entries read
        total += struct.unpack_from("<I", attr_buf, 32)[0]  # the kernel writes back the count it read
        if at_end:
            break
        ctypes.memmove(buffers.token, buffers.next_token, len(buffers.token))
        first = False
    return buffers.keys[: total * buffers.key_size], buffers.values[: total * buffers.value_size], total


def batch_supported() -> bool:
    """Whether the kernel has batch lookup-and-delete for hash maps (Linux 5.6+)."""
    try:
        fd = map_create(BPF_MAP_TYPE_HASH, 4, 4, 4, "fs_probe_batch")
    except BpfSyscallError:
        return False
    try:
        drain_batch(fd, BatchBuffers(4, 4, 4))
        return True
    except BpfSyscallError:
        return False
    finally:
        os.close(fd)


def ringbuf_supported() -> bool:
    try:
        fd = map_create(BPF_MAP_TYPE_RINGBUF, 0, 0, os.sysconf("SC_PAGE_SIZE"), "fs_probe_ring")
    except BpfSyscallError:
        return False
    os.close(fd)
    return True


class GracePeriod:
    """Waits until every BPF program that was running has finished.

    Updating a map-in-map makes the kernel wait for an RCU grace period before the syscall returns
    (maybe_wait_bpf_programs), and every non-sleepable BPF program runs inside an RCU read-side section;
    so after `wait()`, no program still uses a value it read before the call.
    """

    def __init__(self) -> None:
        self._inner = map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1, "fs_rcu_inner")
        self._outer = map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 1, "fs_rcu_sync", inner_map_fd=self._inner)
        self._key = struct.pack("<I", 0)
        self._value = struct.pack("<I", self._inner)

    def wait(self) -> None:
        map_update(self._outer, self._key, self._value)

    def close(self) -> None:
        for fd in (self._outer, self._inner):
            os.close(fd)


def enable_run_time_stats() -> int:
    """Turns on the kernel's per-program run_time_ns/run_cnt statistics while the returned fd is open."""
    return bpf(BPF_ENABLE_STATS, struct.pack("<I", BPF_STATS_RUN_TIME))


@dataclass(frozen=True)
class MapInfo:
    fd: int
    map_type: int
    key_size: int
    value_size: int
    max_entries: int


def map_info(map_fd: int) -> MapInfo:
    """What the kernel says the map behind `map_fd` is (struct bpf_map_info)."""
    info = ctypes.create_string_buffer(88)
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", map_fd, len(info), ctypes.addressof(info)))
    map_type, _id, key_size, value_size, max_entries = struct.unpack_from("<5I", info)
    return MapInfo(map_fd, map_type, key_size, value_size, max_entries)


def prog_run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded program (struct bpf_prog_info)."""
    info = ctypes.create_string_buffer(256)
    attr = struct.pack("<IIQ", prog_fd, len(info), ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    # struct bpf_prog_info: run_time_ns at byte 192, run_cnt at 200 (stable UAPI offsets).
    return struct.unpack_from("<QQ", info, 192)


def prog_test_run(prog_fd: int, packet: bytes, repeat: int) -> tuple[int, int]:
    """BPF_PROG_TEST_RUN: the kernel runs the program `repeat` times on `packet` (no device, nothing sent);
    returns the program's return value and the mean nanoseconds per run."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    attr = struct.pack(
        "<IIIIQQII",
        prog_fd,
        0,
        len(packet),
        len(data_out),
        ctypes.addressof(data_in),
        ctypes.addressof(data_out),
        repeat,
        0,
    )
    buffer = ctypes.create_string_buffer(attr.ljust(ATTR_SIZE, b"\0"), ATTR_SIZE)
    _bpf_in_place(BPF_PROG_TEST_RUN, buffer)
    return struct.unpack_from("<I", buffer, 4)[0], struct.unpack_from("<I", buffer, 36)[0]

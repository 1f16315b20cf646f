"""Listening TCP sockets that were open before the probes: found in /proc, seeded into the sock_state
probe's listener table, so that connections they accept are attributed to their process too.

The probe learns a listener's owner when the socket enters LISTEN (listen(2), process context); a server
started before flowscope did that unseen. Every namespace's listeners are in /proc/<pid>/net/tcp{,6} of
any process inside it, their owners in /proc/<pid>/fd. Entries the probe wrote itself are kept (the
kernel saw them happen; this scan may be older).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass

TCP_LISTEN = "0A"  # the socket state column of /proc/net/tcp: the kernel's TCP_LISTEN in hex
LISTEN_KEY = struct.Struct("<16sIHH")  # struct fs_listen_key in probes/sock_state.c
OWNER = struct.Struct("<QQQII16s")  # struct fs_owner
BPF_NOEXIST = 1
IPV4_MAPPED = bytes(10) + b"\xff\xff"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listener:
    address: bytes  # 16 bytes, IPv4 as IPv4-mapped IPv6 (as the probe keys it)
    port: int
    netns: int
    pid: int
    comm: str
    cgroup_id: int


def proc_net_address(text: str) -> bytes:
    """An address of /proc/net/tcp{,6} (32-bit words in host byte order, as hex) as 16 bytes."""
    words = [bytes.fromhex(text[i : i + 8])[::-1] for i in range(0, len(text), 8)]
    address = b"".join(words)
    return IPV4_MAPPED + address if len(address) == 4 else address


def listening_sockets(table: str) -> list[tuple[bytes, int, int]]:
    """(address, port, socket inode) of each LISTEN line of a /proc/net/tcp or tcp6 table."""
    found = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != TCP_LISTEN:
            continue
        address, port = fields[1].split(":")
        found.append((proc_net_address(address), int(port, 16), int(fields[9])))
    return found


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _socket_inodes(proc: str, pid: str) -> list[int]:
    inodes = []
    try:
        descriptors = os.listdir(f"{proc}/{pid}/fd")
    except OSError:
        return inodes
    for fd in descriptors:
        try:
            target = os.readlink(f"{proc}/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.append(int(target[8:-1]))
    return inodes


def _cgroup_id(proc: str, pid: str, cgroup_root: str | None) -> int:
    """The cgroup v2 id of a process: its cgroup directory's inode number (0 when unknown)."""
    text = _read(f"{proc}/{pid}/cgroup")
    if cgroup_root is None or text is None:
        return 0
    for line in text.splitlines():
        if line.startswith("0::"):
            try:
                return os.stat(cgroup_root + line[3:].rstrip("\n")).st_ino
            except OSError:
                return 0
    return 0


def cgroup_root() -> str | None:
    """The cgroup v2 hierarchy: where this process sees it mounted, else as pid 1 sees it (`ip netns exec`
    gives a process its own /sys, without the cgroup mounts)."""
    from flowscope.kernel.features import cgroup2_mount

    mount = cgroup2_mount()
    if mount is not None:
        return mount
    host_mount = cgroup2_mount("/proc/1/mountinfo")
    return f"/proc/1/root{host_mount}" if host_mount is not None else None


def find_listeners(proc: str = "/proc", cgroup_root: str | None = None) -> list[Listener]:
    """Every listening TCP socket of every network namespace that has a process, with its owner (the
    lowest pid holding it: the parent of pre-forked workers)."""
    owners: dict[int, str] = {}  # socket inode -> pid
    namespaces: dict[int, str] = {}  # netns inode -> a pid inside
    pids = sorted((name for name in os.listdir(proc) if name.isdigit()), key=int)
    for pid in pids:
        try:
            netns = os.stat(f"{proc}/{pid}/ns/net").st_ino
        except OSError:
            continue
        namespaces.setdefault(netns, pid)
        for inode in _socket_inodes(proc, pid):
            owners.setdefault(inode, pid)
    listeners = []
    for netns, inside in namespaces.items():
        for table in ("tcp", "tcp6"):
            for address, port, inode in listening_sockets(_read(f"{proc}/{inside}/net/{table}") or ""):
                pid = owners.get(inode)
                if pid is None:
                    continue
                comm = (_read(f"{proc}/{pid}/comm") or "").rstrip("\n")
                listeners.append(Listener(address, port, netns, int(pid), comm, _cgroup_id(proc, pid, cgroup_root)))
    return listeners


def listener_entry(listener: Listener) -> tuple[bytes, bytes]:
    """The probe's (key, value) for a listener; socket 0: any close of that address and port removes it."""
    key = LISTEN_KEY.pack(listener.address, listener.netns, listener.port, 0)
    value = OWNER.pack(0, listener.cgroup_id, 0, listener.pid, 0, listener.comm.encode()[:15])
    return key, value


def seed_listeners(maps: dict[str, int]) -> int:
    """Writes the listeners found in /proc into the loaded sock_state probe (its maps: name -> fd); returns
    how many it wrote."""
    from flowscope.kernel import bpf_syscall

    table_fd = maps["fs_listeners"]
    written = full = 0
    for listener in find_listeners(cgroup_root=cgroup_root()):
        key, value = listener_entry(listener)
        try:
            bpf_syscall.map_update(table_fd, key, value, BPF_NOEXIST)
            written += 1
        except bpf_syscall.BpfSyscallError as err:
            if err.errno == errno.E2BIG:
                full += 1
            elif err.errno != errno.EEXIST:  # EEXIST: the probe saw this listener itself
                raise
    if full:
        log.warning("%d listening sockets did not fit the listener table: their accepts carry no pid", full)
    return written

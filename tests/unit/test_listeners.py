"""Listening sockets older than the probes, found in a /proc tree and packed for the probe's table."""

import os
import struct
from pathlib import Path

from flowscope.kernel.listeners import Listener, find_listeners, listener_entry, listening_sockets, proc_net_address

MAPPED = bytes(10) + b"\xff\xff"
TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5001 1 0 100 0 0 10 0
   1: 0100007F:9C66 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 5002 1 0 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5003 1 0 100 0 0 10 0
"""
REST = "00000000:00000000 00:00000000 00000000     0        0"


def tcp6_line(slot: int, local: str, state: str, inode: int) -> str:
    return f"   {slot}: {local} {'0' * 32}:0000 {state} {REST} {inode} 1 0 100 0 0 10 0"


TCP6 = "\n".join(
    [
        "  sl  local_address remote_address st tx_queue rx_queue tr tm->when retrnsmt uid timeout inode",
        tcp6_line(0, "0000000000000000FFFF00000100007F:0050", "0A", 6001),
        tcp6_line(1, "000000FD000000000000000002000000:01BB", "0A", 6002),
        tcp6_line(2, "000000FD000000000000000002000000:9000", "01", 6003),
    ]
)


def test_addresses_of_proc_net_tables() -> None:
    assert proc_net_address("0100007F") == MAPPED + bytes([127, 0, 0, 1])
    assert proc_net_address("0000000000000000FFFF00000100007F") == MAPPED + bytes([127, 0, 0, 1])
    assert proc_net_address("000000FD000000000000000002000000") == bytes.fromhex("fd000000000000000000000000000002")


def test_only_listening_sockets_are_taken() -> None:
    assert listening_sockets(TCP) == [(MAPPED + bytes([127, 0, 0, 1]), 8080, 5001), (MAPPED + bytes(4), 22, 5003)]
    assert [port for _address, port, _inode in listening_sockets(TCP6)] == [80, 443]


def make_process(proc: Path, pid: int, netns: Path, sockets: list[int], comm: str, cgroup: str, tables: bool) -> None:
    directory = proc / str(pid)
    (directory / "fd").mkdir(parents=True)
    (directory / "ns").mkdir()
    os.link(netns, directory / "ns" / "net")  # the same inode: the same network namespace
    for fd, inode in enumerate(sockets):
        os.symlink(f"socket:[{inode}]", directory / "fd" / str(fd))
    os.symlink("/dev/null", directory / "fd" / str(len(sockets)))
    (directory / "comm").write_text(comm + "\n")
    (directory / "cgroup").write_text(f"1:cpu:/\n0::{cgroup}\n")
    if tables:
        (directory / "net").mkdir()
        (directory / "net" / "tcp").write_text(TCP)
        (directory / "net" / "tcp6").write_text(TCP6)


def test_listeners_of_every_namespace_with_their_lowest_owning_process(tmp_path: Path) -> None:
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (cgroups / "web").mkdir(parents=True)
    namespaces = tmp_path / "netns"
    namespaces.mkdir()
    pod = namespaces / "pod"
    pod.write_text("")
    make_process(proc, 300, pod, [5001, 6002], "nginx", "/web", tables=True)
    make_process(proc, 301, pod, [5001], "nginx-worker", "/web", tables=False)  # a pre-forked worker
    make_process(proc, 42, pod, [5002], "curl", "/", tables=True)  # not a listener
    (proc / "self").mkdir()
    found = sorted(find_listeners(str(proc), str(cgroups)), key=lambda listener: listener.port)
    netns = pod.stat().st_ino
    web = (cgroups / "web").stat().st_ino
    assert found == [
        Listener(bytes.fromhex("fd000000000000000000000000000002"), 443, netns, 300, "nginx", web),
        Listener(MAPPED + bytes([127, 0, 0, 1]), 8080, netns, 300, "nginx", web),
    ]
    # Sockets nobody holds (port 22 here, 80) have no owner to seed.


def test_the_probes_table_layout() -> None:
    key, value = listener_entry(Listener(MAPPED + bytes([10, 0, 0, 1]), 8080, 4026531840, 300, "nginx", 77))
    assert key == MAPPED + bytes([10, 0, 0, 1]) + struct.pack("<IHH", 4026531840, 8080, 0)
    assert value == struct.pack("<QQQII", 0, 77, 0, 300, 0) + b"nginx".ljust(16, b"\0")

"""The record of the clsact qdiscs flowscope created (flowscope.kernel.tc): trusted only in the network
namespace that wrote it, and deleted once that namespace is gone. The kernel hands a dead namespace's inode
to the next one, so a record trusted by inode alone would make flowscope delete a qdisc someone else made."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flowscope.kernel import tc

BOOT = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
INODE = os.stat("/proc/self/ns/net").st_ino


def write_record(state_dir: Path, inode: int, record: object) -> Path:
    path = state_dir / f"tc-qdiscs-{inode}.json"
    path.write_text(json.dumps(record))
    return path


def test_netns_identity_is_this_namespaces() -> None:
    netns = tc.NetnsIdentity.current()
    assert netns.inode == INODE and netns.boot == BOOT
    assert isinstance(netns.cookie, int) and netns.cookie > 0  # SO_NETNS_COOKIE exists since Linux 5.14


def test_a_saved_record_is_read_back_in_the_same_namespace(tmp_path: Path) -> None:
    tc._save_created(tmp_path, {"eth0": 2, "eth1": 3})
    record = json.loads((tmp_path / f"tc-qdiscs-{INODE}.json").read_text())
    assert record == {"netns_cookie": tc.NetnsIdentity.current().cookie, "boot": BOOT, "qdiscs": {"eth0": 2, "eth1": 3}}
    assert tc._load_created(tmp_path) == {"eth0": 2, "eth1": 3}
    assert [entry.name for entry in tmp_path.iterdir()] == [f"tc-qdiscs-{INODE}.json"]  # no partial file left
    tc._save_created(tmp_path, {})
    assert list(tmp_path.iterdir()) == []


def test_a_record_inherited_with_the_inode_is_ignored(tmp_path: Path) -> None:
    cookie = tc.NetnsIdentity.current().cookie
    assert cookie is not None
    write_record(tmp_path, INODE, {"netns_cookie": cookie + 1, "boot": BOOT, "qdiscs": {"eth0": 2}})
    assert tc._load_created(tmp_path) == {}


def test_a_record_of_an_earlier_boot_or_format_is_ignored(tmp_path: Path) -> None:
    cookie = tc.NetnsIdentity.current().cookie
    write_record(tmp_path, INODE, {"netns_cookie": cookie, "boot": "another-boot", "qdiscs": {"eth0": 2}})
    assert tc._load_created(tmp_path) == {}
    write_record(tmp_path, INODE, {"eth0": 2})  # the format before the record named its namespace
    assert tc._load_created(tmp_path) == {}
    (tmp_path / f"tc-qdiscs-{INODE}.json").write_text("{not json")
    assert tc._load_created(tmp_path) == {}


def test_prune_deletes_the_records_of_namespaces_that_are_gone(tmp_path: Path) -> None:
    current = {"netns_cookie": 7, "boot": BOOT, "qdiscs": {"eth0": 2}}
    live = write_record(tmp_path, 4026531840, current)
    gone = write_record(tmp_path, 4026532999, current)
    earlier_boot = write_record(tmp_path, 4026531841, {**current, "boot": "another-boot"})
    old_format = write_record(tmp_path, 4026531842, {"eth0": 2})
    unrelated = tmp_path / "agent.sock.json"
    unrelated.write_text("{}")

    pruned = tc.prune_state(tmp_path, live={4026531840, 4026531841, 4026531842})

    assert sorted(pruned) == [4026531841, 4026531842, 4026532999]
    assert live.exists() and unrelated.exists()
    assert not gone.exists() and not earlier_boot.exists() and not old_format.exists()


def test_prune_of_a_missing_state_dir_deletes_nothing(tmp_path: Path) -> None:
    assert tc.prune_state(tmp_path / "absent", live=set()) == []


def test_live_namespaces_are_every_threads_and_every_bind_mounts(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    threads = []
    for pid, tid in ((10, 10), (10, 11), (20, 20)):
        ns = proc / str(pid) / "task" / str(tid) / "ns"
        ns.mkdir(parents=True)
        (ns / "net").write_text("")
        threads.append(os.stat(ns / "net").st_ino)
    (proc / "30/task/30").mkdir(parents=True)  # a thread that exited while /proc was read: no ns left
    (proc / "self").mkdir()
    (proc / "self/mountinfo").write_text(
        "25 1 0:22 / / rw - ext4 /dev/vda1 rw\n"
        "48 45 0:4 net:[4026532174] /run/netns/lab-a rw shared:2 - nsfs nsfs rw\n"
        "49 45 0:4 mnt:[4026532200] /run/mnt-ns rw shared:3 - nsfs nsfs rw\n"
    )
    assert tc.live_netns_inodes(proc) == {*threads, 4026532174}

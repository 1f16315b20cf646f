"""tc clsact attachment of the flow programs, and the removal of what flowscope left behind.

flowscope's filters carry a name (TCA_BPF_NAME) "flowscope:<hook>:<owner>", where the owner is the
attaching process as (pid namespace, pid, start time): after a SIGKILL they are recognisable, and the next
start removes those whose owner is gone, while the filters of a flowscope that still runs (an agent, and a
`capture` started next to it) stay. A clsact qdisc is created only where none exists and recorded in a
state file; flowscope removes such a qdisc only when it holds no filter of anyone else. Filters and
qdiscs that someone else created are never touched.

The state file of a network namespace is named by its inode, which the kernel hands to a new namespace once
the old one is gone, so the record also holds the namespace's cookie (unique until reboot) and the boot id:
a record that a namespace inherited with its inode is ignored, and records of namespaces that no longer
exist are deleted at start. Both err the safe way: a record wrongly dropped leaves an empty clsact behind,
never removes one that someone else made.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

FILTER_PREFIX = "flowscope:"
INGRESS_PARENT = 0xFFFFFFF2
EGRESS_PARENT = 0xFFFFFFF3
CLSACT_PARENT = 0xFFFFFFF1
PREFERRED_PRIORITY = 1  # run before other filters so flowscope sees packets others may drop
STATE_DIR = Path("/run/flowscope")
SO_NETNS_COOKIE = 71  # asm-generic socket option (Linux 5.14); the socket module does not name it
STATE_FILE = re.compile(r"tc-qdiscs-(\d+)\.json")


class TcError(RuntimeError):
    pass


@dataclass(frozen=True)
class NetnsIdentity:
    """This process's network namespace: its inode names the state file; cookie and boot tell it apart from
    an earlier namespace that had the same inode."""

    inode: int
    cookie: int | None  # None on kernels without SO_NETNS_COOKIE: the inode alone is trusted there
    boot: str

    @classmethod
    def current(cls) -> NetnsIdentity:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                cookie = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
            except OSError:
                cookie = None
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return cls(os.stat("/proc/self/ns/net").st_ino, cookie, boot)


def _state_file(state_dir: Path, netns: NetnsIdentity) -> Path:
    return state_dir / f"tc-qdiscs-{netns.inode}.json"


def _load_created(state_dir: Path) -> dict[str, int]:
    """The qdiscs (interface name: index) that flowscope created in this network namespace."""
    netns = NetnsIdentity.current()
    path = _state_file(state_dir, netns)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring the unreadable tc state %s: %s", path, err)
        return {}
    if not isinstance(record, dict) or record.get("netns_cookie") != netns.cookie or record.get("boot") != netns.boot:
        log.info("ignoring %s: written in an earlier network namespace that had this one's inode", path)
        return {}
    qdiscs = record.get("qdiscs")
    if not isinstance(qdiscs, dict):
        return {}
    return {name: index for name, index in qdiscs.items() if isinstance(name, str) and isinstance(index, int)}


def _save_created(state_dir: Path, created: dict[str, int]) -> None:
    netns = NetnsIdentity.current()
    path = _state_file(state_dir, netns)
    if not created:
        path.unlink(missing_ok=True)
        return
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = {"netns_cookie": netns.cookie, "boot": netns.boot, "qdiscs": created}
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)  # a flowscope next to this one reads the old record or the new, never half


def live_netns_inodes(proc: Path = Path("/proc")) -> set[int]:
    """The network namespaces this process can see: those of every thread, and those bind-mounted (ip netns)
    in its mount namespace. One that only an open descriptor or another mount namespace keeps alive is not
    among them."""
    inodes = set()
    for task in proc.glob("[0-9]*/task/[0-9]*"):
        try:
            inodes.add(os.stat(task / "ns/net").st_ino)
        except OSError:
            continue  # exited, or not ours to look at
    try:
        mounts = (proc / "self/mountinfo").read_text()
    except OSError:
        mounts = ""
    inodes.update(int(inode) for inode in re.findall(r" net:\[(\d+)\] ", mounts))
    return inodes


def prune_state(state_dir: Path, live: set[int]) -> list[int]:
    """Deletes the state files of network namespaces not in `live` (and of earlier boots); returns their
    inodes."""
    boot = NetnsIdentity.current().boot
    pruned = []
    try:
        entries = list(os.scandir(state_dir))
    except OSError:
        return []
    for entry in entries:
        match = STATE_FILE.fullmatch(entry.name)
        if match is None:
            continue
        inode = int(match[1])
        try:
            record = json.loads(Path(entry.path).read_text())
        except (OSError, ValueError):
            record = None
        earlier_boot = not isinstance(record, dict) or record.get("boot") != boot
        if inode not in live or earlier_boot:
            Path(entry.path).unlink(missing_ok=True)
            pruned.append(inode)
    return pruned


@dataclass(frozen=True)
class Owner:
    """A process, recognisable across pid reuse and from an ancestor pid namespace."""

    pidns: int  # inode of its pid namespace
    pid: int  # its pid in that namespace
    start: int  # start time, in clock ticks after boot

    def __str__(self) -> str:
        return f"{self.pidns}:{self.pid}:{self.start}"

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        try:
            pidns, pid, start = (int(part) for part in text.split(":"))
        except ValueError:
            return None
        return cls(pidns, pid, start)

    @classmethod
    def of(cls, pid: int | str = "self") -> Owner | None:
        """The process `pid` as /proc shows it here; None when it does not exist (any more)."""
        try:
            pidns = os.stat(f"/proc/{pid}/ns/pid").st_ino
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        start = int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces
        nspid = next(line.split()[-1] for line in status.splitlines() if line.startswith("NSpid:"))
        return cls(pidns, int(nspid), start)

    @classmethod
    def current(cls) -> Owner:
        owner = cls.of("self")
        assert owner is not None  # /proc/self always exists
        return owner

    def alive(self) -> bool:
        """Whether this process still runs. One in a pid namespace that this process cannot see (not nested
        in its own) counts as gone: such a flowscope would have to share the network namespace too."""
        if self.pidns == os.stat("/proc/self/ns/pid").st_ino:
            return Owner.of(self.pid) == self
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry.name}/ns/pid").st_ino != self.pidns:
                    continue
            except OSError:
                continue
            if Owner.of(entry.name) == self:
                return True
        return False


def filter_name(hook: str, owner: Owner) -> str:
    return f"{FILTER_PREFIX}{hook}:{owner}"


def stale(name: str) -> bool:
    """Whether a filter of this name is flowscope's and its owner is gone (or unknown: an older format)."""
    if not name.startswith(FILTER_PREFIX):
        return False
    owner = Owner.parse(name[len(FILTER_PREFIX) :].partition(":")[2])
    return owner is None or not owner.alive()


def _bpf_name(message) -> str:
    options = message.get_attr("TCA_OPTIONS")
    if not options:
        return ""
    for name, value in options.get("attrs", []):
        if name == "TCA_BPF_NAME":
            return value
    return ""


@dataclass
class FilterInfo:
    ifindex: int
    parent: int
    priority: int
    handle: int
    name: str


def _filters(ipr: IPRoute, ifindex: int, parent: int) -> list:
    """The filter messages on one hook of an interface; none when it has no clsact (or is gone)."""
    try:
        return list(ipr.get_filters(ifindex, parent=parent))
    except NetlinkError:
        return []


def list_bpf_filters(ipr: IPRoute, ifindex: int) -> list[FilterInfo]:
    return [
        FilterInfo(ifindex, parent, message["info"] >> 16, message["handle"], _bpf_name(message))
        for parent in (INGRESS_PARENT, EGRESS_PARENT)
        for message in _filters(ipr, ifindex, parent)
        if message.get_attr("TCA_KIND") == "bpf" and message["handle"]
    ]


def _has_clsact(ipr: IPRoute, ifindex: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" and q["parent"] == CLSACT_PARENT for q in ipr.get_qdiscs(ifindex))


def _all_filters(ipr: IPRoute, ifindex: int) -> int:
    return sum(1 for parent in (INGRESS_PARENT, EGRESS_PARENT) for m in _filters(ipr, ifindex, parent) if m["handle"])


def _delete_filter(ipr: IPRoute, info: FilterInfo) -> None:
    try:
        ipr.tc("del-filter", "bpf", info.ifindex, info.handle, parent=info.parent, prio=info.priority)
    except NetlinkError as err:
        log.warning("could not remove tc filter %s on ifindex %d: %s", info.name, info.ifindex, err)


def _remove_created_qdisc(ipr: IPRoute, ifindex: int) -> bool:
    """Removes a clsact that flowscope created, unless someone else's filters now live on it."""
    try:
        if not _has_clsact(ipr, ifindex):
            return True
        if _all_filters(ipr, ifindex):
            return False
        ipr.tc("del", "clsact", ifindex)
        return True
    except NetlinkError:
        return True  # the interface is gone


def remove_stale(state_dir: Path = STATE_DIR) -> int:
    """Removes flowscope filters whose process is gone (and the clsact qdiscs flowscope created that are
    left empty); returns the number of filters removed. Only this network namespace is visited; the state
    of namespaces that no longer exist is deleted."""
    pruned = prune_state(state_dir, live_netns_inodes())
    if pruned:
        log.info("deleted the tc state of %d network namespaces that no longer exist", len(pruned))
    removed = 0
    with IPRoute() as ipr:
        for link in ipr.get_links():
            for info in list_bpf_filters(ipr, link["index"]):
                if stale(info.name):
                    _delete_filter(ipr, info)
                    removed += 1
        created = _load_created(state_dir)
        kept = {name: index for name, index in created.items() if not _remove_created_qdisc(ipr, index)}
        _save_created(state_dir, kept)
    return removed


@dataclass
class TcAttachments:
    """The filters this process attached; `detach()` removes them (and qdiscs it created)."""

    state_dir: Path = STATE_DIR
    filters: list[FilterInfo] = field(default_factory=list)
    created_qdiscs: dict[str, int] = field(default_factory=dict)
    owner: Owner = field(default_factory=Owner.current)

    def attach(self, ifname: str, ingress_fd: int, egress_fd: int) -> None:
        with IPRoute() as ipr:
            indexes = ipr.link_lookup(ifname=ifname)
            if not indexes:
                raise TcError(f"interface {ifname} does not exist in this network namespace.")
            ifindex = indexes[0]
            if not _has_clsact(ipr, ifindex):
                try:
                    ipr.tc("add", "clsact", ifindex)
                except NetlinkError as err:
                    raise TcError(f"cannot add a clsact qdisc to {ifname}: {os.strerror(err.code)}.") from None
                self.created_qdiscs[ifname] = ifindex
                _save_created(self.state_dir, {**_load_created(self.state_dir), ifname: ifindex})
            for parent, fd, hook in ((INGRESS_PARENT, ingress_fd, "ingress"), (EGRESS_PARENT, egress_fd, "egress")):
                priority = self._free_priority(ipr, ifindex, parent)
                name = filter_name(hook, self.owner)
                try:
                    ipr.tc(
                        "add-filter", "bpf", ifindex, 1, fd=fd, name=name, parent=parent,
                        classid=1, direct_action=True, prio=priority,
                    )  # fmt: skip
                except NetlinkError as err:
                    raise TcError(
                        f"cannot attach the {hook} flow program to {ifname}: {os.strerror(err.code)}."
                    ) from None
                self.filters.append(FilterInfo(ifindex, parent, priority, 1, name))

    @staticmethod
    def _free_priority(ipr: IPRoute, ifindex: int, parent: int) -> int:
        taken = {m["info"] >> 16 for m in _filters(ipr, ifindex, parent)}
        priority = PREFERRED_PRIORITY
        while priority in taken:
            priority += 1
        return priority

    def detach(self) -> None:
        with IPRoute() as ipr:
            for info in self.filters:
                _delete_filter(ipr, info)
            self.filters.clear()
            kept = {n: i for n, i in self.created_qdiscs.items() if not _remove_created_qdisc(ipr, i)}
            remaining = {n: i for n, i in _load_created(self.state_dir).items() if n not in self.created_qdiscs}
            _save_created(self.state_dir, {**remaining, **kept})
            self.created_qdiscs = kept


def default_interfaces() -> list[str]:
    """Every interface that is up, except loopback."""
    with IPRoute() as ipr:
        names = []
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name != "lo" and link["flags"] & 1:  # IFF_UP
                names.append(name)
    return names


def interface_names() -> dict[int, str]:
    with IPRoute() as ipr:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def missing_interfaces(names: Iterable[str]) -> list[str]:
    existing = set(interface_names().values())
    return [name for name in names if name not in existing]

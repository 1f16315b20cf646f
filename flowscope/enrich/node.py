"""What the node itself says about its pods: cgroup id -> pod UID and container id, network namespace and
host-side veth -> pod, and the processes of each cgroup.

Kubelet names pod cgroups the same way whatever the runtime (cgroup v2 mount):
  systemd driver:  kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/
                   cri-containerd-<id>.scope | crio-<id>.scope | docker-<id>.scope
  cgroupfs driver: kubepods/burstable/pod<uid>/<id>
(guaranteed pods sit directly under kubepods; static pods use a 32-hex UID, their config hash). A cgroup's
id is its directory's inode number, the value bpf_get_current_cgroup_id() and bpf_skb_cgroup_id() return.

A background thread rescans every few seconds, and soon after the enricher reports a miss; the enricher
only reads the last complete scan. Entries that disappear stay for the grace period (late flows).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowscope.enrich import netlink
from flowscope.kernel.features import cgroup2_mount, mount_pseudo_fs

log = logging.getLogger(__name__)

_POD_UID = re.compile(
    r"(?:^|-)pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32})(?:\.slice)?$"
)
_CONTAINER = re.compile(r"^(?:(?:cri-containerd|crio|docker|containerd|cri-o)-)?([0-9a-f]{64})(?:\.scope)?$")
_CONMON = re.compile(r"^crio-conmon-[0-9a-f]{64}\.scope$")  # CRI-O's monitor process: the pod's, no container
# Where the hierarchy is mounted when this process cannot see it (`ip netns exec` mounts a fresh /sys).
PRIVATE_CGROUP2 = Path("/run/flowscope/cgroup2")


@dataclass(frozen=True)
class CgroupEntry:
    path: str  # relative to the cgroup v2 mount, "" for the root
    pod_uid: str | None = None
    container_id: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    pid: int | None  # when the cgroup has exactly one process
    comm: str | None  # when all its processes share one command name


@dataclass
class NodeView:
    """One complete scan (plus what earlier scans saw within the grace period)."""

    cgroups: dict[int, CgroupEntry] = field(default_factory=dict)
    processes: dict[int, ProcessInfo] = field(default_factory=dict)  # by cgroup id
    netns_pods: dict[int, str] = field(default_factory=dict)  # netns inode -> pod uid
    host_netns: frozenset[int] = frozenset()
    ifindex_pods: dict[int, str] = field(default_factory=dict)  # host-side interface -> pod uid
    scanned_at: float = 0.0


def classify(path_components: list[str]) -> CgroupEntry:
    """The pod UID and container id a cgroup path names (kubelet's systemd and cgroupfs layouts)."""
    pod_uid = container = None
    under_kubepods = False
    for component in path_components:
        if not under_kubepods:
            under_kubepods = "kubepods" in component
            if not under_kubepods:
                continue
        if pod_uid is None:
            match = _POD_UID.search(component)
            if match:
                pod_uid = match.group(1).replace("_", "-")
            continue
        if container is None and not _CONMON.match(component):
            match = _CONTAINER.match(component)
            if match:
                container = match.group(1)
    return CgroupEntry("/".join(path_components), pod_uid, container)


def _read_pids(directory: str) -> list[int]:
    try:
        with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as handle:
            return [int(line) for line in handle if line.strip()]
    except (OSError, ValueError):
        return []


def _comm(proc: str, pid: int) -> str | None:
    try:
        with open(f"{proc}/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            return handle.read().rstrip("\n")
    except OSError:
        return None


def _netns(proc: str, pid: int) -> int | None:
    try:
        return os.stat(f"{proc}/{pid}/ns/net").st_ino
    except OSError:
        return None


class NodeScanner:
    def __init__(
        self,
        cgroup_root: str | None = None,
        interval: float = 5.0,
        grace: float = 60.0,
        min_rescan: float = 1.0,
        proc: str = "/proc",
    ) -> None:
        self.cgroup_root = cgroup_root  # None: found (or mounted) by start()
        self.mounted = False
        self.mount_error: str | None = None
        self.interval = interval
        self.grace = grace
        self.min_rescan = min_rescan
        self.proc = proc
        self.view = NodeView()
        self.scans = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_scan_ms: float | None = None
        self._vanished: dict[str, dict[int, tuple[Any, float]]] = {"cgroups": {}, "netns": {}, "ifindex": {}}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the scan ---------------------------------------------------------------------------------------

    def scan(self) -> NodeView:
        """Walks the cgroup tree and the pods' namespaces once; installs and returns the new view."""
        started = time.monotonic()
        now = time.time()
        cgroups: dict[int, CgroupEntry] = {}
        processes: dict[int, ProcessInfo] = {}
        pod_pids: dict[str, list[int]] = {}
        if self.cgroup_root is not None:
            try:
                root_id = os.stat(self.cgroup_root).st_ino
            except OSError as err:
                self._error(f"cgroup root {self.cgroup_root}: {err.strerror}")
            else:
                self._walk(self.cgroup_root, [], root_id, cgroups, processes, pod_pids)
        host_netns = frozenset(
            inode for inode in (_netns(self.proc, 1), _netns(self.proc, os.getpid())) if inode is not None
        )
        netns_pods, pid_in_netns = self._pod_namespaces(pod_pids, host_netns)
        ifindex_pods = self._pod_interfaces(netns_pods, pid_in_netns) if netns_pods else {}
        view = NodeView(
            cgroups=self._keep_vanished("cgroups", cgroups, self.view.cgroups, now),
            processes=processes,
            netns_pods=self._keep_vanished("netns", netns_pods, self.view.netns_pods, now),
            host_netns=host_netns,
            ifindex_pods=self._keep_vanished("ifindex", ifindex_pods, self.view.ifindex_pods, now),
            scanned_at=now,
        )
        self.view = view
        self.scans += 1
        self.last_scan_ms = (time.monotonic() - started) * 1000
        return view

    def _walk(
        self,
        directory: str,
        components: list[str],
        cgroup_id: int,
        cgroups: dict[int, CgroupEntry],
        processes: dict[int, ProcessInfo],
        pod_pids: dict[str, list[int]],
    ) -> None:
        entry = classify(components)
        cgroups[cgroup_id] = entry
        pids = _read_pids(directory)
        if pids:
            comms = {_comm(self.proc, pid) for pid in pids}
            processes[cgroup_id] = ProcessInfo(
                pids[0] if len(pids) == 1 else None, comms.pop() if len(comms) == 1 else None
            )
            if entry.pod_uid is not None:
                pod_pids.setdefault(entry.pod_uid, []).extend(pids)
        try:
            children = [child for child in os.scandir(directory) if child.is_dir(follow_symlinks=False)]
        except OSError:
            return  # removed while we walked
        for child in children:
            self._walk(child.path, [*components, child.name], child.inode(), cgroups, processes, pod_pids)

    def _pod_namespaces(
        self, pod_pids: dict[str, list[int]], host_netns: frozenset[int]
    ) -> tuple[dict[int, str], dict[int, int]]:
        """netns inode -> pod uid for pods with their own namespace, and one process in each such namespace."""
        owners: dict[int, set[str]] = {}
        some_pid: dict[int, int] = {}
        for uid, pids in pod_pids.items():
            for pid in pids:
                inode = _netns(self.proc, pid)
                if inode is None or inode in host_netns:
                    continue  # a hostNetwork pod: its namespace is the node's
                owners.setdefault(inode, set()).add(uid)
                some_pid.setdefault(inode, pid)
        netns_pods = {inode: uids.pop() for inode, uids in owners.items() if len(uids) == 1}
        return netns_pods, {inode: pid for inode, pid in some_pid.items() if inode in netns_pods}

    def _pod_interfaces(self, netns_pods: dict[int, str], pid_in_netns: dict[int, int]) -> dict[int, str]:
        """Host-side ifindex -> pod uid, for veths whose peer lives in a pod's namespace."""
        try:
            by_nsid: dict[int, list[int]] = {}
            # The dump comes first: listing a veth gives its peer's namespace an nsid here if it had none.
            for link in netlink.links():
                if link.peer_nsid is not None:
                    by_nsid.setdefault(link.peer_nsid, []).append(link.index)
            found = {}
            for inode, pid in pid_in_netns.items():
                try:
                    nsid = netlink.nsid_of_process(pid)
                except OSError:
                    continue  # the process exited between the walk and now
                for index in by_nsid.get(nsid, []) if nsid is not None else []:
                    found[index] = netns_pods[inode]
            return found
        except OSError as err:
            self._error(f"netlink: {err.strerror or err}")
            return {}

    def _keep_vanished(
        self, name: str, current: dict[int, Any], previous: dict[int, Any], now: float
    ) -> dict[int, Any]:
        vanished = self._vanished[name]
        for key, value in previous.items():
            if key not in current and key not in vanished:
                vanished[key] = (value, now)
        for key in [k for k, (_, at) in vanished.items() if k in current or at + self.grace < now]:
            del vanished[key]
        merged = {key: value for key, (value, _) in vanished.items()}
        merged.update(current)
        return merged

    def _error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        log.debug("node identity: %s", message)

    # ---- background thread --------------------------------------------------------------------------------

    def start(self) -> None:
        if self.cgroup_root is None:
            self.cgroup_root = cgroup2_mount()
        if self.cgroup_root is None:
            self.mount_error = mount_pseudo_fs("cgroup2", PRIVATE_CGROUP2)
            if self.mount_error is None:
                self.cgroup_root, self.mounted = str(PRIVATE_CGROUP2), True
        self.scan()
        self._thread = threading.Thread(target=self._run, name="flowscope-node-identity", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            woken = self._wake.wait(max(self.interval - (time.monotonic() - last), 0))
            if self._stop.is_set():
                return
            if woken:
                self._wake.clear()
                self._stop.wait(max(self.min_rescan - (time.monotonic() - last), 0))
            try:
                self.scan()
            except Exception as err:  # a scan must never take the thread down; the next one may work
                self._error(f"scan failed: {err}")
            last = time.monotonic()

    def request_rescan(self) -> None:
        """Something was not found: scan again soon (at most once per min_rescan seconds)."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.mounted:
            subprocess.run(["umount", "-l", str(PRIVATE_CGROUP2)], capture_output=True, check=False)
            self.mounted = False

    def health(self) -> dict[str, Any]:
        view = self.view
        pods = {entry.pod_uid for entry in view.cgroups.values() if entry.pod_uid}
        if self.cgroup_root is None:
            why = f" and mounting it failed: {self.mount_error}" if self.mount_error else ""
            state, note = "unavailable", f"no cgroup v2 mount{why}: attribution by cgroup and netns is off"
        elif self.mounted:
            state, note = "ok", f"cgroup v2 was not mounted here: flowscope mounted it at {PRIVATE_CGROUP2}"
        elif not pods:
            state, note = "ok", "no kubelet pod cgroups on the cgroup v2 mount"
        else:
            state, note = "ok", None
        return {
            "state": state,
            "note": note,
            "cgroup_root": self.cgroup_root,
            "cgroups": len(view.cgroups),
            "pods": len(pods),
            "containers": len({e.container_id for e in view.cgroups.values() if e.container_id}),
            "pod_netns": len(view.netns_pods),
            "pod_interfaces": len(view.ifindex_pods),
            "scans": self.scans,
            "last_scan_ms": None if self.last_scan_ms is None else round(self.last_scan_ms, 1),
            "errors": self.errors,
            "last_error": self.last_error,
        }

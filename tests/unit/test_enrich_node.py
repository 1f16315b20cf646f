"""Kubelet's cgroup layouts -> pod UID and container id, and the node scanner over a cgroup-like tree."""

import os

import pytest

from flowscope.enrich.node import CgroupEntry, NodeScanner, classify
from flowscope.kernel.features import cgroup2_mount

UID = "1a2b3c4d-0000-4111-8222-333344445555"
SYSTEMD_UID = UID.replace("-", "_")
CID = "ab" * 32


@pytest.mark.parametrize(
    ("path", "pod_uid", "container"),
    [
        # systemd driver, containerd / CRI-O / docker, each QoS class
        (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope",
         UID, CID),
        (f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice/crio-{CID}.scope",
         UID, CID),
        (f"kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/docker-{CID}.scope", UID, CID),  # guaranteed
        (f"kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice", UID, None),  # the pod's own cgroup
        (f"kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/crio-conmon-{CID}.scope", UID, None),  # CRI-O's monitor
        # cgroupfs driver
        (f"kubepods/burstable/pod{UID}/{CID}", UID, CID),
        (f"kubepods/pod{UID}/{CID}", UID, CID),
        # a static pod's UID is its config hash; kind nests kubelet under its own slice
        (f"kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
         f"kubelet-kubepods-besteffort-pod{'c' * 32}.slice/cri-containerd-{CID}.scope", "c" * 32, CID),
        # a process inside a container's own sub-cgroup still belongs to the container
        (f"kubepods/burstable/pod{UID}/{CID}/init", UID, CID),
        # not a pod
        ("system.slice/containerd.service", None, None),
        (f"system.slice/docker-{CID}.scope", None, None),
        (f"flowscope-test/pod{UID}", None, None),
        ("", None, None),
    ],
)  # fmt: skip
def test_kubelet_cgroup_paths_name_the_pod_and_container(path, pod_uid, container):
    components = path.split("/") if path else []
    assert classify(components) == CgroupEntry(path, pod_uid, container)


def test_the_cgroup2_mount_is_found_in_mountinfo(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "25 30 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - tmpfs tmpfs rw,mode=755\n"
        "26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    assert cgroup2_mount(str(mountinfo)) == "/sys/fs/cgroup/unified"
    mountinfo.write_text("25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    assert cgroup2_mount(str(mountinfo)) is None


def make_cgroup(root, relative, pids=()):
    path = root / relative
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in pids))
    return path


def test_the_scanner_maps_cgroup_ids_to_pods_and_processes_and_keeps_vanished_ones_for_the_grace(tmp_path):
    pod_dir = f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice"
    container = make_cgroup(tmp_path, f"{pod_dir}/cri-containerd-{CID}.scope", pids=[os.getpid()])
    sandbox = make_cgroup(tmp_path, f"{pod_dir}/cri-containerd-{'cd' * 32}.scope", pids=[os.getpid(), 1])
    host = make_cgroup(tmp_path, "system.slice/sshd.service")
    scanner = NodeScanner(cgroup_root=str(tmp_path), grace=60)
    view = scanner.scan()
    assert view.cgroups[container.stat().st_ino] == CgroupEntry(f"{pod_dir}/cri-containerd-{CID}.scope", UID, CID)
    assert view.cgroups[host.stat().st_ino].pod_uid is None
    assert view.cgroups[tmp_path.stat().st_ino] == CgroupEntry("")
    with open(f"/proc/{os.getpid()}/comm") as handle:
        comm = handle.read().strip()
    assert view.processes[container.stat().st_ino].pid == os.getpid()
    assert view.processes[container.stat().st_ino].comm == comm
    assert view.processes[sandbox.stat().st_ino].pid is None  # two processes: no single pid to name
    health = scanner.health()
    assert (health["state"], health["pods"], health["containers"], health["scans"]) == ("ok", 1, 2, 1)
    inode = container.stat().st_ino
    (container / "cgroup.procs").unlink()
    container.rmdir()
    assert scanner.scan().cgroups[inode].container_id == CID  # gone, but within the grace
    scanner.grace = 0
    scanner.scan()
    assert inode not in scanner.scan().cgroups


def test_without_cgroup_v2_the_scanner_says_so():
    scanner = NodeScanner(cgroup_root=None)
    scanner.scan()
    health = scanner.health()
    assert health["state"] == "unavailable" and "no cgroup v2 mount" in health["note"]

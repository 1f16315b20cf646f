"""The agent's OCI image (scripts/build-image) and a real container runtime to run it: runc from Debian, given
an OCI runtime config as the DaemonSet of deploy/helm sets it up (the host's pid namespace, a network namespace
of the node's, only the capabilities named, and the volume mounts the rendered DaemonSet declares: bpffs,
tracefs, cgroups, /lib/modules and /usr/src of the host, the data, cache and run directories, the /tmp emptyDir).

podman is not used: this machine's root lacks CAP_SYS_RESOURCE, and podman always asks its runtime to set
RLIMIT_NOFILE and RLIMIT_NPROC, which then fails with EPERM ("setrlimit `RLIMIT_NPROC`: Operation not
permitted"). crun is not used either: it refuses this host's hybrid cgroup layout, whose cgroup2 hierarchy
has a controller (hugetlb) enabled ("cgroups in hybrid mode not supported, drop all controllers from
cgroupv2"). runc with a config of our own sets no limits and runs on hybrid hosts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = ROOT / "build" / "image"
# What the image is built from: when one of them is newer than the image, it is built again.
INPUTS = ("flowscope", "exporters", "ui", "probes", "proto", "deploy/image", "scripts/build-image", "pyproject.toml",
          "requirements.lock")  # fmt: skip
# The smallest set the agent loads its probes and logs flows with (kernels 5.8+ with tracefs and bpffs mounted;
# deploy/image/README.md says what the chart adds and why).
SMALLEST = ["BPF", "PERFMON", "NET_ADMIN"]
PATH = "/opt/flowscope/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _newest_input() -> float:
    newest = 0.0
    for name in INPUTS:
        path = ROOT / name
        files = [path] if path.is_file() else [p for p in path.rglob("*") if "__pycache__" not in p.parts]
        files = [p for p in files if p.is_file()]
        newest = max([newest, *(p.stat().st_mtime for p in files)])
    return newest


def built_image() -> Path:
    """The image's OCI layout, built (2.5 min here with Debian's packages cached) unless it is current."""
    index = IMAGE_DIR / "oci" / "index.json"
    if not index.exists() or index.stat().st_mtime < _newest_input():
        subprocess.run([str(ROOT / "scripts" / "build-image"), str(IMAGE_DIR)], check=True, timeout=1800)
    return IMAGE_DIR / "oci"


def rootfs() -> Path:
    return IMAGE_DIR / "rootfs"


def bind(source: str | Path, destination: str, *options: str) -> dict:
    return {"type": "bind", "source": str(source), "destination": destination, "options": ["rbind", *options]}


def chart_daemonset(build_dir: Path) -> dict:
    """The agent's DaemonSet as deploy/helm renders it with its defaults (tests/helm/render.go)."""
    from tests.helm.chart import find, manifests, render_text, renderer

    return find(manifests(render_text(renderer(build_dir))), "DaemonSet", "-agent")


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return int(quantity.removesuffix(unit)) * factor
    return int(quantity)


def chart_mounts(daemonset: dict, node_dirs: dict[str, Path], scratch: Path) -> list[dict]:
    """The agent container's volume mounts as the DaemonSet declares them, as runc mounts: a hostPath binds the
    node's path (or, for the paths in `node_dirs`, the test's directory standing in for it), an emptyDir is a
    tmpfs of its sizeLimit (medium Memory) or a fresh directory under `scratch` (the node's disk); readOnly
    mounts are read-only. ConfigMap and Secret volumes are left out: the tests give the agent its settings as
    flags and run it without the relay's TLS. A chart without a writable /tmp fails these tests (the root
    filesystem is read-only, and the probes' compile writes there)."""
    pod = daemonset["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "agent")
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = []
    for mount in container["volumeMounts"]:
        volume, destination = volumes[mount["name"]], mount["mountPath"]
        read_only = ["ro"] if mount.get("readOnly") else []
        if "configMap" in volume or "secret" in volume:
            continue
        assert "subPath" not in mount, mount
        if "hostPath" in volume:
            host = volume["hostPath"]["path"]
            mounts.append(bind(node_dirs.get(host, Path(host)), destination, *read_only))
        elif "emptyDir" in volume and volume["emptyDir"].get("medium") == "Memory":
            size = _bytes(volume["emptyDir"]["sizeLimit"])
            options = ["nosuid", "nodev", f"size={size}", *read_only]
            mounts.append({"type": "tmpfs", "source": "tmpfs", "destination": destination, "options": options})
        elif "emptyDir" in volume:
            directory = scratch / f"emptydir-{mount['name']}"
            directory.mkdir(parents=True, exist_ok=True)
            mounts.append(bind(directory, destination, *read_only))
        else:
            raise AssertionError(f"no stand-in for the volume {volume}")
    return mounts


def runtime_config(
    args: list[str], capabilities: list[str], netns: str, mounts: list[dict], env: dict[str, str]
) -> dict:
    """An OCI runtime config for the image's root filesystem, as a hostPID, hostNetwork pod on a node: what a
    container runtime gives every container (/proc, /dev, the network namespace's /sys, read-only as for an
    unprivileged container), then `mounts` (chart_mounts: the DaemonSet's)."""
    caps = [f"CAP_{name}" for name in capabilities]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [f"PATH={PATH}", *(f"{k}={v}" for k, v in env.items())],
            "cwd": "/",
            "capabilities": {key: caps for key in ("bounding", "effective", "permitted", "inheritable", "ambient")},
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs()), "readonly": True},
        "hostname": "flowscope-image-test",
        "mounts": [
            {"type": "proc", "source": "proc", "destination": "/proc"},
            {"type": "tmpfs", "source": "tmpfs", "destination": "/dev", "options": ["nosuid", "mode=755"]},
            bind("/dev/null", "/dev/null"),
            bind("/dev/zero", "/dev/zero"),
            bind("/dev/urandom", "/dev/urandom"),
            {"type": "sysfs", "source": "sysfs", "destination": "/sys", "options": ["nosuid", "noexec", "nodev", "ro"]},
            *mounts,
        ],
        "linux": {
            # the host's pid namespace (hostPID); the node's network namespace (hostNetwork) is the lab's
            "namespaces": [{"type": "mount"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network", "path": netns}],
        },
    }


def run_container(
    name: str, bundle: Path, config: dict, *, timeout: float | None = None, **popen: object
) -> subprocess.Popen | subprocess.CompletedProcess[str]:
    """Writes the bundle's config and runs crun; Popen when no timeout is given (the caller stops it)."""
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(config))
    argv = ["runc", "run", "--no-pivot", "--bundle", str(bundle), name]
    if timeout is None:
        return subprocess.Popen(argv, text=True, **popen)  # type: ignore[call-overload]
    return subprocess.run(argv, text=True, capture_output=True, timeout=timeout, env={**os.environ})

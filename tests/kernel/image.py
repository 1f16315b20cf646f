"""The agent's OCI image (scripts/build-image) and a real container runtime to run it: runc from Debian, given
an OCI runtime config as the DaemonSet of deploy/helm sets it up (the host's pid namespace, a network namespace
of the node's, only the capabilities named, and the volume mounts the rendered DaemonSet declares: bpffs,
tracefs, cgroups, /lib/modules and /usr/src of the host, the data, cache and run directories, the /tmp emptyDir).
What runs is the image as a runtime gets it from the OCI layout: the root filesystem `umoci unpack` makes of the
layout's layer, and the process its image config says (Entrypoint, then the pod's args or the image's Cmd; Env;
WorkingDir; User unless the pod's securityContext sets one), not build/image/rootfs.

podman is not used: this machine's root lacks CAP_SYS_RESOURCE, and podman always asks its runtime to set
RLIMIT_NOFILE and RLIMIT_NPROC, which then fails with EPERM ("setrlimit `RLIMIT_NPROC`: Operation not
permitted"). crun is not used either: it refuses this host's hybrid cgroup layout, whose cgroup2 hierarchy
has a controller (hugetlb) enabled ("cgroups in hybrid mode not supported, drop all controllers from
cgroupv2"). runc with a config of our own sets no limits and runs on hybrid hosts."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
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


REF = "latest"  # the tag scripts/build-image gives


def _blob(layout: Path, digest: str) -> dict:
    algorithm, hexdigest = digest.split(":")
    return json.loads((layout / "blobs" / algorithm / hexdigest).read_text())


def manifest_digest(layout: Path, ref: str = REF) -> str:
    index = json.loads((layout / "index.json").read_text())
    tagged = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref]
    assert len(tagged) == 1, f"{len(tagged)} manifests tagged {ref} in {layout}"
    return tagged[0]["digest"]


def image_config(layout: Path, ref: str = REF) -> dict:
    """The image config's `config` (Entrypoint, Cmd, Env, WorkingDir, User, Labels) of the layout's tag."""
    return _blob(layout, _blob(layout, manifest_digest(layout, ref))["config"]["digest"])["config"]


def unpacked(layout: Path, ref: str = REF) -> Path:
    """`umoci unpack` of the layout's tag (its rootfs/ and the runtime config umoci derives from the image
    config), made once per image: IMAGE_DIR/bundle holds umoci's sha256_DIGEST.mtree of the manifest it was
    unpacked from, and a bundle of another manifest (the image rebuilt) is unpacked anew."""
    digest = manifest_digest(layout, ref)
    bundle = IMAGE_DIR / "bundle"
    if not (bundle / f"{digest.replace(':', '_')}.mtree").exists():
        partial = IMAGE_DIR / "bundle.partial"
        for old in (bundle, partial):
            shutil.rmtree(old, ignore_errors=True)
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:{ref}", str(partial)], check=True,
                       capture_output=True, timeout=1200)  # fmt: skip
        partial.rename(bundle)
    return bundle


@dataclass(frozen=True)
class Image:
    """The built image as a container runtime gets it from the OCI layout."""

    layout: Path
    config: dict  # image_config
    bundle: Path  # unpacked

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    def argv(self, args: list[str] | None = None) -> list[str]:
        """What a container of the image runs: its Entrypoint, then a pod's `args`, or the image's Cmd."""
        return [*self.config.get("Entrypoint", []), *(self.config.get("Cmd", []) if args is None else args)]

    def user(self) -> tuple[int, int]:
        """The image's User as uid and gid (numeric; none: root)."""
        uid, _, gid = (self.config.get("User") or "0").partition(":")
        return int(uid), int(gid or 0)


def load_image() -> Image:
    layout = built_image()
    return Image(layout, image_config(layout), unpacked(layout))


def bind(source: str | Path, destination: str, *options: str) -> dict:
    return {"type": "bind", "source": str(source), "destination": destination, "options": ["rbind", *options]}


def chart_objects(build_dir: Path, values: dict | None = None) -> list[dict]:
    """deploy/helm's objects as tests/helm/render.go renders them, with its defaults or `values`."""
    from tests.helm.chart import manifests, render_text, renderer

    files = []
    if values is not None:
        files = [build_dir / "values.yaml"]
        files[0].write_text(json.dumps(values))  # JSON is YAML
    return manifests(render_text(renderer(build_dir), *files))


def chart_daemonset(build_dir: Path) -> dict:
    """The agent's DaemonSet as deploy/helm renders it with its defaults (tests/helm/render.go)."""
    from tests.helm.chart import find

    return find(chart_objects(build_dir), "DaemonSet", "-agent")


def _volume_files(objects: list[dict], volume: dict) -> dict[str, bytes]:
    """The files a configMap or secret volume holds (its items, or every key), from the rendered objects."""
    kind, name = ("ConfigMap", volume["configMap"]["name"]) if "configMap" in volume else (
        "Secret", volume["secret"]["secretName"])  # fmt: skip
    source = volume.get("configMap") or volume["secret"]
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    data = {k: v.encode() for k, v in found.get("data", {}).items()} if kind == "ConfigMap" else {
        k: base64.b64decode(v) for k, v in found["data"].items()}  # fmt: skip
    items = source.get("items") or [{"key": key, "path": key} for key in data]
    return {item["path"]: data[item["key"]] for item in items}


def pod_mounts(objects: list[dict], pod: dict, container: dict, scratch: Path, dirs: dict[str, Path]) -> list[dict]:
    """A pod's configMap, secret and emptyDir volume mounts as the kubelet makes them, as runc mounts: a
    configMap or secret is a directory of its files (the rendered object's data; defaultMode, group fsGroup),
    a subPath mount binds the one file; an emptyDir is `dirs[name]` or a fresh directory under `scratch`
    (group fsGroup, setgid, group-writable)."""
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = []
    for mount in container["volumeMounts"]:
        volume, destination = volumes[mount["name"]], mount["mountPath"]
        read_only = ["ro"] if mount.get("readOnly") else []
        directory = dirs.get(mount["name"], scratch / f"volume-{mount['name']}")
        directory.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume or "secret" in volume:
            mode = (volume.get("configMap") or volume["secret"]).get("defaultMode", 0o644)
            for path, content in _volume_files(objects, volume).items():
                (directory / path).write_bytes(content)
                os.chown(directory / path, 0, fs_group if fs_group is not None else 0)
                os.chmod(directory / path, mode)
        elif "emptyDir" in volume and not volume["emptyDir"].get("medium"):
            os.chown(directory, 0, fs_group if fs_group is not None else 0)
            os.chmod(directory, 0o2775 if fs_group is not None else 0o777)
        else:
            raise AssertionError(f"no stand-in for the volume {volume}")
        source = directory / mount["subPath"] if "subPath" in mount else directory
        mounts.append(bind(source, destination, *read_only))
    return mounts


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
    image: Image,
    args: list[str] | None,
    capabilities: list[str],
    netns: str,
    mounts: list[dict],
    env: dict[str, str],
    *,
    user: tuple[int, int] | None = None,
    groups: list[int] = (),  # type: ignore[assignment]
    host_pid: bool = True,
) -> dict:
    """An OCI runtime config for the image's unpacked root filesystem, as a pod on a node runs it: the image's
    process (Image.argv of the pod's `args`, the image's Env then the pod's `env`, its WorkingDir, its User
    unless the pod sets `user`, with `groups` as the supplementary ones, e.g. fsGroup), the host's pid namespace
    (hostPID) or one of its own, the node's network namespace (hostNetwork; the lab's), what a container runtime
    gives every container (/proc, /dev, the network namespace's /sys, read-only as for an unprivileged
    container), then `mounts` (chart_mounts: the DaemonSet's)."""
    caps = [f"CAP_{name}" for name in capabilities]
    uid, gid = image.user() if user is None else user
    namespaces = [{"type": "mount"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network", "path": netns}]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, **({"additionalGids": list(groups)} if groups else {})},
            "args": image.argv(args),
            "env": [*image.config.get("Env", []), *(f"{k}={v}" for k, v in env.items())],
            "cwd": image.config.get("WorkingDir") or "/",
            "capabilities": {key: caps for key in ("bounding", "effective", "permitted", "inheritable", "ambient")},
            "noNewPrivileges": True,
        },
        "root": {"path": str(image.rootfs), "readonly": True},
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
        "linux": {"namespaces": namespaces if host_pid else [{"type": "pid"}, *namespaces]},
    }


def run_container(
    name: str, bundle: Path, config: dict, *, timeout: float | None = None, **popen: object
) -> subprocess.Popen | subprocess.CompletedProcess[str]:
    """Writes the bundle's config and runs runc; Popen when no timeout is given (the caller stops it)."""
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(config))
    argv = ["runc", "run", "--no-pivot", "--bundle", str(bundle), name]
    if timeout is None:
        return subprocess.Popen(argv, text=True, **popen)  # type: ignore[call-overload]
    return subprocess.run(argv, text=True, capture_output=True, timeout=timeout, env={**os.environ})

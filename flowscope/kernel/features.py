"""What the running kernel can do, probed at start (never assumed from its version)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from flowscope.kernel import bpf_syscall
from flowscope.kernel.btf import VMLINUX_BTF, Btf, BtfError

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
BPFFS = Path("/sys/fs/bpf")
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe/type")
KALLSYMS = Path("/proc/kallsyms")


def _mounted(path: Path, fstype: str) -> bool:
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            return any(line.split()[1:3] == [str(path), fstype] for line in mounts)
    except OSError:
        return False


def mount_pseudo_fs(fstype: str, path: Path) -> str | None:
    """Mounts a pseudo file system; returns None on success, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return err.strerror
    result = subprocess.run(["mount", "-t", fstype, fstype, str(path)], capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stderr.strip() or f"mount exited {result.returncode}")


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified in hybrid mode)."""
    try:
        with open(mountinfo, encoding="utf-8") as handle:
            for line in handle:
                before, _, after = line.partition(" - ")
                if after.split(" ", 1)[0] == "cgroup2":
                    return before.split(" ")[4]
    except OSError:
        return None
    return None


def ensure_tracefs() -> tuple[Path | None, str]:
    """The tracefs directory, mounting it when absent; (None, why) when impossible."""
    for path in TRACEFS_CANDIDATES:
        if (path / "events").is_dir():
            return path, ""
    error = mount_pseudo_fs("tracefs", TRACEFS_CANDIDATES[0])
    if error is None and (TRACEFS_CANDIDATES[0] / "events").is_dir():
        return TRACEFS_CANDIDATES[0], "mounted by flowscope"
    return None, f"tracefs is not mounted and mounting it failed: {error}"


def ensure_bpffs() -> tuple[bool, str]:
    if _mounted(BPFFS, "bpf"):
        return True, ""
    error = mount_pseudo_fs("bpf", BPFFS)
    return (True, "mounted by flowscope") if error is None else (False, f"mounting bpffs failed: {error}")


@dataclass
class KernelFeatures:
    release: str
    tracefs: Path | None
    tracefs_note: str
    bpffs: bool
    bpffs_note: str
    btf_path: Path | None
    btf_error: str
    kprobes: bool
    kprobes_reason: str
    ringbuf: bool
    batch_ops: bool
    program_types: dict[str, bool] = field(default_factory=dict)  # from bpftool, when installed

    @cached_property
    def btf(self) -> Btf | None:
        if self.btf_path is None:
            return None
        try:
            return Btf.load(self.btf_path)
        except BtfError as err:
            # Said where BTF is reported (doctor, the probes' reasons), not taken for a readable BTF.
            self.btf_error = f"the kernel's BTF at {self.btf_path} is unreadable: {str(err).rstrip('.')}"
            return None

    @cached_property
    def _kernel_symbols(self) -> frozenset[bytes]:
        """Every symbol name of /proc/kallsyms ("<address> <type> <name>[\t[module]]"), read once."""
        try:
            text = KALLSYMS.read_bytes()
        except OSError:
            return frozenset()
        return frozenset(line.split(b" ", 2)[2].split(b"\t", 1)[0] for line in text.splitlines())

    def kernel_symbol(self, name: str) -> bool:
        """Whether the kernel (or a loaded module) has a symbol of this name: a function a kprobe can name."""
        return name.encode() in self._kernel_symbols

    def tracepoint(self, category: str, name: str) -> bool:
        return self.tracefs is not None and (self.tracefs / "events" / category / name / "format").exists()

    def raw_tracepoint(self, name: str) -> bool:
        """Raw tracepoints need BTF to know the argument layout (btf_trace_<name>)."""
        btf = self.btf
        return btf is not None and btf.has(f"btf_trace_{name}", (8,))

    def to_dict(self) -> dict[str, object]:
        return {
            "release": self.release,
            "btf": str(self.btf_path) if self.btf is not None else None,
            "btf_error": self.btf_error or None,
            "tracefs": str(self.tracefs) if self.tracefs else None,
            "tracefs_note": self.tracefs_note or None,
            "bpffs": self.bpffs,
            "bpffs_note": self.bpffs_note or None,
            "kprobes": self.kprobes,
            "kprobes_reason": self.kprobes_reason or None,
            "ringbuf": self.ringbuf,
            "batch_map_ops": self.batch_ops,
            "program_types": self.program_types,
        }


def _kprobes() -> tuple[bool, str]:
    if KPROBE_PMU.exists():
        return True, ""
    config = _kernel_config()
    if config.get("CONFIG_KPROBES") in (None, "n") and config:
        return False, "the kernel is built without kprobes (CONFIG_KPROBES is not set)"
    return False, "the kernel exposes no kprobe PMU (/sys/bus/event_source/devices/kprobe)"


def _kernel_config() -> dict[str, str]:
    import gzip

    candidates = [Path("/proc/config.gz"), Path(f"/boot/config-{platform.release()}")]
    for path in candidates:
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except OSError:
            continue
        config = {}
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                key, value = line.split("=", 1)
                config[key] = value
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                config[line[2:].split()[0]] = "n"
        return config
    return {}


def _program_types() -> dict[str, bool]:
    """Program types the kernel accepts, per bpftool's own probe (absent when bpftool is not installed)."""
    bpftool = shutil.which("bpftool")
    if not bpftool:
        return {}
    try:
        result = subprocess.run(
            [bpftool, "-j", "feature", "probe", "kernel"], capture_output=True, text=True, timeout=30
        )
        data = json.loads(result.stdout or "{}")
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return {}
    types = data.get("program_types", {})
    return {name.removeprefix("have_").removesuffix("_prog_type"): bool(v) for name, v in types.items()}


def probe_features(with_program_types: bool = False) -> KernelFeatures:
    tracefs, tracefs_note = ensure_tracefs()
    bpffs, bpffs_note = ensure_bpffs()
    btf_path = VMLINUX_BTF if VMLINUX_BTF.exists() else None
    kprobes, kprobes_reason = _kprobes()
    privileged = os.geteuid() == 0
    return KernelFeatures(
        release=platform.release(),
        tracefs=tracefs,
        tracefs_note=tracefs_note,
        bpffs=bpffs,
        bpffs_note=bpffs_note,
        btf_path=btf_path,
        btf_error="" if btf_path else "the kernel has no BTF at /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF)",
        kprobes=kprobes,
        kprobes_reason=kprobes_reason,
        ringbuf=privileged and bpf_syscall.ringbuf_supported(),
        batch_ops=privileged and bpf_syscall.batch_supported(),
        program_types=_program_types() if with_program_types else {},
    )

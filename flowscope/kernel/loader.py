"""Compiles and loads the probe families the running kernel supports, with BCC.

BCC only treats functions of the main source text as programs (and only rewrites map-method syntax
there), so the module's text is the shared header followed by each enabled family's file, read from
probes/ as they are; every option reaches the C code as a -D flag.

`compile_and_load` runs BCC in the process that calls it; `load` runs it in a short-lived process of its
own (flowscope.kernel.compile_child) and keeps only the file descriptors, so that the agent never holds LLVM.
BCC only compiles: flowscope.kernel.bpf_object loads and attaches the programs, and keeps what BCC compiled in a
cache keyed by the kernel and the sources, so that a restart on the same kernel skips the compile.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flowscope.kernel import bpf_object, bpf_syscall
from flowscope.kernel.btf import BtfError
from flowscope.kernel.catalog import CATALOG, FamilyStatus, ProbeFamily, ProbeStatus, Requirement
from flowscope.kernel.features import KernelFeatures
from flowscope.kernel.offsets import clock_flags

log = logging.getLogger(__name__)


class LoaderError(RuntimeError):
    """The probes cannot be loaded; the message says what to do."""


@dataclass
class LoadOptions:
    interfaces: list[str] | None = None  # None: every interface that is up, except lo
    flow_map_size: int = 65536
    drop_map_size: int = 16384
    tcp_map_size: int = 16384
    perf_events: bool = False  # force the perf-buffer path even where the ring buffer exists
    # Event ring size in pages (power of two). 4096 pages (16 MiB, 131,072 events, allocated once when the
    # probes load) ride out ~0.3 s without a read at 400k events/s (the reader thread waits for the GIL while
    # the agent builds a large batch); 256 pages (1 MiB) lost events from 200k/s on with the mmap reader, from
    # 100k/s with BCC's (docs/benchmarks.md, section 4).
    ring_pages: int = 4096
    ring_reader: Literal["mmap", "bcc"] = "mmap"  # the ring's pages read directly (x86-64 only), or BCC's callback
    perf_pages: int = 64  # per-CPU perf buffer pages (power of two)
    drop_events_per_second: int = 1000  # drop events sent to user space per CPU; the rest only counted
    tcp_events_per_second: int = 1000  # retransmit/reset events sent per CPU; the rest only counted
    rtt_sample_ms: int = 100  # RTT sampled at most this often per socket
    socket_map_size: int = 65536  # connections whose owner (pid, comm, cgroup) and start time are kept
    families: set[str] | None = None  # restrict to these families (None: all that can run)
    prefer_kprobes: bool = False  # run each family's kprobe variant where it can run, instead of the tracepoints
    object_cache: str | None = str(bpf_object.CACHE_DIR)  # where compiled probes are kept (None: always compile)
    host_root: str = ""  # where the node's lib/modules and usr/src are mounted, looked at first for headers


def probes_dir() -> Path:
    return Path(str(importlib.resources.files("flowscope.probes")))


def _requirement_unmet(requirement: Requirement, features: KernelFeatures) -> tuple[str, str] | None:
    """(reason, remedy) when the kernel lacks what the requirement names, else None."""
    kind, target = requirement.kind, requirement.target
    if kind == "tracepoint":
        category, _, name = target.partition(":")
        if features.tracefs is None:
            return features.tracefs_note, "mount tracefs at /sys/kernel/tracing"
        if not features.tracepoint(category, name):
            return f"the kernel has no tracepoint {target}", "a newer kernel has it; a kprobe variant may stand in"
    elif kind == "raw_tracepoint":
        if features.btf is None:
            return features.btf_error or "BTF unreadable", "a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        if not features.raw_tracepoint(target):
            return f"the kernel has no raw tracepoint {target}", "a newer kernel has it"
    elif kind == "kprobe":
        if not features.kprobes:
            return features.kprobes_reason, "a kernel built with CONFIG_KPROBES=y (most distribution kernels)"
        if not any(features.kernel_symbol(name) for name in target.split("|")):
            return f"the kernel has no function {' or '.join(target.split('|'))} to probe", "a kernel that has it"
    elif kind == "btf" and features.btf is None:
        return features.btf_error or "BTF unreadable", "a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    return None


def _cflags_unmet(family: ProbeFamily, features: KernelFeatures, options: LoadOptions) -> tuple[str, str] | None:
    """(reason, remedy) when the family's -D flags cannot be made for this kernel (a BTF member it needs)."""
    if family.cflags is None:
        return None
    try:
        family.cflags(features.btf, options)
    except BtfError as err:
        return str(err), "a kernel whose BTF describes it (report the kernel version to flowscope)"
    return None


def plan_families(
    features: KernelFeatures, options: LoadOptions, catalog: list[ProbeFamily] = CATALOG
) -> list[FamilyStatus]:
    """Which families run on this kernel, and why the others do not."""
    statuses: dict[str, FamilyStatus] = {}
    for family in catalog:
        if options.families is not None and family.name not in options.families and family.replaces is None:
            statuses[family.name] = FamilyStatus(family, False, "not selected", "")
            continue
        unmet = next((u for u in (_requirement_unmet(r, features) for r in family.requires) if u is not None), None)
        if unmet is None:
            unmet = _cflags_unmet(family, features, options)
        statuses[family.name] = (
            FamilyStatus(family, True) if unmet is None else FamilyStatus(family, False, unmet[0], unmet[1])
        )
    for status in statuses.values():
        replaced = statuses.get(status.family.replaces or "")
        if replaced is None:
            continue
        if options.prefer_kprobes and status.active:
            replaced.active = False
            replaced.reason = f"--prefer-kprobes: {status.family.name} runs instead"
            replaced.remedy = ""
        elif replaced.active:
            # Say both: whether the fallback could run here, and that it is not needed.
            runs = f"{replaced.family.name} runs on this kernel"
            status.reason = f"{status.reason}; not needed: {runs}" if not status.active else f"not needed: {runs}"
            status.active = False
            status.remedy = ""
        elif options.families is not None and replaced.family.name not in options.families:
            status.active = False
            status.reason = "not selected"
    return list(statuses.values())


def probe_statuses(statuses: list[FamilyStatus]) -> list[ProbeStatus]:
    return [ProbeStatus(s.family.name, s.active, s.family.hook, s.reason, s.remedy) for s in statuses]


def cflags_for(active: list[ProbeFamily], features: KernelFeatures, options: LoadOptions) -> list[str]:
    flags = [
        f"-I{probes_dir() / 'include'}",
        f"-DFLOWSCOPE_RING_PAGES={options.ring_pages}",
        f"-DFLOWSCOPE_DROP_EVENTS_PER_SECOND={options.drop_events_per_second}",
    ]
    if options.perf_events or not features.ringbuf:
        flags.append("-DFLOWSCOPE_PERF_EVENTS")
    flags += clock_flags(features.btf)
    for family in active:
        for drained in family.drained_maps:
            flags.append(f"-D{drained.size_define}={getattr(options, drained.size_option)}")
        if family.cflags is not None:
            flags.extend(family.cflags(features.btf, options))
    return list(dict.fromkeys(flags))  # each once: the families share offsets from one BTF (same values)


def module_text(active: list[ProbeFamily]) -> str:
    directory = probes_dir()
    parts = [(directory / "include" / "flowscope.h").read_text()]
    files = dict.fromkeys(name for family in active for name in (*family.shared, family.source))
    parts += [(directory / name).read_text() for name in files]
    return "\n".join(parts)


@dataclass
class LoadedProbes:
    """The loaded probes as file descriptors handed over by the compile step (flowscope.kernel.compile_child):
    maps, programs, and the attachments that keep the tracepoint and kprobe programs attached. Everything
    stays loaded while these are open; `close()` (or the end of the process) detaches and unloads it."""

    statuses: list[FamilyStatus]
    perf_events: bool
    options: LoadOptions
    maps: dict[str, bpf_syscall.MapInfo] = field(default_factory=dict)  # every map of the module, by name
    programs: dict[str, int] = field(default_factory=dict)  # every loaded program: name -> fd
    attachments: dict[str, int] = field(default_factory=dict)  # "raw_tracepoint:kfree_skb" -> fd
    tc_programs: dict[str, int] = field(default_factory=dict)  # "ingress"/"egress" -> program fd (in programs)
    compile_seconds: float = 0.0  # how long the compile step took, process start to handover
    verifier: list[dict[str, object]] = field(default_factory=list)  # bpf_object.ProgramReport of each program
    object_cache: str = "off"  # what the compiled-object cache did: hit, miss, rebuilt: <why>, off
    compiler_warnings: int = 0  # diagnostics the compile printed (to the debug log, never to the user)

    @property
    def active(self) -> list[ProbeFamily]:
        return [s.family for s in self.statuses if s.active]

    def is_active(self, name: str) -> bool:
        return any(f.name == name for f in self.active)

    def close(self) -> None:
        """Detaches first (the attachments), then lets go of the programs and maps."""
        fds = [*self.attachments.values(), *self.programs.values(), *(m.fd for m in self.maps.values())]
        self.attachments, self.programs, self.maps, self.tc_programs = {}, {}, {}, {}
        for fd in fds:
            os.close(fd)


# include/uapi/linux/capability.h
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39


def effective_capabilities() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def require_privileges() -> None:
    """Loading and attaching needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN before 5.8) and CAP_NET_ADMIN:
    checked up front, since a root user without them (a container, a user namespace) is not enough."""
    caps = effective_capabilities()
    has = {cap: bool(caps >> cap & 1) for cap in (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF)}
    admin = has[CAP_SYS_ADMIN]
    missing = [
        name
        for name, present in (("CAP_BPF", has[CAP_BPF] or admin), ("CAP_NET_ADMIN", has[CAP_NET_ADMIN]),
                              ("CAP_PERFMON", has[CAP_PERFMON] or admin))
        if not present
    ]  # fmt: skip
    if missing:
        raise LoaderError(
            "flowscope needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) to load probes and lacks "
            f"{', '.join(missing)}; run it with sudo, or add the capability to its container or unit."
        )


BCC_MISSING = (
    "the BCC Python module is missing; install python3-bpfcc (make setup does) and run flowscope "
    "from the .venv that make setup creates."
)


def import_bcc():
    try:
        import bcc
    except ImportError:
        raise LoaderError(BCC_MISSING) from None
    return bcc

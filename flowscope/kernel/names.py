"""Names of kernel things from the running kernel: drop reasons, TCP states and reset reasons.

Their numbers differ between kernel versions (reasons are added, and were once prepended), so they are
read from the kernel itself: its BTF enums first (skb_drop_reason, the anonymous enum of TCP_ESTABLISHED,
sk_rst_reason), else the __print_symbolic tables of the tracepoint format files. A name is the kernel's
constant without its enum's prefix: NO_SOCKET for SKB_DROP_REASON_NO_SOCKET, ESTABLISHED for
TCP_ESTABLISHED, NOT_SPECIFIED for SK_RST_REASON_NOT_SPECIFIED.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowscope.kernel.btf import KIND_ENUM, KIND_ENUM64, VMLINUX_BTF, Btf, BtfError
from flowscope.kernel.features import TRACEFS_CANDIDATES

ENUM_KINDS = (KIND_ENUM, KIND_ENUM64)
UNKNOWN = 0xFFFFFFFF  # FS_UNKNOWN in probes/include/fs_kernel.h: the kernel gave no reason or state

DROP_REASON_PREFIXES = ("SKB_DROP_REASON_", "SKB_")
DROP_SUBSYSTEM_PREFIX = "SKB_DROP_REASON_SUBSYS_"
TCP_STATE_PREFIX = "TCP_"
RESET_REASON_PREFIX = "SK_RST_REASON_"


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _is_bound(name: str) -> bool:
    """Enum members that bound or mask the others rather than name a value."""
    return name.endswith(("_MAX", "_MAX_STATES", "_NUM", "_MASK"))


@dataclass(frozen=True)
class DropSubsystems:
    """Drop reasons of subsystems (mac80211, openvswitch) carry the subsystem in their high bits."""

    mask: int = 0
    names: Mapping[int, str] = field(default_factory=dict)

    @property
    def shift(self) -> int:
        return (self.mask & -self.mask).bit_length() - 1 if self.mask else 0

    def name(self, value: int) -> str | None:
        if not self.mask or not value & self.mask:
            return None
        subsystem = self.names.get((value & self.mask) >> self.shift)
        return f"{subsystem}:{value & ~self.mask & 0xFFFFFFFF}" if subsystem else None


@dataclass(frozen=True)
class KernelNames:
    drop_reasons: Mapping[int, str] = field(default_factory=dict)
    tcp_states: Mapping[int, str] = field(default_factory=dict)
    reset_reasons: Mapping[int, str] = field(default_factory=dict)
    drop_subsystems: DropSubsystems = field(default_factory=DropSubsystems)
    source: str = ""  # where the names came from, for doctor

    @classmethod
    def from_btf(cls, btf: Btf) -> KernelNames:
        drop_reasons: dict[int, str] = {}
        subsystems = DropSubsystems()
        if btf.has("skb_drop_reason", ENUM_KINDS):
            raw = btf.enum("skb_drop_reason")
            drop_reasons = _table(raw, DROP_REASON_PREFIXES)
            mask = raw.get("SKB_DROP_REASON_SUBSYS_MASK", 0)
            if mask and btf.has("skb_drop_reason_subsys", ENUM_KINDS):
                names = _table(btf.enum("skb_drop_reason_subsys"), (DROP_SUBSYSTEM_PREFIX,))
                subsystems = DropSubsystems(mask, names)
        try:
            tcp_states = _table(btf.enum("TCP_ESTABLISHED"), (TCP_STATE_PREFIX,))
        except BtfError:
            tcp_states = {}
        reset_reasons = {}
        if btf.has("sk_rst_reason", ENUM_KINDS):
            reset_reasons = _table(btf.enum("sk_rst_reason"), (RESET_REASON_PREFIX,))
        return cls(drop_reasons, tcp_states, reset_reasons, subsystems, "BTF")

    @classmethod
    def from_tracefs(cls, tracefs: Path) -> KernelNames:
        def symbols(event: str, field_name: str, prefixes: tuple[str, ...]) -> dict[int, str]:
            try:
                text = (tracefs / "events" / event / "format").read_text()
            except OSError:
                return {}
            return {value: _strip(name, prefixes) for value, name in print_symbolic(text, field_name).items()}

        return cls(
            symbols("skb/kfree_skb", "reason", DROP_REASON_PREFIXES),
            symbols("sock/inet_sock_set_state", "newstate", (TCP_STATE_PREFIX,)),
            symbols("tcp/tcp_send_reset", "reason", (RESET_REASON_PREFIX,)),
            source=f"tracepoint formats under {tracefs}",
        )

    def or_else(self, other: KernelNames) -> KernelNames:
        """These names, with each table this one lacks taken from `other`."""
        return KernelNames(
            self.drop_reasons or other.drop_reasons,
            self.tcp_states or other.tcp_states,
            self.reset_reasons or other.reset_reasons,
            self.drop_subsystems if self.drop_subsystems.mask else other.drop_subsystems,
            " + ".join(s for s in (self.source, other.source) if s),
        )

    @classmethod
    def load(cls, btf_path: Path = VMLINUX_BTF, tracefs_dirs: tuple[Path, ...] = TRACEFS_CANDIDATES) -> KernelNames:
        """The running kernel's names: BTF, completed from the tracepoint formats where BTF lacks a table."""
        try:
            names = cls.from_btf(Btf.load(btf_path))
        except BtfError:
            names = cls()
        if names.drop_reasons and names.tcp_states and names.reset_reasons:
            return names
        for tracefs in tracefs_dirs:
            if (tracefs / "events").is_dir():
                return names.or_else(cls.from_tracefs(tracefs))
        return names

    def drop_reason_names(self, values: np.ndarray) -> np.ndarray:
        return name_values(values, self.drop_reasons, self.drop_subsystems.name)

    def tcp_state_names(self, values: np.ndarray) -> np.ndarray:
        return name_values(values, self.tcp_states, unknown=(0,))  # 0 is no TCP state: none given

    def reset_reason_names(self, values: np.ndarray) -> np.ndarray:
        return name_values(values, self.reset_reasons)


def _table(values: dict[str, int], prefixes: tuple[str, ...]) -> dict[int, str]:
    table: dict[int, str] = {}
    for name, value in values.items():
        if not _is_bound(name):
            table.setdefault(value, _strip(name, prefixes))  # aliases: the first name is the kernel's own
    return table


_SYMBOLIC_PAIR = re.compile(r'\{\s*(-?(?:0x[0-9a-fA-F]+|\d+))\s*,\s*"([^"]*)"\s*\}')


def print_symbolic(format_text: str, field_name: str) -> dict[int, str]:
    """The value -> name table of `__print_symbolic(REC->field_name, {1, "A"}, ...)` in a format file.

    Pairs whose value is not a number (a constant the kernel did not export with TRACE_DEFINE_ENUM) are
    skipped: their numbers are unknown here.
    """
    start = format_text.find(f"__print_symbolic(REC->{field_name},")
    if start < 0:
        return {}
    depth, end = 0, start
    for end in range(start, len(format_text)):
        if format_text[end] == "(":
            depth += 1
        elif format_text[end] == ")":
            depth -= 1
            if depth == 0:
                break
    return {int(value, 0): name for value, name in _SYMBOLIC_PAIR.findall(format_text[start:end])}


def name_values(
    values: np.ndarray,
    table: Mapping[int, str],
    fallback=None,
    unknown: tuple[int, ...] = (UNKNOWN,),
) -> np.ndarray:
    """Names for an array of kernel values (object array): None where the kernel gave none (`unknown`), the
    number as text where the running kernel has no name for it (never a guess)."""
    if len(values) == 0:
        return np.array([], dtype=object)
    distinct, inverse = np.unique(np.asarray(values, dtype=np.int64), return_inverse=True)
    names = []
    for value in distinct.tolist():
        if value in unknown:
            names.append(None)
        elif value in table:
            names.append(table[value])
        else:
            names.append((fallback(value) if fallback else None) or str(value))
    return np.array(names, dtype=object)[inverse]

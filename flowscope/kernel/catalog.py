"""Every probe family flowscope has: what it hooks, what it needs from the kernel, what it counts.

The loader compiles each family whose requirements the running kernel meets and reports the others,
with the reason and the remedy, in `flowscope doctor`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from flowscope.kernel import offsets as kernel_offsets
from flowscope.kernel.btf import Btf
from flowscope.kernel.layouts import DROP_KEY, DROP_STATS, FLOW_KEY, FLOW_STATS, TCP_KEY, TCP_STATS
from flowscope.kernel.listeners import seed_listeners


@dataclass(frozen=True)
class ProbeStatus:
    """What a BatchSource reports of one probe: whether it runs, on what, and if not why and what would help."""

    name: str  # e.g. "tc_flows", "sock_state", "skb_drop"
    active: bool
    hook: str  # what it attaches to, e.g. "tracepoint skb:kfree_skb"
    reason: str = ""  # why it is unavailable (empty when active)
    remedy: str = ""  # what would make it available

    @property
    def missed(self) -> bool:
        """Not running, and it matters: not a variant whose work another probe already does."""
        return not self.active and "not needed" not in self.reason


@dataclass(frozen=True)
class Requirement:
    kind: str  # tracepoint | raw_tracepoint | kprobe | btf | tc
    target: str = ""  # "skb:kfree_skb" for tracepoints, a kernel function for kprobes ("a|b": either), "" otherwise


@dataclass(frozen=True)
class DrainedMap:
    """A double-buffered counting map (<name>_0 and <name>_1 in the C source)."""

    name: str
    key: np.dtype
    value: np.dtype
    size_option: str  # the LoadOptions attribute holding max_entries (passed to C as -D<define>)
    size_define: str


@dataclass(frozen=True)
class ProbeFamily:
    name: str
    source: str  # file under probes/
    hook: str  # for doctor: what it attaches to
    requires: tuple[Requirement, ...]
    drained_maps: tuple[DrainedMap, ...] = ()
    # Extra -D flags (BTF offsets, enum values) from the running kernel and the load options.
    cflags: Callable[[Btf | None, object], list[str]] | None = None
    replaces: str | None = None  # a fallback (kprobe) family runs only when this family cannot
    fills: tuple[str, ...] = ()  # flow columns this family provides (null when it does not run)
    # Files under probes/ placed before `source` in the module text: a kprobe variant reuses the maps and
    # logic of the family it replaces (whose own programs its cflags switch off).
    shared: tuple[str, ...] = ()
    # Run once the module is loaded and its probes attached, with its maps (name -> fd): seeds the family's
    # kernel tables with what happened before (e.g. listening sockets found in /proc).
    prepare: Callable[[dict[str, int]], object] | None = None


TC_FLOWS = ProbeFamily(
    name="tc_flows",
    source="tc_flow.c",
    hook="tc clsact ingress + egress",
    requires=(Requirement("tc"),),
    drained_maps=(DrainedMap("flows", FLOW_KEY, FLOW_STATS, "flow_map_size", "FLOWSCOPE_FLOW_MAP_SIZE"),),
    fills=("packets", "bytes", "tcp_flags"),
)

SKB_DROP = ProbeFamily(
    name="skb_drop",
    source="skb_drop.c",
    hook="raw tracepoint skb:kfree_skb",
    requires=(Requirement("raw_tracepoint", "kfree_skb"),),
    drained_maps=(DrainedMap("drops", DROP_KEY, DROP_STATS, "drop_map_size", "FLOWSCOPE_DROP_MAP_SIZE"),),
    cflags=kernel_offsets.drop_flags,
    fills=("drop_packets", "drop_bytes", "drop_reason"),
)
TCP_EVENTS = ProbeFamily(
    name="tcp_events",
    source="tcp_events.c",
    hook="raw tracepoints tcp:tcp_retransmit_skb, tcp:tcp_probe, tcp:tcp_send_reset, tcp:tcp_receive_reset",
    requires=tuple(
        Requirement("raw_tracepoint", name)
        for name in ("tcp_retransmit_skb", "tcp_probe", "tcp_send_reset", "tcp_receive_reset")
    ),
    drained_maps=(DrainedMap("tcp", TCP_KEY, TCP_STATS, "tcp_map_size", "FLOWSCOPE_TCP_MAP_SIZE"),),
    cflags=kernel_offsets.tcp_flags,
    fills=("retransmits", "resets", "rtt_us"),
)
SOCK_STATE = ProbeFamily(
    name="sock_state",
    source="sock_state.c",
    hook="raw tracepoint sock:inet_sock_set_state",
    requires=(Requirement("raw_tracepoint", "inet_sock_set_state"),),
    cflags=kernel_offsets.sock_flags,
    prepare=seed_listeners,
)


def kprobe_variant(
    family: ProbeFamily,
    source: str,
    hook: str,
    functions: tuple[str, ...],
    cflags: Callable[[Btf | None, object], list[str]],
) -> ProbeFamily:
    """The stand-in for `family` where its tracepoints are missing: kprobes on `functions` ("a|b": either),
    with offsets from BTF. Its source follows the family's in the module text and reuses its maps and
    logic (`cflags` switch the family's own programs off), so it drains the same maps, fills the same
    columns and joins them the same way."""
    return replace(
        family,
        name=f"{family.name}_kprobe",
        source=source,
        shared=(family.source,),
        hook=hook,
        requires=(*(Requirement("kprobe", function) for function in functions), Requirement("btf")),
        cflags=cflags,
        replaces=family.name,
    )


SKB_DROP_KPROBE = kprobe_variant(
    SKB_DROP,
    "kprobe_skb_drop.c",
    "kprobe sk_skb_reason_drop (kfree_skb_reason before Linux 6.11, kfree_skb before 5.17)",
    ("|".join(kernel_offsets.DROP_FUNCTIONS),),
    kernel_offsets.drop_kprobe_flags,
)
TCP_EVENTS_KPROBE = kprobe_variant(
    TCP_EVENTS,
    "kprobe_tcp_events.c",
    "kprobes + kretprobes __tcp_retransmit_skb and tcp_retransmit_skb, kprobes tcp_rcv_established, tcp_reset, "
    "tcp_v4/v6_send_reset, tcp_send_active_reset",
    ("|".join(kernel_offsets.RETRANSMIT_FUNCTIONS), "tcp_rcv_established", "tcp_reset"),
    kernel_offsets.tcp_kprobe_flags,
)
SOCK_STATE_KPROBE = kprobe_variant(
    SOCK_STATE,
    "kprobe_sock_state.c",
    "kprobes tcp_set_state, inet_sk_set_state",
    ("tcp_set_state",),
    kernel_offsets.sock_kprobe_flags,
)

CATALOG: list[ProbeFamily] = [
    TC_FLOWS,
    SKB_DROP,
    TCP_EVENTS,
    SOCK_STATE,
    SKB_DROP_KPROBE,
    TCP_EVENTS_KPROBE,
    SOCK_STATE_KPROBE,
]


@dataclass
class FamilyStatus:
    family: ProbeFamily
    active: bool
    reason: str = ""
    remedy: str = ""
    detail: dict[str, str] = field(default_factory=dict)

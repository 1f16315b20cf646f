"""Every probe family flowscope has: what it hooks, what it needs from the kernel, what it counts.

The loader compiles each family whose requirements the running kernel meets and reports the others,
with the reason and the remedy, in `flowscope doctor`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from flowscope.btf import Btf
from flowscope.kernel_records import FLOW_KEY, FLOW_STATS


@dataclass(frozen=True)
class Requirement:
    kind: str  # tracepoint | raw_tracepoint | kprobe | btf | tc
    target: str = ""  # "skb:kfree_skb" for tracepoints, a kernel function for kprobes, "" otherwise


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
    # Joins the family's drained counters into the flow rows and decodes its events:
    # (flows, drain, context, coverage) -> (flows, event rows). See flowscope/aggregator.py.
    contribute: Callable[..., tuple[pd.DataFrame, pd.DataFrame]] | None = None


TC_FLOWS = ProbeFamily(
    name="tc_flows",
    source="tc_flow.c",
    hook="tc clsact ingress + egress",
    requires=(Requirement("tc"),),
    drained_maps=(DrainedMap("flows", FLOW_KEY, FLOW_STATS, "flow_map_size", "FLOWSCOPE_FLOW_MAP_SIZE"),),
    fills=("packets", "bytes", "tcp_flags"),
)

CATALOG: list[ProbeFamily] = [TC_FLOWS]


@dataclass
class FamilyStatus:
    family: ProbeFamily
    active: bool
    reason: str = ""
    remedy: str = ""
    detail: dict[str, str] = field(default_factory=dict)

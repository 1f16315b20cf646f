"""What decoding an interval needs to know besides the drain itself: the node, the clock, interface names, the
families that ran, and state the families keep from one interval to the next."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flowscope.kernel.catalog import ProbeFamily
from flowscope.kernel.names import KernelNames


@dataclass
class AggregationContext:
    node: str
    offset_ns: int  # CLOCK_MONOTONIC -> UTC
    ifnames: Mapping[int, str]
    active: list[ProbeFamily]
    symbolize: Callable[[int], str | None] = lambda _address: None
    # Inode of the network namespace the tc probe's interfaces live in (their ifindex means something there).
    netns: int = field(default_factory=lambda: os.stat("/proc/self/ns/net").st_ino)
    extra: dict[str, object] = field(default_factory=dict)  # per-family state (e.g. kernel names)


def kernel_names(context: AggregationContext) -> KernelNames:
    names = context.extra.get("kernel_names")
    if names is None:
        names = context.extra["kernel_names"] = KernelNames.load()
    return names

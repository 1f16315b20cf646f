"""Turns one interval's kernel drain into a FlowBatch: flows from the map (plus spilled packets), the
other families' counters joined into them, events decoded, and the interval's loss accounting."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from flowscope.coverage import Coverage
from flowscope.kernel_reader import KernelDrain
from flowscope.kernel_records import (
    COUNTER_EVENT_LOST_BASE,
    COUNTER_EVENT_SENT_BASE,
    COUNTERS,
    EVENT_KIND_MAX,
    EVENT_KINDS,
    FLOW_KEY,
    FLOW_STATS,
    KIND_FLOW_SPILL,
    flows_from_map,
    merge_map_entries,
    spills_as_map_entries,
)
from flowscope.probe_catalog import ProbeFamily
from flowscope.schema import EVENT_COLUMNS, FLOW_COLUMNS, FlowBatch, conform, empty_frame


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


def counter(drain: KernelDrain, name: str) -> int:
    return int(drain.counters[COUNTERS.index(name)])


def event_counts(drain: KernelDrain, coverage: Coverage) -> None:
    """Per event kind: produced in the kernel = sent + lost; delivered = what reached this process."""
    delivered = np.bincount(drain.events["kind"], minlength=EVENT_KIND_MAX)
    for kind, name in EVENT_KINDS.items():
        sent = int(drain.counters[COUNTER_EVENT_SENT_BASE + kind])
        lost_in_kernel = int(drain.counters[COUNTER_EVENT_LOST_BASE + kind])
        got = int(delivered[kind])
        if sent or lost_in_kernel or got:
            lost = drain.events_lost(kind)
            coverage.add(f"events:{name}", produced=sent + lost_in_kernel, delivered=got, lost=lost)
    if drain.events_malformed:
        # Records the reader could not decode: counted as sent by some kind the reader cannot tell.
        coverage.add("events:malformed", produced=drain.events_malformed, lost=drain.events_malformed)


def flow_rows(drain: KernelDrain, context: AggregationContext, coverage: Coverage) -> pd.DataFrame:
    keys, stats = drain.maps.get("flows", (np.zeros(0, FLOW_KEY), np.zeros(0, FLOW_STATS)))
    spill_keys, spill_stats = spills_as_map_entries(drain.events)
    produced = counter(drain, "tc_packets")
    spill_lost = drain.events_lost(KIND_FLOW_SPILL)
    coverage.add(
        "flow_map",
        produced=produced,
        delivered=int(stats["packets"].sum()) + int(spill_stats["packets"].sum()),
        lost=spill_lost,
    )
    keys, stats = merge_map_entries(keys, stats, spill_keys, spill_stats)
    flows = flows_from_map(keys, stats, context.offset_ns, context.ifnames, context.node)
    flows["netns"] = pd.Series(context.netns, index=flows.index, dtype="UInt32")
    return flows


def build_batch(
    drain: KernelDrain,
    context: AggregationContext,
    window: tuple[pd.Timestamp, pd.Timestamp],
) -> FlowBatch:
    coverage = Coverage()
    active = {family.name for family in context.active}
    flows = flow_rows(drain, context, coverage) if "tc_flows" in active else empty_frame(FLOW_COLUMNS)
    event_counts(drain, coverage)
    events = [empty_frame(EVENT_COLUMNS)]
    for family in context.active:
        if family.contribute is not None:
            flows, family_events = family.contribute(flows, drain, context, coverage)
            events.append(family_events)
    # Counters of probes that ran are facts (0 when nothing happened); of probes that did not, unknown.
    filled = {column for family in context.active for column in family.fills}
    for column in ("drop_packets", "drop_bytes", "retransmits", "resets"):
        if column in filled:
            flows[column] = flows[column].fillna(0)
    non_empty = [e for e in events if not e.empty]
    event_frame = pd.concat(non_empty, ignore_index=True) if non_empty else events[0]
    if not event_frame.empty:
        event_frame = event_frame.sort_values("time", kind="stable", ignore_index=True)
    return FlowBatch(
        window[0],
        window[1],
        _in_schema(flows, FLOW_COLUMNS),
        _in_schema(event_frame, EVENT_COLUMNS),
        coverage,
    )


def _in_schema(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """conform(frame, columns), skipped when the stages already left the frame in the schema's shape
    (the usual case), where it would rebuild every column for nothing: ~6 ms a frame even when empty."""
    index = frame.index
    if (
        isinstance(index, pd.RangeIndex)
        and index.start == 0
        and index.step == 1
        and list(frame.columns) == list(columns)
        and [str(dtype) for dtype in frame.dtypes] == list(columns.values())
    ):
        return frame
    return conform(frame, columns)

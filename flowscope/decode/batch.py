"""Turns one interval's kernel drain into a FlowBatch: flows from the map (plus spilled packets), the
other families' counters joined into them, events decoded, and the interval's loss accounting."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from flowscope.coverage import Coverage
from flowscope.decode.context import AggregationContext, kernel_names
from flowscope.decode.events import contribute_drops, contribute_sockets, contribute_tcp, event_rows
from flowscope.decode.flows import FlowRows, flow_frame, merge_map_entries, spills_as_map_entries
from flowscope.kernel.catalog import ProbeFamily
from flowscope.kernel.layouts import (
    COUNTER_EVENT_LOST_BASE,
    COUNTER_EVENT_SENT_BASE,
    EVENT,
    EVENT_KIND_MAX,
    FLOW_KEY,
    FLOW_STATS,
    KIND_FLOW_SPILL,
    KIND_NUMBER,
    concat_records,
    select_records,
)
from flowscope.readers.drain import KernelDrain
from flowscope.schema import EVENT_COLUMNS, FlowBatch, empty_frame

# What each family adds to an interval besides the flow map: its drained counters joined into the flow rows,
# and its event records picked for decoding: (rows, drain, context, coverage) -> (rows, EVENT records).
# A kprobe variant contributes as the family it replaces (same maps, same records).
Contribution = Callable[[FlowRows, KernelDrain, AggregationContext, Coverage], tuple[FlowRows, np.ndarray]]
CONTRIBUTIONS: dict[str, Contribution] = {
    "skb_drop": contribute_drops,
    "tcp_events": contribute_tcp,
    "sock_state": contribute_sockets,
}


def contribution(family: ProbeFamily) -> Contribution | None:
    return CONTRIBUTIONS.get(family.replaces or family.name)


def event_counts(drain: KernelDrain, coverage: Coverage) -> None:
    """Per event kind: produced in the kernel = sent + lost; delivered = what reached this process."""
    delivered = np.bincount(drain.events["kind"], minlength=EVENT_KIND_MAX)
    for name, kind in KIND_NUMBER.items():
        sent = int(drain.counters[COUNTER_EVENT_SENT_BASE + kind])
        lost_in_kernel = int(drain.counters[COUNTER_EVENT_LOST_BASE + kind])
        got = int(delivered[kind])
        if sent or lost_in_kernel or got:
            lost = drain.events_lost(kind)
            coverage.add(f"events:{name}", produced=sent + lost_in_kernel, delivered=got, lost=lost)
    if drain.events_malformed:
        # Records the reader could not decode: counted as sent by some kind the reader cannot tell.
        coverage.add("events:malformed", produced=drain.events_malformed, lost=drain.events_malformed)


def flow_rows(drain: KernelDrain, context: AggregationContext, coverage: Coverage) -> FlowRows:
    keys, stats = drain.maps.get("flows", (np.zeros(0, FLOW_KEY), np.zeros(0, FLOW_STATS)))
    spill_keys, spill_stats = spills_as_map_entries(drain.events)
    produced = drain.counter("tc_packets")
    spill_lost = drain.events_lost(KIND_FLOW_SPILL)
    coverage.add(
        "flow_map",
        produced=produced,
        delivered=int(stats["packets"].sum()) + int(spill_stats["packets"].sum()),
        lost=spill_lost,
    )
    keys, stats = merge_map_entries(keys, stats, spill_keys, spill_stats)
    return FlowRows.from_map(keys, stats, netns=context.netns)


def event_frame(records: list[np.ndarray], context: AggregationContext) -> pd.DataFrame:
    """The families' event records decoded at once, in time order (of equal times, in family order)."""
    events = concat_records(np.zeros(0, EVENT), *records)
    if len(events) == 0:
        return empty_frame(EVENT_COLUMNS)
    events = select_records(events, np.argsort(events["ts_ns"], kind="stable"))
    return event_rows(
        events,
        kernel_names(context),
        context.offset_ns,
        context.ifnames,
        context.node,
        context.netns,
        context.symbolize,
    )


def build_batch(
    drain: KernelDrain,
    context: AggregationContext,
    window: tuple[pd.Timestamp, pd.Timestamp],
) -> FlowBatch:
    coverage = Coverage()
    active = {family.name for family in context.active}
    contributions = [c for c in map(contribution, context.active) if c is not None]
    if contributions:
        # Read once (~140 ms of BTF), here in the first interval rather than at the first drop or TCP
        # counter, which may come at any time under traffic.
        kernel_names(context)
    no_rows = FlowRows.from_map(np.zeros(0, FLOW_KEY), np.zeros(0, FLOW_STATS))
    rows = flow_rows(drain, context, coverage) if "tc_flows" in active else no_rows
    event_counts(drain, coverage)
    records = []
    for contribute in contributions:
        rows, family_events = contribute(rows, drain, context, coverage)
        records.append(family_events)
    # Counters of probes that ran are facts (0 when nothing happened); of probes that did not, unknown.
    measured = {column for family in context.active for column in family.fills}
    flows = flow_frame(
        rows,
        context.offset_ns,
        context.ifnames,
        context.node,
        measured,
        lambda codes: kernel_names(context).drop_reason_names(codes),
    )
    return FlowBatch(window[0], window[1], flows, event_frame(records, context), coverage)

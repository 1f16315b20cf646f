"""Drops, TCP counters and connection events: numpy mirrors of their kernel maps (probes/skb_drop.c,
probes/tcp_events.c), their decoding into event rows and per-flow counters, and the join of those
counters into the flow rows.

Pure functions over plain arrays and frames (no BCC), so everything here is unit-tested without root.

Join rule: a counter joins the flow row with the same 5-tuple and the same (ifindex, direction) when
there is one (only for counters seen in this agent's network namespace, where interface numbers mean
the same as the tc probe's); else the row with the same 5-tuple and the latest time_end; else it becomes
a row of its own with packets/bytes 0 (null when no probe counts packets), and a null ifname when it
happened in another network namespace. A row carries one drop_reason: another reason of the same flow
becomes a row of its own, with packets 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from flowscope.coverage import Coverage
from flowscope.kernel_names import KernelNames
from flowscope.kernel_records import (
    EVENT_KIND_MAX,
    EVENT_KINDS,
    FLOW_KEY,
    FLOW_STATS,
    KEY_NO_PORTS,
    PORT_PROTOCOLS,
    addresses_to_text,
    flows_from_map,
    protocol_names,
    select_records,
    utc_times,
)
from flowscope.schema import EVENT_COLUMNS, FLOW_COLUMNS, conform, empty_frame

if TYPE_CHECKING:
    from flowscope.aggregator import AggregationContext
    from flowscope.kernel_reader import KernelDrain

DROP_KEY = np.dtype([("flow", FLOW_KEY), ("netns", "<u4"), ("reason", "<u4")])
DROP_STATS = np.dtype(
    [
        ("packets", "<u8"),
        ("bytes", "<u8"),
        ("first_seen_ns", "<u8"),
        ("last_seen_ns", "<u8"),
        ("location", "<u8"),
    ]
)
TCP_KEY = np.dtype([("flow", FLOW_KEY), ("netns", "<u4")])
TCP_STATS = np.dtype(
    [
        ("retransmits", "<u8"),
        ("resets", "<u8"),
        ("rtt_samples", "<u8"),
        ("srtt_sum_us", "<u8"),
        ("first_seen_ns", "<u8"),
        ("last_seen_ns", "<u8"),
        ("srtt_us", "<u4"),
        ("pad", "<u4"),
    ]
)
assert DROP_KEY.itemsize == 52 and DROP_STATS.itemsize == 40
assert TCP_KEY.itemsize == 48 and TCP_STATS.itemsize == 56

KIND = {name: number for number, name in EVENT_KINDS.items()}
KIND_NAMES = np.array([EVENT_KINDS.get(number) for number in range(EVENT_KIND_MAX)], dtype=object)
SOCKET_KINDS = (KIND["connect"], KIND["accept"], KIND["close"])
TCP_KINDS = (KIND["retransmit"], KIND["reset"])

COUNTER_COLUMNS = ("drop_packets", "drop_bytes", "drop_reason", "retransmits", "resets", "rtt_us")
JOIN_TUPLE = ["ip_version", "protocol", "src_ip", "src_port", "dst_ip", "dst_port", "icmp_type", "icmp_code"]
JOIN_PLACE = ["ifindex", "direction"]
JOIN_PORTS = ["src_port", "dst_port"]

Symbolize = Callable[[int], "str | None"]


# ---- shared state of the families, kept in AggregationContext.extra ------------------------------------


def kernel_names(context: AggregationContext) -> KernelNames:
    names = context.extra.get("kernel_names")
    if names is None:
        names = context.extra["kernel_names"] = KernelNames.load()
    return names


def host_netns(context: AggregationContext) -> int:
    """Inode number of the network namespace where the tc probe's interface numbers live."""
    return int(context.netns)


# ---- events ----------------------------------------------------------------------------------------------


def _object(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    out = np.asarray(values, dtype=object).copy()
    out[~keep] = None
    return out


def event_rows(
    events: np.ndarray,
    names: KernelNames,
    offset_ns: int,
    ifnames: Mapping[int, str],
    node: str,
    netns_here: int,
    symbolize: Symbolize,
) -> pd.DataFrame:
    """Event rows (EVENT_COLUMNS) for connect/accept/close/drop/retransmit/reset records.

    Socket events (connect, accept, close) go from the local end (src) to the remote one, and carry the
    owning process; drops, retransmits and resets go the packet's way. state: the state a connection
    closed from, or the socket's state at a retransmit or reset.
    """
    if len(events) == 0:
        return empty_frame(EVENT_COLUMNS)
    kind = events["kind"]
    ip = events["ip_version"] > 0
    has_ports = ip & np.isin(events["proto"], PORT_PROTOCOLS) & (events["key_flags"] & KEY_NO_PORTS == 0)
    drop = kind == KIND["drop"]
    close = kind == KIND["close"]
    reset = kind == KIND["reset"]
    ifindex = events["ifindex"]
    here = (events["netns"] == netns_here) & (ifindex != 0)
    distinct_if, if_inverse = np.unique(ifindex, return_inverse=True)
    ifname = np.array([ifnames.get(int(i)) for i in distinct_if], dtype=object)[if_inverse]
    locations = np.where(drop, events["location"], 0)
    distinct_loc, loc_inverse = np.unique(locations, return_inverse=True)
    symbols = np.array([symbolize(int(a)) if a else None for a in distinct_loc], dtype=object)[loc_inverse]
    state = np.where(close, events["old_state"], np.where(np.isin(kind, TCP_KINDS), events["new_state"], 0))
    comm = np.char.decode(events["comm"], "utf-8", errors="replace").astype(object)
    frame = pd.DataFrame(
        {
            "time": utc_times(events["ts_ns"], offset_ns),
            "kind": KIND_NAMES[np.minimum(kind, EVENT_KIND_MAX - 1)],
            "node": node,
            "ifname": _object(ifname, here),
            "ifindex": pd.Series(pd.array(ifindex, dtype="UInt32")).where(ifindex != 0, pd.NA),
            "netns": pd.Series(pd.array(events["netns"], dtype="UInt32")).where(events["netns"] != 0, pd.NA),
            "ip_version": pd.Series(pd.array(events["ip_version"], dtype="UInt8")).where(ip, pd.NA),
            "protocol": _object(protocol_names(events["proto"]), ip),
            "src_ip": addresses_to_text(events["saddr"], events["ip_version"]),
            "src_port": pd.Series(pd.array(events["sport"], dtype="UInt16")).where(has_ports, pd.NA),
            "dst_ip": addresses_to_text(events["daddr"], events["ip_version"]),
            "dst_port": pd.Series(pd.array(events["dport"], dtype="UInt16")).where(has_ports, pd.NA),
            "bytes": pd.Series(pd.array(events["value"], dtype="UInt64")).where(drop, pd.NA),
            "drop_reason": _object(names.drop_reason_names(events["reason"]), drop),
            "location": _object(symbols, drop),
            "state": names.tcp_state_names(state),
            "duration_us": pd.Series(pd.array(events["value"] // 1000, dtype="UInt64")).where(
                close & (events["value"] > 0), pd.NA
            ),
            "pid": pd.Series(pd.array(events["pid"].astype(np.int64), dtype="Int64")).where(events["pid"] != 0, pd.NA),
            "comm": _object(comm, comm != ""),
            "cgroup_id": pd.Series(pd.array(events["cgroup_id"], dtype="UInt64")).where(
                events["cgroup_id"] != 0, pd.NA
            ),
            "reset_reason": _object(names.reset_reason_names(events["reason"]), reset),
        }
    )
    return conform(frame, EVENT_COLUMNS)


def family_events(events: np.ndarray, kinds: tuple[int, ...], context: AggregationContext) -> pd.DataFrame:
    mine = select_records(events, np.isin(events["kind"], kinds))
    return event_rows(
        mine,
        kernel_names(context),
        context.offset_ns,
        context.ifnames,
        context.node,
        host_netns(context),
        context.symbolize,
    )


# ---- counters -> rows ------------------------------------------------------------------------------------


def counter_rows(
    flow_keys: np.ndarray,
    netns: np.ndarray,
    first_ns: np.ndarray,
    last_ns: np.ndarray,
    offset_ns: int,
    ifnames: Mapping[int, str],
    node: str,
    netns_here: int,
) -> pd.DataFrame:
    """Flow-shaped rows (FLOW_COLUMNS, packets/bytes 0) for counter map keys, with netns and `here` columns."""
    stats = np.zeros(len(flow_keys), dtype=FLOW_STATS)
    stats["first_seen_ns"], stats["last_seen_ns"] = first_ns, last_ns
    rows = flows_from_map(np.ascontiguousarray(flow_keys).view(FLOW_KEY), stats, offset_ns, ifnames, node)
    here = np.asarray(netns) == netns_here
    rows["ifname"] = rows["ifname"].where(here, pd.NA)
    rows["ifindex"] = rows["ifindex"].where(rows["ifindex"] != 0, pd.NA)
    rows["tcp_flags"] = pd.NA
    rows["netns"] = np.asarray(netns)
    rows["here"] = here
    return rows


def _normalized(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Join keys with nulls replaced by a value no real key has, so that null matches null."""
    out = {}
    for name in columns:
        series = frame[name].reset_index(drop=True)
        if pd.api.types.is_numeric_dtype(series.dtype):
            out[name] = series.astype("Int64").fillna(-1).astype(np.int64)
        else:
            out[name] = series.astype(object).where(series.notna(), "\0")
    return pd.DataFrame(out)


def _key_hashes(normalized: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """One 64-bit hash per row of the key columns: joins on one integer instead of eight columns."""
    return pd.util.hash_pandas_object(normalized[columns], index=False).to_numpy()


def _first_match(table: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """For each wanted hash, the position of its first occurrence in `table`, or -1."""
    distinct, first = np.unique(table, return_index=True)
    if len(distinct) == 0:
        return np.full(len(wanted), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(distinct, wanted), len(distinct) - 1)
    return np.where(distinct[at] == wanted, first[at], -1)


def matching_rows(flows: pd.DataFrame, counters: pd.DataFrame) -> np.ndarray:
    """For each counter row, the index of the flow row it joins (see the module's join rule), or -1."""
    target = np.full(len(counters), -1, dtype=np.int64)
    if flows.empty or counters.empty:
        return target
    # Only rows with the ports of some counter can match: the others are left out before the keys are
    # normalized and hashed (a few counters against 100k flows: the join's cost no longer grows with flows).
    ports, wanted_ports = _normalized(flows, JOIN_PORTS), _normalized(counters, JOIN_PORTS)
    candidates = np.flatnonzero(
        np.isin(ports["src_port"], wanted_ports["src_port"]) & np.isin(ports["dst_port"], wanted_ports["dst_port"])
    )
    if len(candidates) == 0:
        return target
    keys = JOIN_TUPLE + JOIN_PLACE
    subset = flows.iloc[candidates]
    rows = _normalized(subset, keys)
    wanted = _normalized(counters, keys)
    # Latest first; stable, so that of equal times the earlier row (an original before its copies) wins.
    end = subset["time_end"].to_numpy(dtype="datetime64[ns]")
    latest_first = np.argsort(-np.where(np.isnat(end), np.iinfo(np.int64).min + 1, end.astype(np.int64)), kind="stable")
    order = candidates[latest_first]
    here = counters["here"].to_numpy(dtype=bool)
    exact = _first_match(_key_hashes(rows, keys)[latest_first], _key_hashes(wanted, keys))
    target[here & (exact >= 0)] = order[exact[here & (exact >= 0)]]
    by_tuple = _first_match(_key_hashes(rows, JOIN_TUPLE)[latest_first], _key_hashes(wanted, JOIN_TUPLE))
    ip = counters["ip_version"].notna().to_numpy()
    rest = (target < 0) & ip & (by_tuple >= 0)
    target[rest] = order[by_tuple[rest]]
    return target


def _with_new_rows(
    flows: pd.DataFrame, counters: pd.DataFrame, target: np.ndarray, packets_measured: bool
) -> tuple[pd.DataFrame, np.ndarray]:
    """Appends one flow row per distinct unmatched counter key; returns the flows and every counter's row."""
    unmatched = np.flatnonzero(target < 0)
    if len(unmatched) == 0:
        return flows, target
    group_keys = [*JOIN_TUPLE, *JOIN_PLACE, "here"]
    pending = counters.iloc[unmatched].reset_index(drop=True)
    codes = _normalized(pending, group_keys).groupby(group_keys, sort=False, dropna=False).ngroup().to_numpy()
    first = pd.Series(np.arange(len(pending))).groupby(codes).first().to_numpy()
    fresh = pending.iloc[first].reset_index(drop=True)
    fresh["time_start"] = pending["time_start"].groupby(codes).min().to_numpy()
    fresh["time_end"] = pending["time_end"].groupby(codes).max().to_numpy()
    fresh[list(COUNTER_COLUMNS)] = pd.NA  # the caller adds the counters to every joined row alike
    fresh["packets"] = 0 if packets_measured else pd.NA
    fresh["bytes"] = 0 if packets_measured else pd.NA
    fresh = conform(fresh[[name for name in fresh.columns if name in FLOW_COLUMNS]], FLOW_COLUMNS)
    target = target.copy()
    target[unmatched] = len(flows) + codes
    return pd.concat([flows, fresh], ignore_index=True), target


def _packets_measured(context: AggregationContext) -> bool:
    return any("packets" in family.fills for family in context.active)


# ---- drops -----------------------------------------------------------------------------------------------


def drop_counter_rows(
    keys: np.ndarray,
    stats: np.ndarray,
    names: KernelNames,
    offset_ns: int,
    ifnames: Mapping[int, str],
    node: str,
    netns_here: int,
) -> pd.DataFrame:
    rows = counter_rows(
        keys["flow"], keys["netns"], stats["first_seen_ns"], stats["last_seen_ns"], offset_ns, ifnames, node, netns_here
    )
    rows["drop_packets"] = stats["packets"]
    rows["drop_bytes"] = stats["bytes"]
    rows["drop_reason"] = names.drop_reason_names(keys["reason"])
    return rows


def join_drops(flows: pd.DataFrame, drops: pd.DataFrame, packets_measured: bool) -> pd.DataFrame:
    """Flows with drop_packets/drop_bytes/drop_reason joined (one reason per row; see the module's rule)."""
    if drops.empty:
        return flows
    flows = flows.reset_index(drop=True)
    target = matching_rows(flows, drops)
    flows, target = _with_new_rows(flows, drops, target, packets_measured)
    reason = drops["drop_reason"].astype(object).where(drops["drop_reason"].notna(), "\0").to_numpy()
    per_reason = (
        pd.DataFrame(
            {
                "row": target,
                "reason": reason,
                "packets": drops["drop_packets"].to_numpy(dtype=np.uint64),
                "bytes": drops["drop_bytes"].to_numpy(dtype=np.uint64),
            }
        )
        .groupby(["row", "reason"], sort=False)
        .sum()
        .reset_index()
        # The reason with the most drops stays on the flow's row; ties go to the name, so the choice is stable.
        .sort_values(["row", "packets", "reason"], ascending=[True, False, True], kind="stable")
    )
    per_reason["reason"] = per_reason["reason"].where(per_reason["reason"] != "\0", None)
    primary = ~per_reason["row"].duplicated()
    first, others = per_reason[primary], per_reason[~primary]
    rows = first["row"].to_numpy()
    flows.loc[rows, "drop_packets"] = first["packets"].to_numpy()
    flows.loc[rows, "drop_bytes"] = first["bytes"].to_numpy()
    flows.loc[rows, "drop_reason"] = first["reason"].to_numpy()
    if others.empty:
        return flows
    copies = flows.iloc[others["row"].to_numpy()].reset_index(drop=True)
    for column in ("packets", "bytes"):
        copies[column] = copies[column].where(copies[column].isna(), 0)
    for column in ("tcp_flags", "retransmits", "resets", "rtt_us"):
        copies[column] = pd.NA
    copies["drop_packets"] = others["packets"].to_numpy()
    copies["drop_bytes"] = others["bytes"].to_numpy()
    copies["drop_reason"] = others["reason"].to_numpy()
    return pd.concat([flows, copies], ignore_index=True)


def contribute_drops(
    flows: pd.DataFrame, drain: KernelDrain, context: AggregationContext, coverage: Coverage
) -> tuple[pd.DataFrame, pd.DataFrame]:
    from flowscope.aggregator import counter  # imported here: the aggregator imports the catalog, which imports this

    keys, stats = drain.maps.get("drops", (np.zeros(0, DROP_KEY), np.zeros(0, DROP_STATS)))
    seen = counter(drain, "drops")
    coverage.add("drop_map", produced=seen, delivered=int(stats["packets"].sum()), lost=counter(drain, "drop_map_full"))
    sampled_out = counter(drain, "drop_events_sampled_out")
    coverage.add("drop_event_sampling", produced=seen, delivered=seen - sampled_out, lost=sampled_out)
    if len(keys):  # nothing to join otherwise (an idle interval: skipping saves the frames' fixed cost)
        names = kernel_names(context)
        netns = host_netns(context)
        rows = drop_counter_rows(keys, stats, names, context.offset_ns, context.ifnames, context.node, netns)
        flows = join_drops(flows, rows, _packets_measured(context))
    return flows, family_events(drain.events, (KIND["drop"],), context)


# ---- TCP counters ----------------------------------------------------------------------------------------


def tcp_counter_rows(
    keys: np.ndarray,
    stats: np.ndarray,
    offset_ns: int,
    ifnames: Mapping[int, str],
    node: str,
    netns_here: int,
) -> pd.DataFrame:
    rows = counter_rows(
        keys["flow"], keys["netns"], stats["first_seen_ns"], stats["last_seen_ns"], offset_ns, ifnames, node, netns_here
    )
    rows["retransmits"] = stats["retransmits"]
    rows["resets"] = stats["resets"]
    sampled = stats["rtt_samples"] > 0
    rows["rtt_us"] = pd.Series(pd.array(stats["srtt_us"], dtype="UInt32")).where(sampled, pd.NA)
    rows["rtt_sampled_ns"] = np.where(sampled, stats["last_seen_ns"].astype(np.int64), -1)
    return rows


def join_tcp(flows: pd.DataFrame, counters: pd.DataFrame, packets_measured: bool) -> pd.DataFrame:
    """Flows with retransmits and resets added, and rtt_us set to the latest RTT sample of the flow."""
    if counters.empty:
        return flows
    flows = flows.reset_index(drop=True)
    target = matching_rows(flows, counters)
    flows, target = _with_new_rows(flows, counters, target, packets_measured)
    per_row = (
        pd.DataFrame(
            {
                "row": target,
                "retransmits": counters["retransmits"].to_numpy(dtype=np.uint64),
                "resets": counters["resets"].to_numpy(dtype=np.uint64),
            }
        )
        .groupby("row", sort=False)[["retransmits", "resets"]]
        .sum()
    )
    rows = per_row.index.to_numpy()
    for column in ("retransmits", "resets"):
        current = flows.loc[rows, column].astype("UInt64").fillna(0).to_numpy(dtype=np.uint64)
        flows.loc[rows, column] = current + per_row[column].to_numpy(dtype=np.uint64)
    sampled = counters["rtt_sampled_ns"].to_numpy() >= 0
    if sampled.any():
        rtt = pd.DataFrame(
            {
                "row": target[sampled],
                "at": counters["rtt_sampled_ns"].to_numpy()[sampled],
                "rtt": counters["rtt_us"].to_numpy()[sampled],
            }
        )
        latest = rtt.sort_values("at", kind="stable").groupby("row").last()
        flows.loc[latest.index.to_numpy(), "rtt_us"] = latest["rtt"].to_numpy()
    return flows


def contribute_tcp(
    flows: pd.DataFrame, drain: KernelDrain, context: AggregationContext, coverage: Coverage
) -> tuple[pd.DataFrame, pd.DataFrame]:
    from flowscope.aggregator import counter  # imported here: the aggregator imports the catalog, which imports this

    keys, stats = drain.maps.get("tcp", (np.zeros(0, TCP_KEY), np.zeros(0, TCP_STATS)))
    seen = counter(drain, "tcp_counts")
    counted = int(stats["retransmits"].sum() + stats["resets"].sum())
    coverage.add("tcp_map", produced=seen, delivered=counted, lost=counter(drain, "tcp_map_full"))
    sampled_out = counter(drain, "tcp_events_sampled_out")
    coverage.add("tcp_event_sampling", produced=seen, delivered=seen - sampled_out, lost=sampled_out)
    rtt_lost = counter(drain, "rtt_map_full")
    samples = int(stats["rtt_samples"].sum())
    coverage.add("rtt_samples", produced=samples + rtt_lost, delivered=samples, lost=rtt_lost)
    if len(keys):
        rows = tcp_counter_rows(keys, stats, context.offset_ns, context.ifnames, context.node, host_netns(context))
        flows = join_tcp(flows, rows, _packets_measured(context))
    return flows, family_events(drain.events, TCP_KINDS, context)


# ---- connection events ------------------------------------------------------------------------------------


def contribute_sockets(
    flows: pd.DataFrame, drain: KernelDrain, context: AggregationContext, coverage: Coverage
) -> tuple[pd.DataFrame, pd.DataFrame]:
    from flowscope.aggregator import counter  # imported here: the aggregator imports the catalog, which imports this

    full = counter(drain, "sock_map_full")
    if full:
        coverage.add("socket_owners", produced=full, lost=full)  # connections whose events lack pid/duration
    return flows, family_events(drain.events, SOCKET_KINDS, context)

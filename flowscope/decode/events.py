"""Drops, TCP counters and connection events: numpy mirrors of their kernel maps (probes/skb_drop.c,
probes/tcp_events.c), their decoding into event rows and per-flow counters, and the join of those
counters into the flow rows.

Pure functions over plain arrays (no BCC), so everything here is unit-tested without root. The joins work
on FlowRows, columns of numpy arrays: their cost per interval is a few numpy calls, not a few hundred pandas
operations (which cost ~0.1 ms each however few the rows).

Join rule: a counter joins the flow row with the same 5-tuple and the same (ifindex, direction) when
there is one (only for counters seen in this agent's network namespace, where interface numbers mean
the same as the tc probe's); else the row with the same 5-tuple and the latest time_end; else it becomes
a row of its own with packets/bytes 0 (null when no probe counts packets), and a null ifname when it
happened in another network namespace. A row carries one drop_reason: another reason of the same flow
becomes a row of its own, with packets 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from flowscope.coverage import Coverage
from flowscope.decode.context import AggregationContext, kernel_names
from flowscope.decode.flows import (
    FlowRows,
    addresses_to_text,
    first_rows,
    nullable,
    protocol_names,
    row_codes,
    shown_ports,
    utc_times,
)
from flowscope.kernel.layouts import (
    DROP_KEY,
    DROP_STATS,
    EVENT_KIND_MAX,
    FLOW_KEY,
    KIND_NUMBER,
    TCP_KEY,
    TCP_STATS,
    select_records,
)
from flowscope.kernel.names import KernelNames
from flowscope.readers.drain import KernelDrain
from flowscope.schema import EVENT_COLUMNS, conform, empty_frame

KIND = KIND_NUMBER
KIND_NAMES = np.array([None, *KIND_NUMBER], dtype=object)  # by number; EVENT_KIND_MAX - 1 is no kind
SOCKET_KINDS = (KIND["connect"], KIND["accept"], KIND["close"])
TCP_KINDS = (KIND["retransmit"], KIND["reset"])


Symbolize = Callable[[int], "str | None"]


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
    _icmp, has_ports = shown_ports(events["ip_version"], events["proto"], events["key_flags"])
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
            "node": np.full(len(events), node, dtype=object),
            "ifname": _object(ifname, here),
            "ifindex": nullable(ifindex, ifindex != 0, "UInt32"),
            "netns": nullable(events["netns"], events["netns"] != 0, "UInt32"),
            "ip_version": nullable(events["ip_version"], ip, "UInt8"),
            "protocol": _object(protocol_names(events["proto"]), ip),
            "src_ip": addresses_to_text(events["saddr"], events["ip_version"]),
            "src_port": nullable(events["sport"], has_ports, "UInt16"),
            "dst_ip": addresses_to_text(events["daddr"], events["ip_version"]),
            "dst_port": nullable(events["dport"], has_ports, "UInt16"),
            "bytes": nullable(events["value"], drop, "UInt64"),
            "drop_reason": _object(names.drop_reason_names(events["reason"]), drop),
            "location": _object(symbols, drop),
            "state": names.tcp_state_names(state),
            "duration_us": nullable(events["value"] // 1000, close & (events["value"] > 0), "UInt64"),
            "pid": nullable(events["pid"], events["pid"] != 0, "Int64"),
            "comm": _object(comm, comm != ""),
            "cgroup_id": nullable(events["cgroup_id"], events["cgroup_id"] != 0, "UInt64"),
            "reset_reason": _object(names.reset_reason_names(events["reason"]), reset),
        }
    )
    return conform(frame, EVENT_COLUMNS, copy=False)


def family_events(drain: KernelDrain, kinds: tuple[int, ...]) -> np.ndarray:
    """The interval's event records of `kinds` (a family's), still undecoded: the aggregator decodes the
    events of every family at once."""
    return select_records(drain.events, np.isin(drain.events["kind"], kinds))


# ---- counters -> rows ------------------------------------------------------------------------------------


def counter_rows(
    flow_keys: np.ndarray,
    netns: np.ndarray,
    first_ns: np.ndarray,
    last_ns: np.ndarray,
    netns_here: int,
    packets_measured: bool,
) -> FlowRows:
    """Rows for counter map keys, nothing counted yet: no interface where the key has none (ifindex 0), and
    the interface's name only for counters of this network namespace (`named`, the join's `here`)."""
    keys = np.ascontiguousarray(flow_keys).view(FLOW_KEY)
    netns = np.asarray(netns)
    return FlowRows.from_keys(
        keys,
        first_ns,
        last_ns,
        ifindex_known=keys["ifindex"] != 0,
        named=netns == netns_here,
        netns=netns,
        packets_known=packets_measured,
    )


def _port_keys(rows: FlowRows) -> np.ndarray:
    """Per row, its ports (or ICMP type and code) as the frame shows them, in one integer; -1 when none."""
    icmp, has_ports = shown_ports(rows.ip_version, rows.proto, rows.key_flags)
    ports = rows.sport.astype(np.int64) << 16 | rows.dport
    icmp_codes = (rows.sport & 0xFF).astype(np.int64) << 8 | (rows.dport & 0xFF)
    return np.where(has_ports, ports, np.where(icmp, (1 << 32) | icmp_codes, -1))


def _tuple_bytes(rows: FlowRows) -> np.ndarray:
    """Per row, the 5-tuple as the frame shows it (ip_version, protocol, addresses as text, ports, ICMP type
    and code), as a row of bytes: what the frame shows as null, or does not show (the prefix of an IPv4
    address), is zeroed, so that two rows are equal here exactly when their frame columns are."""
    n = len(rows)
    ip = rows.ip_version > 0
    addresses = np.concatenate(
        [rows.saddr.view(np.uint8).reshape(n, 16), rows.daddr.view(np.uint8).reshape(n, 16)], axis=1
    )
    v4 = rows.ip_version == 4
    addresses[v4, :12] = 0
    addresses[v4, 16:28] = 0
    addresses[~v4 & (rows.ip_version != 6)] = 0  # not IP: no address shown
    header = np.zeros((n, 2), dtype=np.uint8)
    header[:, 0], header[:, 1] = rows.ip_version, np.where(ip, rows.proto, 0)
    ports = _port_keys(rows).view(np.uint8).reshape(n, 8)
    return np.concatenate([header, ports, addresses], axis=1)


def _place_bytes(rows: FlowRows) -> np.ndarray:
    """Per row, (ifindex, direction) as the frame shows them, as a row of bytes (no ifindex: -1)."""
    n = len(rows)
    ifindex = np.where(rows.ifindex_known, rows.ifindex.astype(np.int64), -1)
    return np.concatenate([ifindex.view(np.uint8).reshape(n, 8), rows.direction.reshape(n, 1) & 1], axis=1)


def _first_match(table: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """For each wanted code, the position of its first occurrence in `table`, or -1."""
    distinct, first = np.unique(table, return_index=True)
    if len(distinct) == 0:
        return np.full(len(wanted), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(distinct, wanted), len(distinct) - 1)
    return np.where(distinct[at] == wanted, first[at], -1)


def matching_rows(rows: FlowRows, counters: FlowRows) -> np.ndarray:
    """For each counter row, the index of the flow row it joins (see the module's join rule), or -1."""
    target = np.full(len(counters), -1, dtype=np.int64)
    if len(rows) == 0 or len(counters) == 0:
        return target
    # Only rows with the ports of some counter can match: the others are left out before the keys are
    # built and hashed (a few counters against 100k flows: the join's cost does not grow with the flows).
    candidates = np.flatnonzero(np.isin(_port_keys(rows), _port_keys(counters)))
    if len(candidates) == 0:
        return target
    subset = rows.take(candidates)
    # Latest first; stable, so that of equal times the earlier row (an original before its copies) wins.
    latest_first = np.argsort(-subset.last_seen_ns.astype(np.int64), kind="stable")
    order = candidates[latest_first]
    tuples = row_codes(np.concatenate([_tuple_bytes(subset), _tuple_bytes(counters)]))
    places = row_codes(np.concatenate([_place_bytes(subset), _place_bytes(counters)]))
    exact_codes = tuples * (places.max() + 1) + places
    n = len(subset)
    here = counters.named
    exact = _first_match(exact_codes[:n][latest_first], exact_codes[n:])
    target[here & (exact >= 0)] = order[exact[here & (exact >= 0)]]
    by_tuple = _first_match(tuples[:n][latest_first], tuples[n:])
    rest = (target < 0) & (counters.ip_version > 0) & (by_tuple >= 0)
    target[rest] = order[by_tuple[rest]]
    return target


def _with_new_rows(rows: FlowRows, counters: FlowRows, target: np.ndarray) -> tuple[FlowRows, np.ndarray]:
    """Appends one row per distinct unmatched counter key (its times spanning theirs, nothing counted yet);
    returns the rows and every counter's row."""
    unmatched = np.flatnonzero(target < 0)
    if len(unmatched) == 0:
        return rows, target
    pending = counters.take(unmatched)
    here = pending.named.astype(np.uint8).reshape(-1, 1)
    groups = row_codes(np.concatenate([_tuple_bytes(pending), _place_bytes(pending), here], axis=1))
    first = first_rows(groups)
    count = len(first)
    fresh = pending.take(first)
    fresh.first_seen_ns = np.full(count, np.iinfo(np.uint64).max, dtype=np.uint64)
    fresh.last_seen_ns = np.zeros(count, dtype=np.uint64)
    np.minimum.at(fresh.first_seen_ns, groups, pending.first_seen_ns)
    np.maximum.at(fresh.last_seen_ns, groups, pending.last_seen_ns)
    target = target.copy()
    target[unmatched] = len(rows) + groups
    return rows.append(fresh), target


def _packets_measured(context: AggregationContext) -> bool:
    return any("packets" in family.fills for family in context.active)


def _drained_counter_rows(keys: np.ndarray, stats: np.ndarray, context: AggregationContext) -> FlowRows:
    """Rows for a drained counter map (drops or TCP), keyed by flow and network namespace."""
    return counter_rows(
        keys["flow"],
        keys["netns"],
        stats["first_seen_ns"],
        stats["last_seen_ns"],
        context.netns,
        _packets_measured(context),
    )


def _runs_start(values: np.ndarray) -> np.ndarray:
    """Where each run of equal values begins in a sorted array."""
    return np.concatenate([[True], values[1:] != values[:-1]]) if len(values) else np.zeros(0, dtype=bool)


# ---- drops -----------------------------------------------------------------------------------------------


def join_drops(
    rows: FlowRows,
    drops: FlowRows,
    reasons: np.ndarray,
    reason_names: np.ndarray,
    packets: np.ndarray,
    nbytes: np.ndarray,
) -> FlowRows:
    """Rows with drop_packets/drop_bytes/drop_reason joined (one reason per row; see the module's rule).
    `drops`: a row per drop counter (counter_rows); `reasons`: their kernel codes, `reason_names` their names."""
    if len(drops) == 0:
        return rows
    target = matching_rows(rows, drops)
    rows, target = _with_new_rows(rows, drops, target)
    # Per (row, reason name): the drops summed. The reason with the most drops stays on the flow's row; ties
    # go to the name (none first), so the choice is stable; the others become copies of the row.
    text = np.where(pd.isna(reason_names), "\0", reason_names).astype(object)
    name_codes, distinct_names = pd.factorize(text)
    groups = row_codes(np.stack([target, name_codes.astype(np.int64)], axis=1).view(np.uint8).reshape(len(target), 16))
    first = first_rows(groups)
    count = len(first)
    row, reason = target[first], np.asarray(reasons, dtype=np.uint32)[first]
    name_rank = np.argsort(np.argsort(np.asarray(distinct_names, dtype=object), kind="stable"))[name_codes[first]]
    summed_packets, summed_bytes = np.zeros(count, dtype=np.uint64), np.zeros(count, dtype=np.uint64)
    np.add.at(summed_packets, groups, np.asarray(packets, dtype=np.uint64))
    np.add.at(summed_bytes, groups, np.asarray(nbytes, dtype=np.uint64))
    order = np.lexsort((name_rank, ~summed_packets, row))
    primary = _runs_start(row[order])
    kept, others = order[primary], order[~primary]
    rows.drop_packets[row[kept]] = summed_packets[kept]
    rows.drop_bytes[row[kept]] = summed_bytes[kept]
    rows.drop_reason[row[kept]] = reason[kept]
    if len(others) == 0:
        return rows
    copies = rows.take(row[others])
    copies.packets[:] = 0
    copies.bytes[:] = 0
    copies.tcp_flags_known[:] = False
    copies.retransmits[:] = 0
    copies.resets[:] = 0
    copies.rtt_known[:] = False
    copies.drop_packets, copies.drop_bytes = summed_packets[others], summed_bytes[others]
    copies.drop_reason = reason[others]
    return rows.append(copies)


def contribute_drops(
    rows: FlowRows, drain: KernelDrain, context: AggregationContext, coverage: Coverage
) -> tuple[FlowRows, np.ndarray]:
    keys, stats = drain.maps.get("drops", (np.zeros(0, DROP_KEY), np.zeros(0, DROP_STATS)))
    seen = drain.counter("drops")
    coverage.add("drop_map", produced=seen, delivered=int(stats["packets"].sum()), lost=drain.counter("drop_map_full"))
    sampled_out = drain.counter("drop_events_sampled_out")
    coverage.add("drop_event_sampling", produced=seen, delivered=seen - sampled_out, lost=sampled_out)
    if len(keys):  # nothing to join otherwise (an idle interval)
        drops = _drained_counter_rows(keys, stats, context)
        names = kernel_names(context).drop_reason_names(keys["reason"])
        rows = join_drops(rows, drops, keys["reason"], names, stats["packets"], stats["bytes"])
    return rows, family_events(drain, (KIND["drop"],))


# ---- TCP counters ----------------------------------------------------------------------------------------


def join_tcp(
    rows: FlowRows,
    counters: FlowRows,
    retransmits: np.ndarray,
    resets: np.ndarray,
    srtt_us: np.ndarray,
    rtt_sampled: np.ndarray,
) -> FlowRows:
    """Rows with retransmits and resets added, and rtt_us set to the latest RTT sample of the flow (by the
    counters' last_seen_ns; of equal times, the last counter's). `counters`: a row per TCP counter."""
    if len(counters) == 0:
        return rows
    target = matching_rows(rows, counters)
    rows, target = _with_new_rows(rows, counters, target)
    np.add.at(rows.retransmits, target, np.asarray(retransmits, dtype=np.uint64))
    np.add.at(rows.resets, target, np.asarray(resets, dtype=np.uint64))
    if rtt_sampled.any():
        row, at, rtt = target[rtt_sampled], counters.last_seen_ns[rtt_sampled], srtt_us[rtt_sampled]
        order = np.lexsort((at, row))  # stable: of equal (row, time), the later counter comes last
        last = order[np.concatenate([_runs_start(row[order])[1:], [True]])]
        rows.rtt_us[row[last]] = rtt[last]
        rows.rtt_known[row[last]] = True
    return rows


def contribute_tcp(
    rows: FlowRows, drain: KernelDrain, context: AggregationContext, coverage: Coverage
) -> tuple[FlowRows, np.ndarray]:
    keys, stats = drain.maps.get("tcp", (np.zeros(0, TCP_KEY), np.zeros(0, TCP_STATS)))
    seen = drain.counter("tcp_counts")
    counted = int(stats["retransmits"].sum() + stats["resets"].sum())
    coverage.add("tcp_map", produced=seen, delivered=counted, lost=drain.counter("tcp_map_full"))
    sampled_out = drain.counter("tcp_events_sampled_out")
    coverage.add("tcp_event_sampling", produced=seen, delivered=seen - sampled_out, lost=sampled_out)
    rtt_lost = drain.counter("rtt_map_full")
    samples = int(stats["rtt_samples"].sum())
    coverage.add("rtt_samples", produced=samples + rtt_lost, delivered=samples, lost=rtt_lost)
    if len(keys):
        counters = _drained_counter_rows(keys, stats, context)
        rows = join_tcp(
            rows, counters, stats["retransmits"], stats["resets"], stats["srtt_us"], stats["rtt_samples"] > 0
        )
    return rows, family_events(drain, TCP_KINDS)


# ---- connection events ------------------------------------------------------------------------------------


def contribute_sockets(
    rows: FlowRows, drain: KernelDrain, context: AggregationContext, coverage: Coverage
) -> tuple[FlowRows, np.ndarray]:
    full = drain.counter("sock_map_full")
    if full:
        coverage.add("socket_owners", produced=full, lost=full)  # connections whose events lack pid/duration
    return rows, family_events(drain, SOCKET_KINDS)

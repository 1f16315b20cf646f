"""The data side of `flowscope top`: a window of recent intervals, grouped, filtered and ranked.

Everything here is pandas and runs off the UI thread; the Textual app and the plain `-o table` output only
receive the ready results (`TopRows`, `DropsTable`, `Detail`, `Totals`). Nothing here imports textual.

Rows are keyed by flowscope.analysis.grouping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from flowscope.analysis.grouping import (
    GROUPING_BY_NAME,
    GROUPINGS,
    UNKNOWN,
    Grouping,
    key_mask,
    number_column,
    pod_names,
    text_column,
)
from flowscope.coverage import Coverage
from flowscope.display import endpoint
from flowscope.filters import MATCH_ALL, Filter
from flowscope.schema import FLOW_COUNTERS, FlowBatch

CONNECT_KINDS = ("connect", "accept")
DROP_COUNTERS = ("drop_packets", "drop_bytes")
PEER_COUNTERS = ("bytes", "packets", "drop_packets")


@dataclass(frozen=True)
class Metric:
    name: str  # column of TopRows.frame
    title: str  # heading in the TUI and in -o table
    unit: str  # rate | count | duration


METRICS = (
    Metric("bytes_per_s", "BYTES/S", "bytes_rate"),
    Metric("packets_per_s", "PKTS/S", "rate"),
    Metric("drops", "DROPS", "count"),
    Metric("retransmits", "RETX", "count"),
    Metric("resets", "RST", "count"),
    Metric("rtt_us", "RTT", "duration"),
    Metric("connections", "CONN", "count"),
    Metric("closes", "CLOSE", "count"),
)
SORT_KEYS = ("key", *(m.name for m in METRICS))

# The flow columns top needs: the filter's fields, the grouping keys and the counters. Trimming on
# arrival keeps a window of many intervals of 100k flows affordable.
KEPT_FLOW_COLUMNS = (
    "node",
    "ifname",
    "direction",
    "protocol",
    "src_ip",
    "src_port",
    "dst_ip",
    "dst_port",
    *FLOW_COUNTERS,
    "drop_reason",
    "rtt_us",
    *(f"{side}_{name}" for side in ("src", "dst") for name in ("namespace", "pod", "workload", "pid", "comm", "node")),
)

SPARK = "▁▂▃▄▅▆▇█"
TREND_WIDTH = 12  # intervals a row's trend shows


# --- the window ---------------------------------------------------------------------------------------


@dataclass
class _Interval:
    time_end: pd.Timestamp
    seconds: float
    flows: pd.DataFrame
    events: pd.DataFrame
    # Per view (grouping + filter), computed when first needed and dropped when the view changes.
    passed: np.ndarray | None = None  # the flows that pass the filter (dropped when the filter changes)
    groups: pd.DataFrame | None = None  # per key: sums, rtt mean, connection counts
    drops: pd.DataFrame | None = None  # per key and drop reason: drop packets and bytes
    peers: tuple[tuple, pd.DataFrame] | None = None  # a detail's key and its peers here (see _interval_peers)


@dataclass(frozen=True)
class Totals:
    """Figures for the header: the last interval, unfiltered, and the accounting so far."""

    time_end: pd.Timestamp | None
    seconds: float
    flows: int
    flows_per_s: float
    bytes_per_s: float
    packets_per_s: float
    filtered_flows: int  # flows of the last interval that pass the filter
    intervals: int  # intervals received so far
    coverage: Coverage


@dataclass(frozen=True)
class TopRows:
    """The ranked rows of the rate window: columns "key", "label", the METRICS (rates over the window, counts
    of the last interval), "bytes" and "packets" (the last interval's counts) and "trend"."""

    grouping: str
    sort: str
    descending: bool
    frame: pd.DataFrame  # index: position; column "key" holds the key tuple
    groups: int  # how many groups the rate window has (the frame holds the top ones)
    rate_window: float = 2.0  # seconds the rows' rates average over


@dataclass(frozen=True)
class DropsTable:
    """Drop reasons of the window ranked by dropped packets, with their top victims in the current grouping."""

    frame: pd.DataFrame  # reason, last, window, window_bytes, share, victims (list of (label, packets))


@dataclass(frozen=True)
class Detail:
    grouping: str
    key: tuple
    label: str
    series: pd.DataFrame  # per interval: time_end, bytes_per_s, packets_per_s, drops, retransmits, resets, rtt_us
    # Over the last TopModel.detail_intervals: peer, direction (→ to the peer, ← from it), bytes, packets,
    # drop_packets
    peers: pd.DataFrame
    drops: pd.DataFrame  # over the window: reason, packets, bytes
    events: pd.DataFrame  # over the last TopModel.detail_intervals, newest first: time, kind, flow, reason


RATE_WINDOWS = (2.0, 10.0, 40.0)  # what `w` cycles through in the TUI (iftop's averages)


@dataclass
class TopModel:
    """The last intervals of a BatchSource, and the rows of `top` for the current view.

    Not thread-safe: the app calls it from one worker at a time.
    """

    history: int = 60  # intervals kept for trends, detail series and the drops view
    row_budget: int = 2_000_000  # flow rows kept in the window; older intervals go first beyond it
    detail_intervals: int = 10  # recent intervals searched for a detail's peers and events
    fallback_seconds: float = 1.0  # interval length when a batch has no usable times
    # Seconds of recent intervals the rows' rates average over (iftop's 2, 10 and 40 s): a row that went
    # idle stays, its rate fading, until the window has passed it.
    rate_window: float = 2.0
    grouping: str = "flow"
    filter: Filter = MATCH_ALL
    sort: str = "bytes_per_s"
    descending: bool = True
    window: deque[_Interval] = field(default_factory=deque)
    coverage: Coverage = field(default_factory=Coverage)
    intervals: int = 0

    # --- input ---------------------------------------------------------------------------------------

    def add(self, batch: FlowBatch) -> None:
        self.account(batch)
        self.keep(batch)

    def account(self, batch: FlowBatch) -> None:
        """Counts the batch's interval and its loss accounting (even while the display is paused)."""
        self.coverage.merge(batch.coverage)
        self.intervals += 1

    def keep(self, batch: FlowBatch) -> None:
        """Adds the batch to the window that rows, trends, drops and details are computed from."""
        seconds = self.fallback_seconds
        if batch.time_start is not None and batch.time_end is not None and not pd.isna(batch.time_start):
            span = (batch.time_end - batch.time_start).total_seconds()
            if span > 0:
                seconds = span
        flows = batch.flows[[c for c in KEPT_FLOW_COLUMNS if c in batch.flows.columns]]
        self.window.append(_Interval(batch.time_end, seconds, flows, batch.events))
        rows = sum(len(i.flows) for i in self.window)
        while len(self.window) > 1 and (len(self.window) > self.history or rows > self.row_budget):
            rows -= len(self.window.popleft().flows)

    # --- view ----------------------------------------------------------------------------------------

    def set_view(
        self,
        *,
        grouping: str | None = None,
        filter: Filter | None = None,
        sort: str | None = None,
        descending: bool | None = None,
        rate_window: float | None = None,
    ) -> None:
        if rate_window is not None:
            if not rate_window > 0:
                raise ValueError(f"the rate window is a positive number of seconds, not {rate_window!r}")
            self.rate_window = float(rate_window)
        if grouping is not None and grouping not in GROUPING_BY_NAME:
            raise ValueError(f"unknown grouping {grouping!r}; groupings are {', '.join(GROUPINGS)}")
        if sort is not None and sort not in SORT_KEYS:
            raise ValueError(f"unknown sort column {sort!r}; columns are {', '.join(SORT_KEYS)}")
        filter_changes = filter is not None and filter != self.filter
        view_changes = filter_changes or (grouping is not None and grouping != self.grouping)
        self.grouping = grouping or self.grouping
        self.filter = filter if filter is not None else self.filter
        self.sort = sort or self.sort
        self.descending = self.descending if descending is None else descending
        for interval in self.window if view_changes else ():
            interval.groups = interval.drops = interval.peers = None
            if filter_changes:
                interval.passed = None

    @property
    def group(self) -> Grouping:
        return GROUPING_BY_NAME[self.grouping]

    # --- results -------------------------------------------------------------------------------------

    def totals(self) -> Totals:
        if not self.window:
            return Totals(None, 0.0, 0, 0.0, 0.0, 0.0, 0, self.intervals, self.coverage)
        last = self.window[-1]
        flows = last.flows
        filtered = int(self._passed(last).sum()) if self.filter else len(flows)
        return Totals(
            last.time_end,
            last.seconds,
            len(flows),
            len(flows) / last.seconds,
            _total(flows, "bytes") / last.seconds,
            _total(flows, "packets") / last.seconds,
            filtered,
            self.intervals,
            self.coverage,
        )

    def rows(self, limit: int, trend_width: int = TREND_WIDTH, arrow: str = "→") -> TopRows:
        """The top `limit` groups of the last interval in the current sort order, with a bytes/s trend."""
        if not self.window:
            return TopRows(self.grouping, self.sort, self.descending, _empty_rows(), 0, self.rate_window)
        last = self.window[-1]
        window, seconds = self._window_groups()
        # The rows are the keys of the rate window; their counts are the last interval's (0 for a row idle
        # in it), so a script summing the rows of every interval gets totals; the rates are the window's.
        groups = self._groups(last)
        if len(window) != len(groups):
            groups = groups.reindex(window.index)
            idle = ~window.index.isin(self._groups(last).index)
            groups.loc[idle, [c for c in groups.columns if c != "rtt_us"]] = 0
        table = pd.DataFrame(
            {
                "bytes": groups["bytes"],
                "packets": groups["packets"],
                "bytes_per_s": window["bytes"] / seconds,
                "packets_per_s": window["packets"] / seconds,
                "drops": groups["drop_packets"],
                "retransmits": groups["retransmits"],
                "resets": groups["resets"],
                "rtt_us": groups["rtt_us"],
                "connections": groups["connections"],
                "closes": groups["closes"],
            },
            index=window.index,
        )
        if self.sort == "key":
            ranked = table.sort_index(ascending=not self.descending)
        else:
            ranked = table.sort_values(
                [self.sort, "bytes_per_s"], ascending=[not self.descending, False], na_position="last", kind="stable"
            )
        top = ranked.head(max(limit, 0))
        keys = list(top.index)
        frame = top.reset_index(drop=True)
        frame.insert(0, "key", pd.Series(keys, dtype=object))
        pods = self._pod_names(last, keys)
        frame.insert(1, "label", [self.group.label(k, arrow, pods) for k in keys])
        frame["trend"] = self._trends(top.index, trend_width)
        return TopRows(self.grouping, self.sort, self.descending, frame, len(table), self.rate_window)

    def _window_groups(self) -> tuple[pd.DataFrame, float]:
        """Per key, the sums over the intervals that ended within the rate window (the last one at least), and
        the seconds they cover; RTT is the mean of the intervals' means."""
        last = self.window[-1]
        recent = [last]
        if not pd.isna(last.time_end):
            for interval in reversed(list(self.window)[:-1]):
                if (
                    pd.isna(interval.time_end)
                    or (last.time_end - interval.time_end).total_seconds() >= self.rate_window
                ):
                    break
                recent.append(interval)
        if len(recent) == 1:
            return self._groups(last), last.seconds
        frames = [self._groups(interval) for interval in recent]
        combined = pd.concat(frames)
        by_key = combined.groupby(level=list(range(combined.index.nlevels)), sort=False)
        sums = by_key[[c for c in combined.columns if c != "rtt_us"]].sum(min_count=1)
        sums["rtt_us"] = by_key["rtt_us"].mean()
        sums = sums[list(frames[0].columns)]
        return _as_tuple_keys(sums, list(self.group.key_names)), sum(i.seconds for i in recent)

    def drops(self, victims: int = 3) -> DropsTable:
        """Drop reasons over the window, most dropped packets first, with the groups that lost the most."""
        window_drops = [self._drops(i) for i in self.window]
        present = [d for d in window_drops if not d.empty]
        columns = ["reason", "last", "window", "window_bytes", "share", "victims"]
        if not present:
            return DropsTable(pd.DataFrame(columns=columns))
        every = pd.concat(present)
        names = list(self.group.key_names)
        by_reason = every.groupby("reason", sort=False)[["packets", "bytes"]].sum()
        last = window_drops[-1].groupby("reason", sort=False)["packets"].sum()
        by_victim = every.groupby(["reason", *names], sort=False)["packets"].sum().reset_index()
        by_victim = by_victim.sort_values(["reason", "packets"], ascending=[True, False], kind="stable")
        top_victims = by_victim.groupby("reason", sort=False).head(victims)
        victim_lists: dict[str, list[tuple[str, int]]] = {}
        keys = [tuple(getattr(record, n) for n in names) for record in top_victims.itertuples(index=False)]
        pods: dict[str, str] = {}
        for interval in self.window:
            pods |= self._pod_names(interval, keys)
        for key, record in zip(keys, top_victims.itertuples(index=False), strict=True):
            victim_lists.setdefault(record.reason, []).append((self.group.label(key, pods=pods), int(record.packets)))
        ranked = by_reason.sort_values(["packets"], ascending=False, kind="stable")
        total = max(int(ranked["packets"].sum()), 1)
        frame = pd.DataFrame(
            {
                "reason": ranked.index.to_numpy(dtype=object),
                "last": [int(last.get(r, 0)) for r in ranked.index],
                "window": ranked["packets"].to_numpy(dtype=np.int64),
                "window_bytes": ranked["bytes"].to_numpy(dtype=np.int64),
                "share": ranked["packets"].to_numpy(dtype=float) / total,
                "victims": [victim_lists.get(r, []) for r in ranked.index],
            }
        )
        return DropsTable(frame)

    def detail(self, key: tuple, events: int = 50) -> Detail:
        """Everything the window knows about one group: its series, peers, drops by reason and recent events."""
        group = self.group
        names = list(group.key_names)
        series_rows = []
        drops = []
        for interval in self.window:
            row = _row(self._groups(interval), key)
            series_rows.append(
                {
                    "time_end": interval.time_end,
                    "bytes_per_s": (row["bytes"] if row is not None else 0) / interval.seconds,
                    "packets_per_s": (row["packets"] if row is not None else 0) / interval.seconds,
                    "drops": row["drop_packets"] if row is not None else 0,
                    "retransmits": row["retransmits"] if row is not None else 0,
                    "resets": row["resets"] if row is not None else 0,
                    "rtt_us": row["rtt_us"] if row is not None else np.nan,
                }
            )
            interval_drops = self._drops(interval)
            if not interval_drops.empty:
                drops.append(interval_drops[key_mask(interval_drops, names, key)])
        series = pd.DataFrame(series_rows)
        if drops and any(not d.empty for d in drops):
            by_reason = pd.concat(drops).groupby("reason", sort=False)[["packets", "bytes"]].sum()
            by_reason = by_reason.sort_values("packets", ascending=False, kind="stable").reset_index()
        else:
            by_reason = pd.DataFrame({"reason": [], "packets": [], "bytes": []})
        recent = list(self.window)[-self.detail_intervals :]
        return Detail(
            self.grouping,
            key,
            group.label(key),
            series,
            self._peers(recent, key),
            by_reason,
            self._events(recent, key, events),
        )

    # --- per-interval work, cached per view ----------------------------------------------------------

    def _passed(self, interval: _Interval) -> np.ndarray:
        """Which of the interval's flows pass the filter: evaluated once per interval and filter."""
        if interval.passed is None:
            interval.passed = self.filter.flows_mask(interval.flows)
        return interval.passed

    def _flows(self, interval: _Interval) -> pd.DataFrame:
        return interval.flows[self._passed(interval)] if self.filter else interval.flows

    def _groups(self, interval: _Interval) -> pd.DataFrame:
        if interval.groups is None:
            interval.groups = self._aggregate(interval)
        return interval.groups

    def _aggregate(self, interval: _Interval) -> pd.DataFrame:
        group = self.group
        names = list(group.key_names)
        flows = self._flows(interval)
        # Per key: the sums of the flow counters and the mean RTT.
        keyed = group.keyed(flows, [c for c in (*FLOW_COUNTERS, "rtt_us") if c in flows.columns])
        by_key = keyed.groupby(names, sort=False)
        result = (
            by_key[[c for c in FLOW_COUNTERS if c in keyed.columns]]
            .sum(min_count=1)
            .reindex(columns=list(FLOW_COUNTERS))
        )
        result["rtt_us"] = by_key["rtt_us"].mean() if "rtt_us" in keyed.columns else np.nan
        events = self.filter.events(interval.events)
        if len(events) and "kind" in events.columns:
            flagged = events.assign(
                connections=_first_per_connection(events, CONNECT_KINDS),
                closes=_first_per_connection(events, ("close",)),
            )
            flagged = flagged[(flagged["connections"] > 0) | (flagged["closes"] > 0)]  # other events make no row
            counts = group.keyed(flagged, ["connections", "closes"]).groupby(names, sort=False)
            counts = _as_tuple_keys(counts[["connections", "closes"]].sum(), names)
        else:
            counts = None
        return _with_counts(_as_tuple_keys(result, names), counts)

    def _drops(self, interval: _Interval) -> pd.DataFrame:
        """Dropped packets and bytes per key and reason (only rows with drops, so this stays small)."""
        if interval.drops is None:
            flows = self._flows(interval)
            names = list(self.group.key_names)
            if "drop_packets" in flows.columns:
                flows = flows[flows["drop_packets"].to_numpy(dtype=np.int64, na_value=0) > 0]
            else:
                flows = flows.iloc[0:0]
            keyed = self.group.keyed(flows.assign(reason=text_column(flows, "drop_reason")), ["reason", *DROP_COUNTERS])
            keyed["reason"] = keyed["reason"].replace("", UNKNOWN)
            interval.drops = (
                keyed.groupby(["reason", *names], sort=False)[list(DROP_COUNTERS)]
                .sum()
                .set_axis(["packets", "bytes"], axis=1)
                .reset_index()
            )
        return interval.drops

    def _trends(self, keys: pd.Index, width: int) -> list[str]:
        if width <= 0:
            return [""] * len(keys)
        recent = list(self.window)[-width:]
        matrix = np.zeros((len(keys), len(recent)))
        for column, interval in enumerate(recent):
            if interval.groups is None:  # not grouped for this view yet: see backfill()
                continue
            rates = interval.groups["bytes"].reindex(keys)
            matrix[:, column] = rates.to_numpy(dtype=float, na_value=0.0) / interval.seconds
        return sparklines(matrix)

    def backfill(self, intervals: int = TREND_WIDTH, limit: int | None = None) -> bool:
        """Groups the recent intervals that trends read and the current view has not grouped yet (the
        newest first, at most `limit` of them).

        After a view change the rows come first (only the last interval is grouped for them) and the
        trends follow once this has run; returns whether there was anything to do.
        """
        missing = [i for i in reversed(list(self.window)[-intervals:]) if i.groups is None][:limit]
        for interval in missing:
            self._groups(interval)
        return bool(missing)

    def _pod_names(self, interval: _Interval, keys: list[tuple]) -> dict[str, str]:
        """The pods of the addresses in flow keys (the flow view names its ends by pod where known)."""
        if self.group.name != "flow" or not keys:
            return {}
        names = list(self.group.key_names)
        addresses = {str(k[names.index(n)]) for k in keys for n in ("src_ip", "dst_ip")}
        return pod_names(interval.flows, addresses)

    def _peers(self, intervals: list[_Interval], key: tuple) -> pd.DataFrame:
        """Who the group talked to: the other end of its flows, by identity or else by address.

        A flow's peer is its reply: the same endpoints the other way round.
        """
        group = self.group
        if group.name == "flow":
            return self._flow_peers(intervals, key)
        peer_group = group.with_ip_fallback()
        parts = [part for part in (self._interval_peers(i, key) for i in intervals) if len(part)]
        if not parts:
            return pd.DataFrame({"peer": [], "direction": [], **{c: [] for c in PEER_COUNTERS}})
        peer_names = list(peer_group.key_names)
        summed = pd.concat(parts, ignore_index=True).groupby([*peer_names, "direction"], sort=False).sum()
        summed = summed.sort_values("bytes", ascending=False, kind="stable").reset_index()
        return pd.DataFrame(
            {
                "peer": [peer_group.label(k) for k in summed[peer_names].itertuples(index=False, name=None)],
                "direction": summed["direction"].to_numpy(dtype=object),
                **{c: summed[c].to_numpy() for c in PEER_COUNTERS},
            }
        )

    def _interval_peers(self, interval: _Interval, key: tuple) -> pd.DataFrame:
        """The peers of one group in one interval with their counters, summed; kept for the key last asked
        (an open detail reads the same intervals on every refresh, and only the newest is new)."""
        if interval.peers is not None and interval.peers[0] == key:
            return interval.peers[1]
        group = self.group
        peer_group = group.with_ip_fallback()
        flows = self._flows(interval)
        parts = []
        for end, other, direction in (("src", "dst", "→"), ("dst", "src", "←")):
            mine, _ = group.side_keys(flows, end)
            here = key_mask(mine, list(group.key_names), key)
            if here.any():
                theirs, _ = peer_group.side_keys(flows[here], other)
                part = pd.DataFrame(theirs).assign(direction=direction)
                for counter in PEER_COUNTERS:
                    part[counter] = number_column(flows, counter)[here].clip(min=0)
                parts.append(part)
        peers = pd.DataFrame()
        if parts:
            by_peer = pd.concat(parts, ignore_index=True).groupby([*peer_group.key_names, "direction"], sort=False)
            peers = by_peer.sum().reset_index()
        interval.peers = (key, peers)
        return peers

    def _flow_peers(self, intervals: list[_Interval], key: tuple) -> pd.DataFrame:
        protocol, src_ip, src_port, dst_ip, dst_port = key
        reply = (protocol, dst_ip, dst_port, src_ip, src_port)
        pods = self._pod_names(intervals[-1], [key]) if intervals else {}
        rows = []
        for flow_key, direction in ((key, "→"), (reply, "←")):
            sums = dict.fromkeys(PEER_COUNTERS, 0)
            for interval in intervals:
                row = _row(self._groups(interval), flow_key)
                for counter in PEER_COUNTERS:
                    if row is not None and not pd.isna(row[counter]):
                        sums[counter] += int(row[counter])
            rows.append({"peer": endpoint(pods.get(dst_ip, dst_ip), dst_port), "direction": direction, **sums})
        return pd.DataFrame(rows)

    def _events(self, intervals: list[_Interval], key: tuple, limit: int) -> pd.DataFrame:
        names = list(self.group.key_names)
        parts = []
        for interval in intervals:
            events = self.filter.events(interval.events)
            if len(events):
                keyed = self.group.keyed(events, [])
                rows = np.unique(keyed["row"].to_numpy()[key_mask(keyed, names, key)])  # once if both ends match
                parts.append(events.iloc[rows])
        if not parts:
            return pd.DataFrame({"time": [], "kind": [], "flow": [], "reason": []})
        recent = pd.concat(parts, ignore_index=True).sort_values("time", ascending=False, kind="stable").head(limit)
        flows = GROUPING_BY_NAME["flow"]
        flow_keys = flows.keyed(recent, [])[list(flows.key_names)]
        pods = pod_names(recent)  # events carry their ends' identity themselves
        return pd.DataFrame(
            {
                "time": recent["time"].to_numpy(),
                "kind": text_column(recent, "kind"),
                "flow": [flows.label(k, pods=pods) for k in flow_keys.itertuples(index=False, name=None)],
                "reason": text_column(recent, "drop_reason"),
            }
        )


def _as_tuple_keys(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Keys as a MultiIndex even for one key column, so every key is a tuple."""
    if not isinstance(frame.index, pd.MultiIndex):
        frame.index = pd.MultiIndex.from_arrays([frame.index], names=names)
    return frame


def _with_counts(groups: pd.DataFrame, counts: pd.DataFrame | None) -> pd.DataFrame:
    """Adds connection counts per key; keys with connections but no flows get a row of their own.

    Placed by position rather than joined: a join of two 100k-key MultiIndexes costs more than the
    grouping itself, while the lookup builds the index engine that trends reuse anyway.
    """
    groups["connections"] = np.zeros(len(groups), dtype=np.int64)
    groups["closes"] = np.zeros(len(groups), dtype=np.int64)
    if counts is None or counts.empty:
        return groups
    positions = groups.index.get_indexer(counts.index)
    known = positions >= 0
    for column in ("connections", "closes"):
        values = groups[column].to_numpy(copy=True)
        values[positions[known]] = counts[column].to_numpy()[known]
        groups[column] = values
    if known.all():
        return groups
    return pd.concat([groups, counts[~known].astype(np.int64)])


def _first_per_connection(events: pd.DataFrame, kinds: tuple[str, ...]) -> np.ndarray:
    """1 for the first event of `kinds` of each connection, else 0.

    A connection between two local sockets is seen at both ends (connect and accept, two closes) and
    still counts once; its ends are compared without regard to which one the event calls the source.
    """
    chosen = events["kind"].isin(kinds).to_numpy(dtype=bool, na_value=False)
    ends = [
        pd.Series(text_column(events, f"{side}_ip"))
        + " "
        + pd.Series(number_column(events, f"{side}_port")).astype(str)
        for side in ("src", "dst")
    ]
    one = ends[0].to_numpy(dtype=object)
    other = ends[1].to_numpy(dtype=object)
    connection = pd.DataFrame(
        {
            "chosen": chosen,
            "protocol": text_column(events, "protocol"),
            "low": np.where(one <= other, one, other),
            "high": np.where(one <= other, other, one),
        }
    )
    return (chosen & ~connection.duplicated().to_numpy()).astype(np.int64)


def _row(groups: pd.DataFrame, key: tuple) -> pd.Series | None:
    if key not in groups.index:
        return None
    return groups.iloc[groups.index.get_loc(key)]


def _total(frame: pd.DataFrame, name: str) -> float:
    return float(frame[name].sum()) if name in frame.columns else 0.0


def _empty_rows() -> pd.DataFrame:
    return pd.DataFrame(columns=["key", "label", *(m.name for m in METRICS), "trend"])


def sparklines(matrix: np.ndarray) -> list[str]:
    """One bar string per row, each scaled to its own maximum (a trend, not a comparison between rows)."""
    matrix = matrix.astype(float)
    peak = matrix.max(axis=1, keepdims=True)
    scaled = np.divide(matrix, peak, out=np.zeros_like(matrix), where=peak > 0)
    levels = np.clip(np.ceil(scaled * (len(SPARK) - 1)).astype(int), 0, len(SPARK) - 1)
    return ["".join(SPARK[level] for level in row) for row in levels]

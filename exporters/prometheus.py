"""The Prometheus output: `flowscope agent --metrics-addr 127.0.0.1:9464` serves /metrics.

Each interval's FlowBatch is summed on the sink's thread into counters (per node, direction and drop reason,
and — within a budget — per workload); the metric families are built then, once per interval, so a scrape only
hands over the latest ones (a custom collector: no label object per flow, no labels() on the data path) with
the pipeline's own state read at that moment (coverage, sink queues, probes, identity). prometheus-client
answers in OpenMetrics when the scraper asks for it.

The cardinality budget: every per-workload family has at most `budget` series. The keys with the most activity
in that family (decayed over recent intervals: bytes for traffic and drops, events for the TCP counters and
drop locations, samples for RTT) keep their labels; the rest fold into one series whose labels all read
"other". A key's own series grows only while it is kept and "other" takes its increments while it is folded,
so no series ever goes down (a key that comes back resumes where it stopped). A key not seen for `grace`
seconds, by the batches' own clock (a replay behaves as live), loses its series.

Which end labels a per-workload series is the label context (metrics.context): `local`, the end on this node
(egress: the source; ingress: the destination; socket events: the local socket), or `source`, `destination`
or `both` (source_* and destination_* labels). With metrics.server_port, traffic also carries the server's
port: the destination's, else the source's, and never one of the kernel's ephemeral range.
"""

from __future__ import annotations

import heapq
import logging
import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from flowscope.analysis.grouping import GROUPING_BY_NAME, counter_values, number_column, text_column
from flowscope.analysis.top import CONNECT_KINDS, first_per_connection
from flowscope.config import MetricsConfig
from flowscope.exporters.listen import ListenError, ListenFlags, uses_tls
from flowscope.schema import FlowBatch

log = logging.getLogger(__name__)

OTHER = "other"
DECAY = 0.8  # per interval: a key's rank follows its recent bytes, not its whole past
RTT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FAILED_FROM = "SYN_SENT"  # a connection closed from SYN_SENT never opened (refused, unreachable, timed out)
EPHEMERAL_PORTS = "/proc/sys/net/ipv4/ip_local_port_range"
DEFAULT_EPHEMERAL = (32768, 60999)  # the kernel's default, when the file cannot be read
LISTEN_FLAGS = ListenFlags(
    "--metrics-addr", "--metrics-tls-cert", "--metrics-tls-key", "--metrics-plaintext-anywhere", "/metrics",
    "who talks to whom",
)  # fmt: skip


def ephemeral_ports(path: str = EPHEMERAL_PORTS) -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections: a port in it is no service's."""
    try:
        with open(path, encoding="ascii") as handle:
            low, high = (int(part) for part in handle.read().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return low, high


# ---- one per-workload family's counters, within the budget ------------------------------------------------


@dataclass
class _Entry:
    own: np.ndarray  # the values of the key's own series (they grow only while it is kept)
    score: float  # decayed weight (bytes), its rank
    seen: float  # batch time (epoch seconds) the key last had records
    kept: bool | None = None  # None: new, not ranked yet


class Budgeted:
    """Counters by key, exposed as at most `budget` series: the top keys by score, and "other"."""

    def __init__(self, width: int, budget: int, grace: float) -> None:
        self.width = width
        self.budget = budget
        self.grace = grace
        self.entries: dict[tuple, _Entry] = {}
        self.other = np.zeros(width)
        self.folded_ever = False  # "other" has a series once anything folded into it
        self.folds = 0  # times a key went to "other": new beyond the budget, or out of the top

    def add(self, keys: Sequence[tuple], values: np.ndarray, weights: np.ndarray, now: float) -> None:
        """One interval: `values[i]` (width counters) of `keys[i]`, ranked by `weights[i]`."""
        for entry in self.entries.values():
            entry.score *= DECAY
        for key, weight in zip(keys, weights, strict=True):
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = _Entry(np.zeros(self.width), 0.0, now)
            entry.score += float(weight)
            entry.seen = now
        self._expire(now)
        self._rank()
        for key, row in zip(keys, values, strict=True):
            entry = self.entries[key]
            if entry.kept:
                entry.own += row
            else:
                self.other += row

    def _expire(self, now: float) -> None:
        for key in [k for k, e in self.entries.items() if e.seen < now - self.grace]:
            del self.entries[key]

    def _rank(self) -> None:
        if len(self.entries) <= self.budget and not self.folded_ever:
            top = set(self.entries)
        else:
            self.folded_ever = True
            top = set(heapq.nlargest(self.budget - 1, self.entries, key=lambda k: self.entries[k].score))  # +other
        for key, entry in self.entries.items():
            kept = key in top
            if not kept and entry.kept is not False:
                self.folds += 1
            entry.kept = kept

    @property
    def folded(self) -> int:
        """Keys whose records go to "other" now."""
        return sum(1 for e in self.entries.values() if not e.kept)

    def series(self, key_width: int) -> Iterator[tuple[tuple, np.ndarray]]:
        for key, entry in self.entries.items():
            if entry.kept:
                yield key, entry.own
        if self.folded_ever:
            yield (OTHER,) * key_width, self.other


def counts(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A counter column as float64, null (not measured) as 0: what it adds to a sum."""
    return np.nan_to_num(counter_values(frame[column]).astype(np.float64))


def sum_by(keys: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> tuple[list[tuple], np.ndarray]:
    """The distinct key tuples of the rows and each one's sums of `values` (nulls count as 0)."""
    if not len(next(iter(keys.values()))):
        return [], np.zeros((0, len(values)))
    frame = pd.DataFrame({**keys, **{f"v{i}": np.nan_to_num(v) for i, v in enumerate(values.values())}})
    grouped = frame.groupby(list(keys), sort=False)[[f"v{i}" for i in range(len(values))]].sum()
    index = grouped.index
    tuples = list(index) if isinstance(index, pd.MultiIndex) else [(k,) for k in index]
    return tuples, grouped.to_numpy(dtype=np.float64)


# ---- labels -------------------------------------------------------------------------------------------


class Labels:
    """The identity labels of the per-workload families, from metrics.context and metrics.labels."""

    def __init__(self, config: MetricsConfig) -> None:
        self.context = config.context
        self.grouping = GROUPING_BY_NAME[config.labels]
        fields = self.grouping.fields
        if self.context == "local":
            self.names: tuple[str, ...] = fields
        elif self.context == "both":
            self.names = (*(f"source_{f}" for f in fields), *(f"destination_{f}" for f in fields))
        else:
            self.names = tuple(f"{self.context}_{f}" for f in fields)

    def columns(self, frame: pd.DataFrame, local_is_source: np.ndarray) -> dict[str, np.ndarray]:
        src, _ = self.grouping.side_keys(frame, "src")
        dst, _ = self.grouping.side_keys(frame, "dst")
        fields = self.grouping.fields
        if self.context == "local":
            return {f: np.where(local_is_source, src[f], dst[f]) for f in fields}
        sides = {"source": src, "destination": dst}
        chosen = ("source", "destination") if self.context == "both" else (self.context,)
        return {f"{side}_{f}": sides[side][f] for side in chosen for f in fields}

    def local_is_source(self, flows: pd.DataFrame) -> np.ndarray:
        """Egress: the source is on this node; ingress: the destination; neither (a drop outside tc): the
        destination when it has identity, else the source."""
        direction = text_column(flows, "direction")
        _, dst_known = self.grouping.side_keys(flows, "dst")
        return (direction == "egress") | ((direction != "ingress") & ~dst_known)


def server_ports(frame: pd.DataFrame, ephemeral: tuple[int, int]) -> np.ndarray:
    """The server's port of each flow as text: the destination's unless it is ephemeral, else the source's
    unless it is, else "" (both ends ephemeral, or no ports)."""
    low, high = ephemeral
    src, dst = number_column(frame, "src_port"), number_column(frame, "dst_port")

    def serving(port: np.ndarray) -> np.ndarray:
        return (port > 0) & ((port < low) | (port > high))

    port = np.where(serving(dst), dst, np.where(serving(src), src, -1))
    return np.where(port >= 0, port.astype(str), "")


def rtt_buckets(rtt_us: np.ndarray) -> np.ndarray:
    """The bucket index (0..len(RTT_BUCKETS), the last one +Inf) of each RTT in microseconds."""
    return np.searchsorted(np.asarray(RTT_BUCKETS), rtt_us / 1e6, side="left")


# ---- the aggregate ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilySpec:
    name: str  # without _total
    help: str
    value: int  # column of the table's values


TRAFFIC = (
    FamilySpec("workload_packets", "Packets seen by the tc hooks, per workload", 0),
    FamilySpec("workload_bytes", "Bytes (L2 length) seen by the tc hooks, per workload", 1),
)
DROPS = (
    FamilySpec("workload_drops", "Packets the kernel dropped, per reason and workload", 0),
    FamilySpec("workload_drop_bytes", "Bytes of the packets the kernel dropped, per reason and workload", 1),
)
TCP = (
    FamilySpec("workload_tcp_retransmits", "TCP segments retransmitted, per workload", 0),
    FamilySpec("workload_tcp_resets", "TCP resets sent or received, per workload", 1),
    FamilySpec("workload_tcp_connections_opened", "TCP connections opened (connect or accept), per workload", 2),
    FamilySpec("workload_tcp_connections_closed", "TCP connections closed, per workload", 3),
    FamilySpec("workload_tcp_connections_failed", "TCP connections that never opened (closed from SYN_SENT)", 4),
)
DROP_LOCATIONS = (
    FamilySpec("drop_events", "Drop events sent to user space (sampled), per reason and kernel function", 0),
)
HISTOGRAM_WIDTH = len(RTT_BUCKETS) + 2  # the buckets, +Inf, and the sum of the samples


class Aggregate:
    """Every counter the metrics show, summed over the intervals so far."""

    def __init__(self, config: MetricsConfig, ephemeral: tuple[int, int]) -> None:
        self.labels = Labels(config)
        self.ephemeral = ephemeral
        self.port_label = ("port",) if config.server_port else ()
        budget, grace = config.budget, config.grace
        self.traffic = Budgeted(2, budget, grace)
        self.drops = Budgeted(2, budget, grace)
        self.tcp = Budgeted(5, budget, grace)
        self.rtt = Budgeted(HISTOGRAM_WIDTH, budget, grace)
        self.locations = Budgeted(1, budget, grace)
        self.by_direction: dict[str, np.ndarray] = {}  # direction -> packets, bytes
        self.by_reason: dict[str, np.ndarray] = {}  # reason -> packets, bytes
        self.tcp_node = np.zeros(5)  # retransmits, resets, opened, closed, failed
        self.rtt_node = np.zeros(HISTOGRAM_WIDTH)
        self.flows_active = 0
        self.intervals = 0
        self.last_end: float | None = None

    def add(self, batch: FlowBatch) -> None:
        now = batch.time_end.timestamp()
        flows, events = batch.flows, batch.events
        local = self.labels.local_is_source(flows)
        identity = self.labels.columns(flows, local)
        self._traffic(flows, identity, now)
        self._drops(flows, identity, now)
        self._tcp(flows, identity, events, now)
        self._rtt(flows, identity, now)
        self._locations(events, now)
        self.flows_active = len(flows)
        self.intervals += 1
        self.last_end = now

    def _traffic(self, flows: pd.DataFrame, identity: dict[str, np.ndarray], now: float) -> None:
        packets, size = counts(flows, "packets"), counts(flows, "bytes")
        direction = text_column(flows, "direction")
        keys, sums = sum_by({"direction": direction}, {"packets": packets, "bytes": size})
        for (name,), row in zip(keys, sums, strict=True):
            self.by_direction[name] = self.by_direction.get(name, np.zeros(2)) + row
        key_columns = {"direction": direction, **identity}
        if self.port_label:
            key_columns["port"] = server_ports(flows, self.ephemeral)
        keys, sums = sum_by(key_columns, {"packets": packets, "bytes": size})
        self.traffic.add(keys, sums, sums[:, 1], now)

    def _drops(self, flows: pd.DataFrame, identity: dict[str, np.ndarray], now: float) -> None:
        packets = counts(flows, "drop_packets")
        rows = packets > 0
        size = counts(flows, "drop_bytes")[rows]
        reason = text_column(flows, "drop_reason")[rows]
        keys, sums = sum_by({"reason": reason}, {"packets": packets[rows], "bytes": size})
        for (name,), row in zip(keys, sums, strict=True):
            self.by_reason[name] = self.by_reason.get(name, np.zeros(2)) + row
        keys, sums = sum_by(
            {"reason": reason, **{k: v[rows] for k, v in identity.items()}}, {"packets": packets[rows], "bytes": size}
        )
        self.drops.add(keys, sums, sums[:, 1], now)

    def _tcp(self, flows: pd.DataFrame, identity: dict[str, np.ndarray], events: pd.DataFrame, now: float) -> None:
        tcp = text_column(flows, "protocol") == "TCP"
        flow_part = {k: v[tcp] for k, v in identity.items()}
        retransmits, resets = counts(flows, "retransmits")[tcp], counts(flows, "resets")[tcp]
        opened, closed, failed, event_part = self._connections(events)
        zeros_flows, zeros_events = np.zeros(int(tcp.sum())), np.zeros(len(opened))
        columns = {k: np.concatenate([flow_part[k], event_part[k]]) for k in flow_part}
        values = {
            "retransmits": np.concatenate([retransmits, zeros_events]),
            "resets": np.concatenate([resets, zeros_events]),
            "opened": np.concatenate([zeros_flows, opened]),
            "closed": np.concatenate([zeros_flows, closed]),
            "failed": np.concatenate([zeros_flows, failed]),
        }
        keys, sums = sum_by(columns, values)
        self.tcp.add(keys, sums, sums.sum(axis=1), now)
        self.tcp_node += np.array([v.sum() for v in values.values()])

    def _connections(self, events: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Per socket event (connect, accept, close): opened, closed, failed, and its local end's labels."""
        kind = text_column(events, "kind")
        socket_events = events[np.isin(kind, (*CONNECT_KINDS, "close"))]
        if socket_events.empty:
            return np.zeros(0), np.zeros(0), np.zeros(0), {n: np.zeros(0, dtype=object) for n in self.labels.names}
        opened = first_per_connection(socket_events, CONNECT_KINDS).astype(np.float64)
        closed = first_per_connection(socket_events, ("close",)).astype(np.float64)
        failed = (closed > 0) & (text_column(socket_events, "state") == FAILED_FROM)
        identity = self.labels.columns(socket_events, np.ones(len(socket_events), dtype=bool))
        return opened, closed, failed.astype(np.float64), identity

    def _rtt(self, flows: pd.DataFrame, identity: dict[str, np.ndarray], now: float) -> None:
        rtt = counter_values(flows["rtt_us"]).astype(np.float64)
        rows = ~np.isnan(rtt)
        rtt = rtt[rows]
        bucket = rtt_buckets(rtt)
        values = {f"b{i}": (bucket == i).astype(np.float64) for i in range(len(RTT_BUCKETS) + 1)}
        values["sum"] = rtt / 1e6
        keys, sums = sum_by({k: v[rows] for k, v in identity.items()}, values)
        self.rtt.add(keys, sums, sums[:, :-1].sum(axis=1), now)
        self.rtt_node += np.array([v.sum() for v in values.values()])

    def _locations(self, events: pd.DataFrame, now: float) -> None:
        drops = events[text_column(events, "kind") == "drop"]
        keys, sums = sum_by(
            {"reason": text_column(drops, "drop_reason"), "location": text_column(drops, "location")},
            {"events": np.ones(len(drops))},
        )
        self.locations.add(keys, sums, sums[:, 0], now)

    # ---- the families ------------------------------------------------------------------------------

    def families(self, node: str) -> list[Metric]:
        """The data families, built once per interval; a scrape hands them over as they are."""
        identity = self.labels.names
        out: list[Metric] = []
        for label, rows, families in (
            ("direction", self.by_direction, (("packets", "Packets"), ("bytes", "Bytes (L2 length)"))),
            ("reason", self.by_reason, (("drops", "Packets"), ("drop_bytes", "Bytes of the packets"))),
        ):
            what = "seen by the tc hooks" if label == "direction" else "the kernel dropped"
            for index, (name, text) in enumerate(families):
                family = CounterMetricFamily(f"flowscope_{name}", f"{text} {what}, per {label}", labels=["node", label])
                for value, row in sorted(rows.items()):
                    family.add_metric([node, value], row[index])
                out.append(family)
        node_tcp = (
            ("tcp_retransmits", "TCP segments retransmitted"),
            ("tcp_resets", "TCP resets sent or received"),
            ("tcp_connections_opened", "TCP connections opened (connect or accept)"),
            ("tcp_connections_closed", "TCP connections closed"),
            ("tcp_connections_failed", "TCP connections that never opened (closed from SYN_SENT)"),
        )
        for index, (name, text) in enumerate(node_tcp):
            family = CounterMetricFamily(f"flowscope_{name}", text, labels=["node"])
            family.add_metric([node], self.tcp_node[index])
            out.append(family)
        out.append(_histogram("flowscope_tcp_rtt_seconds", "Smoothed TCP RTT, one sample per flow and interval",
                              ["node"], [((node,), self.rtt_node)]))  # fmt: skip
        traffic_labels = ("direction", *identity, *self.port_label)
        out += _counters(TRAFFIC, traffic_labels, self.traffic, node)
        out += _counters(DROPS, ("reason", *identity), self.drops, node)
        out += _counters(TCP, identity, self.tcp, node)
        out += _counters(DROP_LOCATIONS, ("reason", "location"), self.locations, node)
        out.append(
            _histogram(
                "flowscope_workload_tcp_rtt_seconds", "Smoothed TCP RTT per workload, one sample per flow and interval",
                ["node", *identity], [((node, *k), v) for k, v in self.rtt.series(len(identity))],
            )
        )  # fmt: skip
        active = GaugeMetricFamily("flowscope_flows_active", "Flows with records in the last interval", labels=["node"])
        active.add_metric([node], self.flows_active)
        out.append(active)
        folded = GaugeMetricFamily(
            "flowscope_metrics_folded_keys", 'Keys whose records a family counts in its "other" series now (the '
            "budget)", labels=["node", "family"],
        )  # fmt: skip
        folds = CounterMetricFamily(
            "flowscope_metrics_folds", 'Times a key of a family went to its "other" series: new beyond the budget, '
            "or out of the most active", labels=["node", "family"],
        )  # fmt: skip
        for name, table in self.tables().items():
            folded.add_metric([node, name], table.folded)
            folds.add_metric([node, name], table.folds)
        out += [folded, folds]
        intervals = CounterMetricFamily("flowscope_intervals", "Intervals the metrics have summed", labels=["node"])
        intervals.add_metric([node], self.intervals)
        out.append(intervals)
        if self.last_end is not None:
            last = GaugeMetricFamily(
                "flowscope_last_interval_end_timestamp_seconds", "End of the last interval summed (the batches' clock)",
                labels=["node"],
            )  # fmt: skip
            last.add_metric([node], self.last_end)
            out.append(last)
        return out

    def tables(self) -> dict[str, Budgeted]:
        """The budgeted table of each per-workload family, by the family's name (the families of one table, such
        as packets and bytes, share its keys)."""
        tables = {
            f"flowscope_{spec.name}": table
            for table, specs in ((self.traffic, TRAFFIC), (self.drops, DROPS), (self.tcp, TCP),
                                 (self.locations, DROP_LOCATIONS))
            for spec in specs
        }  # fmt: skip
        return {**tables, "flowscope_workload_tcp_rtt_seconds": self.rtt}


def _counters(specs: Sequence[FamilySpec], labels: tuple[str, ...], table: Budgeted, node: str) -> list[Metric]:
    families = [CounterMetricFamily(f"flowscope_{s.name}", s.help, labels=["node", *labels]) for s in specs]
    for key, values in table.series(len(labels)):
        for spec, family in zip(specs, families, strict=True):
            family.add_metric([node, *key], values[spec.value])
    return families


def _histogram(name: str, help: str, labels: list[str], series: list[tuple[tuple, np.ndarray]]) -> Metric:
    family = HistogramMetricFamily(name, help, labels=labels)
    bounds = [floatToGoString(b) for b in RTT_BUCKETS] + ["+Inf"]
    for key, values in series:
        cumulative = np.cumsum(values[:-1])
        family.add_metric(list(key), list(zip(bounds, cumulative.tolist(), strict=True)), float(values[-1]))
    return family


# ---- the agent's own state, read at scrape time -------------------------------------------------------


def self_metrics(pipeline: Any, node: str) -> list[Metric]:
    """The agent's own state now: coverage by stage and by output, queues, maps, probes, identity, build."""
    status = pipeline.status()
    out: list[Metric] = []

    def family(kind: type, name: str, help: str, label: str | None, values: list[tuple[str, float]]) -> None:
        metric = kind(name, help, labels=["node", label] if label else ["node"])
        for value_label, value in values:
            metric.add_metric([node, value_label] if label else [node], value)
        out.append(metric)

    coverage, sinks = status["coverage"], status["sinks"]
    for part in ("produced", "delivered", "lost"):
        family(CounterMetricFamily, f"flowscope_records_{part}",
               f"Records (packets, events) {part} by each stage of the data path", "source",
               [(source, counts[part]) for source, counts in coverage.items()])  # fmt: skip
    for part in ("produced", "delivered", "lost"):
        family(CounterMetricFamily, f"flowscope_sink_records_{part}",
               f"Records (flow and event rows) {part} by each output", "sink",
               [(name, sink[part]) for name, sink in sinks.items()])  # fmt: skip
    family(GaugeMetricFamily, "flowscope_sink_queue_fill_ratio", "How full each output's queue is", "sink",
           [(name, s["queued"] / s["capacity"] if s["capacity"] else 0.0) for name, s in sinks.items()])  # fmt: skip
    family(GaugeMetricFamily, "flowscope_map_fill_ratio",
           "Entries of the last drain of each kernel map over its capacity", "map",
           sorted(getattr(pipeline.source, "map_fill", {}).items()))  # fmt: skip
    # Probes that are not needed here (another variant runs) are no loss: they are left out.
    probes = [p for p in status["probes"] if p["active"] or "not needed" not in (p["reason"] or "")]
    family(GaugeMetricFamily, "flowscope_probe_active", "1 when the probe runs, 0 when it is missing", "probe",
           [(p["name"], 1.0 if p["active"] else 0.0) for p in probes])  # fmt: skip
    identity = status["identity"]
    if identity is not None:
        family(CounterMetricFamily, "flowscope_identity_resolved",
               "Flow ends given an identity, by the source that named them", "source",
               list(identity["resolved"].items()))  # fmt: skip
        family(CounterMetricFamily, "flowscope_identity_unresolved", "Flow ends no identity source named", None,
               [("", identity["unresolved"])])  # fmt: skip
        family(CounterMetricFamily, "flowscope_identity_misses", "Identity lookups that failed, by kind", "kind",
               list(identity["misses"].items()))  # fmt: skip
    info = GaugeMetricFamily(
        "flowscope_build_info", "flowscope's version", labels=["node", "version", "python_version"]
    )
    info.add_metric([node, version("flowscope"), platform.python_version()], 1.0)
    out.append(info)
    return out


class FlowscopeCollector:
    """What a scrape reads: the families of the last interval and the pipeline's state now."""

    def __init__(self, sink: PrometheusSink) -> None:
        self.sink = sink

    def collect(self) -> Iterator[Metric]:
        yield from self.sink.families
        if self.sink.pipeline is not None:
            yield from self_metrics(self.sink.pipeline, self.sink.node)


class PrometheusSink:
    """The pipeline's output that sums each batch and serves /metrics (HTTP, or HTTPS with a key and cert)."""

    name = "prometheus"

    def __init__(self, config: MetricsConfig, node: str = "", ephemeral: tuple[int, int] | None = None) -> None:
        assert config.address, "the Prometheus output needs metrics.address"
        self.config = config
        self.node = node
        self.pipeline: Any = None
        self.aggregate = Aggregate(config, ephemeral or ephemeral_ports())
        self.families: list[Metric] = self.aggregate.families(node)  # replaced whole, never changed in place
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FlowscopeCollector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._server: Any = None
        self._count_keys()

    def bind(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.node = self.node or pipeline.source.node
        self.families = self.aggregate.families(self.node)

    def open(self) -> None:
        config = self.config
        assert config.address
        host, port, tls = uses_tls(config.address, config.tls_cert, config.tls_key, config.plaintext_anywhere,
                                   LISTEN_FLAGS)  # fmt: skip
        try:
            self._server, _thread = start_http_server(
                port, host, self.registry, certfile=config.tls_cert if tls else None,
                keyfile=config.tls_key if tls else None,
            )  # fmt: skip
        except OSError as err:
            raise ListenError(
                f"cannot serve /metrics on {config.address} ({err.strerror or err}); choose another --metrics-addr."
            ) from None
        log.info("serving /metrics on %s%s", config.address, " (TLS)" if tls else "")

    def write(self, batch: FlowBatch) -> None:
        self.aggregate.add(batch)
        self.families = self.aggregate.families(self.node)
        self._count_keys()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def health(self) -> dict[str, Any]:
        return self._health  # from any thread: counted on the sink's, replaced whole

    def _count_keys(self) -> None:
        tables = self.aggregate.tables()
        self._health = {
            "state": "ok",
            "keys": {name: len(t.entries) for name, t in tables.items()},
            "folded": {name: t.folded for name, t in tables.items()},
        }

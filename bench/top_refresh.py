"""`flowscope top` with 100k live flows: what one refresh costs, off and on the UI thread (no root, no kernel).

Each interval is a FlowBatch of 100k distinct flows (the same connections every interval, with changing
counters, as on a busy node): 60% between 500 pods in 20 namespaces, 40% between pods and 2000 outside
addresses; 1% carry drops with kernel reason names, TCP flows have an RTT, and 2000 connect/close events
come with each interval. The window is filled first (20 intervals, the row budget of 2M flows), so trends
and details read a full history.

Figures (medians over the measured intervals):
  refresh_ms            what the feed thread does per interval: keep the batch, totals, top 50 rows by flow
                        with their trends (the "refresh" the issue asks to keep smooth)
  refresh_pod_ms        the same grouped by pod (each flow counted at both ends)
  refresh_filtered_ms   the same by flow with the filter `namespace=ns-3,ns-4 not port=53`
  regroup_ms            a key press that changes the grouping, until its rows are ready
  regroup_trends_ms     then the 12 intervals the rows' trends read, grouped anew (the trends follow)
  drops_ms              the drops view
  detail_ms             a key press that opens the detail of one of the three busiest pods (its peers over
                        the last 10 intervals, its series over the window)
  detail_refresh_ms     an open detail once a new interval has come (its rows already grouped, as the feed
                        does); the peers of the older intervals are kept
  filter_mask_ms        parse_filter(...).flows_mask on one 100k batch (CIDR, ports, pod prefix)
  ui_apply_ms           time on the UI thread to put one snapshot (50 rows) on screen (Textual, headless)

    .venv/bin/python -m bench.top_refresh [--flows 100000] [--intervals 6]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

import numpy as np
import pandas as pd

from bench import lab
from flowscope.analysis.top import TopModel
from flowscope.coverage import Coverage
from flowscope.filters import parse_filter
from flowscope.schema import FlowBatch, events_frame, flows_frame

PODS, NAMESPACES, OUTSIDE = 500, 20, 2000
REASONS = np.array(["NO_SOCKET", "NETFILTER_DROP", "TCP_INVALID_SEQUENCE", "SOCKET_FILTER"], dtype=object)
START = pd.Timestamp("2025-03-01T12:00:00Z")


class Traffic:
    """The node's connections, fixed once; `batch(i)` gives interval i with fresh counters."""

    def __init__(self, flows: int, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)
        rng, n = self.rng, flows
        pod_ips = np.array([f"10.204.{i // 250}.{i % 250 + 1}" for i in range(PODS)], dtype=object)
        outside_ips = np.array([f"192.0.{i // 250}.{i % 250 + 1}" for i in range(OUTSIDE)], dtype=object)
        namespaces = np.array([f"ns-{i % NAMESPACES}" for i in range(PODS)], dtype=object)
        pods = np.array([f"app-{i // 5}-{i:04d}" for i in range(PODS)], dtype=object)
        workloads = np.array([f"app-{i // 5}" for i in range(PODS)], dtype=object)
        src_pod = rng.integers(0, PODS, n)
        dst_pod = rng.integers(0, PODS, n)
        outside = rng.random(n) < 0.4
        outside_peer = rng.integers(0, OUTSIDE, n)
        frame = {
            "protocol": np.where(rng.random(n) < 0.85, "TCP", "UDP").astype(object),
            "src_ip": pod_ips[src_pod],
            "src_port": rng.integers(1024, 65536, n),
            "dst_ip": np.where(outside, outside_ips[outside_peer], pod_ips[dst_pod]),
            "dst_port": rng.choice(np.array([53, 80, 443, 5432, 6379, 8080, 8443]), n),
            "src_namespace": namespaces[src_pod],
            "src_pod": pods[src_pod],
            "src_workload": workloads[src_pod],
            "src_pid": 1000 + src_pod,
            "src_comm": workloads[src_pod],
            "dst_namespace": np.where(outside, None, namespaces[dst_pod]),
            "dst_pod": np.where(outside, None, pods[dst_pod]),
            "dst_workload": np.where(outside, None, workloads[dst_pod]),
        }
        self.flows = pd.DataFrame(frame)
        self.flows["node"] = "node-a"
        self.flows["ifname"] = np.where(outside, "eth0", "cni0").astype(object)
        self.flows["direction"] = np.where(rng.random(n) < 0.5, "ingress", "egress").astype(object)
        self.flows["ip_version"] = 4
        self.size = rng.lognormal(8, 2, n)  # each connection's typical bytes per interval

    def batch(self, interval: int) -> FlowBatch:
        rng, n = self.rng, len(self.flows)
        flows = self.flows.copy()
        packets = np.maximum(1, rng.poisson(20, n))
        flows["packets"] = packets
        flows["bytes"] = np.maximum(packets * 60, (self.size * rng.random(n)).astype(np.int64))
        dropped = rng.random(n) < 0.01
        flows["drop_packets"] = np.where(dropped, np.minimum(packets, rng.integers(1, 5, n)), 0)
        flows["drop_bytes"] = flows["drop_packets"] * 60
        flows["drop_reason"] = np.where(dropped, REASONS[rng.integers(0, len(REASONS), n)], None)
        flows["retransmits"] = np.where(rng.random(n) < 0.02, rng.integers(1, 4, n), 0)
        flows["resets"] = np.where(rng.random(n) < 0.005, 1, 0)
        flows["rtt_us"] = np.where(flows["protocol"] == "TCP", rng.integers(50, 20000, n), -1)
        flows["rtt_us"] = flows["rtt_us"].where(flows["rtt_us"] >= 0)
        start = START + pd.Timedelta(seconds=interval)
        flows["time_start"], flows["time_end"] = start, start + pd.Timedelta(seconds=1)
        picked = rng.integers(0, n, 2000)
        events = flows.iloc[picked][
            ["protocol", "src_ip", "src_port", "dst_ip", "dst_port", "src_namespace", "src_pod", "dst_namespace"]
        ].assign(
            kind=np.where(rng.random(2000) < 0.5, "connect", "close").astype(object),
            time=start + pd.Timedelta(milliseconds=500),
        )
        coverage = Coverage()
        coverage.add("tc_flows", n, n, 0)
        return FlowBatch(
            start,
            start + pd.Timedelta(seconds=1),
            flows_frame(flows),
            events_frame(events.reset_index(drop=True)),
            coverage,
        )


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return (time.perf_counter() - started) * 1000, result


def refresh(model: TopModel, batch: FlowBatch) -> None:
    model.add(batch)
    model.totals()
    model.rows(50)


def ui_apply_ms(traffic: Traffic, intervals: int) -> list[float]:
    """Runs the real app headless on a queue of batches and times its snapshot handler on the UI thread."""
    import queue

    from flowscope.kernel.catalog import ProbeStatus
    from flowscope.ui.app import TopApp

    class Feed:
        node, interval = "node-a", 1.0

        def __init__(self) -> None:
            self.queue: queue.Queue = queue.Queue()

        def probes(self) -> list[ProbeStatus]:
            return [ProbeStatus("tc_flows", True, "tc")]

        def __iter__(self):
            while (batch := self.queue.get()) is not None:
                yield batch

        def close(self) -> None:
            self.queue.put(None)

    durations: list[float] = []
    handler = TopApp.on_snapshot_ready

    def timed_handler(app: TopApp, message) -> None:
        started = time.perf_counter()
        handler(app, message)
        durations.append((time.perf_counter() - started) * 1000)

    TopApp.on_snapshot_ready = timed_handler  # type: ignore[method-assign]

    async def scenario() -> None:
        source = Feed()
        app = TopApp(source, rows=50)
        async with app.run_test(size=(160, 60)) as pilot:
            for i in range(intervals):
                shown = len(durations)
                source.queue.put(traffic.batch(100 + i))
                deadline = time.monotonic() + 20
                while len(durations) == shown and time.monotonic() < deadline:
                    await pilot.pause(0.05)
        source.close()

    try:
        asyncio.run(scenario())
    finally:
        TopApp.on_snapshot_ready = handler  # type: ignore[method-assign]
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--intervals", type=int, default=6, help="measured intervals after the window is full")
    args = parser.parse_args()

    lab.log(f"top_refresh: building {args.flows:,} flows")
    traffic = Traffic(args.flows)
    model = TopModel()
    fill = model.row_budget // args.flows
    for i in range(fill):
        model.add(traffic.batch(i))
    lab.log(f"top_refresh: window filled with {len(model.window)} intervals")

    figures: dict[str, list[float]] = {name: [] for name in ("refresh", "refresh_pod", "refresh_filtered")}
    interval = fill
    for view, name in (
        ({"grouping": "flow"}, "refresh"),
        ({"grouping": "pod"}, "refresh_pod"),
        ({"grouping": "flow", "filter": parse_filter("namespace=ns-3,ns-4 not port=53")}, "refresh_filtered"),
    ):
        model.set_view(**view)
        model.rows(50)  # the regrouping a key press causes, not counted here
        for _ in range(args.intervals):
            batch = traffic.batch(interval)
            interval += 1
            figures[name].append(timed(lambda b=batch: refresh(model, b))[0])
        lab.log(f"top_refresh: {name} median {lab.median(figures[name]):.0f} ms")

    model.set_view(grouping="flow", filter=parse_filter(""))
    model.rows(50)
    model.backfill()
    regroup, backfill = [], []
    for grouping in ("pod", "flow"):
        regroup.append(timed(lambda g=grouping: (model.set_view(grouping=g), model.rows(50)))[0])
        backfill.append(timed(model.backfill)[0])
    model.set_view(grouping="pod")
    model.rows(50)
    drops = [timed(model.drops)[0] for _ in range(3)]
    busiest = model.rows(3).frame["key"].tolist()
    detail = [timed(lambda k=key: model.detail(k))[0] for key in busiest]
    detail_refresh = []
    for _ in range(3):
        model.add(traffic.batch(interval))
        interval += 1
        model.rows(50)
        detail_refresh.append(timed(lambda: model.detail(busiest[-1]))[0])
    flows = model.window[-1].flows
    mask_filter = parse_filter("ip=10.204.0.0/23,192.0.2.0/24 port=443,8000-8443 not pod=ns-1/app-3")
    masks = [timed(lambda: mask_filter.flows_mask(flows))[0] for _ in range(3)]
    lab.log("top_refresh: the app, headless")
    ui = ui_apply_ms(traffic, 5)

    result = {
        "flows_per_interval": args.flows,
        "window_intervals": len(model.window),
        "median_refresh_ms": round(lab.median(figures["refresh"]), 1),
        "max_refresh_ms": round(max(figures["refresh"]), 1),
        "median_refresh_pod_ms": round(lab.median(figures["refresh_pod"]), 1),
        "median_refresh_filtered_ms": round(lab.median(figures["refresh_filtered"]), 1),
        "regroup_ms": round(max(regroup), 1),
        "regroup_trends_ms": round(max(backfill), 1),
        "drops_ms": round(lab.median(drops), 1),
        "detail_ms": round(lab.median(detail), 1),
        "detail_refresh_ms": round(lab.median(detail_refresh), 1),
        "filter_mask_ms": round(lab.median(masks), 1),
        "median_ui_apply_ms": round(lab.median(ui), 1),
        "max_ui_apply_ms": round(max(ui), 1) if ui else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    for name, value in result.items():
        print(f"{name:28} {value}")
    lab.save("top_refresh", result)


if __name__ == "__main__":
    main()

"""The Prometheus output:

1. Scrape latency and /metrics size at 10k series: PrometheusSink holding 5,000 workloads (egress, so 10k
   per-workload series of packets and bytes, within a budget of 5,001), scraped over HTTP on loopback in the
   text format and in OpenMetrics; beside it, the sink's per-interval cost (summing the batch and building the
   families) for the same 5,000 keys.
2. Agent CPU with the exporter on vs off: `flowscope agent --replay` of 20 one-second intervals of 10k flows
   each at --speed 1 (the gRPC API its one other output), once without /metrics and once with it scraped
   every second; the agent's CPU seconds (its rusage) side by side. The replay's reading and the API cost the
   same in both runs, so the difference is the exporter's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.request import Request, urlopen

import numpy as np
import pandas as pd

from bench import lab

WORKLOADS = 5_000
FLOWS, INTERVALS = 10_000, 20
SCRAPES = 20
START = pd.Timestamp("2025-03-01T12:00:00Z")


def synthetic_batch(rows: int, workloads: int, second: int):
    from flowscope.schema import FlowBatch, flows_frame

    rng = np.random.default_rng(second)
    owner = np.arange(rows) % workloads
    start = START + pd.Timedelta(seconds=second)
    frame = pd.DataFrame(
        {
            "time_start": start, "time_end": start + pd.Timedelta(seconds=1), "node": "bench-node",
            "ifname": "eth0", "direction": "egress", "ip_version": 4, "protocol": "UDP",
            "src_ip": [f"10.{n >> 8 & 255}.{n & 255}.1" for n in owner.tolist()],
            "src_port": 40000 + np.arange(rows) % 20000,
            "dst_ip": "10.200.0.1", "dst_port": 53, "packets": rng.integers(1, 100, rows),
            "bytes": rng.integers(60, 150_000, rows), "src_namespace": [f"ns-{n % 50}" for n in owner.tolist()],
            "src_workload": [f"w-{n}" for n in owner.tolist()],
        }
    )  # fmt: skip
    flows = flows_frame(frame)
    return FlowBatch(start, start + pd.Timedelta(seconds=1), flows, FlowBatch.empty(start, start).events)


def get(address: str, accept: str | None = None) -> bytes:
    request = Request(f"http://{address}/metrics", headers={"Accept": accept} if accept else {})
    with urlopen(request, timeout=30) as answer:
        return answer.read()


def scrape_latency() -> dict:
    from flowscope.config import MetricsConfig
    from flowscope.exporters.prometheus import PrometheusSink
    from tests.integration.servers import free_port

    address = f"127.0.0.1:{free_port()}"
    sink = PrometheusSink(MetricsConfig(address=address, budget=WORKLOADS + 1), node="bench-node")
    sink.open()
    try:
        writes = []
        for second in range(5):
            batch = synthetic_batch(WORKLOADS, WORKLOADS, second)
            began = time.perf_counter()
            sink.write(batch)
            writes.append(time.perf_counter() - began)
        result = {"workloads": WORKLOADS, "write_ms": round(lab.median(writes) * 1e3, 1)}
        for name, accept in (("text", None), ("openmetrics", "application/openmetrics-text; version=1.0.0")):
            times, body = [], b""
            for _ in range(SCRAPES):
                began = time.perf_counter()
                body = get(address, accept)
                times.append(time.perf_counter() - began)
            series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
            result[name] = {
                "median_ms": round(lab.median(times) * 1e3, 1), "max_ms": round(max(times) * 1e3, 1),
                "bytes": len(body), "samples": series,
            }  # fmt: skip
            lab.log(f"prometheus: {name}: {series} samples, {len(body):,} bytes, {result[name]['median_ms']} ms")
        return result
    finally:
        sink.close()


def agent_run(recording: Path, directory: Path, metrics: bool) -> dict:
    from tests.integration.servers import free_port

    address = f"127.0.0.1:{free_port()}"
    argv = [str(Path(sys.executable).with_name("flowscope")), "agent", "--replay", str(recording), "--speed", "1",
            "--exit-at-end", "--status-socket", str(directory / f"agent-{metrics}.sock"),
            "--grpc-socket", str(directory / "api.sock"),
            "--hubble-socket", str(directory / "hubble.sock")]  # fmt: skip
    if metrics:
        argv += ["--metrics-addr", address]
    env = {**os.environ, "FLOWSCOPE_FLOWLOG_ENABLED": "0"}  # the gRPC API runs in both: an output to have
    started = time.monotonic()
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    scrapes, done = [], threading.Event()

    def scraper() -> None:  # Prometheus's habit: once a second, for as long as the agent serves
        while not done.wait(1.0):
            try:
                scrapes.append(len(get(address)))
            except OSError:
                continue

    thread = threading.Thread(target=scraper, daemon=True)
    if metrics:
        thread.start()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    errors = process.stderr.read()
    if process.returncode != 0:
        raise RuntimeError(f"the agent failed: {errors[-1000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "metrics": metrics, "cpu_s": round(cpu, 2), "wall_s": round(time.monotonic() - started, 1),
        "cpu_per_interval_ms": round(cpu / INTERVALS * 1e3, 1), "scrapes": len(scrapes),
        "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }  # fmt: skip


def agent_cpu() -> dict:
    from flowscope.formats.jsonl import write_batch

    with tempfile.TemporaryDirectory(prefix="fsb-prom-") as name:
        directory = Path(name)
        recording = directory / "flows.jsonl"
        with open(recording, "w", encoding="utf-8") as handle:
            for second in range(INTERVALS):
                write_batch(synthetic_batch(FLOWS, 1000, second), handle)
        lab.log(f"prometheus: recording of {INTERVALS} x {FLOWS:,} flows ({recording.stat().st_size:,} bytes)")
        off = agent_run(recording, directory, metrics=False)
        on = agent_run(recording, directory, metrics=True)
    lab.log(f"prometheus: agent CPU off {off['cpu_s']} s, on {on['cpu_s']} s ({on['scrapes']} scrapes)")
    return {"flows": FLOWS, "intervals": INTERVALS, "off": off, "on": on,
            "extra_cpu_per_interval_ms": round((on["cpu_s"] - off["cpu_s"]) / INTERVALS * 1e3, 1)}  # fmt: skip


def main() -> None:
    result = {"scrape": scrape_latency(), "agent": agent_cpu()}
    lab.save("prometheus", result)


if __name__ == "__main__":
    main()

"""The Parquet flow log: how fast the agent's flow-log sink writes 10k flows per second, how many bytes a flow
costs on disk, and how long read_flowlog takes over the log — all of it, one minute of it, and one namespace
(the filter pushed down into Arrow: only that namespace's rows become pandas columns) — and the peak memory
of each read.

The flows are synthetic but shaped like a cluster's: 10,000 flows per 1-s interval among 400 pods in 20
namespaces and 60 workloads, with ports, counters and identity on both ends; each interval has the same
flows with new counters (as long-lived connections do). They go through exporters/flowlog.FlowLogSink with
the agent's defaults (5-minute files). The default run writes and reads one hour: 36M rows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import lab

FLOWS_PER_SECOND = 10_000


def template(rng: np.random.Generator) -> pd.DataFrame:
    from flowscope.schema import flows_frame

    n = FLOWS_PER_SECOND
    pods = np.array([f"pod-{i}" for i in range(400)], dtype=object)
    namespaces = np.array([f"ns-{i % 20}" for i in range(400)], dtype=object)
    workloads = np.array([f"app-{i % 60}" for i in range(400)], dtype=object)
    src, dst = rng.integers(0, 400, n), rng.integers(0, 400, n)
    frame = pd.DataFrame(
        {
            "node": "node-1", "ifname": "eth0", "ifindex": 2, "direction": rng.choice(["ingress", "egress"], n),
            "ip_version": 4, "protocol": rng.choice(["TCP", "UDP"], n, p=[0.9, 0.1]),
            "src_ip": [f"10.{s // 250}.{s % 250}.{7}" for s in src], "src_port": rng.integers(32768, 61000, n),
            "dst_ip": [f"10.{d // 250}.{d % 250}.{9}" for d in dst],
            "dst_port": rng.choice([80, 443, 5432, 6379, 8080], n),
            "tcp_flags": 0x18, "drop_packets": 0, "retransmits": 0, "resets": 0,
            "src_namespace": namespaces[src], "src_pod": pods[src], "src_workload": workloads[src],
            "src_workload_kind": "Deployment", "src_identity_source": "ip",
            "dst_namespace": namespaces[dst], "dst_pod": pods[dst], "dst_workload": workloads[dst],
            "dst_workload_kind": "Deployment", "dst_identity_source": "ip",
        }
    )  # fmt: skip
    return flows_frame(frame)


def write_log(directory: Path, minutes: int, rng: np.random.Generator) -> dict:
    from flowscope.config import FlowLogConfig
    from flowscope.exporters.flowlog import FlowLogSink
    from flowscope.schema import FlowBatch

    base = template(rng)
    sink = FlowLogSink(FlowLogConfig(directory=str(directory), retain_size="100GiB"))
    sink.open()
    start = pd.Timestamp("2026-12-03T00:00:00Z")
    cpu, wall = time.process_time(), time.monotonic()
    intervals = minutes * 60
    for second in range(intervals):
        flows = base.copy()
        begin, end = start + pd.Timedelta(seconds=second), start + pd.Timedelta(seconds=second + 1)
        flows["time_start"], flows["time_end"] = begin, end
        flows["packets"] = pd.array(rng.integers(1, 100, len(flows)), dtype="UInt64")
        flows["bytes"] = pd.array(flows["packets"].to_numpy(dtype=np.int64) * 900, dtype="UInt64")
        batch = FlowBatch.empty(begin, end)
        batch.flows = flows
        sink.write(batch)
    sink.close()
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    files = list(directory.glob("flows_*.parquet"))
    size = sum(f.stat().st_size for f in files)
    rows = intervals * FLOWS_PER_SECOND
    return {
        "rows": rows, "files": len(files), "bytes": size, "bytes_per_flow": round(size / rows, 1),
        "write_rows_per_s": round(rows / wall), "write_rows_per_cpu_s": round(rows / cpu),
    }  # fmt: skip


def timed_read(directory: Path, **query) -> dict:
    from flowscope.analysis.flowlog import planned_reads, read_flowlog

    groups = len(planned_reads(directory, query.get("since"), query.get("until")))
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) starts again from the current RSS
    began, cpu = time.monotonic(), time.process_time()
    frame = read_flowlog(directory, **query)
    seconds, cpu = time.monotonic() - began, time.process_time() - cpu
    return {
        "rows": len(frame),
        "row_groups": groups,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "rows_per_s": round(len(frame) / seconds),
        "frame_mb": round(frame.memory_usage(deep=True).sum() / 2**20),
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> int:
    """The process's peak resident memory since the last reset (VmHWM), in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=60, help="minutes of 10k flows/s to write (default: one hour)")
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory(prefix="fsbench-flowlog-") as name:
        directory = Path(name)
        written = write_log(directory, args.minutes, rng)
        lab.log(
            f"flow log: {written['rows']:,} rows in {written['files']} files, {written['bytes_per_flow']} bytes per "
            f"flow; written at {written['write_rows_per_s']:,} rows/s ({written['write_rows_per_cpu_s']:,} per CPU-s)"
        )
        minute = {"since": "2026-12-03T00:04:00Z", "until": "2026-12-03T00:04:59Z"}
        reads = {
            "all": timed_read(directory),
            "one_minute": timed_read(directory, **minute),
            "one_namespace": timed_read(directory, filter="namespace=ns-3"),
        }
    for what, read in reads.items():
        lab.log(
            f"read_flowlog {what}: {read['rows']:,} rows from {read['row_groups']} row groups in {read['seconds']} s "
            f"({read['cpu_seconds']} CPU-s), a {read['frame_mb']:,} MiB frame, peak RSS {read['peak_rss_mb']:,} MiB"
        )
    lab.save("flowlog", {"minutes": args.minutes, "written": written, "reads": reads})


if __name__ == "__main__":
    main()

"""Agent CPU and memory with 10k and 100k active flows, without an output and with the Parquet flow log.

The agent here is flowscope's data path in a process of its own: LiveSource (probes on fsb0a, every family
the kernel supports, drained every second) and the node identity enricher, as `flowscope agent` runs them,
then either nothing (each FlowBatch dropped after enrichment) or the agent's default output, the flow log
(exporters/flowlog.py, written on the same thread so that its cost is in the interval's figures). tcpreplay
loops over N distinct UDP flows at N packets/s,
so every flow gets a packet in every interval and N flows are active all the time. The flow map has
room for them (65536 entries for 10k flows, 131072 for 100k). After a warm-up, the agent process's CPU
time (utime + stime from /proc) over a measured window gives its CPU share, and /proc gives its RSS
(now and peak). The child reports how long each interval's drain + FlowBatch + enrichment took.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import lab


def child(flow_map_size: int, flowlog: str | None) -> None:
    """The agent process: runs until SIGTERM, then prints its figures as JSON on stdout."""
    from flowscope.pipeline.memory import return_freed_memory, trim_heap

    return_freed_memory()  # as every flowscope command does, before pandas loads pyarrow
    from flowscope.config import IdentityConfig
    from flowscope.coverage import Coverage
    from flowscope.enrich import build_enricher
    from flowscope.kernel.loader import LoadOptions
    from flowscope.pipeline.live import LiveSource

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    started = time.monotonic()
    source = LiveSource(LoadOptions(interfaces=[lab.VETH_CLIENT], flow_map_size=flow_map_size), interval=1.0)
    start = {"start_s": round(time.monotonic() - started, 2), "compile_s": source.loaded.compile_seconds}
    enricher = build_enricher(IdentityConfig(node_name="bench"))
    sink = None
    if flowlog:
        from flowscope.config import FlowLogConfig
        from flowscope.exporters.flowlog import FlowLogSink

        sink = FlowLogSink(FlowLogConfig(directory=flowlog))
        sink.open()
    print("ready", flush=True)
    intervals = []
    coverage = Coverage()
    try:
        while not stop:
            began = time.monotonic()
            batch = source.next_batch(source.interval)
            drained, cpu_drained = time.monotonic(), time.thread_time()
            batch = enricher.enrich(batch)
            done, cpu_done = time.monotonic(), time.thread_time()
            if sink is not None:
                sink.write(batch)
            written, cpu_written = time.monotonic(), time.thread_time()
            intervals.append(
                {
                    "rows": len(batch.flows),
                    "drain_and_batch_ms": round((drained - began - source.interval) * 1e3, 1),
                    "enrich_ms": round((done - drained) * 1e3, 1),
                    "enrich_cpu_ms": round((cpu_done - cpu_drained) * 1e3, 1),
                    "flowlog_ms": round((written - done) * 1e3, 1),
                    "flowlog_cpu_ms": round((cpu_written - cpu_done) * 1e3, 1),
                }
            )
            coverage.merge(batch.coverage)
            del batch  # not alive through the next drain, as in the agent's pipeline
            trim_heap()
    finally:
        enricher.close()
        source.close()
        if sink is not None:
            sink.close()
    logged = {}
    if flowlog:
        files = list(Path(flowlog).glob("flows_*.parquet"))
        logged = {"flowlog_bytes": sum(f.stat().st_size for f in files), "flowlog_files": len(files)}
    print(json.dumps({"intervals": intervals, "coverage": coverage.to_dict(), **start, **logged}), flush=True)


def under_traffic(
    pid: int, flows: int, warmup: float, window: float, pcap: Path | None
) -> tuple[dict[str, int], float, dict[str, int]]:
    """The process's memory before the traffic, then with `flows` flows replayed from `pcap` (None: idle) its
    CPU share over `window` seconds after `warmup`, and its memory at the end."""
    idle = lab.process_status(pid)
    replay = None
    try:
        if pcap is not None:
            loops = int(warmup + window) + 2  # one loop over the N flows takes one second
            replay = lab.tcpreplay(pcap, pps=flows, loops=loops)
        time.sleep(warmup)
        cpu_before, wall_before = lab.cpu_seconds(pid), time.monotonic()
        time.sleep(window)
        cpu_after, wall_after = lab.cpu_seconds(pid), time.monotonic()
        return idle, round((cpu_after - cpu_before) / (wall_after - wall_before), 3), lab.process_status(pid)
    finally:
        if replay is not None:
            replay.terminate()
            replay.wait()


def measure(
    flows: int, flow_map_size: int, warmup: float, window: float, pcap: Path | None, flowlog: Path | None
) -> dict:
    """The agent's figures with `flows` active flows (0: idle, no traffic), writing a flow log into `flowlog`
    (None: no output)."""
    extra = ["--flowlog", str(flowlog)] if flowlog else []
    agent = subprocess.Popen(
        [sys.executable, "-m", "bench.agent", "--child", "--flow-map-size", str(flow_map_size), *extra],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        if agent.stdout is None or agent.stdout.readline().strip() != "ready":
            raise RuntimeError("the agent process did not start")
        idle, cpu_share, memory = under_traffic(agent.pid, flows, warmup, window, pcap)
    finally:
        agent.send_signal(signal.SIGTERM)
        output, _ = agent.communicate(timeout=30)
    report = json.loads(output.strip().splitlines()[-1])
    intervals = report["intervals"]
    steady = [i for i in intervals if i["rows"] >= 0.9 * flows] if flows else intervals[1:]
    rows_written = sum(i["rows"] for i in intervals)
    result = {
        "flows": flows,
        "output": "flow log" if flowlog else "none",
        "flow_map_size": flow_map_size,
        "cpu_share": cpu_share,
        "rss_mb": round(memory["VmRSS"] / 2**20, 1),
        "peak_rss_mb": round(memory["VmHWM"] / 2**20, 1),
        "rss_before_traffic_mb": round(idle["VmRSS"] / 2**20, 1),
        "intervals_at_full_load": len(steady),
        "median_rows": lab.median([i["rows"] for i in steady]),
        "median_drain_and_batch_ms": round(lab.median([i["drain_and_batch_ms"] for i in steady]), 1),
        "median_enrich_ms": round(lab.median([i["enrich_ms"] for i in steady]), 1),
        "median_enrich_cpu_ms": round(lab.median([i["enrich_cpu_ms"] for i in steady]), 1),
        "median_flowlog_ms": round(lab.median([i["flowlog_ms"] for i in steady]), 1),
        "median_flowlog_cpu_ms": round(lab.median([i["flowlog_cpu_ms"] for i in steady]), 1),
        "flowlog_bytes_per_flow": round(report["flowlog_bytes"] / rows_written, 1)
        if flowlog and rows_written
        else None,
        "coverage": report["coverage"],  # over the whole run, by source (produced = delivered + lost)
        # LiveSource's start (probes compiled in a child process, tc attached), and the child's part of it
        "start_s": report["start_s"],
        "compile_s": report["compile_s"],
    }
    lab.log(
        f"agent with {flows:,} active flows, output {result['output']}: CPU {result['cpu_share']:.0%} of a core, "
        f"RSS {result['rss_mb']} MB (peak {result['peak_rss_mb']}), per interval: drain + FlowBatch "
        f"{result['median_drain_and_batch_ms']} ms, enrichment {result['median_enrich_ms']} ms, flow log "
        f"{result['median_flowlog_ms']} ms ({result['flowlog_bytes_per_flow']} bytes per flow; "
        f"{result['intervals_at_full_load']} intervals at full load)"
    )
    return result


def measure_command(flows: int, flow_map_size: int, warmup: float, window: float, pcap: Path, directory: Path) -> dict:
    """`flowscope agent` itself (its pipeline, a thread per sink, the status server) with its default outputs,
    the flow log and the gRPC API, on the same traffic: its CPU share and RSS."""
    state = directory / f"agent-{flows}"
    state.mkdir()
    agent = subprocess.Popen(
        [str(Path(sys.executable).with_name("flowscope")), "agent", "-i", lab.VETH_CLIENT, "--flow-map-size",
         str(flow_map_size), "--data-dir", str(state / "data"), "--state-dir", str(state), "--grpc-socket",
         str(state / "api.sock"), "--hubble-socket", str(state / "hubble.sock"), "--status-socket",
         str(state / "status.sock")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        if agent.stderr is None or "agent running" not in agent.stderr.readline():
            raise RuntimeError("flowscope agent did not start")
        idle, cpu_share, memory = under_traffic(agent.pid, flows, warmup, window, pcap)
    finally:
        agent.send_signal(signal.SIGTERM)
        _, errors = agent.communicate(timeout=60)
    result = {
        "flows": flows,
        "output": "flowscope agent (flow log, gRPC API)",
        "flow_map_size": flow_map_size,
        "cpu_share": cpu_share,
        "rss_mb": round(memory["VmRSS"] / 2**20, 1),
        "peak_rss_mb": round(memory["VmHWM"] / 2**20, 1),
        "rss_before_traffic_mb": round(idle["VmRSS"] / 2**20, 1),
        "stopped": errors.strip().splitlines()[-1] if errors.strip() else "",
    }
    lab.log(
        f"flowscope agent with {flows:,} active flows (flow log, gRPC API): CPU {result['cpu_share']:.0%} of a core, "
        f"RSS {result['rss_mb']} MB (peak {result['peak_rss_mb']}); {result['stopped']}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--flow-map-size", type=int, default=65536, help=argparse.SUPPRESS)
    parser.add_argument("--flowlog", help=argparse.SUPPRESS)
    parser.add_argument("--flows", default="0,10000,100000", help="active flow counts to measure (0: idle)")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--window", type=float, default=6.0)
    args = parser.parse_args()
    if args.child:
        child(args.flow_map_size, args.flowlog)
        return
    lab.require_tools("tcpreplay")
    started = time.monotonic()
    results = []
    with lab.lab(), lab.udp_sink(), tempfile.TemporaryDirectory(prefix="fsbench-") as directory:
        for flows in (int(n) for n in args.flows.split(",")):
            pcap = lab.write_udp_flows_pcap(Path(directory) / f"flows-{flows}.pcap", flows) if flows else None
            map_size = max(65536, 1 << max(flows - 1, 1).bit_length())
            results.append(measure(flows, map_size, args.warmup, args.window, pcap, None))
            if flows:  # the same traffic with the flow log written, side by side
                logdir = Path(directory) / f"log-{flows}"
                results.append(measure(flows, map_size, args.warmup, args.window, pcap, logdir))
                results.append(measure_command(flows, map_size, args.warmup, args.window, pcap, Path(directory)))
    lab.save("agent", {"runs": results, "elapsed_s": round(time.monotonic() - started, 1)})


if __name__ == "__main__":
    main()

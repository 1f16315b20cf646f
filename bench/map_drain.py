"""Flow-map path: the time to drain a 100k-flow map into a FlowBatch, and the new-flow rate it sustains.

1. Drain: the current generation's flow map is filled from user space (BPF_MAP_UPDATE_BATCH) with 100k
   distinct flows (90% IPv4, 10% IPv6, 20k distinct remote addresses, 200 local ones), then drained
   the way the agent does every interval: generation flip + RCU grace period + batch lookup-and-delete
   (KernelReader.flip_and_drain), then decoded into a FlowBatch (aggregator.build_batch). Filling from
   user space isolates the drain from traffic generation; the kernel does the same hash work either way.
2. New flows: tcpreplay sends distinct UDP flows (one packet each) at a fixed rate through fsb0a, with
   the agent attached at its defaults (65536-entry map, 1 s interval). Per rate: flows sent, flows in
   the FlowBatches, spilled (map full, carried by the event ring), lost; the highest rate with every
   flow delivered and nothing lost is the sustained new-flow rate.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import lab

BPF_MAP_UPDATE_BATCH = 26


def update_batch(map_fd: int, keys: np.ndarray, values: np.ndarray) -> None:
    """Writes every (key, value) into a map with BPF_MAP_UPDATE_BATCH."""
    from flowscope.kernel import bpf_syscall

    keys, values = np.ascontiguousarray(keys), np.ascontiguousarray(values)
    attr = struct.pack("<QQQQIIQQ", 0, 0, keys.ctypes.data, values.ctypes.data, len(keys), map_fd, 0, 0)
    bpf_syscall.bpf(BPF_MAP_UPDATE_BATCH, attr)


def synthetic_flows(count: int, ifindex: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    from flowscope.kernel.layouts import FLOW_KEY, FLOW_STATS

    rng = np.random.default_rng(seed)
    keys = np.zeros(count, dtype=FLOW_KEY)
    v6 = np.arange(count) % 10 == 0
    local = rng.integers(0, 200, count)
    remote = rng.integers(0, 20_000, count)
    raw = np.zeros((count, 2, 16), dtype=np.uint8)
    raw[~v6, :, 10:12] = 0xFF  # IPv4-mapped IPv6
    raw[~v6, 0, 12] = 10
    raw[~v6, 0, 13] = 205
    raw[~v6, 0, 14:16] = np.stack([local[~v6] >> 8, local[~v6] & 0xFF], axis=1)
    raw[~v6, 1, 12] = 172
    raw[~v6, 1, 13] = 16
    raw[~v6, 1, 14:16] = np.stack([remote[~v6] >> 8, remote[~v6] & 0xFF], axis=1)
    raw[v6, :, 0:2] = (0xFD, 0x00)
    raw[v6, 0, 14:16] = np.stack([local[v6] >> 8, local[v6] & 0xFF], axis=1)
    raw[v6, 1, 2] = 0x01
    raw[v6, 1, 14:16] = np.stack([remote[v6] >> 8, remote[v6] & 0xFF], axis=1)
    keys["saddr"] = raw[:, 0].copy().view("V16").reshape(-1)
    keys["daddr"] = raw[:, 1].copy().view("V16").reshape(-1)
    keys["sport"] = 1024 + np.arange(count) % 60_000  # with the addresses, every key is distinct
    keys["dport"] = rng.choice([53, 80, 443, 5432, 6379, 8080], count)
    keys["proto"] = np.where(keys["dport"] == 53, 17, 6)
    keys["direction"] = np.arange(count) % 2
    keys["ip_version"] = np.where(v6, 6, 4)
    keys["ifindex"] = ifindex
    stats = np.zeros(count, dtype=FLOW_STATS)
    now = time.monotonic_ns()
    stats["packets"] = rng.integers(1, 1000, count)
    stats["bytes"] = stats["packets"] * rng.integers(60, 1500, count)
    stats["first_seen_ns"] = now - 900_000_000
    stats["last_seen_ns"] = now
    stats["cgroup_id"] = np.where(keys["direction"] == 1, rng.integers(1000, 1100, count), 0)
    stats["tcp_flags"] = np.where(keys["proto"] == 6, 0x18, 0)
    assert len(np.unique(keys)) == count
    return keys, stats


def drain(flows: int, repeats: int) -> dict:
    from flowscope.decode.batch import build_batch
    from flowscope.decode.context import AggregationContext
    from flowscope.decode.flows import monotonic_to_utc_offset_ns
    from flowscope.kernel import tc
    from flowscope.kernel.compile_child import load
    from flowscope.kernel.loader import LoadOptions
    from flowscope.readers.drain import KernelReader

    map_size = 1 << (flows - 1).bit_length()
    loaded = load(LoadOptions(interfaces=[lab.VETH_CLIENT], flow_map_size=map_size))
    reader = KernelReader(loaded)
    try:
        ifnames = tc.interface_names()
        ifindex = next(index for index, name in ifnames.items() if name == lab.VETH_CLIENT)
        context = AggregationContext("bench", monotonic_to_utc_offset_ns(), ifnames, loaded.active)
        keys, stats = synthetic_flows(flows, ifindex)
        # Wall-clock per step, and the CPU time of the whole drain (this thread's): on a busy machine the
        # wall clock includes waiting for a CPU, the CPU time does not (nor the grace period's sleep).
        timings: dict[str, list[float]] = {"flip_and_drain_ms": [], "build_batch_ms": [], "total_ms": [], "cpu_ms": []}
        rows = []
        profile = cProfile.Profile()
        for repeat in range(repeats + 1):
            update_batch(loaded.maps[f"flows_{reader.generation}"].fd, keys, stats)
            window = (pd.Timestamp.now(tz="UTC"), pd.Timestamp.now(tz="UTC"))
            if repeat == repeats:
                profile.enable()
            started, cpu_started = time.perf_counter(), time.thread_time()
            kernel = reader.flip_and_drain()
            drained = time.perf_counter()
            batch = build_batch(kernel, context, window)
            built, cpu_built = time.perf_counter(), time.thread_time()
            if repeat == repeats:
                profile.disable()
                break  # the profiled run is not timed
            if repeat == 0:
                continue  # warm-up (first allocations, imports)
            timings["flip_and_drain_ms"].append((drained - started) * 1e3)
            timings["build_batch_ms"].append((built - drained) * 1e3)
            timings["total_ms"].append((built - started) * 1e3)
            timings["cpu_ms"].append((cpu_built - cpu_started) * 1e3)
            rows.append(len(batch.flows))
    finally:
        reader.close()
        loaded.close()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(18)
    result = {
        "flows": flows,
        "map_size": map_size,
        "rows": rows,
        "profile_top": text.getvalue().splitlines()[:45],
        **{name: [round(v, 1) for v in values] for name, values in timings.items()},
        **{f"median_{name}": round(lab.median(values), 1) for name, values in timings.items()},
    }
    lab.log(
        f"drain {flows:,} flows: flip+drain {result['median_flip_and_drain_ms']} ms, FlowBatch "
        f"{result['median_build_batch_ms']} ms, total {result['median_total_ms']} ms, CPU {result['median_cpu_ms']} ms "
        f"(median of {repeats})"
    )
    return result


def new_flow_rates(runs: list[tuple[int, int | None]], seconds: float) -> list[dict]:
    """One agent run per (flow map size, new flows per second); rate None: as fast as tcpreplay can."""
    from flowscope.kernel.loader import LoadOptions

    results = []
    with tempfile.TemporaryDirectory(prefix="fsbench-") as directory:
        for map_size, rate in runs:
            flows = int((rate or 400_000) * seconds)
            pcap = lab.write_udp_flows_pcap(Path(directory) / f"flows-{flows}.pcap", flows)
            seen: list[pd.DataFrame] = []

            def keep(batch, seen=seen) -> None:
                mine = batch.flows[(batch.flows["protocol"] == "UDP") & (batch.flows["direction"] == "egress")]
                seen.append(mine[["src_ip", "src_port", "packets"]])

            options = LoadOptions(interfaces=[lab.VETH_CLIENT], flow_map_size=map_size)
            with lab.Agent(options, interval=1.0, on_batch=keep) as agent:
                replay = lab.tcpreplay(pcap, pps=rate)
                sent, pps = lab.tcpreplay_rate(replay.communicate()[0])
                time.sleep(0.2)
                agent.stop()
            flows_seen = pd.concat(seen, ignore_index=True)
            distinct = len(flows_seen.drop_duplicates(["src_ip", "src_port"]))
            coverage = agent.coverage.to_dict()
            spill = coverage.get("events:flow_spill", {"produced": 0, "delivered": 0, "lost": 0})
            entry = {
                "flow_map_size": map_size,
                "rate_asked": rate or "topspeed",
                "flows_sent": sent,
                "pps_achieved": round(pps),
                "flows_delivered": distinct,
                "packets_delivered": int(flows_seen["packets"].sum()),
                "spilled_produced": spill["produced"],
                "spilled_delivered": spill["delivered"],
                "spilled_lost": spill["lost"],
                "flow_map": coverage.get("flow_map"),
                "no_loss": distinct == sent and spill["lost"] == 0,
            }
            results.append(entry)
            lab.log(
                f"map {map_size}: new flows at {entry['pps_achieved']:,}/s: sent {sent:,}, delivered {distinct:,}, "
                f"spilled {spill['produced']:,} (lost {spill['lost']:,})"
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--runs",
        default="65536:30000,65536:60000,65536:90000,65536:150000,262144:150000,262144:0",
        help="flow map size:new flows per second, comma-separated (rate 0: as fast as tcpreplay can)",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of new flows per rate")
    args = parser.parse_args()
    lab.require_tools("tcpreplay")
    started = time.monotonic()
    with lab.lab(), lab.udp_sink():
        result = {
            "drain": drain(args.flows, args.repeats),
            "new_flows": new_flow_rates(
                [(int(size), int(rate) or None) for size, rate in (run.split(":") for run in args.runs.split(","))],
                args.seconds,
            ),
        }
    for size in sorted({r["flow_map_size"] for r in result["new_flows"]}):
        sustained = [r["pps_achieved"] for r in result["new_flows"] if r["no_loss"] and r["flow_map_size"] == size]
        result.setdefault("sustained_new_flows_per_s", {})[str(size)] = max(sustained) if sustained else 0
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    lab.save("map_drain", result)


if __name__ == "__main__":
    main()

"""Events: ring-buffer events per second into the aggregator, with produced / delivered / lost.

Event source: the tc program's flow spill. With a one-entry flow map, every packet of a flow that is not
in the map is sent through the event ring as one 120-byte record (FS_EV_FLOW_SPILL) and counted in the
kernel as sent or lost (ring full). tcpreplay loops over 1000 distinct UDP flows at a fixed rate through
fsb0a, so the event rate is the packet rate, and the aggregator folds each interval's events back into
at most 1000 flows. The agent runs as usual (1 s intervals, 1 MiB ring), once with the event reader of
flowscope/kernel_reader.py (BCC's ring-buffer callback, one Python call per event) and once with the
numpy prototype of bench/ring_reader.py. produced = what the kernel tried to send, delivered = what
reached the FlowBatches, lost = what the kernel counted as ring-full; produced == delivered + lost is
checked for every run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench import lab, ring_reader

# (reader, ring pages): the default ring, then a 16 MiB one (131072 records: over a second at 100k/s),
# which rides out the moments a reader thread waits for the GIL behind a long numpy or pandas call.
CONFIGS = (("bcc_callback", 256), ("numpy_mmap", 256), ("bcc_callback", 4096), ("numpy_mmap", 4096))
DISTINCT_FLOWS = 1000


def one_run(reader: str, ring_pages: int, rate: int | None, seconds: float, pcap: Path) -> dict:
    from flowscope.loader import LoadOptions

    loops = max(1, round((rate or 2_000_000) * seconds / DISTINCT_FLOWS))  # --duration ends it in time
    options = LoadOptions(interfaces=[lab.VETH_CLIENT], flow_map_size=1, ring_pages=ring_pages)
    agent = lab.Agent(options, interval=1.0)
    if reader == "numpy_mmap":
        ring_reader.install(agent.source)
    with agent:
        cpu_before, wall_before = os.times(), time.monotonic()
        replay = lab.tcpreplay(pcap, pps=rate, loops=loops, seconds=seconds)
        sent, pps = lab.tcpreplay_rate(replay.communicate()[0])
        time.sleep(0.3)
        agent.stop()
        cpu_after, wall_after = os.times(), time.monotonic()
    spill = agent.coverage.sources.get("events:flow_spill")
    produced, delivered, lost = (spill.produced, spill.delivered, spill.lost) if spill else (0, 0, 0)
    busy = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    entry = {
        "reader": reader,
        "ring_pages": ring_pages,
        "rate_asked": rate or "topspeed",
        "packets_sent": sent,
        "events_per_s_offered": round(pps),
        "produced": produced,
        "delivered": delivered,
        "lost": lost,
        "balanced": produced == delivered + lost,
        "loss_ratio": round(lost / produced, 4) if produced else 0.0,
        "delivered_per_s": round(delivered / (sent / pps)) if pps else 0,
        "agent_cpu_share": round(busy / (wall_after - wall_before), 3),
        "unbalanced_sources": agent.coverage.unbalanced(),
    }
    lab.log(
        f"{reader:<13} ring {ring_pages:>4} pages, offered {entry['events_per_s_offered']:>8,}/s: "
        f"produced {produced:>9,} delivered "
        f"{delivered:>9,} lost {lost:>9,} ({'balanced' if entry['balanced'] else 'UNBALANCED'}), "
        f"agent CPU {entry['agent_cpu_share']:.0%}"
    )
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100000,200000,0", help="events per second (0: as fast as possible)")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    lab.require_tools("tcpreplay")
    rates = [int(r) or None for r in args.rates.split(",")]
    started = time.monotonic()
    runs = []
    with lab.lab(), lab.udp_sink(), tempfile.TemporaryDirectory(prefix="fsbench-") as directory:
        pcap = lab.write_udp_flows_pcap(Path(directory) / "flows.pcap", DISTINCT_FLOWS)
        for reader, ring_pages in CONFIGS:
            for rate in rates:
                runs.append(one_run(reader, ring_pages, rate, args.seconds, pcap))
    summary = {}
    for reader, ring_pages in CONFIGS:
        mine = [r for r in runs if r["reader"] == reader and r["ring_pages"] == ring_pages]
        lossless = [r["delivered_per_s"] for r in mine if r["lost"] == 0 and r["produced"]]
        summary[f"{reader} ring {ring_pages}"] = {
            "max_lossless_delivered_per_s": max(lossless) if lossless else 0,
            "max_delivered_per_s": max(r["delivered_per_s"] for r in mine),
            "all_balanced": all(r["balanced"] for r in mine),
        }
        lab.log(f"{reader} ring {ring_pages}: {summary[f'{reader} ring {ring_pages}']}")
    lab.save("events", {"runs": runs, "summary": summary, "elapsed_s": round(time.monotonic() - started, 1)})


if __name__ == "__main__":
    main()

"""Events: ring-buffer events per second into the aggregator, with produced / delivered / lost.

Event source: the tc program's flow spill, driven without a traffic generator. With a one-entry flow
map, a packet of any flow other than the one in the map is sent through the event ring as one 120-byte
record (FS_EV_FLOW_SPILL) and counted in the kernel as sent or lost (ring full). A child process runs
the loaded tc egress program with BPF_PROG_TEST_RUN on two packets of different flows in turns, paced
to the rate asked; one of the two holds the map's entry, so each pair of calls spills one call's worth
of runs. The agent runs as usual (1 s intervals) with each of flowscope's ring readers
(LoadOptions.ring_reader): "mmap" (flowscope/ring_reader.py, the default on x86-64) and "bcc" (BCC's
per-event callback, the fallback elsewhere), each with a 1 MiB ring (256 pages, the default until
issue 5) and the 16 MiB default (4096 pages). produced = what the kernel tried to send, delivered =
what reached the FlowBatches, lost = what the kernel counted as ring-full plus what the reader dropped;
produced == delivered + lost is checked in every run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import lab
from flowscope.kernel.loader import LoadOptions

# (reader, ring pages): a 1 MiB ring, then the 16 MiB default (131072 records: over a second at 100k/s),
# which rides out the moments the reader thread waits for the GIL behind a long numpy or pandas call.
CONFIGS = (("bcc", 256), ("mmap", 256), ("bcc", 4096), ("mmap", 4096))
READER_NAMES = {"bcc": "bcc_callback", "mmap": "mmap"}
RUNS_PER_CALL = 500


def generate(prog_fd: int, rate: int, seconds: float) -> None:
    """The event source (a child process holding the program's fd): BPF_PROG_TEST_RUN in turns on two
    flows' packets, RUNS_PER_CALL runs a call, paced to `rate` spills per second (0: no pacing)."""
    from bench.dataplane import udp_packet
    from flowscope.kernel.bpf_syscall import prog_test_run

    first, second = udp_packet(40000), udp_packet(40001)  # another source port: another flow
    started = time.monotonic()
    pairs = 0
    while (now := time.monotonic()) - started < seconds:
        prog_test_run(prog_fd, first, RUNS_PER_CALL)
        prog_test_run(prog_fd, second, RUNS_PER_CALL)
        pairs += 1
        if rate:
            ahead = started + pairs * RUNS_PER_CALL / rate - now
            if ahead > 0:
                time.sleep(ahead)


def one_run(reader: str, ring_pages: int, rate: int, seconds: float) -> dict:
    options = LoadOptions(interfaces=[lab.VETH_CLIENT], flow_map_size=1, ring_pages=ring_pages, ring_reader=reader)
    agent = lab.Agent(options, interval=1.0)
    prog_fd = agent.source.loaded.tc_programs["egress"]
    with agent:
        cpu_before, wall_before = os.times(), time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "bench.events", "--generate", str(prog_fd), "--rate", str(rate),
             "--seconds", str(seconds)],
            pass_fds=(prog_fd,), cwd=Path(__file__).resolve().parent.parent, check=True,
        )  # fmt: skip
        time.sleep(0.3)
        agent.stop()
        cpu_after, wall_after = os.times(), time.monotonic()
    spill = agent.coverage.sources.get("events:flow_spill")
    produced, delivered, lost = (spill.produced, spill.delivered, spill.lost) if spill else (0, 0, 0)
    busy = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    entry = {
        "reader": READER_NAMES[reader],
        "ring_pages": ring_pages,
        "rate_asked": rate or "unpaced",
        "events_per_s_offered": round(produced / seconds),
        "produced": produced,
        "delivered": delivered,
        "lost": lost,
        "balanced": produced == delivered + lost,
        "loss_ratio": round(lost / produced, 4) if produced else 0.0,
        "delivered_per_s": round(delivered / seconds),
        "agent_cpu_share": round(busy / (wall_after - wall_before), 3),
        "unbalanced_sources": agent.coverage.unbalanced(),
    }
    lab.log(
        f"{entry['reader']:<13} ring {ring_pages:>4} pages, offered {entry['events_per_s_offered']:>8,}/s: "
        f"produced {produced:>9,} delivered "
        f"{delivered:>9,} lost {lost:>9,} ({'balanced' if entry['balanced'] else 'UNBALANCED'}), "
        f"agent CPU {entry['agent_cpu_share']:.0%}"
    )
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100000,200000,400000,800000", help="events per second (0: unpaced)")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--generate", type=int, metavar="PROG_FD", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate is not None:
        generate(args.generate, args.rate, args.seconds)
        return
    rates = [int(r) for r in args.rates.split(",")]
    started = time.monotonic()
    runs = []
    with lab.lab():
        for reader, ring_pages in CONFIGS:
            for rate in rates:
                runs.append(one_run(reader, ring_pages, rate, args.seconds))
    summary = {}
    defaults = LoadOptions()
    for reader, ring_pages in CONFIGS:
        mine = [r for r in runs if r["reader"] == READER_NAMES[reader] and r["ring_pages"] == ring_pages]
        lossless = [r["delivered_per_s"] for r in mine if r["lost"] == 0 and r["produced"]]
        name = f"{READER_NAMES[reader]} ring {ring_pages}"
        summary[name] = {
            "max_lossless_delivered_per_s": max(lossless) if lossless else 0,
            "max_delivered_per_s": max(r["delivered_per_s"] for r in mine),
            "all_balanced": all(r["balanced"] for r in mine),
            "is_default": (reader, ring_pages) == (defaults.ring_reader, defaults.ring_pages),
        }
        lab.log(f"{name}: {summary[name]}")
    lab.save("events", {"runs": runs, "summary": summary, "elapsed_s": round(time.monotonic() - started, 1)})


if __name__ == "__main__":
    main()

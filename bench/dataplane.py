"""Data-plane overhead: what attaching flowscope costs the traffic it watches.

1. Throughput: iperf3 between the lab's namespaces (veth) and on the client namespace's loopback, TCP
   bulk and 64-byte UDP packets, with the agent running (probes attached to fsb0a and lo, drained every
   second) and without it. Runs are interleaved (off/on, then on/off, ...) so drift hits both sides;
   the figure is the ratio of the medians.
2. Per-packet cost of every program flowscope loaded, from the kernel's own run statistics
   (run_time_ns / run_cnt, bpf_stats_enabled on only for this phase), under each workload, plus a
   stream of packets that are all new flows (tcpreplay of distinct 5-tuples). Empty programs on the
   same hooks (tc on fsb0a, tcp_probe, kfree_skb) give what the statistics add to any program.
3. The tc programs alone on one crafted 64-byte UDP packet, BPF_PROG_TEST_RUN with 1e6 repeats: the
   existing-flow path with hot caches, without any stack around it; an empty tc program measured the
   same way gives the harness's own cost. The same run on variants of probes/tc_flow.c, changed here
   in memory only (the file is not touched), attributes the cost to its parts (see VARIANTS).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench import lab

WORKLOADS = {
    # name: (host, iperf3 flags, figure reader, unit)
    "veth_tcp": (lab.SERVER_V4, (), lab.tcp_bits_per_second, "bit/s"),
    "loopback_tcp": ("127.0.0.1", (), lab.tcp_bits_per_second, "bit/s"),
    "veth_udp_64B": (lab.SERVER_V4, ("-u", "-l", "64", "-b", "0"), lab.udp_packets_per_second, "packets/s"),
}
WARM_UP_SECONDS = 1.0
TEST_RUN_REPEAT = 1_000_000
VARIANT_ROUNDS = 7
# Reference points for the test runs: an empty tc program (the harness's own cost), and the floor of what
# the flow program does per packet on an existing flow: one lookup in a shared hash map with a key of the
# flow key's size (44 bytes), then two atomic adds.
REFERENCE_TC_PROGRAMS = """
#include <uapi/linux/pkt_cls.h>
struct fs_floor_key { u8 bytes[44]; };
struct fs_floor_value { u64 packets; u64 bytes; };
BPF_HASH(fs_floor, struct fs_floor_key, struct fs_floor_value, 65536);
int fs_empty(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
int fs_hash_floor(struct __sk_buff *skb) {
    struct fs_floor_key key = {};
    key.bytes[0] = skb->protocol;
    struct fs_floor_value *value = fs_floor.lookup(&key);
    if (!value) {
        struct fs_floor_value fresh = {1, skb->len};
        fs_floor.insert(&key, &fresh);
        return TC_ACT_UNSPEC;
    }
    __sync_fetch_and_add(&value->packets, 1);
    __sync_fetch_and_add(&value->bytes, skb->len);
    return TC_ACT_UNSPEC;
}
"""
# What-if variants of the tc program: (name, what it changes, [(text in the probe source, replacement)]).
# Each removes or undoes one part of the per-packet path, so its saving against as_is is that part's cost.
FLOW_LOOKUP = "struct flow_stats *stats = fs_flow_lookup(generation, &key);"
VARIANTS = (
    ("as_is", "probes/tc_flow.c as committed", ()),
    (
        "precise_clock",
        "bpf_ktime_get_ns() on every packet instead of fs_now() (the clock read once per jiffy)",
        (("__u64 now = fs_now();", "__u64 now = bpf_ktime_get_ns();"),),
    ),
    (
        "merged_lookup",
        "`generation ? flows_1.lookup() : flows_0.lookup()`: one call on a selected map, which the verifier "
        "cannot inline",
        ((FLOW_LOOKUP, "struct flow_stats *stats = generation ? flows_1.lookup(&key) : flows_0.lookup(&key);"),),
    ),
    (
        "one_map",
        "no generation read, one flow map (no double buffering)",
        (("__u32 generation = fs_current_generation();", "__u32 generation = 0;"),),
    ),
    (
        "no_tc_counters",
        "without the per-CPU tc_packets/tc_bytes counters (the 'produced' of the loss accounting)",
        (("    fs_count(generation, FS_CNT_TC_PACKETS, 1);\n    fs_count(generation, FS_CNT_TC_BYTES, len);\n", ""),),
    ),
    (
        "array_not_hash",
        "the flow-map lookup replaced by a one-entry array's: what the hash lookup itself costs",
        (
            (
                "static __always_inline int fs_account(",
                "BPF_ARRAY(fs_bench_one, struct flow_stats, 1);\nstatic __always_inline int fs_account(",
            ),
            (FLOW_LOOKUP, "__u32 zero = 0;\n    struct flow_stats *stats = fs_bench_one.lookup(&zero);"),
        ),
    ),
)
# Programs that do nothing, attached beside flowscope's during the run-statistics phase: their ns per run is
# what the statistics themselves (two sched_clock() reads) and the hook's dispatch add to every program.
REFERENCE_LIVE_PROGRAMS = """
#include <uapi/linux/pkt_cls.h>
int reference_empty_tc(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
RAW_TRACEPOINT_PROBE(tcp_probe) { return 0; }
RAW_TRACEPOINT_PROBE(kfree_skb) { return 0; }
"""
REFERENCE_PREFIX = "reference_empty_"


def agent_options(flow_map_size: int = 65536):
    from flowscope.kernel.loader import LoadOptions

    return LoadOptions(interfaces=[lab.VETH_CLIENT, "lo"], flow_map_size=flow_map_size)


def throughput(rounds: int, seconds: float) -> dict:
    samples: dict[str, dict[str, list[float]]] = {name: {"off": [], "on": []} for name in WORKLOADS}
    agent_cpu: dict[str, list[float]] = {name: [] for name in WORKLOADS}  # this process: the agent's threads

    def measure(mode: str) -> None:
        for name, (host, flags, figure, _unit) in WORKLOADS.items():
            times, started = os.times(), time.monotonic()
            value = figure(lab.iperf3(host, seconds, *flags))
            if mode == "on":
                used = sum(os.times()[:2]) - sum(times[:2])
                agent_cpu[name].append(used / (time.monotonic() - started))
            samples[name][mode].append(value)
            lab.log(f"  {name:<14} probes {mode:<3} {value:,.0f}")

    for round_number in range(rounds):
        order = ("off", "on") if round_number % 2 == 0 else ("on", "off")
        for mode in order:
            if mode == "on":
                with lab.Agent(agent_options()) as agent:
                    # Warm-up: the agent's first intervals with TCP events pay one-off costs (first decode
                    # of each family's events, kernel symbols); 40% of a core in the first second on
                    # loopback against 9-11% after it. Measured is the steady state: from the end of
                    # the interval that held the warm-up traffic.
                    lab.iperf3("127.0.0.1", WARM_UP_SECONDS)
                    drained = agent.batches + 1
                    while agent.batches < drained and agent.error is None:
                        time.sleep(0.05)
                    measure(mode)
            else:
                measure(mode)
    result = {}
    for name, by_mode in samples.items():
        # Each round's "on" over the same round's "off": the two ran back to back, so a change of load on
        # the machine between rounds cancels out; the figure is the median of these ratios.
        pairs = [on / off for on, off in zip(by_mode["on"], by_mode["off"], strict=True)]
        result[name] = {
            "unit": WORKLOADS[name][3],
            "off": by_mode["off"],
            "on": by_mode["on"],
            "median_off": lab.median(by_mode["off"]),
            "median_on": lab.median(by_mode["on"]),
            "round_ratios": [round(r, 4) for r in pairs],
            "ratio": round(lab.median(pairs), 4),
            "agent_cpu_share": round(lab.median(agent_cpu[name]), 4),
        }
        lab.log(f"{name}: with probes / without = {result[name]['ratio']:.3f} (median of {rounds} rounds)")
    return result


def per_packet_cost(seconds: float, new_flows: int) -> dict:
    """Per workload: each program's runs and ns per run, and the programs' time as a share of one core."""
    import bcc

    from flowscope.kernel import bpf_syscall, tc
    from flowscope.kernel.headers import export_for_bcc, find_headers

    result = {}
    stats_fd = bpf_syscall.enable_run_time_stats()
    try:
        with lab.Agent(agent_options(flow_map_size=2 * new_flows)) as agent:
            fds = dict(agent.source.loaded.programs)  # every program flowscope loaded: name -> fd
            export_for_bcc(find_headers())  # the agent compiles in a child process: this one has none yet
            references = bcc.BPF(text=REFERENCE_LIVE_PROGRAMS)  # its raw tracepoints attach as it loads
            attachments = tc.TcAttachments()
            try:
                empty_tc = references.load_func(b"reference_empty_tc", bcc.BPF.SCHED_CLS).fd
                attachments.attach(lab.VETH_CLIENT, empty_tc, empty_tc)  # after flowscope's filters
                for name, function in references.funcs.items():
                    fds[REFERENCE_PREFIX + name.decode().removeprefix(REFERENCE_PREFIX)] = function.fd

                def measure(name: str, traffic) -> None:
                    before, started = lab.run_stats(fds), time.monotonic()
                    throughput = traffic()
                    programs = lab.run_stats_delta(before, lab.run_stats(fds))
                    wall = time.monotonic() - started
                    own = sum(p["ns"] for n, p in programs.items() if not n.startswith(REFERENCE_PREFIX))
                    result[name] = {
                        "programs": programs,
                        "wall_s": round(wall, 2),
                        "throughput": throughput,
                        "core_share": round(own / (wall * 1e9), 4),
                    }

                for name, (host, flags, figure, unit) in WORKLOADS.items():
                    measure(
                        name, lambda host=host, flags=flags, figure=figure: figure(lab.iperf3(host, seconds, *flags))
                    )
                    result[name]["unit"] = unit
                with tempfile.TemporaryDirectory(prefix="fsbench-") as directory:
                    pcap = lab.write_udp_flows_pcap(Path(directory) / "flows.pcap", new_flows)
                    measure("new_flows", lambda: lab.tcpreplay_rate(lab.tcpreplay(pcap).communicate()[0])[1])
                    result["new_flows"]["unit"] = "packets/s"
            finally:  # before the agent detaches, so that the clsact it made is left with no filter of ours
                attachments.detach()
                references.cleanup()
    finally:
        os.close(stats_fd)
    for workload, figures in result.items():
        lab.log(f"{workload}: BPF programs used {figures['core_share']:.1%} of a core")
        for program, counts in figures["programs"].items():
            if counts["runs"]:
                lab.log(f"  {program:<36} {counts['runs']:>10,} runs {counts['ns_per_run']:>8} ns/run")
    return result


def udp_packet(source_port: int = 40000) -> bytes:
    """One 64-byte IPv4/UDP frame of the lab's client to its server (the test runs' packet)."""
    return lab.udp_frame(lab.CLIENT_V4, source_port, 5201, 64)


def prog_test_run(prog_fd: int, packet: bytes, repeat: int) -> dict:
    """BPF_PROG_TEST_RUN: the kernel runs the program `repeat` times on `packet` and reports the mean ns."""
    from flowscope.kernel import bpf_syscall

    retval, ns_per_run = bpf_syscall.prog_test_run(prog_fd, packet, repeat)
    return {"repeat": repeat, "ns_per_run": ns_per_run, "retval": retval}


def tc_variants() -> dict:
    """BPF_PROG_TEST_RUN of the tc egress program and of its variants, and of an empty program."""
    import bcc

    from flowscope.kernel.features import probe_features
    from flowscope.kernel.headers import export_for_bcc, find_headers
    from flowscope.kernel.loader import LoadOptions, cflags_for, module_text, plan_families

    options = LoadOptions(families={"tc_flows"})
    features = probe_features()
    export_for_bcc(find_headers())
    active = [status.family for status in plan_families(features, options) if status.active]
    source, cflags = module_text(active), cflags_for(active, features, options)
    packet = udp_packet()
    reference = bcc.BPF(text=REFERENCE_TC_PROGRAMS)
    try:
        harness = prog_test_run(reference.load_func(b"fs_empty", bcc.BPF.SCHED_CLS).fd, packet, TEST_RUN_REPEAT)
        floor_fd = reference.load_func(b"fs_hash_floor", bcc.BPF.SCHED_CLS).fd
        prog_test_run(floor_fd, packet, 1)
        floor = prog_test_run(floor_fd, packet, TEST_RUN_REPEAT)
    finally:
        reference.cleanup()
    floor["ns_without_harness"] = floor["ns_per_run"] - harness["ns_per_run"]
    result = {"empty_program": harness, "hash_floor": floor, "variants": {}}
    lab.log(f"test_run empty tc program: {harness['ns_per_run']} ns/run (the harness)")
    lab.log(
        f"test_run 44-byte-key hash lookup + 2 atomic adds: {floor['ns_without_harness']} ns/run without the harness"
    )
    loaded = {}
    try:
        for name, description, edits in VARIANTS:
            text = source
            missing = [old for old, _new in edits if old not in text]
            if missing:
                result["variants"][name] = {
                    "description": description,
                    "not_applicable": f"{missing[0]!r} not in source",
                }
                continue
            for old, new in edits:
                text = text.replace(old, new)
            loaded[name] = bcc.BPF(text=text, cflags=cflags)
            fd = loaded[name].load_func(b"fs_tc_egress", bcc.BPF.SCHED_CLS).fd
            prog_test_run(fd, packet, TEST_RUN_REPEAT // 10)  # warm up; the flow exists from here on
            result["variants"][name] = {"description": description, "fd": fd, "runs": []}
        for _round in range(VARIANT_ROUNDS):  # round-robin, so drift on the machine hits every variant alike
            for name in loaded:
                figures = result["variants"][name]
                figures["runs"].append(prog_test_run(figures["fd"], packet, TEST_RUN_REPEAT)["ns_per_run"])
    finally:
        for bpf in loaded.values():
            bpf.cleanup()
    for name in loaded:
        figures = result["variants"][name]
        del figures["fd"]
        figures["ns_per_run"] = lab.median(figures["runs"])
        figures["ns_without_harness"] = figures["ns_per_run"] - harness["ns_per_run"]
        lab.log(
            f"test_run egress {name:<30} {figures['ns_per_run']:>6.0f} ns/run "
            f"({figures['ns_without_harness']:.0f} without the harness)"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (each: every workload off and on)")
    parser.add_argument("--seconds", type=float, default=1.5, help="seconds per iperf3 run")
    parser.add_argument("--new-flows", type=int, default=100_000, help="distinct flows for the new-flow cost")
    args = parser.parse_args()
    lab.require_tools("iperf3", "tcpreplay")
    started = time.monotonic()
    with lab.lab(), lab.iperf3_server(lab.NETNS_SERVER), lab.iperf3_server(lab.NETNS_CLIENT), lab.udp_sink():
        result = {
            "config": {"rounds": args.rounds, "seconds": args.seconds, "new_flows": args.new_flows},
            "throughput": throughput(args.rounds, args.seconds),
            "per_packet": per_packet_cost(args.seconds, args.new_flows),
            "test_run": tc_variants(),
        }
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    lab.save("dataplane", result)


if __name__ == "__main__":
    main()

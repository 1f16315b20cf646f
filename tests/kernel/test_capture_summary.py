"""`flowscope capture --duration` run to its end, and its summary's probe lists checked against what the
kernel shows: the raw tracepoint links and tc programs the capture process holds (/proc/PID/fdinfo), the tc
filters on the watched interface, and tracefs' kprobe_events for the probes that cannot run."""

from __future__ import annotations

import math
import re
from pathlib import Path

from tests.kernel.capture import Capture, held_by
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import filters, flow_totals, start_sink, two_hosts, udp_frame, udp_id
from tests.kernel.tracepoint_lab import RAW_TRACEPOINTS

DURATION, INTERVAL = 4.0, 0.5
KPROBE_EVENTS = Path("/sys/kernel/tracing/kprobe_events")


def test_capture_with_a_duration_ends_by_itself_and_names_the_probes_the_kernel_runs() -> None:
    with Lab("fscs-", "10.233.0.0/16", "fd00:233::/64") as lab:
        hosts = two_hosts(lab)
        start_sink(hosts.b, "udp-sink", hosts.address("b", 4), "5000")
        run = Capture.start(hosts.a, ["fstcA"], INTERVAL, "--duration", str(DURATION))
        held = held_by(run.process.pid)
        tc_programs = {entry["hook"]: entry["options"]["prog"]["id"] for entry in filters(hosts.a, "fstcA")}
        sent = hosts.udp("a", 4, 40000, 5000, 100, 30)
        result = run.wait(timeout=DURATION + 60)  # no signal: it ends when the duration has passed
    assert result.returncode == 0, result.stderr
    assert result.summary["interrupted"] is False
    assert result.summary["intervals"] == len(result.batches) == math.ceil(DURATION / INTERVAL)
    assert result.summary["unbalanced_sources"] == []
    a, b = hosts.address("a", 4), hosts.address("b", 4)
    assert flow_totals(result.flows, "fstcA", {a, b}) == {
        udp_id("egress", 4, a, 40000, b, 5000): (sent["sent"], sent["sent"] * udp_frame(4, 100))
    }
    probes = {probe["name"]: probe for probe in result.summary["probes"]}
    active = {name for name, probe in probes.items() if probe["active"]}
    # The tc probe runs on both hooks of the interface, with programs this capture loaded.
    assert probes["tc_flows"]["hook"] == "tc clsact ingress + egress"
    assert set(tc_programs) == {"ingress", "egress"} and set(tc_programs.values()) == held.tc_programs
    # The raw tracepoints of the active probes are exactly the links the capture holds.
    named = {name for probe in active for name in re.findall(r"\w+:(\w+)", probes[probe]["hook"])}
    assert named == set(held.raw_tracepoints) == RAW_TRACEPOINTS
    kprobe_families = {name for name, probe in probes.items() if probe["hook"].startswith("kprobe")}
    if KPROBE_EVENTS.exists():
        assert kprobe_families <= active
    else:  # neither attached nor said to be; each says why, and what runs instead
        assert kprobe_families and not kprobe_families & active
        for name in kprobe_families:
            reason = probes[name]["reason"]
            assert reason.startswith("the kernel is built without kprobes"), reason
            assert f"not needed: {name.removesuffix('_kprobe')} runs on this kernel" in reason, reason

"""The pipeline on the real kernel: an output that hangs for good costs only its own records, counted
exactly; the kernel side and the other outputs (JSON lines and the Parquet flow log) lose nothing and hold the
same flows, with the exact counts of the traffic sent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd

from flowscope.analysis.flowlog import read_flowlog
from flowscope.formats.jsonl import read_batches
from flowscope.schema import as_read
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import flow_totals, start_sink, two_hosts, udp_frame, udp_id
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
FLOWS, COUNT, PAYLOAD = 20, 30, 100
INTERVALS = 8


def test_a_hung_output_loses_only_its_own_records(tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    a4, b4 = hosts.port_a.ip4, hosts.port_b.ip4
    start_sink(hosts.b, "udp-sink", b4, "7001")
    out = tmp_path / "flows.jsonl"
    child = hosts.a.popen(
        sys.executable, "-m", "tests.kernel.pipeline_child", "fstcA", str(out), str(tmp_path / "log"),
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "ready"
        report = hosts.udp("a", 4, 21000, 7001, PAYLOAD, COUNT, "--flows", str(FLOWS))
        # more intervals than the hung output's queue holds (2) and the write it hangs in (1)
        wait_for(lambda: out.read_text().count('"type":"interval"') >= INTERVALS)
    finally:
        child.send_signal(signal.SIGINT)
        stdout, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    run = json.loads(stdout.strip().splitlines()[-1])
    coverage = run["coverage"]

    batches = list(read_batches(out.read_text().splitlines(), source=str(out)))
    flows = [batch.flows for batch in batches]
    totals = flow_totals(pd.concat(flows, ignore_index=True), "fstcA", {a4, b4})
    per_flow = report["per_flow"]
    assert per_flow == COUNT
    assert totals == {
        udp_id("egress", 4, a4, 21000 + n, b4, 7001): (COUNT, COUNT * udp_frame(4, PAYLOAD)) for n in range(FLOWS)
    }
    # The kernel side lost nothing, and the working output wrote every interval's records.
    assert coverage["flow_map"]["lost"] == 0 and coverage["flow_map"]["produced"] >= FLOWS * COUNT
    written = sum(len(batch.flows) + len(batch.events) for batch in batches)
    assert coverage["sink:jsonl"] == {"produced": written, "delivered": written, "lost": 0}
    # The flow log (settled when its file completed, at the close) holds the same flows as the JSON lines.
    assert coverage["sink:flowlog"] == {"produced": written, "delivered": written, "lost": 0}
    logged = read_flowlog(tmp_path / "log")
    assert flow_totals(logged, "fstcA", {a4, b4}) == totals
    pd.testing.assert_frame_equal(logged, read_flowlog_order(pd.concat(flows, ignore_index=True)))
    # The hung output: every record the pipeline produced, none delivered, all counted lost.
    assert coverage["sink:stuck"] == {"produced": written, "delivered": 0, "lost": written}
    assert len(batches) == run["intervals"] >= INTERVALS


def read_flowlog_order(flows: pd.DataFrame) -> pd.DataFrame:
    """Flows in the order and dtypes read_flowlog gives them."""
    return as_read(flows.sort_values(["time_start", "time_end"], kind="stable").reset_index(drop=True), "flows")

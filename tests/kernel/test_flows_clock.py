"""The tc probe's first/last-seen stamps come from a clock read once per jiffy (fs_now in flowscope.h): a
stamp may be up to one tick early, never late. Checked against the wall clock around the sends."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from tests.kernel.capture import Capture
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import assert_flow_map_balanced, start_sink, two_hosts

TICK_SLACK = pd.Timedelta(milliseconds=20)  # one tick at HZ >= 100, and the capture's clock offset
LATE_SLACK = pd.Timedelta(milliseconds=5)  # realtime against monotonic drift over the test (NTP slews)


def now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC")


@pytest.mark.parametrize("version", [4, 6])
def test_first_and_last_seen_bracket_the_sends(tc_lab: Lab, version: int) -> None:
    hosts = two_hosts(tc_lab)
    start_sink(hosts.b, "udp-sink", hosts.address("b", version), "7001")
    run = Capture.start(hosts.a, ["fstcA"], 0.5)
    first_before = now()
    hosts.udp("a", version, 5001, 7001, 100, 5)
    first_after = now()
    time.sleep(0.5)
    last_before = now()
    hosts.udp("a", version, 5001, 7001, 100, 5)
    last_after = now()
    result = run.stop()

    flows = result.flows
    mine = flows[(flows["ifname"] == "fstcA") & (flows["src_port"] == 5001) & (flows["protocol"] == "UDP")]
    assert int(mine["packets"].sum()) == 10
    first, last = mine["time_start"].min(), mine["time_end"].max()
    print(f"first seen {first} in [{first_before}, {first_after}], last seen {last} in [{last_before}, {last_after}]")
    assert first_before - TICK_SLACK <= first <= first_after + LATE_SLACK
    assert last_before - TICK_SLACK <= last <= last_after + LATE_SLACK
    assert_flow_map_balanced(result)

"""One meaning of a verdict: the filter language in pandas and in ClickHouse's SQL, the verdict a Hubble client
receives for a flow row and the rows Hubble's verdict filter selects all agree. A row of counters only (a
retransmit or an RTT, no packet counted) is forwarded, seen and not dropped, and `--verdict FORWARDED` selects
it; flowscope sends no other verdict, so `--verdict TRACED` selects nothing."""

import numpy as np
import pandas as pd
import pytest

from flowscope.exporters.grpc.hubble import HubbleApi, filter_set
from flowscope.exporters.grpc.ring import Chunk
from flowscope.filters import parse_filter
from flowscope.formats.clickhouse import where
from flowscope.proto.hubble.flow import flow_pb2 as flow
from flowscope.proto.hubble.observer import observer_pb2 as observer
from flowscope.schema import FlowBatch, events_frame, flows_frame

START, END = pd.Timestamp("2025-03-01T12:00:00Z"), pd.Timestamp("2025-03-01T12:00:02Z")
# one row each: retransmits only, an RTT only, drops only, every packet dropped, some of 10 packets dropped
ROWS = flows_frame(
    pd.DataFrame(
        {
            "time_start": [START] * 5,
            "time_end": [END] * 5,
            "protocol": ["TCP"] * 5,
            "src_ip": ["10.204.0.2"] * 5,
            "dst_ip": ["10.204.0.3"] * 5,
            "src_port": [40001, 40002, 40003, 40004, 40005],
            "dst_port": [443] * 5,
            "packets": [0, None, 0, 6, 10],
            "bytes": [0, None, 0, 600, 1000],
            "drop_packets": [0, None, 3, 6, 2],
            "drop_bytes": [0, None, 300, 600, 200],
            "drop_reason": [None, None, "NO_SOCKET", "NETFILTER_DROP", "TCP_INVALID_SEQUENCE"],
            "retransmits": [2, None, 0, 0, 0],
            "rtt_us": [None, 900, None, None, None],
        }
    )
)
FORWARDED_PORTS, DROPPED_PORTS = [40001, 40002, 40005], [40003, 40004, 40005]


def hubble_flows(verdicts: list[int]) -> list[flow.Flow]:
    """The Flows a Hubble client gets of ROWS asking for `verdicts` (all with none)."""
    batch = FlowBatch(START, END, ROWS, events_frame(pd.DataFrame()))
    view = Chunk(0, "node-a", batch, [], END.value, len(ROWS)).view(HubbleApi())
    whitelist = [flow.FlowFilter(verdict=verdicts)] if verdicts else []
    encoded = view.encode(view.select(filter_set(whitelist, [])))
    return [observer.GetFlowsResponse.FromString(data).flow for data in encoded]


def ports(flows: list[flow.Flow], verdict: int) -> list[int]:
    return sorted(f.l4.TCP.source_port for f in flows if f.verdict == verdict)


def test_the_filter_language_calls_every_row_not_dropped_forwarded():
    for text, want in (("verdict=forwarded", FORWARDED_PORTS), ("verdict=dropped", DROPPED_PORTS)):
        assert ROWS["src_port"][parse_filter(text).flows_mask(ROWS)].tolist() == want


def test_clickhouse_selects_the_same_rows(tmp_path):
    from chdb import session

    columns = ROWS[["src_port", "packets", "drop_packets"]].astype(object).itertuples(index=False)
    values = ", ".join("(" + ", ".join("NULL" if pd.isna(v) else str(v) for v in row) + ")" for row in columns)
    table = f"values('src_port UInt16, packets Nullable(UInt64), drop_packets Nullable(UInt64)', {values})"
    current = session.Session(str(tmp_path / "chdb"))
    for text, want in (("verdict=forwarded", FORWARDED_PORTS), ("verdict=dropped", DROPPED_PORTS)):
        sql = f"SELECT src_port FROM {table} WHERE {where(parse_filter(text), 'flows').sql()} ORDER BY src_port"
        assert current.query(sql, "CSV").bytes().decode().split() == [str(port) for port in want]


def test_a_hubble_client_gets_forwarded_and_dropped_flows_only():
    everything = hubble_flows([])
    assert {f.verdict for f in everything} == {flow.FORWARDED, flow.DROPPED}
    assert (ports(everything, flow.FORWARDED), ports(everything, flow.DROPPED)) == (FORWARDED_PORTS, DROPPED_PORTS)
    summaries = {f.l4.TCP.source_port: f.Summary for f in everything if f.verdict == flow.FORWARDED}
    assert summaries[40001] == "TCP Flags: none; 0 packets, 0 bytes in 2.000s; retransmits 2"
    assert summaries[40005] == "TCP Flags: none; 8 packets, 800 bytes in 2.000s"  # 10 - 2 dropped


@pytest.mark.parametrize(
    ("verdicts", "want"),
    [
        ([flow.FORWARDED], {flow.FORWARDED: FORWARDED_PORTS}),
        ([flow.DROPPED], {flow.DROPPED: DROPPED_PORTS}),
        ([flow.FORWARDED, flow.DROPPED], {flow.FORWARDED: FORWARDED_PORTS, flow.DROPPED: DROPPED_PORTS}),
        ([flow.TRACED], {}),  # a verdict flowscope never sends
        ([flow.TRACED, flow.DROPPED], {flow.DROPPED: DROPPED_PORTS}),
    ],
)
def test_hubble_verdict_filters_select_exactly_the_flows_of_that_verdict(verdicts, want):
    got = hubble_flows(verdicts)
    verdicts_got = np.unique([f.verdict for f in got]).tolist()
    assert {v: ports(got, v) for v in verdicts_got} == want

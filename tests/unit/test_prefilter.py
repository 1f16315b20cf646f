"""The filter pushed down into the flow log's reads (formats/prefilter.py): over an Arrow table each term keeps
exactly the rows it keeps over the frame, the rows read_flowlog gives are the ones the pandas filter gives over
the whole read, for a table of filters and for generated ones, and rows the filter leaves out never become
pandas columns."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowscope.analysis.flowlog import read_flowlog
from flowscope.config import FlowLogConfig
from flowscope.exporters.flowlog import FlowLogSink
from flowscope.filters import OBJECT_FIELDS, parse_filter
from flowscope.formats import parquet
from flowscope.formats.prefilter import ArrowColumns, prefilter
from flowscope.schema import READ_FLOW_COLUMNS, as_read
from tests.ui.scenario import shop_batches

SHOP = shop_batches()  # 5 two-second intervals, 22 flows and 11 events


def other_node() -> list:
    """The first two intervals again, ten minutes on, as another node saw them: labels on the source side, the
    last flow of each without ports or protocol (nulls the filter must treat as the frame does)."""
    later = pd.Timedelta(minutes=10)
    batches = []
    for batch in SHOP[:2]:
        flows = batch.flows.copy()
        flows["time_start"], flows["time_end"] = flows["time_start"] + later, flows["time_end"] + later
        flows["node"] = "node-b"
        flows["src_labels"] = [{"app": str(pod), "tier": "web"} if pd.notna(pod) else None for pod in flows["src_pod"]]
        for column in ("src_port", "dst_port", "protocol"):
            flows.loc[flows.index[-1], column] = pd.NA
        events = batch.events.copy()
        events["time"] = events["time"] + later
        events["node"] = "node-b"
        batches.append(replace(batch, time_start=batch.time_start + later, time_end=batch.time_end + later,
                               flows=flows, events=events))  # fmt: skip
    return batches


BATCHES = [*SHOP, *other_node()]


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    directory = tmp_path_factory.mktemp("log")
    sink = FlowLogSink(FlowLogConfig(directory=str(directory), rotate_age=1e9), monotonic=lambda: 0.0)
    sink.open()
    for batch in BATCHES:
        sink.write(batch)
    sink.close()
    return directory


FILTERS = [
    "pod=shop/checkout", "from-pod=shop/payments", "to-pod=kube-system/", "pod=coredns", "pod=shop/",
    "namespace=shop", "not namespace=shop", "to-namespace=kube-system", "workload=shop/payments", "workload=coredns",
    "ip=10.204.0.0/24", "ip=fd00:204::/64", "ip=10.204.0.53", "from-ip=192.0.2.0/24", "!ip=10.204.0.0/16",
    "port=8443", "port=50000-60000", "to-port=53", "not port=8443", "protocol=UDP", "protocol=tcp,udp",
    "not protocol=TCP", "protocol=6", "direction=ingress", "verdict=dropped", "verdict=forwarded",
    "not verdict=dropped", "reason=NO_SOCKET,NETFILTER_DROP", "not reason=NETFILTER_DROP", "ifname=veth-checkout",
    "type=drop", "type=retransmit", "type=reset", "type=flow", "type=connect,close", "node=node-a", "node=node-b",
    "not node=node-a", "from-node=node-a", "observer=node-*", "observer=*-b", "label=app=checkout-7d9f",
    "label=tier=web", "not label=tier=web", "namespace=shop port=8443 not verdict=dropped",
    "label=tier=web to-port=8443", "pod=shop/checkout,kube-system/coredns direction=egress", "port=1-65535",
]  # fmt: skip


def frame_and_table(log, kind: str) -> tuple[pd.DataFrame, object]:
    """Every flow (or event) of the log as read_flowlog gives them, and as the Arrow table it converts (text
    read as dictionaries)."""
    frame = read_flowlog(log, records=kind)
    file = next(log.iterdir())
    categorical = [name for name, dtype in READ_FLOW_COLUMNS.items() if dtype == "category"]
    table = pq.ParquetFile(file, read_dictionary=categorical).read()
    table = table.filter(np.asarray(table.column("record").to_numpy(zero_copy_only=False) == kind[:-1]))
    order = ["time_start", "time_end"] if kind == "flows" else ["time"]
    return frame, table.sort_by([(name, "ascending") for name in order])


@pytest.mark.parametrize("kind", ["flows", "events"])
def test_each_term_keeps_over_arrow_exactly_the_rows_it_keeps_over_the_frame(log, kind):
    frame, table = frame_and_table(log, kind)
    assert len(frame) == table.num_rows == (31 if kind == "flows" else 16)
    for text in FILTERS:
        for term in parse_filter(text).terms:
            if term.field in OBJECT_FIELDS:
                with pytest.raises(TypeError):
                    term.matches(ArrowColumns(table), kind)
                continue
            arrow, pandas = term.matches(ArrowColumns(table), kind), term.mask(frame, kind)
            assert arrow.dtype == bool and arrow.tolist() == pandas.tolist(), (text, term.text)


@pytest.mark.parametrize("kind", ["flows", "events"])
def test_read_flowlog_gives_what_the_pandas_filter_gives_over_everything(log, kind):
    everything = read_flowlog(log, records=kind)
    recorded = pd.concat([getattr(b, kind) for b in BATCHES], ignore_index=True)
    order = ["time_start", "time_end"] if kind == "flows" else ["time"]
    recorded = recorded.sort_values(order, kind="stable")
    counts = {}
    for text in FILTERS:
        chosen = parse_filter(text)
        keep = chosen.flows_mask if kind == "flows" else chosen.events_mask
        read = read_flowlog(log, filter=text, records=kind)
        pd.testing.assert_frame_equal(read, as_read(everything[keep(everything)], kind), obj=text)
        pd.testing.assert_frame_equal(read, as_read(recorded[keep(recorded)], kind), obj=text)
        counts[text] = len(read)
    if kind == "flows":  # the filters select what they say, nulls included (two flows have no ports)
        shown = ("to-namespace=kube-system", "port=1-65535", "port=8443", "not port=8443", "label=tier=web",
                 "not label=tier=web", "label=tier=web to-port=8443")  # fmt: skip
        assert [counts[text] for text in shown] == [4, 29, 14, 17, 8, 23, 2]


TERMS = st.sampled_from([
    "pod=shop/checkout", "pod=shop/", "pod=coredns", "pod=payments-0,kube-system/core", "namespace=shop",
    "namespace=kube-system,shop", "workload=shop/payments", "workload=checkout", "ip=10.204.0.0/24",
    "ip=fd00:204::/64", "ip=10.204.0.10,192.0.2.80", "port=8443", "port=53,443", "port=40000-52000",
    "node=node-a", "node=node-b", "observer=node-?", "protocol=TCP", "protocol=udp,17", "direction=egress",
    "verdict=dropped", "verdict=forwarded", "reason=NO_SOCKET", "reason=TCP_INVALID_SEQUENCE,NETFILTER_DROP",
    "ifname=eth0,veth-payments", "type=drop,reset", "type=flow", "type=accept", "label=app", "label=tier!=web",
])  # fmt: skip
SIDED = ("pod", "namespace", "workload", "ip", "port", "node", "label")


@st.composite
def filters(draw) -> str:
    terms = []
    for text in draw(st.lists(TERMS, min_size=1, max_size=4)):
        side = draw(st.sampled_from(["", "from-", "to-"])) if text.split("=")[0] in SIDED else ""
        terms.append(("not " if draw(st.booleans()) else "") + side + text)
    return " ".join(terms)


@settings(
    derandomize=True, max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=filters(), kind=st.sampled_from(["flows", "events"]))
def test_generated_filters_read_what_the_pandas_filter_selects(log, text, kind):
    everything = read_flowlog(log, records=kind)
    chosen = parse_filter(text)
    keep = chosen.flows_mask(everything) if kind == "flows" else chosen.events_mask(everything)
    pd.testing.assert_frame_equal(read_flowlog(log, filter=text, records=kind), as_read(everything[keep], kind))


def test_rows_the_filter_leaves_out_are_never_converted(log, monkeypatch):
    converted = []
    typed_frame = parquet.typed_frame

    def counting(tables, columns):
        converted.append(sum(table.num_rows for table in tables))
        return typed_frame(tables, columns)

    monkeypatch.setattr(parquet, "typed_frame", counting)
    assert len(read_flowlog(log)) == 31 and converted == [31]
    assert len(read_flowlog(log, filter="to-namespace=kube-system")) == 4 and converted[-1] == 4
    assert len(read_flowlog(log, filter="not port=8443 verdict=dropped")) == 4 and converted[-1] == 4
    # a label term stays in pandas: the rows the other terms pass are converted, then the labels decide
    assert len(read_flowlog(log, filter="label=tier=web port=8443")) == 4 and converted[-1] == 14
    assert len(read_flowlog(log, filter="label=tier=web")) == 8 and converted[-1] == 31


def test_prefilter_returns_the_table_itself_when_nothing_is_pushed_down(log):
    _, table = frame_and_table(log, "flows")
    assert prefilter(parse_filter("label=app"), table, "flows") is table
    assert prefilter(parse_filter("port=0-65535 not port=1-9"), table, "flows").num_rows == 29

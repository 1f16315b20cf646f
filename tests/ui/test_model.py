"""The data side of `top` on the shop scenario: groupings, sorting, filtering, drops, detail, trends."""

import numpy as np
import pandas as pd
import pytest

from flowscope.analysis.top import TopModel, sparklines
from flowscope.filters import parse_filter
from flowscope.schema import FlowBatch, events_frame, flows_frame
from tests.ui.scenario import shop_batches

CHECKOUT_TO_PAYMENTS = ("TCP", "10.204.0.10", 43210, "10.204.0.11", 8443)
CHECKOUT_POD = ("shop", "checkout-7d9f", "")


@pytest.fixture
def model() -> TopModel:
    top = TopModel()
    for batch in shop_batches():
        top.add(batch)
    top.backfill()
    return top


def table(model: TopModel, columns=("label", "bytes_per_s", "drops", "connections", "closes"), limit=20):
    frame = model.rows(limit).frame
    return [tuple(None if pd.isna(v) else v for v in row) for row in frame[list(columns)].itertuples(index=False)]


def test_flows_of_the_last_interval_ranked_by_bytes(model):
    assert table(model, ("label", "bytes_per_s", "packets_per_s", "drops", "rtt_us", "closes", "trend")) == [
        ("TCP shop/checkout-7d9f:43210 → shop/payments-0:8443", 70000.0, 70.0, 0, 1600.0, 1, "▆▇▇██"),
        ("TCP shop/payments-0:8443 → shop/checkout-7d9f:43210", 56000.0, 40.0, 0, 900.0, 0, "█████"),
        ("TCP shop/checkout-7d9f:50000 → shop/payments-0:443", 12000.0, 10.0, 0, 300.0, 0, "█████"),
        ("TCP 192.0.2.80:51000 → shop/checkout-7d9f:8080", 180.0, 3.0, 6, None, 0, "▁▁▁██"),
        ("UDP shop/checkout-7d9f:40001 → kube-system/coredns-55:53", 90.0, 1.0, 0, None, 0, "█▁█▁█"),
    ]
    assert model.rows(2).groups == 5
    assert len(model.rows(2).frame) == 2


@pytest.mark.parametrize(
    ("grouping", "expected"),
    [
        (
            "pod",
            [
                ("shop/checkout-7d9f", 138270.0, 6, 0, 1),
                ("shop/payments-0", 138000.0, 0, 0, 1),
                ("192.0.2.80", 180.0, 6, 0, 0),
                ("kube-system/coredns-55", 90.0, 0, 0, 0),
            ],
        ),
        (
            "workload",
            [
                ("shop/checkout", 138270.0, 6, 0, 1),
                ("shop/payments", 138000.0, 0, 0, 1),
                ("192.0.2.80", 180.0, 6, 0, 0),
                ("kube-system/coredns", 90.0, 0, 0, 0),
            ],
        ),
        ("namespace", [("shop", 276270.0, 6, 0, 2), ("kube-system", 90.0, 0, 0, 0)]),
        ("process", [("checkout[4242]", 138270.0, 6, 0, 1), ("payments[5151]", 138000.0, 0, 0, 1)]),
        ("node", [("node-a", 276270.0, 6, 0, 2), ("node-b", 90.0, 0, 0, 0)]),
    ],
)
def test_groupings_count_both_ends(model, grouping, expected):
    model.set_view(grouping=grouping)
    assert table(model) == expected


def test_connections_count_each_connection_once_and_by_interval():
    top = TopModel()
    batches = shop_batches()
    top.add(batches[0])
    # connect and accept of the same connection are one connection
    assert dict(table(top, ("label", "connections"))) == {
        "TCP shop/payments-0:8443 → shop/checkout-7d9f:43210": 0,
        "TCP shop/checkout-7d9f:43210 → shop/payments-0:8443": 1,
        "TCP shop/checkout-7d9f:50000 → shop/payments-0:443": 0,
        "UDP shop/checkout-7d9f:40001 → kube-system/coredns-55:53": 0,
    }
    top.add(batches[1])
    top.set_view(grouping="process")
    assert dict(table(top, ("label", "connections"))) == {"checkout[4242]": 0, "payments[5151]": 1, "curl[777]": 1}


def test_sorting_by_any_column_and_direction(model):
    model.set_view(sort="drops")
    assert [r[0] for r in table(model)][:1] == ["TCP 192.0.2.80:51000 → shop/checkout-7d9f:8080"]
    model.set_view(sort="rtt_us", descending=False)
    assert [r[0] for r in table(model)] == [
        "TCP shop/checkout-7d9f:50000 → shop/payments-0:443",
        "TCP shop/payments-0:8443 → shop/checkout-7d9f:43210",
        "TCP shop/checkout-7d9f:43210 → shop/payments-0:8443",
        "TCP 192.0.2.80:51000 → shop/checkout-7d9f:8080",  # no RTT sorts last either way
        "UDP shop/checkout-7d9f:40001 → kube-system/coredns-55:53",
    ]
    model.set_view(grouping="pod", sort="key", descending=False)
    assert [r[0] for r in table(model)] == [
        "192.0.2.80",
        "kube-system/coredns-55",
        "shop/checkout-7d9f",
        "shop/payments-0",
    ]
    with pytest.raises(ValueError, match="unknown sort column 'speed'"):
        model.set_view(sort="speed")


def test_filter_applies_to_rows_totals_and_drops(model):
    model.set_view(grouping="pod", filter=parse_filter("namespace=kube-system"))
    assert table(model) == [("shop/checkout-7d9f", 90.0, 0, 0, 0), ("kube-system/coredns-55", 90.0, 0, 0, 0)]
    assert model.totals().filtered_flows == 1
    model.set_view(filter=parse_filter("not namespace=shop"))  # every flow has shop at one end
    assert table(model) == []
    model.set_view(filter=parse_filter("verdict=dropped"))
    assert table(model) == [("192.0.2.80", 180.0, 6, 0, 0), ("shop/checkout-7d9f", 180.0, 6, 0, 0)]
    assert model.totals().filtered_flows == 1
    assert model.totals().flows == 5
    assert model.drops().frame["reason"].tolist() == ["NETFILTER_DROP", "TCP_INVALID_SEQUENCE", "NO_SOCKET"]


def test_totals_and_loss_accounting(model):
    totals = model.totals()
    assert (totals.flows, totals.flows_per_s, totals.bytes_per_s, totals.packets_per_s) == (5, 2.5, 138270.0, 124.0)
    assert totals.intervals == 5
    assert (totals.coverage.produced, totals.coverage.lost) == (35, 2)


def test_drop_reasons_ranked_with_victims(model):
    model.set_view(grouping="pod")
    drops = model.drops().frame
    assert drops[["reason", "last", "window", "window_bytes"]].values.tolist() == [
        ["NETFILTER_DROP", 12, 24, 1440],
        ["TCP_INVALID_SEQUENCE", 0, 4, 4000],
        ["NO_SOCKET", 0, 2, 148],
    ]
    assert drops["share"].round(4).tolist() == [0.8, 0.1333, 0.0667]
    assert drops["victims"].tolist() == [
        [("192.0.2.80", 12), ("shop/checkout-7d9f", 12)],
        [("shop/checkout-7d9f", 2), ("shop/payments-0", 2)],
        [("10.204.0.1", 1), ("shop/payments-0", 1)],
    ]
    model.set_view(grouping="flow")
    assert model.drops().frame["victims"].tolist()[2] == [("TCP 10.204.0.1:39000 → shop/payments-0:9999", 1)]


def test_pod_detail(model):
    model.set_view(grouping="pod")
    detail = model.detail(CHECKOUT_POD)
    assert detail.label == "shop/checkout-7d9f"
    assert detail.series["bytes_per_s"].tolist() == [118090.0, 123000.0, 128090.0, 133180.0, 138270.0]
    assert detail.series["drops"].tolist() == [0, 0, 0, 8, 6]
    assert detail.series["retransmits"].tolist() == [0, 0, 3, 0, 0]
    assert detail.peers.values.tolist() == [
        ["shop/payments-0", "→", 720000, 700, 2],
        ["shop/payments-0", "←", 560000, 400, 0],
        ["192.0.2.80", "←", 720, 12, 12],
        ["kube-system/coredns-55", "→", 540, 6, 0],
    ]
    assert detail.drops.values.tolist() == [["NETFILTER_DROP", 12, 720], ["TCP_INVALID_SEQUENCE", 2, 2000]]
    assert detail.events["kind"].tolist() == [
        "close", "close", "drop", "drop", "drop", "retransmit", "accept", "connect",
    ]  # fmt: skip
    assert detail.events["reason"].tolist()[2:5] == ["NETFILTER_DROP", "TCP_INVALID_SEQUENCE", "NETFILTER_DROP"]


def test_detail_peers_follow_new_intervals_and_view_changes():
    batches = shop_batches()
    top = TopModel()
    for batch in batches[:4]:
        top.add(batch)
    top.set_view(grouping="pod")
    assert top.detail(CHECKOUT_POD).peers.values.tolist() == [
        ["shop/payments-0", "→", 556000, 540, 2],
        ["shop/payments-0", "←", 448000, 320, 0],
        ["kube-system/coredns-55", "→", 360, 4, 0],
        ["192.0.2.80", "←", 360, 6, 6],
    ]
    top.add(batches[4])  # the open detail refreshes: the new interval counts, the older ones still do
    assert top.detail(CHECKOUT_POD).peers.values.tolist() == [
        ["shop/payments-0", "→", 720000, 700, 2],
        ["shop/payments-0", "←", 560000, 400, 0],
        ["192.0.2.80", "←", 720, 12, 12],
        ["kube-system/coredns-55", "→", 540, 6, 0],
    ]
    top.set_view(filter=parse_filter("not namespace=kube-system"))
    assert [row[0] for row in top.detail(CHECKOUT_POD).peers.values.tolist()] == [
        "shop/payments-0",
        "shop/payments-0",
        "192.0.2.80",
    ]
    top.set_view(grouping="namespace", filter=parse_filter(""))
    assert top.detail(("shop",)).peers.values.tolist() == [
        ["shop", "→", 1280000, 1100, 2],
        ["shop", "←", 1280000, 1100, 2],
        ["192.0.2.80", "←", 720, 12, 12],
        ["kube-system", "→", 540, 6, 0],
        ["10.204.0.1", "←", 74, 1, 1],
        ["10.204.0.1", "→", 54, 1, 0],
    ]


def test_flow_detail_shows_the_reply_as_peer(model):
    detail = model.detail(CHECKOUT_TO_PAYMENTS)
    assert detail.peers.values.tolist() == [
        ["shop/payments-0:8443", "→", 600000, 600, 2],
        ["shop/payments-0:8443", "←", 560000, 400, 0],
    ]
    assert detail.series["rtt_us"].tolist() == [1200.0, 1300.0, 1400.0, 1500.0, 1600.0]
    assert detail.events["kind"].tolist() == ["close", "retransmit", "accept", "connect"]


def test_detail_of_a_key_that_left_the_window_is_empty_not_an_error(model):
    detail = model.detail(("TCP", "10.9.9.9", 1, "10.9.9.8", 2))
    assert detail.series["bytes_per_s"].tolist() == [0.0] * 5
    assert detail.peers["bytes"].tolist() == [0, 0]
    assert detail.events.empty and detail.drops.empty


def test_window_keeps_history_and_row_budget():
    top = TopModel(history=3)
    for batch in shop_batches():
        top.add(batch)
    assert len(top.window) == 3
    assert top.intervals == 5
    budget = TopModel(row_budget=8)
    for batch in shop_batches():
        budget.add(batch)
    assert [len(i.flows) for i in budget.window] == [5]  # the newest interval always stays


def test_account_without_keep_counts_loss_but_freezes_rows():
    batches = shop_batches()
    top = TopModel()
    top.add(batches[0])
    top.account(batches[3])
    assert top.totals().coverage.lost == 2
    assert top.totals().time_end == batches[0].time_end


def test_missing_counters_stay_missing():
    start = pd.Timestamp("2025-03-01T12:00:00Z")
    flows = flows_frame(
        pd.DataFrame({"protocol": ["UDP"], "src_ip": ["10.204.0.1"], "dst_ip": ["10.204.0.2"], "bytes": [500]})
    )
    top = TopModel()
    top.add(FlowBatch(start, start + pd.Timedelta(seconds=1), flows, events_frame(pd.DataFrame())))
    row = top.rows(5).frame.iloc[0]
    assert row["label"] == "UDP 10.204.0.1 → 10.204.0.2"
    assert row["bytes_per_s"] == 500.0
    assert pd.isna(row["packets_per_s"]) and pd.isna(row["drops"]) and pd.isna(row["rtt_us"])


def test_empty_model_has_no_rows():
    top = TopModel()
    assert top.rows(10).frame.empty
    assert top.drops().frame.empty
    assert top.totals().flows == 0


def test_trends_after_a_view_change_fill_in_with_backfill():
    top = TopModel()
    for batch in shop_batches():
        top.add(batch)
    top.set_view(grouping="namespace")
    assert table(top, ("label", "trend")) == [("shop", "▁▁▁▁█"), ("kube-system", "▁▁▁▁█")]
    assert top.backfill(limit=1) is True  # the newest missing interval first (kube-system: silent in it)
    assert table(top, ("label", "trend")) == [("shop", "▁▁▁██"), ("kube-system", "▁▁▁▁█")]
    assert top.backfill() is True
    assert table(top, ("label", "trend")) == [("shop", "▇████"), ("kube-system", "█▁█▁█")]
    assert top.backfill() is False


def test_sparklines_scale_each_row_to_its_peak():
    assert sparklines(np.array([[0, 1, 2, 4], [5, 5, 5, 5], [0, 0, 0, 0]])) == ["▁▃▅█", "████", "▁▁▁▁"]


def burst_then_idle() -> list[FlowBatch]:
    """Four 1-s intervals: a burst of 1,000 bytes in the first only (port 1111), and 100 bytes in each
    (port 2222)."""
    start = pd.Timestamp("2025-03-01T12:00:00Z")
    batches = []
    for second in range(4):
        rows = [{"src_port": 2222, "bytes": 100, "packets": 1}]
        if second == 0:
            rows.append({"src_port": 1111, "bytes": 1000, "packets": 10})
        flows = pd.DataFrame([{"protocol": "TCP", "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "dst_port": 80, **r}
                              for r in rows])  # fmt: skip
        begin, end = start + pd.Timedelta(seconds=second), start + pd.Timedelta(seconds=second + 1)
        batches.append(FlowBatch(begin, end, flows_frame(flows), events_frame(pd.DataFrame())))
    return batches


@pytest.mark.parametrize(
    ("window", "after", "expected"),
    [
        (2.0, 1, {1111: 1000.0, 2222: 100.0}),  # the burst's own interval
        (2.0, 2, {1111: 500.0, 2222: 100.0}),  # a second later: averaged over the 2 s, fading
        (2.0, 3, {2222: 100.0}),  # two seconds later: gone
        (10.0, 4, {1111: 250.0, 2222: 100.0}),  # 10 s: still there, 1,000 bytes over 4 s
        (40.0, 3, {1111: 1000.0 / 3, 2222: 100.0}),
    ],
)
def test_rates_average_over_the_window_so_an_idle_row_fades_out(window, after, expected):
    top = TopModel(rate_window=window)
    for batch in burst_then_idle()[:after]:
        top.add(batch)
    rows = top.rows(10)
    assert {key[2]: rate for key, rate in zip(rows.frame["key"], rows.frame["bytes_per_s"], strict=True)} == expected
    assert rows.rate_window == window


def test_the_window_changes_with_the_view_and_must_be_positive():
    top = TopModel()
    for batch in burst_then_idle():
        top.add(batch)
    top.set_view(rate_window=10.0)
    assert len(top.rows(10).frame) == 2
    with pytest.raises(ValueError, match="positive number of seconds"):
        top.set_view(rate_window=0)

"""The common questions (flowscope.analysis.summaries) over the shop scenario's 22 flows, against figures
derived by hand from its table (tests/ui/scenario.py): each end of a flow counts for its key, as in `top`."""

import pandas as pd

from flowscope.analysis import drops_by_reason, peers, timeseries, top_talkers
from tests.ui.scenario import shop_batches

FLOWS = pd.concat([b.flows for b in shop_batches()], ignore_index=True)


def rows(frame: pd.DataFrame) -> list[tuple]:
    return [tuple(None if pd.isna(v) else v for v in row) for row in frame.itertuples(index=False)]


def test_top_talkers_by_workload_count_both_ends_and_fall_back_to_addresses():
    assert list(top_talkers(FLOWS).columns) == ["workload", "packets", "bytes", "flows"]
    assert rows(top_talkers(FLOWS)) == [
        ("shop/checkout", 1118, 1281260, 20),
        ("shop/payments", 1102, 1280128, 17),
        ("192.0.2.80", 12, 720, 2),
        ("kube-system/coredns", 6, 540, 3),
        ("10.204.0.1", 2, 128, 2),
    ]
    assert rows(top_talkers(FLOWS, by="namespace", n=1)) == [("shop", 2220, 2561388, 37)]


def test_top_talkers_by_flow_are_five_tuples():
    assert rows(top_talkers(FLOWS, by="flow", n=2)) == [
        ("TCP shop/checkout-7d9f:43210 → shop/payments-0:8443", 600, 600000, 5),
        ("TCP shop/payments-0:8443 → shop/checkout-7d9f:43210", 400, 560000, 5),
    ]


def test_drops_by_reason_alone_and_by_workload():
    assert rows(drops_by_reason(FLOWS)) == [
        ("NETFILTER_DROP", 12, 720), ("TCP_INVALID_SEQUENCE", 2, 2000), ("NO_SOCKET", 1, 74),
    ]  # fmt: skip
    assert rows(drops_by_reason(FLOWS, by="workload")) == [
        ("NETFILTER_DROP", "192.0.2.80", 12, 720),
        ("NETFILTER_DROP", "shop/checkout", 12, 720),
        ("TCP_INVALID_SEQUENCE", "shop/checkout", 2, 2000),
        ("TCP_INVALID_SEQUENCE", "shop/payments", 2, 2000),
        ("NO_SOCKET", "10.204.0.1", 1, 74),
        ("NO_SOCKET", "shop/payments", 1, 74),
    ]


def test_timeseries_buckets_by_interval_end_with_empty_buckets_as_zero():
    series = timeseries(FLOWS, freq="4s")
    assert [t.isoformat() for t in series.index] == [
        "2025-03-01T12:00:00+00:00", "2025-03-01T12:00:04+00:00", "2025-03-01T12:00:08+00:00",
    ]  # fmt: skip
    # Intervals end at 2, 4, 6, 8 and 10 s: the buckets hold the first, the second and third, the last two.
    assert series["packets"].tolist() == [202, 434, 484] and series["bytes"].tolist() == [236180, 502308, 542900]
    assert series["drop_packets"].tolist() == [0, 1, 14]  # drops end at 4 s (1), 8 s (2 + 6) and 10 s (6)
    dropped = timeseries(FLOWS, freq="2s", filter="verdict=dropped")
    assert [t.second for t in dropped.index] == [4, 6, 8, 10] and dropped["drop_packets"].tolist() == [1, 0, 8, 6]


def test_peers_of_a_pod_sent_and_received():
    assert rows(peers(FLOWS, "shop/checkout-7d9f")) == [
        ("shop/payments-0", "sent", 700, 720000, 10),
        ("shop/payments-0", "received", 400, 560000, 5),
        ("192.0.2.80", "received", 12, 720, 2),
        ("kube-system/coredns-55", "sent", 6, 540, 3),
    ]
    assert rows(peers(FLOWS, "shop/checkout-7d9f", by="workload"))[0] == ("shop/payments", "sent", 700, 720000, 10)
    assert peers(FLOWS, "shop/absent").empty

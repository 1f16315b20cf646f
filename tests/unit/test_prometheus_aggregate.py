"""The Prometheus output's sums, without a server: the label context, server ports outside the ephemeral range,
connection outcomes, the budget's folding and the grace period of a vanished key (hand-derived values)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flowscope.config import MetricsConfig
from flowscope.exporters.prometheus import Aggregate, Budgeted, ephemeral_ports
from flowscope.schema import FlowBatch, events_frame, flows_frame

START = pd.Timestamp("2025-03-01T12:00:00Z")
EPHEMERAL = (32768, 60999)
CHECKOUT = {"src_namespace": "shop", "src_workload": "checkout", "dst_namespace": "shop", "dst_workload": "payments"}


def batch(flows: list[dict], events: list[dict] = (), second: int = 0) -> FlowBatch:
    start = START + pd.Timedelta(seconds=second)
    frame = flows_frame(pd.DataFrame(flows)) if flows else FlowBatch.empty(start, start).flows
    event_frame = events_frame(pd.DataFrame(list(events))) if events else FlowBatch.empty(start, start).events
    return FlowBatch(start, start + pd.Timedelta(seconds=1), frame, event_frame)


def samples(aggregate: Aggregate, family: str) -> dict[tuple, float]:
    """{labels without node, sorted by name: value} of one family's samples."""
    for metric in aggregate.families("n1"):
        if metric.name == family:
            return {
                tuple(sorted((k, v) for k, v in s.labels.items() if k != "node")): s.value
                for s in metric.samples
                if s.name.endswith("_total") or s.name == family
            }
    raise AssertionError(f"no family {family}")


def flow(direction: str, size: int, **extra: object) -> dict:
    return {"direction": direction, "protocol": "TCP", "src_ip": "10.0.0.1", "src_port": 40000, "dst_ip": "10.0.0.2",
            "dst_port": 8443, "packets": 1, "bytes": size, **CHECKOUT, **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ("local", {(("direction", "egress"), ("namespace", "shop"), ("workload", "checkout")): 100,
                   (("direction", "ingress"), ("namespace", "shop"), ("workload", "payments")): 7}),
        ("source", {(("direction", "egress"), ("source_namespace", "shop"), ("source_workload", "checkout")): 100,
                    (("direction", "ingress"), ("source_namespace", "shop"), ("source_workload", "checkout")): 7}),
        ("both", {(("destination_namespace", "shop"), ("destination_workload", "payments"), ("direction", "egress"),
                   ("source_namespace", "shop"), ("source_workload", "checkout")): 100,
                  (("destination_namespace", "shop"), ("destination_workload", "payments"), ("direction", "ingress"),
                   ("source_namespace", "shop"), ("source_workload", "checkout")): 7}),
        ("destination", {(("destination_namespace", "shop"), ("destination_workload", "payments"),
                          ("direction", "egress")): 100,
                         (("destination_namespace", "shop"), ("destination_workload", "payments"),
                          ("direction", "ingress")): 7}),
    ],
)  # fmt: skip
def test_the_label_context_picks_whose_identity_labels_a_series(context: str, expected: dict) -> None:
    aggregate = Aggregate(MetricsConfig(address="127.0.0.1:1", context=context), EPHEMERAL)
    # egress leaves checkout (the local end: the source); ingress arrives at payments (local: the destination)
    aggregate.add(batch([flow("egress", 100), flow("ingress", 7)]))
    assert samples(aggregate, "flowscope_workload_bytes") == expected


def test_pod_labels_name_the_pod_of_the_local_end() -> None:
    aggregate = Aggregate(MetricsConfig(address="127.0.0.1:1", labels="pod"), EPHEMERAL)
    pods = {"src_pod": "checkout-7d9f-abcde", "dst_pod": "payments-5c4b-fghij"}
    aggregate.add(batch([flow("egress", 100, **pods), flow("ingress", 7, **pods), flow("egress", 3, **pods)]))
    assert samples(aggregate, "flowscope_workload_bytes") == {
        (("direction", "egress"), ("namespace", "shop"), ("pod", "checkout-7d9f-abcde")): 103,
        (("direction", "ingress"), ("namespace", "shop"), ("pod", "payments-5c4b-fghij")): 7,
    }


def test_every_family_and_every_sample_carries_the_node_label() -> None:
    aggregate = Aggregate(MetricsConfig(address="127.0.0.1:1"), EPHEMERAL)
    aggregate.add(batch([flow("egress", 100, rtt_us=800, retransmits=1, drop_packets=1, drop_bytes=60,
                              drop_reason="NO_SOCKET")]))  # fmt: skip
    families = list(aggregate.families("n1"))
    assert len(families) > 20
    unlabelled = {(m.name, s.labels.get("node")) for m in families for s in m.samples if s.labels.get("node") != "n1"}
    assert unlabelled == set()


def test_the_server_port_label_is_never_an_ephemeral_port() -> None:
    aggregate = Aggregate(MetricsConfig(address="127.0.0.1:1", server_port=True, labels="namespace"), EPHEMERAL)
    aggregate.add(batch([
        flow("egress", 10),  # 40000 -> 8443: the server's is the destination's
        flow("egress", 20, src_port=8443, dst_port=40001),  # the answer of a server: the source's
        flow("egress", 40, src_port=40002, dst_port=50000),  # both ephemeral: no port
        flow("egress", 80, src_port=32767, dst_port=61000),  # just outside the range at both ends: the destination's
    ]))  # fmt: skip
    ports = {dict(k)["port"]: v for k, v in samples(aggregate, "flowscope_workload_bytes").items()}
    assert ports == {"8443": 30, "": 40, "61000": 80}


def test_the_ephemeral_range_is_the_kernels(tmp_path) -> None:
    (tmp_path / "range").write_text("20000\t29999\n")
    assert ephemeral_ports(str(tmp_path / "range")) == (20000, 29999)
    assert ephemeral_ports(str(tmp_path / "absent")) == EPHEMERAL


def test_connections_count_once_per_connection_and_a_close_from_syn_sent_is_a_failure() -> None:
    aggregate = Aggregate(MetricsConfig(address="127.0.0.1:1"), EPHEMERAL)
    ends = {"protocol": "TCP", "src_ip": "10.0.0.1", "src_port": 40000, "dst_ip": "10.0.0.2", "dst_port": 8443}
    back = {"protocol": "TCP", "src_ip": "10.0.0.2", "src_port": 8443, "dst_ip": "10.0.0.1", "dst_port": 40000}
    refused = {**ends, "src_port": 40001, "state": "SYN_SENT"}
    who = {"src_namespace": "shop", "src_workload": "checkout"}
    events = [
        {"time": START, "kind": "connect", **ends, **who},
        {"time": START, "kind": "accept", **back, "src_namespace": "shop", "src_workload": "payments"},  # same one
        {"time": START, "kind": "close", **ends, "state": "FIN_WAIT1", **who},
        {"time": START, "kind": "close", **refused, **who},
    ]
    aggregate.add(batch([], events))
    key = (("namespace", "shop"), ("workload", "checkout"))
    assert samples(aggregate, "flowscope_workload_tcp_connections_opened")[key] == 1
    assert samples(aggregate, "flowscope_workload_tcp_connections_closed")[key] == 2
    assert samples(aggregate, "flowscope_workload_tcp_connections_failed")[key] == 1
    assert samples(aggregate, "flowscope_tcp_connections_opened")[()] == 1


def test_folded_keys_go_to_other_and_a_key_returning_resumes_where_it_stopped() -> None:
    table = Budgeted(1, budget=3, grace=600)
    table.add([("a",), ("b",), ("c",), ("d",)], np.array([[4.0], [3.0], [2.0], [1.0]]), np.array([4, 3, 2, 1]), 0)
    assert dict(table.series(1)) == {("a",): 4, ("b",): 3, ("other",): 3}  # c and d folded: 2 + 1
    assert (table.folded, table.folds) == (2, 2)
    # d outweighs the rest now (decayed: a 3.2, b 2.4): d and a keep their labels, b folds
    table.add([("d",), ("b",)], np.array([[10.0], [5.0]]), np.array([10, 0]), 1)
    assert dict(table.series(1)) == {("a",): 4, ("d",): 10, ("other",): 8}
    assert (table.folded, table.folds) == (2, 3)  # b and c folded now; b's the third fold (c stayed folded)
    table.add([("c",)], np.array([[1.0]]), np.array([1]), 2)  # still out of the top: no new fold
    assert (table.folded, table.folds) == (2, 3)


def test_every_per_workload_family_reports_its_folded_keys_and_folds() -> None:
    aggregate = Aggregate(MetricsConfig(address="127.0.0.1:1", budget=2), EPHEMERAL)
    aggregate.add(batch([flow("egress", 100), flow("egress", 7, src_workload="cart"), flow("ingress", 5)]))
    folded = samples(aggregate, "flowscope_metrics_folded_keys")
    folds = samples(aggregate, "flowscope_metrics_folds")
    workload = ("packets", "bytes", "drops", "drop_bytes", "tcp_retransmits", "tcp_resets", "tcp_connections_opened",
                "tcp_connections_closed", "tcp_connections_failed", "tcp_rtt_seconds")  # fmt: skip
    names = {f"flowscope_workload_{name}" for name in workload} | {"flowscope_drop_events"}
    assert {dict(k)["family"] for k in folded} == names == {dict(k)["family"] for k in folds}
    # three traffic keys for a budget of 2 (one kept, one "other"): the two smaller ones folded
    for family in ("flowscope_workload_packets", "flowscope_workload_bytes"):
        assert folded[(("family", family),)] == 2
        assert folds[(("family", family),)] == 2


def test_a_key_unseen_for_the_grace_period_loses_its_series() -> None:
    table = Budgeted(1, budget=10, grace=60)
    table.add([("gone",), ("stays",)], np.array([[1.0], [1.0]]), np.array([1, 1]), 0)
    table.add([("stays",)], np.array([[1.0]]), np.array([1]), 60)
    assert dict(table.series(1)) == {("gone",): 1, ("stays",): 2}  # 60 s unseen: still within the grace
    table.add([("stays",)], np.array([[1.0]]), np.array([1]), 61)
    assert dict(table.series(1)) == {("stays",): 3}


def test_an_rtt_on_a_bucket_bound_counts_in_that_bucket_as_prometheus_le_reads_it() -> None:
    aggregate = Aggregate(MetricsConfig(address="127.0.0.1:1"), EPHEMERAL)
    aggregate.add(batch([flow("egress", 1, rtt_us=rtt) for rtt in (999, 1000, 1001)]))
    (histogram,) = [m for m in aggregate.families("n1") if m.name == "flowscope_tcp_rtt_seconds"]
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert (buckets["0.0005"], buckets["0.001"], buckets["0.0025"], buckets["+Inf"]) == (0, 2, 3, 3)


def test_the_cap_holds_and_no_series_goes_down_whatever_the_traffic() -> None:
    """Random traffic of 200 keys over a budget of 10, keys vanishing for longer than the grace: every interval
    shows at most 10 series, a series shown again is never below what it showed before (unless its key expired:
    a new series), and every value added is in exactly one series (or went with an expired key)."""
    rng = np.random.default_rng(12)
    table = Budgeted(1, budget=10, grace=5)
    shown: dict[tuple, float] = {}
    added = expired = 0.0
    for second in range(300):
        keys = sorted({(f"k{n}",) for n in rng.integers(0, 200 if second % 50 < 25 else 20, rng.integers(1, 40))})
        values = rng.integers(1, 1000, (len(keys), 1)).astype(np.float64)
        before = dict(table.entries)
        table.add(keys, values, values[:, 0] * rng.random(len(keys)), second)
        expired += sum(float(entry.own[0]) for key, entry in before.items() if key not in table.entries)
        added += values.sum()
        series = dict(table.series(1))
        assert len(series) <= 10
        for key, value in series.items():
            if key in table.entries or key == ("other",):
                assert value >= shown.get(key, 0), (second, key)
        shown = {k: v for k, v in {**shown, **{k: float(v[0]) for k, v in series.items()}}.items()
                 if k in table.entries or k == ("other",)}  # fmt: skip
        own = sum(float(entry.own[0]) for entry in table.entries.values())
        assert own + table.other[0] + expired == added
    assert table.folds > 0 and table.folded_ever

import numpy as np
import pandas as pd
import pytest

from flowscope.decode.batch import build_batch
from flowscope.decode.context import AggregationContext
from flowscope.kernel.catalog import SKB_DROP, SOCK_STATE, TC_FLOWS, TCP_EVENTS
from flowscope.kernel.layouts import (
    COUNTER_EVENT_LOST_BASE,
    COUNTER_EVENT_SENT_BASE,
    DROP_KEY,
    DROP_STATS,
    EVENT,
    FLOW_KEY,
    FLOW_STATS,
    KIND_FLOW_SPILL,
    TCP_KEY,
    TCP_STATS,
)
from flowscope.kernel.names import KernelNames
from flowscope.readers.drain import KernelDrain
from flowscope.schema import EVENT_COLUMNS, FLOW_COLUMNS, empty_frame
from tests.unit.kernel_entries import OFFSET_NS, WINDOW, address, counters, flow_key, flow_stats


def spill(src: str, sport: int, dst: str, dport: int, length: int, ts: int):
    e = np.zeros(1, dtype=EVENT)
    e["kind"], e["saddr"], e["daddr"], e["sport"], e["dport"] = (
        KIND_FLOW_SPILL,
        np.void(address(src)),
        np.void(address(dst)),
        sport,
        dport,
    )
    e["proto"], e["ip_version"], e["direction"], e["ifindex"], e["value"], e["ts_ns"] = 17, 4, 1, 2, length, ts
    return e


def context() -> AggregationContext:
    return AggregationContext(node="node-a", offset_ns=OFFSET_NS, ifnames={2: "veth0"}, active=[TC_FLOWS])


def test_map_entries_and_spills_of_the_same_flow_are_summed_and_accounted() -> None:
    keys = np.concatenate([flow_key("10.0.0.1", 1000, "10.0.0.2", 53), flow_key("10.0.0.1", 1001, "10.0.0.2", 53)])
    values = np.concatenate([flow_stats(3, 300, 10, 20), flow_stats(1, 100, 15, 15)])
    events = np.concatenate(
        [spill("10.0.0.1", 1000, "10.0.0.2", 53, 100, 25), spill("10.0.0.3", 7, "10.0.0.2", 53, 60, 5)]
    )
    c = counters(tc_packets=7, flow_map_full=3)
    c[COUNTER_EVENT_SENT_BASE + KIND_FLOW_SPILL] = 2
    c[COUNTER_EVENT_LOST_BASE + KIND_FLOW_SPILL] = 1
    batch = build_batch(KernelDrain(0, {"flows": (keys, values)}, events, c), context(), WINDOW)

    flows = batch.flows.sort_values(["src_ip", "src_port"]).reset_index(drop=True)
    assert flows[["src_ip", "src_port", "dst_ip", "dst_port", "packets", "bytes"]].values.tolist() == [
        ["10.0.0.1", 1000, "10.0.0.2", 53, 4, 400],
        ["10.0.0.1", 1001, "10.0.0.2", 53, 1, 100],
        ["10.0.0.3", 7, "10.0.0.2", 53, 1, 60],
    ]
    assert flows.loc[0, "time_start"] == pd.Timestamp(OFFSET_NS + 10, unit="ns", tz="UTC")
    assert flows.loc[0, "time_end"] == pd.Timestamp(OFFSET_NS + 25, unit="ns", tz="UTC")
    assert set(flows["ifname"]) == {"veth0"} and set(flows["direction"]) == {"egress"}
    assert set(flows["protocol"]) == {"UDP"} and set(flows["node"]) == {"node-a"}
    # 7 packets seen: 4 in the map, 2 spilled and delivered, 1 spill refused by the ring.
    assert batch.coverage.to_dict()["flow_map"] == {"produced": 7, "delivered": 6, "lost": 1}
    assert batch.coverage.to_dict()["events:flow_spill"] == {"produced": 3, "delivered": 2, "lost": 1}
    assert batch.coverage.unbalanced() == []


def test_counters_of_probes_that_did_not_run_stay_null() -> None:
    drain = KernelDrain(
        0,
        {"flows": (flow_key("10.0.0.1", 1, "10.0.0.2", 2), flow_stats(1, 60, 1, 1))},
        np.zeros(0, EVENT),
        counters(tc_packets=1),
    )
    flows = build_batch(drain, context(), WINDOW).flows
    assert flows["drop_packets"].isna().all() and flows["retransmits"].isna().all() and flows["rtt_us"].isna().all()
    assert flows.loc[0, "packets"] == 1


def test_a_lost_delivery_shows_as_unbalanced() -> None:
    # The kernel says it sent 2 spill events but only 1 arrived: accounting must not hide it.
    c = counters(tc_packets=2)
    c[COUNTER_EVENT_SENT_BASE + KIND_FLOW_SPILL] = 2
    drain = KernelDrain(
        0, {"flows": (np.zeros(0, FLOW_KEY), np.zeros(0, FLOW_STATS))}, spill("10.0.0.1", 1, "10.0.0.2", 2, 60, 1), c
    )
    coverage = build_batch(drain, context(), WINDOW).coverage
    assert sorted(coverage.unbalanced()) == ["events:flow_spill", "flow_map"]


ALL_FAMILIES = [TC_FLOWS, SKB_DROP, TCP_EVENTS, SOCK_STATE]
NAMES = KernelNames(drop_reasons={2: "NOT_SPECIFIED", 3: "NO_SOCKET"}, tcp_states={1: "ESTABLISHED"}, reset_reasons={})


def every_family_drain(flows=(), drops=(), tcp=(), events=()) -> KernelDrain:
    maps = {
        "flows": (np.concatenate([np.zeros(0, FLOW_KEY), *(k for k, _ in flows)]),
                  np.concatenate([np.zeros(0, FLOW_STATS), *(s for _, s in flows)])),
        "drops": (np.concatenate([np.zeros(0, DROP_KEY), *(k for k, _ in drops)]),
                  np.concatenate([np.zeros(0, DROP_STATS), *(s for _, s in drops)])),
        "tcp": (np.concatenate([np.zeros(0, TCP_KEY), *(k for k, _ in tcp)]),
                np.concatenate([np.zeros(0, TCP_STATS), *(s for _, s in tcp)])),
    }  # fmt: skip
    return KernelDrain(0, maps, np.concatenate([np.zeros(0, EVENT), *events]), counters())


def every_family_context() -> AggregationContext:
    return AggregationContext(
        node="node-a", offset_ns=OFFSET_NS, ifnames={2: "veth0"}, active=ALL_FAMILIES, netns=7,
        extra={"kernel_names": NAMES},
    )  # fmt: skip


def test_an_interval_with_nothing_gives_empty_frames_of_the_schema_and_zero_accounting() -> None:
    batch = build_batch(every_family_drain(), every_family_context(), WINDOW)
    pd.testing.assert_frame_equal(batch.flows, empty_frame(FLOW_COLUMNS), check_exact=True)
    pd.testing.assert_frame_equal(batch.events, empty_frame(EVENT_COLUMNS), check_exact=True)
    zero = {"produced": 0, "delivered": 0, "lost": 0}
    sources = ["drop_event_sampling", "drop_map", "flow_map", "rtt_samples", "tcp_event_sampling", "tcp_map"]
    assert batch.coverage.to_dict() == dict.fromkeys(sources, zero)


def drop(flow: np.ndarray, reason: int, packets: int):
    k, s = np.zeros(1, DROP_KEY), np.zeros(1, DROP_STATS)
    k["flow"], k["netns"], k["reason"] = flow, 7, reason
    s["packets"], s["bytes"], s["first_seen_ns"], s["last_seen_ns"] = packets, packets * 60, 5, 6
    return k, s


def tcp(flow: np.ndarray, retransmits: int):
    k, s = np.zeros(1, TCP_KEY), np.zeros(1, TCP_STATS)
    k["flow"], k["netns"] = flow, 7
    s["retransmits"], s["first_seen_ns"], s["last_seen_ns"] = retransmits, 5, 6
    return k, s


@pytest.mark.parametrize(
    "drain",
    [
        every_family_drain(flows=[(flow_key("10.0.0.1", 1, "10.0.0.2", 2), flow_stats(1, 60, 1, 2))]),
        every_family_drain(events=[spill("10.0.0.1", 1, "10.0.0.2", 2, 60, 3)]),
        every_family_drain(
            flows=[(flow_key("10.0.0.1", 1, "10.0.0.2", 2, proto=6), flow_stats(4, 240, 1, 2))],
            drops=[drop(flow_key("10.0.0.1", 1, "10.0.0.2", 2, proto=6), 2, 1),
                   drop(flow_key("10.0.0.1", 1, "10.0.0.2", 2, proto=6), 3, 2),
                   drop(flow_key("10.0.0.9", 9, "10.0.0.2", 2), 3, 1)],
            tcp=[tcp(flow_key("10.0.0.1", 1, "10.0.0.2", 2, proto=6), 2),
                 tcp(flow_key("10.0.0.8", 8, "10.0.0.2", 2, proto=6), 1)],
        ),
    ],
    ids=["flows", "spills", "joins and new rows"],
)  # fmt: skip
def test_every_batch_has_the_schemas_columns_and_types(drain: KernelDrain) -> None:
    batch = build_batch(drain, every_family_context(), WINDOW)
    assert list(batch.flows.columns) == list(FLOW_COLUMNS)
    assert [str(dtype) for dtype in batch.flows.dtypes] == list(FLOW_COLUMNS.values())
    assert list(batch.events.columns) == list(EVENT_COLUMNS)
    assert batch.flows.index.equals(pd.RangeIndex(len(batch.flows))) and len(batch.flows) > 0

"""The API sink's ring keeps exactly the last `capacity` records: whole chunks dropped oldest first, the oldest
one left cut part way (in time order, flows and events interleaved), and `number` / `first` / `since` /
`until` answered from what is left, never from what was dropped."""

from __future__ import annotations

import pandas as pd

from flowscope.exporters.grpc.hubble import HubbleApi
from flowscope.exporters.grpc.own import OwnApi
from flowscope.exporters.grpc.ring import Api, Follower, Query, Ring
from flowscope.filters import FilterSet, parse_filter
from flowscope.proto.flowscope.v1 import flowscope_pb2 as pb
from flowscope.proto.hubble.observer import observer_pb2 as observer
from flowscope.schema import FlowBatch, events_frame, flows_frame

T0 = pd.Timestamp("2026-01-02T03:04:00Z")
# Record k (its port 1000 + k) is at T0 + k s. Four chunks of 4, 5, 3, 4 records; in each, events between flows.
CHUNKS = [([0, 2, 3], [1]), ([4, 6, 8], [5, 7]), ([10], [9, 11]), ([12, 13, 15], [14])]


def at(k: int) -> pd.Timestamp:
    return T0 + pd.Timedelta(seconds=k)


def batch(flow_ids: list[int], event_ids: list[int]) -> FlowBatch:
    ids = sorted(flow_ids + event_ids)
    flows = flows_frame(
        pd.DataFrame(
            {
                "time_start": [at(k) - pd.Timedelta(milliseconds=500) for k in flow_ids],
                "time_end": [at(k) for k in flow_ids],
                "protocol": ["UDP"] * len(flow_ids),
                "src_ip": ["10.0.0.1"] * len(flow_ids),
                "dst_ip": ["10.0.0.2"] * len(flow_ids),
                "src_port": [1000 + k for k in flow_ids],
                "dst_port": [53] * len(flow_ids),
                "packets": [1] * len(flow_ids),
                "bytes": [100] * len(flow_ids),
            }
        )
    )
    events = events_frame(
        pd.DataFrame(
            {
                "time": [at(k) for k in event_ids],
                "kind": ["retransmit"] * len(event_ids),
                "protocol": ["TCP"] * len(event_ids),
                "src_ip": ["10.0.0.1"] * len(event_ids),
                "dst_ip": ["10.0.0.2"] * len(event_ids),
                "src_port": [1000 + k for k in event_ids],
                "dst_port": [443] * len(event_ids),
            }
        )
    )
    return FlowBatch(at(ids[0]) - pd.Timedelta(seconds=1), at(ids[-1]), flows, events)


def filled(capacity: int = 10) -> Ring:
    ring = Ring(capacity, client_queue=100)
    for flow_ids, event_ids in CHUNKS:
        ring.add(batch(flow_ids, event_ids), "node-a")
    return ring


def own_records(ring: Ring, query: Query) -> list[tuple[str, int]]:
    """(flow|event, record number) of what the own API streams for `query`, in stream order."""
    out = []
    for data in ring.stream(OwnApi(), query, lambda: False):
        response = pb.GetFlowsResponse.FromString(data)
        items = response.records.items if response.HasField("records") else [response]
        for item in items:
            kind = item.WhichOneof("response")
            if kind in ("flow", "event"):
                out.append((kind, getattr(item, kind).src_port - 1000))
    return out


def numbers(ring: Ring, query: Query, api: Api | None = None) -> list[int]:
    if api is None:
        return [k for _, k in own_records(ring, query)]
    got = []
    for data in ring.stream(api, query, lambda: False):
        response = observer.GetFlowsResponse.FromString(data)
        if response.HasField("flow"):
            l4 = response.flow.l4
            got.append((l4.UDP.source_port or l4.TCP.source_port) - 1000)
    return got


def test_the_ring_keeps_exactly_the_last_records_and_counts_what_it_dropped():
    ring = filled()
    state = ring.state()
    assert (state["seen"], state["buffered"], state["capacity"]) == (16, 10, 10)
    assert state["seen"] - state["buffered"] == 6  # evicted: the first chunk whole, 2 of the second
    assert [(c.seq, c.records) for c in ring.chunks] == [(4, 3), (9, 3), (12, 4)]
    # of the second chunk (flows 4, 6, 8 then events 5, 7) the ring dropped record 4 (flow row 0) and 5 (event 0),
    # and holds no more rows than it counts (a copy of the rest: the interval's batch itself can go)
    assert ring.chunks[0].batch.flows["src_port"].tolist() == [1006, 1008]
    assert ring.chunks[0].batch.events["src_port"].tolist() == [1007]
    assert sum(len(c.batch.flows) + len(c.batch.events) for c in ring.chunks) == state["buffered"]
    assert own_records(ring, Query()) == [
        ("flow", 6), ("event", 7), ("flow", 8), ("event", 9), ("flow", 10), ("event", 11), ("flow", 12),
        ("flow", 13), ("event", 14), ("flow", 15),
    ]  # fmt: skip


def test_number_and_first_answer_from_what_is_left():
    ring = filled()
    assert numbers(ring, Query(number=3)) == [13, 14, 15]
    assert numbers(ring, Query(number=9)) == [7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert numbers(ring, Query(number=20)) == list(range(6, 16))
    assert numbers(ring, Query(number=3, first=True)) == [6, 7, 8]
    assert numbers(ring, Query(number=20, first=True)) == list(range(6, 16))
    flows_only = FilterSet((parse_filter("type=flow"),), ())
    assert numbers(ring, Query(flows_only, number=2, first=True)) == [6, 8]
    assert numbers(ring, Query(flows_only, number=4)) == [10, 12, 13, 15]


def test_since_and_until_never_reach_dropped_records():
    ring = filled()
    assert numbers(ring, Query(since=at(0).value)) == list(range(6, 16))
    assert numbers(ring, Query(since=at(5).value)) == list(range(6, 16))
    assert numbers(ring, Query(since=at(8).value)) == list(range(8, 16))
    assert numbers(ring, Query(since=at(2).value, until=at(7).value)) == [6, 7]
    assert numbers(ring, Query(until=at(5).value)) == []
    assert numbers(ring, Query(number=2, since=at(3).value, until=at(11).value)) == [10, 11]
    assert numbers(ring, Query(number=2, first=True, since=at(3).value)) == [6, 7]


def test_hubble_reads_the_same_last_records():
    ring = filled()
    assert numbers(ring, Query(number=20), HubbleApi()) == list(range(6, 16))
    assert numbers(ring, Query(number=4), HubbleApi()) == [12, 13, 14, 15]
    assert numbers(ring, Query(since=at(7).value, until=at(9).value), HubbleApi()) == [7, 8, 9]


def test_a_chunk_larger_than_the_ring_is_cut_to_its_last_records():
    ring = Ring(3, client_queue=100)
    ring.add(batch([0, 2, 3], [1, 4]), "node-a")
    state = ring.state()
    assert (state["seen"], state["buffered"]) == (5, 3)
    assert numbers(ring, Query()) == [2, 3, 4]
    ring.add(batch([5], []), "node-a")  # the cut chunk is cut further
    assert (ring.state()["seen"], ring.state()["buffered"]) == (6, 3)
    assert [c.records for c in ring.chunks] == [2, 1]
    assert numbers(ring, Query()) == [3, 4, 5]
    ring.add(batch([6, 7], []), "node-a")  # and then dropped whole
    assert [c.records for c in ring.chunks] == [1, 2]
    assert numbers(ring, Query(number=10)) == [5, 6, 7]


def test_records_sharing_the_time_of_the_cut_are_cut_by_count_not_by_time():
    # The flows of one interval often share their time_end: the ring drops the first of them in its own order
    # and serves exactly the rest, as many as it says it holds.
    ring = Ring(3, client_queue=100)
    tied = batch([0, 1, 2, 3, 4], [])
    tied.flows["time_end"] = at(4)
    ring.add(tied, "node-a")
    assert ring.state()["buffered"] == 3
    assert numbers(ring, Query()) == [2, 3, 4]
    assert numbers(ring, Query(number=10, first=True)) == [2, 3, 4]
    assert numbers(ring, Query(since=at(4).value)) == [2, 3, 4]
    assert numbers(ring, Query(number=10), HubbleApi()) == [2, 3, 4]


def test_hubble_drops_both_verdicts_of_a_flow_the_ring_dropped():
    # Flow 1 counts drops among its packets: Hubble shows it twice (its FORWARDED then, after the FORWARDED of
    # the others, its DROPPED part: one time for all). Served or dropped, its two parts go together.
    some_dropped = batch([0, 1, 2, 3], [])
    some_dropped.flows["time_end"] = at(3)
    some_dropped.flows["packets"] = pd.array([1, 3, 1, 1], dtype="UInt64")
    some_dropped.flows["drop_packets"] = pd.array([0, 2, 0, 0], dtype="UInt64")
    for capacity, want in ((3, [1, 2, 3, 1]), (2, [2, 3]), (1, [3])):
        ring = Ring(capacity, client_queue=100)
        ring.add(some_dropped, "node-a")
        assert numbers(ring, Query(number=10), HubbleApi()) == want, capacity
        assert numbers(ring, Query(number=10)) == [3 - k for k in range(capacity)][::-1], capacity


def test_a_follower_gets_the_whole_chunk_that_the_ring_cuts():
    ring = Ring(3, client_queue=100)
    follower = Follower(OwnApi(), Query(follow=True), limit=100)
    ring.followers.append(follower)
    ring.add(batch([0, 2, 3], [1, 4]), "node-a")
    sent = [item for item in follower.take(0) if item.positions is not None]
    assert [len(item.positions) for item in sent] == [5]
    assert [len(c.batch.flows) + len(c.batch.events) for c in ring.chunks] == [3]

"""A client that stops reading gets lost notices whose counts add up, and never slows ingest or the other
clients: a real agent replays 40,000 records while one follower reads everything and another reads nothing."""

from __future__ import annotations

import threading

import grpc
import pandas as pd
import pytest

from flowscope.proto.client import request
from flowscope.proto.flowscope.v1 import flowscope_pb2_grpc
from tests.integration.grpc_agents import Agent, interval_batches, recording
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)
INTERVALS, FLOWS = 80, 500


def record_count(response) -> int:
    """The records of one message of the raw stream: a flow, or many packed (Records)."""
    return int(response.HasField("flow")) + len(response.records.items)


def test_a_client_that_never_reads_gets_lost_notices_that_add_up(tmp_path):
    batches = interval_batches(pd.Timestamp("2025-03-01T12:00:00Z"), INTERVALS, 0.05, FLOWS, "agent")
    total = INTERVALS * FLOWS
    path = recording(tmp_path / "big.jsonl", batches)
    with Agent.start(tmp_path, path, "--speed", "1", "--grpc-client-queue", "5000") as agent:
        since = pd.Timestamp(0, tz="UTC")
        # the slow client's window stays at HTTP/2's 64 KiB: what gRPC buffers for it is far below 40,000 records
        channel = grpc.insecure_channel(f"unix://{agent.socket}", options=[("grpc.http2.bdp_probe", 0)])
        slow = flowscope_pb2_grpc.FlowScopeStub(channel).GetFlows(request(follow=True, since=since))
        end = batches[-1].time_end.value
        first = next(slow)  # the slow client is registered; from now on it reads nothing until the end
        fast_client = agent.client()
        fast = {"records": 0, "lost": 0}

        def read_all() -> None:
            for response in fast_client.flows(request(follow=True, since=since)):
                fast["records"] += response.HasField("flow")
                fast["lost"] += response.lost.count if response.HasField("lost") else 0
                if response.HasField("progress") and response.progress.time.ToNanoseconds() >= end:
                    return

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        reader.join(120)
        assert not reader.is_alive() and fast["records"] + fast["lost"] == total
        status = agent.client().status()
        assert status.seen == total and status.sources["sink:grpc"].lost == 0  # ingest lost nothing
        wait_for(lambda: agent.client().status().client_lost - fast["lost"] > 0, 60, "the slow client losing records")

        records, lost = record_count(first), 0
        for response in slow:
            records += record_count(response)
            if response.HasField("lost"):
                assert response.lost.source == "client"
                lost += response.lost.count
            if response.HasField("progress") and response.progress.time.ToNanoseconds() >= end:
                break
        slow.cancel()
        fast_client.close()
    assert lost > 0 and records + lost == total

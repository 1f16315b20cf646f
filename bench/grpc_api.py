"""The flow API's figures (printed and saved to bench/results/grpc_api.json, never asserted): ingest cost of the
API sink at 100k flows per interval (no follower, and 10 followers whose filter passes none), records/s to 1 and
10 followers with and without a filter, and the relay's merge throughput over 3 agents.

    .venv/bin/python -m bench.grpc_api
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

from bench import lab
from flowscope.config import ClientConfig, GrpcConfig, RelayConfig
from flowscope.exporters.grpc.relay import RelaySource
from flowscope.exporters.grpc.server import GrpcSink
from flowscope.proto.client import Client, request
from tests.integration.grpc_agents import Agent, interval_batches, recording

FLOWS = 100_000  # per interval, for the ingest figures
FOLLOWED = 5000  # per interval, 5 intervals, for the follower figures
RELAYED = 50_000  # records each of the 3 agents holds for the relay


def followers(sink: GrpcSink, socket: str, count: int, allow: list[str], batches: list) -> float:
    """Records per second delivered to `count` followers while `batches` are written."""
    clients = [Client(ClientConfig(server=f"unix://{socket}")) for _ in range(count)]
    received = [0] * count
    end = batches[-1].time_end.value
    ready = threading.Barrier(count + 1)

    def follow(index: int) -> None:
        stream = clients[index].flows(request(follow=True, allow=allow))
        ready.wait()
        for response in stream:
            received[index] += response.HasField("flow")
            if response.HasField("progress") and response.progress.time.ToNanoseconds() >= end:
                return

    threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    ready.wait()
    wait_clients(sink, count)
    started = time.perf_counter()
    for batch in batches:
        sink.write(batch)
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for client in clients:
        client.close()
    return sum(received) / seconds


def wait_clients(sink: GrpcSink, count: int) -> None:
    while sink.ring.state()["clients"] != count:
        time.sleep(0.01)


def ingest_ms(sink: GrpcSink, batches: list) -> float:
    started = time.perf_counter()
    for batch in batches:
        sink.write(batch)
    return (time.perf_counter() - started) * 1000 / len(batches)


def ingest_with_idle_followers(sink: GrpcSink, socket: str, start: pd.Timestamp) -> float:
    """ms per 100k-flow interval with 10 followers whose filter passes nothing (the cost of offering to them)."""
    clients = [Client(ClientConfig(server=f"unix://{socket}")) for _ in range(10)]
    streams = [client.flows(request(follow=True, allow=["port=1"])) for client in clients]
    threads = [threading.Thread(target=lambda s=s: sum(1 for _ in s), daemon=True) for s in streams]
    for thread in threads:
        thread.start()
    wait_clients(sink, 10)
    cost = ingest_ms(sink, interval_batches(start, 5, 1.0, FLOWS, "bench"))
    for client in clients:
        client.close()
    wait_clients(sink, 0)
    return cost


def relay_merge(directory: Path) -> dict:
    """Records/s the relay's merge lets out of 3 agents (subprocesses) that hold RELAYED records each."""
    start = pd.Timestamp("2025-03-01T14:00:00Z")
    agents = []
    try:
        for node in ("a", "b", "c"):
            path = recording(directory / f"{node}.jsonl", interval_batches(start, 5, 1.0, RELAYED // 5, node))
            agents.append(Agent.start(directory, path, "--speed", "0", "--grpc-ring", str(RELAYED), name=node))
        for agent in agents:
            client = agent.client()
            while client.status().seen < RELAYED:
                time.sleep(0.05)
            client.close()
        config = RelayConfig(peers=[f"unix://{agent.socket}" for agent in agents], interval=0.1, drain_timeout=1.0)
        source = RelaySource(config, ClientConfig(timeout=10.0))
        stop = threading.Event()
        merged = 0
        started = time.perf_counter()
        for batch in source.batches(stop):
            merged += len(batch.flows)
            if merged >= 3 * RELAYED:
                break
        seconds = time.perf_counter() - started
        stop.set()
        source.close()
    finally:
        for agent in agents:
            agent.stop()
    return {"agents": 3, "records": merged, "seconds": round(seconds, 2), "records_per_s": round(merged / seconds)}


def main() -> None:
    result: dict = {}
    with tempfile.TemporaryDirectory() as directory:
        config = GrpcConfig(socket=f"{directory}/f.sock", hubble_socket=f"{directory}/h.sock", ring=65536)
        sink = GrpcSink(config, "bench")
        sink.open()
        result["ingest_ms_per_100k"] = round(
            ingest_ms(sink, interval_batches(pd.Timestamp("2025-03-01T12:00:00Z"), 5, 1.0, FLOWS, "bench")), 1
        )
        lab.log(f"grpc_api: ingest {result['ingest_ms_per_100k']} ms per interval of {FLOWS:,} flows (no follower)")
        idle = ingest_with_idle_followers(sink, config.socket, pd.Timestamp("2025-03-01T12:10:00Z"))
        result["ingest_ms_per_100k_10_idle_followers"] = round(idle, 1)
        lab.log(f"grpc_api: ingest {idle:.1f} ms per interval of {FLOWS:,} flows (10 followers, filter passes none)")
        start = pd.Timestamp("2025-03-01T13:00:00Z")
        result["followers"] = []
        for count in (1, 10):
            for allow in ([], ["port=10000-10999"]):
                batches = interval_batches(start, 5, 1.0, FOLLOWED, "bench")
                start = batches[-1].time_end + pd.Timedelta(seconds=1)
                rate = followers(sink, config.socket, count, allow, batches)
                shown = allow[0] if allow else "none"
                result["followers"].append({"followers": count, "filter": shown, "records_per_s": round(rate)})
                lab.log(f"grpc_api: {count:>2} follower(s), filter {shown:<18} {rate:>10,.0f} records/s delivered")
        sink.close()
        result["relay"] = relay_merge(Path(directory))
        lab.log(f"grpc_api: relay merge of 3 agents: {result['relay']['records_per_s']:,} records/s")
    lab.save("grpc_api", result)


if __name__ == "__main__":
    main()

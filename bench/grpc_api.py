"""The flow API's figures (printed, never asserted): ingest cost of the API sink at 100k flows per interval,
records/s to 1 and 10 followers with and without a filter.

    .venv/bin/python -m bench.grpc_api
"""

from __future__ import annotations

import tempfile
import threading
import time

import pandas as pd

from flowscope.config import ClientConfig, GrpcConfig
from flowscope.exporters.grpc.server import GrpcSink
from flowscope.proto.client import Client, request
from tests.integration.grpc_agents import interval_batches

FLOWS = 100_000


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
    time.sleep(0.5)  # the streams are registered on the server (a bench, not a test: nothing asserts on it)
    started = time.perf_counter()
    for batch in batches:
        sink.write(batch)
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for client in clients:
        client.close()
    return sum(received) / seconds


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        config = GrpcConfig(socket=f"{directory}/f.sock", hubble_socket=f"{directory}/h.sock", ring=65536)
        sink = GrpcSink(config, "bench")
        sink.open()
        big = interval_batches(pd.Timestamp("2025-03-01T12:00:00Z"), 5, 1.0, FLOWS, "bench")
        started = time.perf_counter()
        for batch in big:
            sink.write(batch)
        ingest_ms = (time.perf_counter() - started) * 1000 / len(big)
        print(f"ingest: {ingest_ms:.1f} ms per interval of {FLOWS:,} flows (no follower)")
        start = pd.Timestamp("2025-03-01T13:00:00Z")
        for count in (1, 10):
            for allow in ([], ["port=10000-10999"]):
                batches = interval_batches(start, 5, 1.0, 5000, "bench")
                start = batches[-1].time_end + pd.Timedelta(seconds=1)
                rate = followers(sink, config.socket, count, allow, batches)
                print(
                    f"{count:>2} follower(s), filter {allow[0] if allow else 'none':<18} {rate:>10,.0f} records/s delivered"  # noqa: E501
                )
        sink.close()


if __name__ == "__main__":
    main()

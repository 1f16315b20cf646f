"""A live pipeline in a lab namespace with three sinks — JSON lines, the Parquet flow log, and one that never
returns from a write:

    python -m tests.kernel.pipeline_child IFACE OUT.jsonl FLOWLOG_DIR

prints "ready" once the probes are attached, runs until SIGINT, then prints the run's coverage as JSON."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

from flowscope.config import FlowLogConfig, load
from flowscope.exporters.flowlog import FlowLogSink
from flowscope.exporters.jsonl import JsonlSink
from flowscope.kernel.loader import LoadOptions
from flowscope.pipeline.live import LiveSource
from flowscope.pipeline.pipeline import Pipeline

STUCK_QUEUE = 2


class StuckSink:
    """An output that hangs on its first write, for good (a dead NFS mount, a peer that never reads)."""

    name = "stuck"

    def open(self) -> None:
        return None

    def write(self, batch: object) -> None:
        threading.Event().wait()

    def close(self) -> None:
        return None

    def health(self) -> dict[str, str]:
        return {"state": "ok"}


def main(interface: str, path: str, flowlog: str) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    state_dir = Path(load().probes.state_dir)  # the test's own (FLOWSCOPE_STATE_DIR)
    source = LiveSource(LoadOptions(interfaces=[interface]), interval=0.2, state_dir=state_dir)
    with open(path, "w", encoding="utf-8") as out:
        sinks = [StuckSink(), JsonlSink(out), FlowLogSink(FlowLogConfig(directory=flowlog))]
        pipeline = Pipeline(source, sinks, queue_batches={"stuck": STUCK_QUEUE, "jsonl": 1024, "flowlog": 1024})
        pipeline.start()
        print("ready", flush=True)
        pipeline.run(stop)
        coverage = pipeline.close(timeout=2.0)
    print(json.dumps({"coverage": coverage.to_dict(), "intervals": pipeline.intervals}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The pipeline: one source fanned out to sinks on threads of their own; a slow, failing or dead sink costs
only its own records, counted exactly as `sink:<name>` so that produced = delivered + lost for each."""

from __future__ import annotations

import threading
import time

import pytest

from flowscope.pipeline.pipeline import Pipeline, batches
from flowscope.pipeline.sink import SinkError, records
from flowscope.schema import FlowBatch
from tests.ui.scenario import NODE, shop_batches
from tests.waiting import wait_for

SHOP = shop_batches()
RECORDS = [records(batch) for batch in SHOP]  # flow rows + event rows of each interval


class ListSource:
    """A BatchSource over a list: yields each batch, then ends."""

    def __init__(self, items: list[FlowBatch]) -> None:
        self.items = items
        self.node = NODE
        self.interval = 2.0
        self.closed = False

    def probes(self):
        return []

    def batches(self, stop):
        for batch in self.items:
            if stop.is_set():
                return
            yield batch

    def close(self) -> None:
        self.closed = True


class Recorder:
    """A sink that keeps what it is given, with a log of the calls on its thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.written: list[FlowBatch] = []
        self.calls: list[tuple[str, str]] = []

    def open(self) -> None:
        self.calls.append(("open", threading.current_thread().name))

    def write(self, batch: FlowBatch) -> None:
        self.written.append(batch)

    def reopen(self) -> None:
        self.calls.append(("reopen", threading.current_thread().name))

    def close(self) -> None:
        self.calls.append(("close", threading.current_thread().name))

    def health(self):
        return {"state": "ok"}


class Gate(Recorder):
    """A sink whose writes wait until the test opens its gate (a slow or stuck output)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def write(self, batch: FlowBatch) -> None:
        self.waiting.set()
        self.gate.wait()
        super().write(batch)


class Failing(Recorder):
    def __init__(self, name: str, failures: set[int]) -> None:
        super().__init__(name)
        self.failures = failures
        self.count = 0

    def write(self, batch: FlowBatch) -> None:
        self.count += 1
        if self.count in self.failures:
            raise OSError(28, "No space left on device")
        super().write(batch)


def sink_counts(coverage, name: str) -> tuple[int, int, int]:
    count = coverage.sources[f"sink:{name}"]
    return count.produced, count.delivered, count.lost


def run(pipeline: Pipeline) -> None:
    pipeline.start()
    pipeline.run(threading.Event())


def test_every_sink_gets_every_batch_in_order_on_its_own_thread():
    first, second = Recorder("first"), Recorder("second")
    pipeline = Pipeline(ListSource(SHOP), [first, second])
    run(pipeline)
    total = pipeline.close()
    for sink in (first, second):
        assert [b.time_end for b in sink.written] == [b.time_end for b in SHOP]
        assert [name for name, _thread in sink.calls] == ["open", "close"]
        assert {thread for _name, thread in sink.calls} == {f"flowscope-sink-{sink.name}"}
        assert sink_counts(total, sink.name) == (sum(RECORDS), sum(RECORDS), 0)
    assert pipeline.intervals == 5 and pipeline.source.closed and total.unbalanced() == []


def test_each_interval_carries_the_sinks_settled_counts_and_balances():
    sink = Recorder("out")
    pipeline = Pipeline(ListSource(SHOP), [sink])
    pipeline.start()
    stop = threading.Event()
    for batch in batches(pipeline.source, stop):
        pipeline.publish(batch)
        wait_for(lambda: len(sink.written) == pipeline.intervals)  # written before the next interval
    pipeline.close()
    settled = [b.coverage.sources["sink:out"] for b in sink.written]
    # each interval reports the interval before it (the first reports nothing yet)
    assert [(c.produced, c.delivered, c.lost) for c in settled] == [(0, 0, 0)] + [(n, n, 0) for n in RECORDS[:-1]]


def test_a_stuck_sink_loses_only_its_own_records_and_counts_them_exactly():
    stuck, fine = Gate("stuck"), Recorder("fine")
    pipeline = Pipeline(ListSource([]), [stuck, fine], queue_batches=2)
    pipeline.start()
    pipeline.publish(SHOP[0])
    stuck.waiting.wait(10)  # batch 0 is being written (held), the queue is empty again
    for number, batch in enumerate(SHOP[1:], 2):
        pipeline.publish(batch)  # 1 and 2 queue; 3 and 4 find the queue full
        wait_for(lambda n=number: len(fine.written) == n)  # (the other sink keeps up)
    assert pipeline.status()["sinks"]["stuck"]["queued"] == 2
    stuck.gate.set()
    total = pipeline.close()
    assert [b.time_end for b in stuck.written] == [b.time_end for b in SHOP[:3]]
    assert sink_counts(total, "stuck") == (sum(RECORDS), sum(RECORDS[:3]), sum(RECORDS[3:]))
    assert sink_counts(total, "fine") == (sum(RECORDS), sum(RECORDS), 0)


def test_a_failed_write_is_counted_as_lost_and_the_sink_goes_on():
    failing = Failing("disk", failures={2})
    pipeline = Pipeline(ListSource(SHOP), [failing])
    pipeline.start()
    stop = threading.Event()
    for batch in batches(pipeline.source, stop):
        pipeline.publish(batch)
        wait_for(lambda: failing.count == pipeline.intervals)
        if failing.count == 2:
            assert pipeline.status()["sinks"]["disk"]["error"] == "OSError: [Errno 28] No space left on device"
    assert pipeline.status()["sinks"]["disk"]["error"] is None  # the next write succeeded
    total = pipeline.close()
    assert len(failing.written) == 4
    assert sink_counts(total, "disk") == (sum(RECORDS), sum(RECORDS) - RECORDS[1], RECORDS[1])


def test_a_sink_that_never_returns_does_not_hold_up_the_close():
    dead, fine = Gate("dead"), Recorder("fine")
    pipeline = Pipeline(ListSource(SHOP), [dead, fine], queue_batches={"dead": 2, "fine": 8})
    run(pipeline)
    wait_for(lambda: dead.waiting.is_set() and len(fine.written) == 5)
    total = pipeline.close(timeout=0.5)  # the gate never opens
    assert fine.calls[-1][0] == "close" and len(fine.written) == 5
    # one batch held in write(), two queued, two refused: all five lost, none twice
    assert sink_counts(total, "dead") == (sum(RECORDS), 0, sum(RECORDS))
    dead.gate.set()  # the write returns after the close gave up: nothing more is counted
    time.sleep(0.05)
    assert sink_counts(pipeline.coverage, "dead") == (sum(RECORDS), 0, sum(RECORDS))


def test_a_sink_that_cannot_open_stops_the_start_and_closes_the_others():
    class Unopenable(Recorder):
        def open(self) -> None:
            raise PermissionError(13, "Permission denied: '/var/lib/flowscope'")

    first, bad = Recorder("first"), Unopenable("bad")
    pipeline = Pipeline(ListSource(SHOP), [first, bad])
    with pytest.raises(SinkError, match=r"^the bad output cannot start: \[Errno 13\] Permission denied"):
        pipeline.start()
    assert [name for name, _thread in first.calls] == ["open", "close"]


def test_reopen_runs_on_the_sink_thread_between_batches():
    sink = Recorder("log")
    pipeline = Pipeline(ListSource([]), [sink])
    pipeline.start()
    pipeline.publish(SHOP[0])
    pipeline.reopen()
    pipeline.publish(SHOP[1])
    pipeline.close()
    assert [name for name, _thread in sink.calls] == ["open", "reopen", "close"]
    assert {thread for _name, thread in sink.calls} == {"flowscope-sink-log"}
    assert len(sink.written) == 2


def test_identity_is_added_before_any_sink_sees_a_batch():
    class Naming:
        def __init__(self) -> None:
            self.closed = False

        def enrich(self, batch: FlowBatch) -> FlowBatch:
            flows = batch.flows.copy()
            flows["src_pod"] = "named"
            return FlowBatch(batch.time_start, batch.time_end, flows, batch.events, batch.coverage)

        def health(self):
            return {}

        def close(self) -> None:
            self.closed = True

    sink, enricher = Recorder("out"), Naming()
    pipeline = Pipeline(ListSource(SHOP), [sink], enricher=enricher)
    run(pipeline)
    pipeline.close()
    assert all((b.flows["src_pod"] == "named").all() for b in sink.written) and enricher.closed


def test_a_live_source_is_read_until_the_duration_with_the_last_interval_cut_short():
    class Clocked:
        node, interval = NODE, 2.0

        def __init__(self) -> None:
            self.asked: list[float] = []

        def next_batch(self, seconds: float, stop=None) -> FlowBatch:
            self.asked.append(seconds)
            return SHOP[0]

    source = Clocked()
    assert len(list(batches(source, threading.Event(), duration=5.0))) == 3
    assert source.asked == [2.0, 2.0, 1.0]
    stopped = threading.Event()
    stopped.set()
    source.asked.clear()
    assert len(list(batches(source, stopped))) == 1 and source.asked == [0.0]  # one last drain at a stop


def test_two_sinks_of_one_name_are_refused():
    with pytest.raises(ValueError, match="same name"):
        Pipeline(ListSource([]), [Recorder("x"), Recorder("x")])


class Deferred(Recorder):
    """A sink that settles what it was handed only in idle() (as the ClickHouse sink writes a server that came
    back while no batch comes)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.held = self.written_count = 0

    def write(self, batch: FlowBatch) -> None:
        super().write(batch)
        self.held += records(batch)

    def idle(self) -> None:
        self.calls.append(("idle", threading.current_thread().name))
        self.written_count, self.held = self.written_count + self.held, 0

    def settled(self) -> tuple[int, int]:
        written, self.written_count = self.written_count, 0
        return written, 0


def test_a_sink_with_idle_is_called_on_its_thread_while_no_batch_comes(monkeypatch):
    from flowscope.pipeline import sink as sink_module

    monkeypatch.setattr(sink_module, "IDLE_SECONDS", 0.05, raising=False)
    sink = Deferred("out")
    pipeline = Pipeline(ListSource(SHOP), [sink])
    run(pipeline)  # the source ended: no batch comes any more
    delivered = lambda: pipeline.status()["sinks"]["out"]["delivered"]  # noqa: E731
    wait_for(lambda: delivered() == sum(RECORDS) == 33, what="what idle() settled counted as delivered")
    wait_for(lambda: [c for c in sink.calls if c[0] == "idle"][1:], what="idle() called again")
    assert {thread for call, thread in sink.calls if call == "idle"} == {"flowscope-sink-out"}
    assert sink_counts(pipeline.close(), "out") == (33, 33, 0)

"""The perf-buffer record walker (flowscope.readers.perf) on synthetic perf memory laid out as the kernel
lays it out: 8-byte headers, raw samples padded to 8 bytes, LOST records, a data area mapped once whose
records wrap around its end."""

from __future__ import annotations

import struct

import numpy as np

from flowscope.kernel.layouts import EVENT
from flowscope.readers.perf import PERF_RECORD_LOST, PERF_RECORD_SAMPLE, pending_bytes, sample_span, walk_records

PERF_RECORD_COMM = 3


def event(number: int) -> bytes:
    record = np.zeros(1, dtype=EVENT)
    record["ts_ns"], record["kind"], record["value"] = number, 2, number * 3
    return record.tobytes()


def sample(raw: bytes) -> bytes:
    """A PERF_RECORD_SAMPLE of PERF_SAMPLE_RAW as the kernel writes it for bpf_perf_event_output."""
    span = sample_span(len(raw))
    padded = raw.ljust(span - 12, b"\0")
    return struct.pack("<IHHI", PERF_RECORD_SAMPLE, 0, span, len(padded)) + padded


def lost(count: int) -> bytes:
    return struct.pack("<IHHQQ", PERF_RECORD_LOST, 0, 24, 7, count)


def walk(*records: bytes):
    return walk_records(np.frombuffer(b"".join(records), dtype=np.uint8), EVENT.itemsize)


def numbers(read) -> list[int]:
    return read.records.reshape(-1).view(EVENT)["ts_ns"].tolist()


def test_a_run_of_samples_is_read_in_order() -> None:
    read = walk(*(sample(event(n)) for n in range(1, 6)))
    assert numbers(read) == [1, 2, 3, 4, 5]
    assert read.records.reshape(-1).view(EVENT)["value"].tolist() == [3, 6, 9, 12, 15]
    assert (read.lost, read.malformed) == (0, 0)


def test_lost_records_are_counted_and_the_samples_around_them_kept() -> None:
    read = walk(sample(event(1)), lost(40), sample(event(2)), sample(event(3)), lost(2), sample(event(4)))
    assert numbers(read) == [1, 2, 3, 4]
    assert (read.lost, read.malformed) == (42, 0)


def test_samples_of_another_length_and_other_records_are_skipped() -> None:
    comm = struct.pack("<IHH", PERF_RECORD_COMM, 0, 32) + bytes(24)
    read = walk(sample(event(1)), sample(b"short"), comm, sample(event(2)))
    assert numbers(read) == [1, 2]
    assert (read.lost, read.malformed) == (0, 1)


def test_nothing_pending_is_nothing_read() -> None:
    read = walk()
    assert read.records.shape == (0, EVENT.itemsize)
    assert (read.lost, read.malformed) == (0, 0)


def test_records_that_wrap_around_the_end_of_the_data_area() -> None:
    span = sample_span(EVENT.itemsize)
    size = 4 * span  # room for four samples; positions only grow
    data = np.zeros(size, dtype=np.uint8)
    stream = b"".join(sample(event(n)) for n in range(1, 4))
    tail = 3 * span + span // 2  # the first record starts in the middle of the last slot
    at = (tail + np.arange(len(stream))) % size
    data[at] = np.frombuffer(stream, dtype=np.uint8)
    pending = pending_bytes(data, tail, tail + len(stream))
    assert numbers(walk_records(pending, EVENT.itemsize)) == [1, 2, 3]
    # Not wrapping: a view of the area itself.
    assert np.shares_memory(pending_bytes(data, size, size + span), data)

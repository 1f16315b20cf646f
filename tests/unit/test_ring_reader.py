"""The ring-buffer record walker and the pending-event store, on synthetic ring memory laid out as the
kernel lays it out (the data area mapped twice in a row, 8-byte headers, positions that only grow)."""

from __future__ import annotations

import numpy as np

from flowscope.kernel.layouts import EVENT, EVENT_KIND_MAX
from flowscope.readers.ring import (
    BUSY_BIT,
    DISCARD_BIT,
    PendingEvents,
    record_span,
    walk_records,
)

RING_SIZE = 4096  # one page: 32 slots of 128 bytes
SLOT = record_span(EVENT.itemsize)


class SyntheticRing:
    """Ring memory a test writes records into, at positions that grow past the end and wrap."""

    def __init__(self, start: int = 0) -> None:
        self.data = np.zeros(2 * RING_SIZE, dtype=np.uint8)
        self.consumer = self.producer = start

    def _store(self, position: int, payload: bytes) -> None:
        at = (position + np.arange(len(payload))) & (RING_SIZE - 1)
        values = np.frombuffer(payload, dtype=np.uint8)
        self.data[at] = values
        self.data[at + RING_SIZE] = values  # the second mapping of the same pages

    def append(self, body: bytes, busy: bool = False, discarded: bool = False) -> int:
        """Writes a record at the producer position; returns that position."""
        position = self.producer
        length = len(body) | (BUSY_BIT if busy else 0) | (DISCARD_BIT if discarded else 0)
        page_offset = 0  # the kernel's own bookkeeping; readers ignore it
        self._store(position, length.to_bytes(4, "little") + page_offset.to_bytes(4, "little") + body)
        self.producer += record_span(len(body))
        return position

    def commit(self, position: int) -> None:
        header = int.from_bytes(self.data[position & (RING_SIZE - 1) :][:4].tobytes(), "little")
        self._store(position, (header & ~BUSY_BIT).to_bytes(4, "little"))

    def walk(self):
        read = walk_records(self.data, self.consumer, self.producer, EVENT.itemsize)
        self.consumer = read.consumer
        return read


def event(number: int, kind: int = 7, generation: int = 0) -> bytes:
    record = np.zeros(1, dtype=EVENT)
    record["ts_ns"], record["kind"], record["generation"], record["value"] = number, kind, generation, number * 3
    record["comm"] = f"c{number}".encode()
    return record.tobytes()


def numbers(read) -> list[int]:
    return read.records.reshape(-1).view(EVENT)["ts_ns"].tolist()


def test_committed_records_are_read_in_order_and_the_consumer_moves_past_them() -> None:
    ring = SyntheticRing()
    bodies = [event(n) for n in (1, 2, 3)]
    for body in bodies:
        ring.append(body)
    read = ring.walk()
    assert read.records.tobytes() == b"".join(bodies)
    assert read.consumer == ring.producer == 3 * SLOT
    assert read.malformed == 0
    again = ring.walk()
    assert len(again.records) == 0 and again.consumer == 3 * SLOT


def test_records_that_wrap_around_the_end_of_the_data_area_are_read_whole() -> None:
    # Three laps into the ring, 200 bytes before the end of the data area: the second record straddles it.
    ring = SyntheticRing(start=3 * RING_SIZE - 200)
    bodies = [event(n) for n in range(10, 15)]
    for body in bodies:
        ring.append(body)
    read = ring.walk()
    assert numbers(read) == [10, 11, 12, 13, 14]
    assert read.records.tobytes() == b"".join(bodies)
    assert read.consumer == 3 * RING_SIZE - 200 + 5 * SLOT


def test_a_full_ring_is_read_entirely() -> None:
    ring = SyntheticRing(start=5 * SLOT)
    for n in range(RING_SIZE // SLOT):
        ring.append(event(n))
    read = ring.walk()
    assert numbers(read) == list(range(32)) and read.consumer == 5 * SLOT + RING_SIZE


def test_a_record_still_being_written_stops_the_read_until_it_is_committed() -> None:
    ring = SyntheticRing()
    ring.append(event(1))
    busy = ring.append(event(2), busy=True)
    ring.append(event(3))  # committed, but behind a record still being written
    first = ring.walk()
    assert numbers(first) == [1] and first.consumer == busy
    assert numbers(ring.walk()) == [] and ring.consumer == busy
    ring.commit(busy)
    second = ring.walk()
    assert numbers(second) == [2, 3] and second.consumer == ring.producer


def test_a_discarded_record_is_skipped_and_not_counted_as_malformed() -> None:
    ring = SyntheticRing()
    ring.append(event(1))
    ring.append(event(2), discarded=True)
    ring.append(bytes(40), discarded=True)  # of another length too
    ring.append(event(3))
    read = ring.walk()
    assert numbers(read) == [1, 3]
    assert read.malformed == 0 and read.consumer == ring.producer


def test_records_of_another_length_are_skipped_by_their_own_length_and_counted() -> None:
    ring = SyntheticRing(start=RING_SIZE - 3 * SLOT)
    ring.append(event(1))
    ring.append(bytes(60))  # shorter: the records after it are no longer on the 128-byte grid
    ring.append(event(2))
    ring.append(bytes(300))  # longer than a slot, and across the end of the data area
    ring.append(event(3))
    ring.append(event(4))
    read = ring.walk()
    assert numbers(read) == [1, 2, 3, 4]
    assert read.malformed == 2 and read.consumer == ring.producer
    assert read.records.tobytes() == b"".join(event(n) for n in (1, 2, 3, 4))


def test_a_busy_record_of_another_length_stops_the_read() -> None:
    ring = SyntheticRing()
    ring.append(event(1))
    busy = ring.append(bytes(60), busy=True)
    ring.append(event(2))
    read = ring.walk()
    assert numbers(read) == [1] and read.consumer == busy and read.malformed == 0


def rows(*records: bytes) -> np.ndarray:
    return np.frombuffer(b"".join(records), dtype=np.uint8).reshape(-1, EVENT.itemsize)


def test_pending_events_beyond_the_capacity_are_dropped_and_counted_by_generation_and_kind() -> None:
    pending = PendingEvents(capacity=3)
    pending.add(rows(event(1, kind=7, generation=1), event(2, kind=4, generation=0)))
    pending.add(rows(event(3, kind=7, generation=1), event(4, kind=4, generation=1), event(5, kind=7, generation=2)))
    pending.add(rows(event(6, kind=EVENT_KIND_MAX + 3, generation=1)))  # an unknown kind counts under 0
    events, dropped = pending.take()
    assert events.dtype == EVENT and events["ts_ns"].tolist() == [1, 2, 3]
    assert events["comm"].tolist() == [b"c1", b"c2", b"c3"]
    expected = np.zeros((2, EVENT_KIND_MAX), dtype=np.int64)
    expected[1, 4] = 1  # event 4
    expected[0, 7] = 1  # event 5: generation 2 is generation 0 (only the low bit counts)
    expected[1, 0] = 1  # event 6
    assert dropped.tolist() == expected.tolist()
    # Taken: room again, and the drops start from zero.
    pending.add(rows(event(7)))
    events, dropped = pending.take()
    assert events["ts_ns"].tolist() == [7] and not dropped.any()
    events, dropped = pending.take()
    assert len(events) == 0 and events.dtype == EVENT and not dropped.any()

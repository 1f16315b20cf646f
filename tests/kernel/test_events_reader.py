"""The event reader counts every event: delivered + lost = produced, exactly, with a ring that holds them
all, with a ring that overflows, and with the reader's own pending store full (events dropped in user
space). For the mmap reader (flowscope.readers.ring, the default on x86-64) and BCC's callback reader (the
fallback elsewhere); where the count is exact with any buffer, for perf buffers read through their pages
(flowscope.readers.perf) too.

Events come from the loaded tc egress program run with BPF_PROG_TEST_RUN: no traffic, no interface, no
other process's packets. With a one-entry flow map, the first flow's packet takes the entry and every
packet of the second flow spills through the ring as one event, so the events produced are known
exactly: the second flow's runs."""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import pytest

from flowscope.coverage import Coverage
from flowscope.decode.batch import build_batch
from flowscope.decode.context import AggregationContext
from flowscope.kernel import bpf_syscall
from flowscope.kernel.compile_child import load
from flowscope.kernel.layouts import EVENT
from flowscope.kernel.loader import LoadedProbes, LoadOptions
from flowscope.readers import ring as ring_reader
from flowscope.readers.drain import PENDING_EVENTS_MAX, KernelReader

RUNS = 500  # program runs per BPF_PROG_TEST_RUN call: one burst of spills
FIRST_PORT = 40000  # the flow that holds the map's entry; FIRST_PORT + 1 spills
READERS = ("mmap", "bcc")
PERF = "perf"  # perf buffers (--perf-buffer), read through their pages on x86-64
PERF_PAGES = 1024  # per CPU: 30,840 events, more than the 5,000 spills sent between two drains


def udp_frame(sport: int) -> bytes:
    """A 64-byte Ethernet/IPv4/UDP frame 10.206.0.1 -> 10.206.0.2 (only the program sees it)."""
    eth = bytes.fromhex("020600000002" "020600000001") + b"\x08\x00"  # fmt: skip
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 50, 0, 0, 64, 17, 0, bytes([10, 206, 0, 1]), bytes([10, 206, 0, 2]))
    return eth + ip + struct.pack("!HHHH", sport, 7001, 30, 0) + bytes(22)


FRAMES = (udp_frame(FIRST_PORT), udp_frame(FIRST_PORT + 1))


@contextmanager
def spill_probes(reader: str, ring_pages: int, pending_max: int = PENDING_EVENTS_MAX) -> Iterator[Probes]:
    if reader == PERF:
        transport = {"perf_events": True, "perf_pages": PERF_PAGES}
    else:
        transport = {"ring_pages": ring_pages, "ring_reader": reader}
    options = LoadOptions(interfaces=[], families={"tc_flows"}, flow_map_size=1, **transport)
    loaded = load(options)
    try:
        probes = Probes(loaded, KernelReader(loaded, pending_max))
        try:
            assert probes.kernel.mmap_ring == (reader == "mmap" and ring_reader.supported())
            yield probes
        finally:
            probes.kernel.close()
    finally:
        loaded.close()


class Probes:
    def __init__(self, loaded: LoadedProbes, kernel: KernelReader) -> None:
        self.loaded = loaded
        self.kernel = kernel
        self.context = AggregationContext(node="fsev", offset_ns=0, ifnames={}, active=loaded.active)
        self.batches = []

    def send(self, rounds: int) -> None:
        """`rounds` x (RUNS packets of the first flow, then RUNS of the second): RUNS spills a round."""
        egress = self.loaded.tc_programs["egress"]
        for _ in range(rounds):
            for frame in FRAMES:
                bpf_syscall.prog_test_run(egress, frame, RUNS)

    def drain(self) -> None:
        window = (pd.Timestamp.now(tz="UTC"), pd.Timestamp.now(tz="UTC"))
        self.batches.append(build_batch(self.kernel.flip_and_drain(), self.context, window))

    def coverage(self) -> Coverage:
        total = Coverage()
        for batch in self.batches:
            total.merge(batch.coverage)
        return total

    def packets_per_flow(self) -> dict[int, tuple[int, int]]:
        flows = pd.concat([batch.flows for batch in self.batches], ignore_index=True)
        totals = flows.groupby(flows["src_port"].astype(int))[["packets", "bytes"]].sum()
        return {int(port): (int(row.packets), int(row.bytes)) for port, row in totals.iterrows()}


def spill_counts(probes: Probes) -> tuple[int, int, int]:
    spill = probes.coverage().sources["events:flow_spill"]
    return spill.produced, spill.delivered, spill.lost


@pytest.mark.parametrize("reader", [*READERS, PERF])
def test_every_spill_is_delivered_when_the_ring_holds_them(reader: str) -> None:
    with spill_probes(reader, ring_pages=4096) as probes:
        probes.send(10)
        probes.drain()  # a generation flip in the middle: the other map starts empty, the same flow takes it
        probes.send(10)
        probes.drain()
        probes.drain()
    sent = 20 * RUNS
    print(f"{reader}: spills produced, delivered, lost {spill_counts(probes)}")
    assert spill_counts(probes) == (sent, sent, 0)
    frame = len(FRAMES[0])
    assert probes.packets_per_flow() == {FIRST_PORT: (sent, sent * frame), FIRST_PORT + 1: (sent, sent * frame)}
    flow_map = probes.coverage().sources["flow_map"]
    assert (flow_map.produced, flow_map.delivered, flow_map.lost) == (2 * sent, 2 * sent, 0)
    assert probes.coverage().unbalanced() == []


@pytest.mark.parametrize("reader", READERS)
def test_spills_an_overflowing_ring_refuses_are_counted_as_lost(reader: str) -> None:
    """A one-page ring holds 32 events; each call writes a burst of RUNS spills, faster than any reader."""
    with spill_probes(reader, ring_pages=1) as probes:
        probes.send(10)
        probes.drain()
        probes.send(10)
        probes.drain()
        probes.drain()
    sent = 20 * RUNS
    produced, delivered, lost = spill_counts(probes)
    print(f"{reader}: spills produced {produced}, delivered {delivered}, lost {lost}")
    assert produced == sent and delivered + lost == sent
    assert delivered >= 32 and lost > 0
    frame = len(FRAMES[0])
    assert probes.packets_per_flow() == {
        FIRST_PORT: (sent, sent * frame),
        FIRST_PORT + 1: (delivered, delivered * frame),
    }
    flow_map = probes.coverage().sources["flow_map"]
    assert (flow_map.produced, flow_map.delivered, flow_map.lost) == (2 * sent, sent + delivered, lost)
    assert probes.coverage().unbalanced() == []


@pytest.mark.parametrize("reader", [*READERS, PERF])
def test_events_beyond_the_readers_pending_store_are_counted_as_lost(reader: str) -> None:
    """The ring takes all 5000 spills; the reader keeps 1000 until the drain and drops the rest, counted."""
    with spill_probes(reader, ring_pages=4096, pending_max=1000) as probes:
        probes.send(10)
        probes.drain()
        probes.drain()
    assert spill_counts(probes) == (10 * RUNS, 1000, 10 * RUNS - 1000)
    assert probes.packets_per_flow()[FIRST_PORT + 1][0] == 1000
    assert probes.coverage().unbalanced() == []


def test_the_ring_wakes_its_reader_once_an_eighth_of_it_is_written() -> None:
    """Records go to the ring with BPF_RB_NO_WAKEUP but one in FLOWSCOPE_RING_WAKE_EVERY (an eighth of the
    ring: 1024 on 256 pages), which wakes the reader; the others wait for it or for the drain. An epoll
    registered on the empty ring says whether the kernel signalled; the ring holds every record either way."""
    ring_pages = 256
    wake_every = ring_pages * mmap.PAGESIZE // (8 * (EVENT.itemsize + ring_reader.HEADER_SIZE))
    assert wake_every == 1024
    loaded = load(LoadOptions(interfaces=[], families={"tc_flows"}, flow_map_size=1, ring_pages=ring_pages))
    try:
        egress = loaded.tc_programs["egress"]
        bpf_syscall.prog_test_run(egress, FRAMES[0], 1)  # takes the flow map's one entry: FRAMES[1] spills
        events_fd = loaded.maps["fs_events"].fd
        ring = ring_reader.MmapRing(events_fd, ring_pages * mmap.PAGESIZE, EVENT.itemsize)
        try:
            with select.epoll() as epoll:
                epoll.register(events_fd, select.EPOLLIN)
                for cycle in range(2):  # the second after a read: the count starts again
                    bpf_syscall.prog_test_run(egress, FRAMES[1], wake_every - 1)
                    assert epoll.poll(0) == [], f"cycle {cycle}: woken before {wake_every} records"
                    bpf_syscall.prog_test_run(egress, FRAMES[1], 1)
                    assert epoll.poll(0) == [(events_fd, select.EPOLLIN)], f"cycle {cycle}: not woken"
                    assert len(ring.read().records) == wake_every
                    assert epoll.poll(0) == []  # caught up: off epoll's ready list until the next wake-up
        finally:
            ring.close()
    finally:
        loaded.close()

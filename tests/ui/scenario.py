"""A small, realistic node for the `top` tests: five 2-second intervals of a shop namespace.

checkout (shop) calls payments over TCP 8443 (one connect/accept, a retransmit burst in interval 2,
TCP_INVALID_SEQUENCE drops in interval 3, closed in interval 4), asks coredns (kube-system) over UDP 53,
and talks IPv6 to payments on 443; a host process (curl, no pod) hits a closed port on payments (NO_SOCKET,
reset); an outside address is dropped by the firewall (NETFILTER_DROP) in intervals 3 and 4. The event
ring loses 2 events in interval 3.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from flowscope.coverage import Coverage
from flowscope.formats.jsonl import write_batch
from flowscope.schema import FlowBatch, events_frame, flows_frame

NODE = "node-a"
START = pd.Timestamp("2025-03-01T12:00:00Z")
SECONDS = 2

CHECKOUT = {
    "namespace": "shop",
    "pod": "checkout-7d9f",
    "workload": "checkout",
    "workload_kind": "Deployment",
    "node": NODE,
    "pid": 4242,
    "comm": "checkout",
    "identity_source": "cgroup",
}
PAYMENTS = {
    "namespace": "shop",
    "pod": "payments-0",
    "workload": "payments",
    "workload_kind": "StatefulSet",
    "node": NODE,
    "pid": 5151,
    "comm": "payments",
    "identity_source": "cgroup",
}
COREDNS = {
    "namespace": "kube-system",
    "pod": "coredns-55",
    "workload": "coredns",
    "workload_kind": "Deployment",
    "node": "node-b",
    "identity_source": "ip",
}
CURL = {"pid": 777, "comm": "curl", "node": NODE, "identity_source": "cgroup"}
OUTSIDE: dict = {}

CHECKOUT_IP, PAYMENTS_IP, COREDNS_IP, NODE_IP, OUTSIDE_IP = (
    "10.204.0.10",
    "10.204.0.11",
    "10.204.0.53",
    "10.204.0.1",
    "192.0.2.80",
)


def _ends(src: dict, dst: dict) -> dict:
    return {f"src_{k}": v for k, v in src.items()} | {f"dst_{k}": v for k, v in dst.items()}


def _flow(interval: int, src, dst, ifname, direction, protocol, sport, dport, packets, size, **counters) -> dict:
    (src_ip, src_identity), (dst_ip, dst_identity) = src, dst
    start = START + pd.Timedelta(seconds=SECONDS * interval)
    return {
        "time_start": start,
        "time_end": start + pd.Timedelta(seconds=SECONDS),
        "node": NODE,
        "ifname": ifname,
        "direction": direction,
        "ip_version": 6 if ":" in src_ip else 4,
        "protocol": protocol,
        "src_ip": src_ip,
        "src_port": sport,
        "dst_ip": dst_ip,
        "dst_port": dport,
        "packets": packets,
        "bytes": packets * size,
        "drop_packets": 0,
        "retransmits": 0,
        "resets": 0,
        **counters,
        **_ends(src_identity, dst_identity),
    }


def _event(interval: int, offset_ms: int, kind: str, src, dst, protocol, sport, dport, **fields) -> dict:
    (src_ip, src_identity), (dst_ip, dst_identity) = src, dst
    return {
        "time": START + pd.Timedelta(seconds=SECONDS * interval, milliseconds=offset_ms),
        "kind": kind,
        "node": NODE,
        "ip_version": 4,
        "protocol": protocol,
        "src_ip": src_ip,
        "src_port": sport,
        "dst_ip": dst_ip,
        "dst_port": dport,
        **fields,
        **_ends(src_identity, dst_identity),
    }


checkout = (CHECKOUT_IP, CHECKOUT)
payments = (PAYMENTS_IP, PAYMENTS)
coredns = (COREDNS_IP, COREDNS)
curl = (NODE_IP, CURL)
outside = (OUTSIDE_IP, OUTSIDE)
checkout6 = ("fd00:204::10", CHECKOUT)
payments6 = ("fd00:204::11", PAYMENTS)


def shop_batches() -> list[FlowBatch]:
    batches = []
    for i in range(5):
        flows = [
            _flow(
                i,
                checkout,
                payments,
                "veth-checkout",
                "egress",
                "TCP",
                43210,
                8443,
                100 + 10 * i,
                1000,
                rtt_us=1200 + 100 * i,
                retransmits=3 if i == 2 else 0,
                drop_packets=2 if i == 3 else 0,
                drop_bytes=2000 if i == 3 else 0,
                drop_reason="TCP_INVALID_SEQUENCE" if i == 3 else None,
            ),
            _flow(i, payments, checkout, "veth-payments", "egress", "TCP", 8443, 43210, 80, 1400, rtt_us=900),
            _flow(i, checkout6, payments6, "veth-checkout", "egress", "TCP", 50000, 443, 20, 1200, rtt_us=300),
        ]
        events = []
        if i in (0, 2, 4):
            flows.append(_flow(i, checkout, coredns, "veth-checkout", "egress", "UDP", 40001, 53, 2, 90))
        if i == 0:
            events += [
                _event(i, 100, "connect", checkout, payments, "TCP", 43210, 8443, pid=4242, comm="checkout"),
                _event(i, 101, "accept", checkout, payments, "TCP", 43210, 8443, pid=5151, comm="payments"),
            ]
        if i == 1:
            flows += [
                _flow(
                    i,
                    curl,
                    payments,
                    "veth-payments",
                    "ingress",
                    "TCP",
                    39000,
                    9999,
                    1,
                    74,
                    drop_packets=1,
                    drop_bytes=74,
                    drop_reason="NO_SOCKET",
                ),
                _flow(i, payments, curl, "veth-payments", "egress", "TCP", 9999, 39000, 1, 54, resets=1),
            ]
            events += [
                _event(i, 200, "connect", curl, payments, "TCP", 39000, 9999, pid=777, comm="curl"),
                _event(
                    i,
                    201,
                    "drop",
                    curl,
                    payments,
                    "TCP",
                    39000,
                    9999,
                    drop_reason="NO_SOCKET",
                    location="tcp_v4_rcv",
                    bytes=74,
                ),
                _event(i, 202, "reset", payments, curl, "TCP", 9999, 39000, state="CLOSE"),
            ]
        if i == 2:
            events.append(_event(i, 300, "retransmit", checkout, payments, "TCP", 43210, 8443, state="ESTABLISHED"))
        if i in (3, 4):
            flows.append(
                _flow(
                    i,
                    outside,
                    checkout,
                    "eth0",
                    "ingress",
                    "TCP",
                    51000,
                    8080,
                    6,
                    60,
                    drop_packets=6,
                    drop_bytes=360,
                    drop_reason="NETFILTER_DROP",
                )
            )
            events.append(
                _event(
                    i,
                    400,
                    "drop",
                    outside,
                    checkout,
                    "TCP",
                    51000,
                    8080,
                    drop_reason="NETFILTER_DROP",
                    location="nf_hook_slow",
                    bytes=60,
                )
            )
        if i == 3:
            events.append(
                _event(
                    i,
                    500,
                    "drop",
                    payments,
                    checkout,
                    "TCP",
                    8443,
                    43210,
                    drop_reason="TCP_INVALID_SEQUENCE",
                    location="tcp_validate_incoming",
                    bytes=1000,
                )
            )
        if i == 4:
            events += [
                _event(i, 600, "close", checkout, payments, "TCP", 43210, 8443, pid=4242, duration_us=8_000_000),
                _event(i, 601, "close", payments, checkout, "TCP", 8443, 43210, pid=5151, duration_us=8_000_000),
            ]
        coverage = Coverage()
        coverage.add("tc_flows", len(flows), len(flows), 0)
        lost = 2 if i == 3 else 0
        coverage.add("event_ring", len(events) + lost, len(events), lost)
        start = START + pd.Timedelta(seconds=SECONDS * i)
        batches.append(
            FlowBatch(
                start,
                start + pd.Timedelta(seconds=SECONDS),
                flows_frame(pd.DataFrame(flows)),
                events_frame(pd.DataFrame(events)),
                coverage,
            )
        )
    return batches


def steady_app(source):
    """The app of `top` on `source`, its filter field's cursor drawn steadily: a screenshot must not
    depend on the phase of a blink (every 0.5 s)."""
    from textual.widgets import Input

    from flowscope.ui.app import TopApp

    class SteadyTopApp(TopApp):
        def on_mount(self) -> None:  # Textual runs TopApp.on_mount after this one
            self.query_one("#filter", Input).cursor_blink = False

    return SteadyTopApp(source)


def replay_app(path: Path):
    """The app of `top` on a replay file, read as fast as it goes."""
    from flowscope.pipeline.source import ReplaySource

    return steady_app(ReplaySource(str(path), speed=0, node=NODE))


def write_replay(path: Path, batches: list[FlowBatch]) -> Path:
    with open(path, "w", encoding="utf-8") as out:
        for batch in batches:
            write_batch(batch, out)
    return path


class QueueSource:
    """A BatchSource fed by the test, one batch at a time, to drive the app through live-like arrivals."""

    def __init__(self, node: str = NODE, interval: float = SECONDS) -> None:
        import queue

        self.node = node
        self.interval = interval
        self._queue: queue.Queue = queue.Queue()

    def put(self, batch: FlowBatch | None) -> None:
        """Queues a batch; None ends the stream."""
        self._queue.put(batch)

    def probes(self):
        from flowscope.kernel.catalog import ProbeStatus

        return [
            ProbeStatus("tc_flows", True, "tc clsact ingress+egress"),
            ProbeStatus("tcp_rtt", False, "kprobe tcp_rcv_established", "kprobes are off"),
            # A variant whose work another probe does: the header leaves it out.
            ProbeStatus("skb_drop_kprobe", False, "kprobe kfree_skb", "kprobes are off; not needed: skb_drop runs"),
        ]

    def batches(self, stop):
        import queue

        while not stop.is_set():
            try:
                batch = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if batch is None:
                return
            yield batch

    def close(self) -> None:
        self._queue.put(None)


async def settle(app, pilot, after: int | None = None, timeout: float = 20.0, intervals: int | None = None) -> None:
    """Waits until the app shows the newest snapshot its feed computed (and one newer than `after`, and one
    that has counted `intervals` intervals)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.02)
        snapshot = app.last_snapshot
        shown = snapshot.sequence if snapshot else 0
        counted = intervals is None or (snapshot is not None and snapshot.totals.intervals >= intervals)
        if shown and shown == app.feed.published and (after is None or shown > after) and counted:
            await pilot.pause(0.05)
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the app did not settle within {timeout}s")


async def until(pilot, condition, what: str, timeout: float = 20.0) -> None:
    """Lets the app run until `condition()` holds (`what` says what was awaited when it never does)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await pilot.pause(0.02)


async def screen_still(app, pilot, timeout: float = 20.0) -> None:
    """Waits until three screenshots in a row are the same: tables that just got rows lay out their
    column widths over a few refreshes, later on a loaded machine."""
    import time

    deadline = time.monotonic() + timeout
    shots: list[str] = []
    while time.monotonic() < deadline:
        await pilot.pause(0.1)
        shots = [*shots[-2:], app.export_screenshot()]
        if len(shots) == 3 and len(set(shots)) == 1:
            return
    raise AssertionError(f"the screen kept changing for {timeout}s")


async def press_and_settle(app, pilot, *keys: str) -> None:
    for key in keys:
        before = app.feed.published
        await pilot.press(key)
        await settle(app, pilot, after=before)


async def put_and_settle(app, pilot, source: QueueSource, *batches: FlowBatch) -> None:
    """Hands the source one batch at a time, each shown before the next comes: settled on a snapshot that has
    counted it (a snapshot published meanwhile for another reason, such as the app's first, does not do)."""
    for batch in batches:
        counted = app.feed.model.intervals
        source.put(batch)
        await settle(app, pilot, intervals=counted + 1)


async def replay_finished(app, pilot) -> None:
    """Waits until a replay has been read to its end and its last snapshot is shown."""
    import asyncio
    import time

    deadline = time.monotonic() + 20
    while not app.feed.finished.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert app.feed.finished.is_set(), "the replay did not finish"
    await settle(app, pilot)
    # The cursor follows its row's key as rows reorder; the key it started on is that of the first
    # snapshot the UI happened to show while the replay streamed in, so every test starts at the top.
    from textual.widgets import DataTable

    app.query_one("#rows", DataTable).move_cursor(row=0)
    await pilot.pause(0.05)

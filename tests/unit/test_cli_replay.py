"""`capture --replay`: a recording comes out as it went in, with the identity of the node it was made on."""

import contextlib
import json
import os
import threading

from flowscope.cli import main
from tests.ui.scenario import shop_batches, write_replay


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_capture_replays_a_recording_unchanged_and_names_nothing_from_this_machine(tmp_path):
    batches = shop_batches()
    recording = write_replay(tmp_path / "shop.jsonl", batches)
    out = tmp_path / "out.jsonl"

    assert main(["capture", "--replay", str(recording), "-o", "jsonl", "--file", str(out)]) == 0

    written, recorded = records(out), records(recording)
    summary = written.pop()
    assert summary["type"] == "summary"
    assert summary["intervals"] == 5
    assert summary["identity"] is None  # no identity flags: nothing was looked up on this machine
    assert [r for r in written if r["type"] == "flow"] == [r for r in recorded if r["type"] == "flow"]
    assert [r for r in written if r["type"] == "event"] == [r for r in recorded if r["type"] == "event"]
    assert len([r for r in written if r["type"] == "flow"]) == sum(len(batch.flows) for batch in batches) == 22


def test_capture_replays_a_recording_from_a_pipe_whole(tmp_path):
    recording = write_replay(tmp_path / "shop.jsonl", shop_batches())
    pipe, out = tmp_path / "shop.fifo", tmp_path / "out.jsonl"
    os.mkfifo(pipe)

    finished = threading.Event()

    def feed() -> None:
        with open(pipe, "wb") as writer:  # opens once capture reads: it must not read (and lose) bytes before
            writer.write(recording.read_bytes())
        # a capture that peeked opens the pipe again, and would wait for a writer for ever: give it an end of file
        while not finished.wait(1):
            with contextlib.suppress(OSError):  # ENXIO: no reader waiting
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        assert main(["capture", "--replay", str(pipe), "-o", "jsonl", "--file", str(out)]) == 0
    finally:
        finished.set()
        feeder.join(10)
    assert [r for r in records(out) if r["type"] == "flow"] == [r for r in records(recording) if r["type"] == "flow"]


T0, T1, T2 = "2025-03-01T12:00:00.000000000Z", "2025-03-01T12:00:01.000000000Z", "2025-03-01T12:00:02.000000000Z"


def small_recording(path):
    """Two intervals written by hand: a TCP connection's two directions and a UDP packet dropped for want of a
    socket, a connect event and a drop event; the event ring lost one event in the first interval."""

    def flow(**fields) -> dict:
        return {"type": "flow", "time_start": T0, "time_end": T1, "ifname": "eth0", "ip_version": 4, **fields}

    lines = [
        flow(direction="egress", protocol="TCP", src_ip="10.1.0.1", src_port=40000, dst_ip="10.1.0.2", dst_port=443,
             packets=10, bytes=6000, drop_packets=0, drop_bytes=0, retransmits=1, resets=0, rtt_us=250),
        flow(direction="ingress", protocol="TCP", src_ip="10.1.0.2", src_port=443, dst_ip="10.1.0.1", dst_port=40000,
             packets=8, bytes=8000, drop_packets=0, drop_bytes=0, retransmits=0, resets=0),
        flow(direction="ingress", protocol="UDP", ip_version=6, src_ip="fd00::9", src_port=5353, dst_ip="fd00::1",
             dst_port=53, packets=1, bytes=90, drop_packets=1, drop_bytes=90, drop_reason="NO_SOCKET"),
        {"type": "event", "time": "2025-03-01T12:00:00.250000000Z", "kind": "connect", "ip_version": 4,
         "protocol": "TCP", "src_ip": "10.1.0.1", "src_port": 40000, "dst_ip": "10.1.0.2", "dst_port": 443,
         "pid": 123, "comm": "curl"},
        {"type": "interval", "time_start": T0, "time_end": T1,
         "coverage": {"flow_map": {"produced": 3, "delivered": 3, "lost": 0},
                      "event_ring": {"produced": 2, "delivered": 1, "lost": 1}}},
        {"type": "event", "time": "2025-03-01T12:00:01.500000000Z", "kind": "drop", "ip_version": 6,
         "protocol": "UDP", "src_ip": "fd00::9", "src_port": 5353, "dst_ip": "fd00::1", "dst_port": 53,
         "drop_reason": "NO_SOCKET", "location": "udp_queue_rcv_skb"},
        {"type": "interval", "time_start": T1, "time_end": T2,
         "coverage": {"flow_map": {"produced": 0, "delivered": 0, "lost": 0},
                      "event_ring": {"produced": 1, "delivered": 1, "lost": 0}}},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_capture_writes_a_table_per_interval_and_a_summary_line(tmp_path):
    out = tmp_path / "out.txt"
    assert main(["capture", "--replay", str(small_recording(tmp_path / "small.jsonl")), "-o", "table",
                 "--file", str(out)]) == 0  # fmt: skip
    header = (
        "IFACE        DIR     PROTO  SOURCE                                   DESTINATION                             "
        "     PKTS      BYTES  DROPS REASON              RETX  RST  RTT_US"
    )
    # Rows by bytes, largest first; a counter the recording does not have is "-"; lost 1 of 3 + 2 + 0 + 1.
    assert out.read_text().splitlines() == [
        f"--- {T0} .. {T1}",
        header,
        "eth0         ingress TCP    10.1.0.2:443                             10.1.0.1:40000                                  8       8000      0 -                      0    0       -",  # noqa: E501
        "eth0         egress  TCP    10.1.0.1:40000                           10.1.0.2:443                                   10       6000      0 -                      1    0     250",  # noqa: E501
        "eth0         ingress UDP    [fd00::9]:5353                           [fd00::1]:53                                    1         90      1 NO_SOCKET              -    -       -",  # noqa: E501
        "  event connect    10.1.0.1:40000 -> 10.1.0.2:443 pid=123 comm=curl",
        f"--- {T1} .. {T2}",
        header,
        "  event drop       [fd00::9]:5353 -> [fd00::1]:53 drop_reason=NO_SOCKET location=udp_queue_rcv_skb",
        "=== 2 intervals; lost 1 of 6 produced; identity: as recorded",
    ]


NAMES = """
pods:
  - {namespace: shop, name: web-1, ips: [10.1.0.1], workload: web, node: node-a, labels: {app: web}}
  - {namespace: external, name: partner, ips: ["fd00::8/125"]}
services:
  - {namespace: shop, name: api, ips: [10.1.0.2], labels: {app: api}}
"""
SIDE = ("namespace", "pod", "workload", "workload_kind", "container", "pid", "comm", "node", "labels",
        "identity_source")  # fmt: skip
# The pod at 10.1.0.1, whose socket 10.1.0.1:40000 the connect event names as curl's (pid 123).
WEB = ("shop", "web-1", "web", "Deployment", None, 123, "curl", "node-a", {"app": "web"}, "static")
API = ("shop", None, "api", "Service", None, None, None, None, {"app": "api"}, "static")
PARTNER = ("external", "partner", "partner", "Pod", None, None, None, None, {}, "static")  # fd00::9 in fd00::8/125
NOBODY = (None,) * 8 + (None, "none")  # fd00::1


def test_capture_of_a_replay_names_the_sides_from_a_metadata_file(tmp_path):
    names = tmp_path / "names.yaml"
    names.write_text(NAMES)
    out = tmp_path / "out.jsonl"
    recording = small_recording(tmp_path / "small.jsonl")
    assert main(["capture", "--replay", str(recording), "--metadata", str(names), "--node-name", "node-a",
                 "-o", "jsonl", "--file", str(out)]) == 0  # fmt: skip
    written = records(out)

    def sides(kind: str) -> list[tuple]:
        return [(tuple(r[f"src_{n}"] for n in SIDE), tuple(r[f"dst_{n}"] for n in SIDE))
                for r in written if r["type"] == kind]  # fmt: skip

    assert sides("flow") == [(WEB, API), (API, WEB), (PARTNER, NOBODY)]
    assert sides("event") == [(WEB, API), (PARTNER, NOBODY)]
    identity = written[-1]["identity"]
    # 5 flows' and 3 events' sides named from the file; fd00::1 (a flow and an event) by nothing.
    assert (identity["node_name"], identity["resolved"], identity["unresolved"], identity["misses"]) == (
        "node-a", {"static": 8}, 2, {"ip_unknown": 2})  # fmt: skip
    assert identity["sources"]["static"]["state"] == "loaded"

"""What every benchmark shares: the network-namespace lab, traffic generators, BPF run statistics, results.

The lab is two namespaces joined by a veth pair, with static neighbour entries and no IPv6 link-local
addresses, so the link carries only the traffic a benchmark sends (no ARP, ND, DAD or MLD chatter):

    fsbench-a: fsb0a 10.205.0.1 fd00:205::1  <-- veth -->  fsbench-b: fsb0b 10.205.0.2 fd00:205::2

A benchmark process enters fsbench-a (setns on its own thread only, so /sys and the mount namespace stay
the host's) and attaches flowscope there; nothing outside the lab sees its filters or its packets.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np

NETNS_CLIENT = "fsbench-a"
NETNS_SERVER = "fsbench-b"
VETH_CLIENT = "fsb0a"
VETH_SERVER = "fsb0b"
CLIENT_V4, SERVER_V4 = "10.205.0.1", "10.205.0.2"
CLIENT_V6, SERVER_V6 = "fd00:205::1", "fd00:205::2"
CLIENT_MAC, SERVER_MAC = "02:05:00:00:00:01", "02:05:00:00:00:02"
CLIENT_CPU, SERVER_CPU = 0, 1  # iperf3 client and server each get a core of their own

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=check)


def in_server(*command: str) -> list[str]:
    return ["ip", "netns", "exec", NETNS_SERVER, *command]


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise SystemExit(f"{', '.join(missing)} missing; run `make setup-test` (it installs the test packages).")


def delete_lab() -> None:
    for name in (NETNS_CLIENT, NETNS_SERVER):
        if Path("/run/netns", name).exists():
            run("ip", "netns", "del", name, check=False)


def create_lab() -> None:
    delete_lab()
    run("ip", "netns", "add", NETNS_CLIENT)
    run("ip", "netns", "add", NETNS_SERVER)
    run("ip", "link", "add", VETH_CLIENT, "netns", NETNS_CLIENT, "type", "veth", "peer", "name", VETH_SERVER,
        "netns", NETNS_SERVER)  # fmt: skip
    sides = (
        (NETNS_CLIENT, VETH_CLIENT, CLIENT_MAC, CLIENT_V4, CLIENT_V6, SERVER_MAC, SERVER_V4, SERVER_V6),
        (NETNS_SERVER, VETH_SERVER, SERVER_MAC, SERVER_V4, SERVER_V6, CLIENT_MAC, CLIENT_V4, CLIENT_V6),
    )
    for netns, veth, mac, v4, v6, peer_mac, peer_v4, peer_v6 in sides:
        ip = ("ip", "-n", netns)
        run(*ip, "link", "set", "lo", "up")
        run(*ip, "link", "set", veth, "address", mac, "addrgenmode", "none")
        run(*ip, "addr", "add", f"{v4}/24", "dev", veth)
        run(*ip, "addr", "add", f"{v6}/64", "dev", veth, "nodad")
        run(*ip, "link", "set", veth, "up")
        run(*ip, "neigh", "replace", peer_v4, "lladdr", peer_mac, "dev", veth, "nud", "permanent")
        run(*ip, "neigh", "replace", peer_v6, "lladdr", peer_mac, "dev", veth, "nud", "permanent")


def enter_netns(path: str) -> None:
    """Moves this thread (and the processes it starts from now on) into the network namespace at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {path} failed")
    finally:
        os.close(fd)


LAB_LOCK = Path("/run/lock/flowscope-bench.lock")


@contextmanager
def lab() -> Iterator[None]:
    """Creates the lab, enters its client namespace, and leaves and removes it afterwards (even on failure). The lab's
    names are fixed, so a second benchmark process waits here until the first one's lab is gone."""
    if os.geteuid() != 0:
        raise SystemExit("the benchmarks load BPF programs and create network namespaces; run them as root.")
    with open(LAB_LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another benchmark holds the lab ({LAB_LOCK}); waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        create_lab()
        own = f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net"
        back = os.open(own, os.O_RDONLY)  # held open: the namespace this thread comes back to
        try:
            enter_netns(f"/run/netns/{NETNS_CLIENT}")
            yield
        finally:
            enter_netns(f"/proc/self/fd/{back}")
            os.close(back)
            delete_lab()


# ---- traffic -------------------------------------------------------------------------------------------


@contextmanager
def serving(what: str, command: list[str], settle: float = 0.3) -> Iterator[None]:
    """Runs a server process while the block runs: `settle` seconds to start listening, an error naming
    `what` if it has exited by then, SIGTERM (then SIGKILL after 5 s) at the end."""
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: a chatty server never blocks on it
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            time.sleep(settle)
            if process.poll() is not None:
                errors.seek(0)
                raise RuntimeError(f"{what} did not start: {errors.read().strip() or process.returncode}")
            yield
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def iperf3_server(netns: str = NETNS_SERVER) -> AbstractContextManager[None]:
    """An iperf3 server in `netns` (fsbench-b, or fsbench-a for the loopback runs)."""
    return serving("iperf3 -s", ["ip", "netns", "exec", netns, "iperf3", "-s", "-A", str(SERVER_CPU)])


ECHO_PORT = 7007
# A small TCP echo server (IPv4 and IPv6) for the many-short-connections workload, run in fsbench-b.
ECHO_SERVER = f"""
import socket, socketserver
class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(4096)
        if data:
            self.request.sendall(data)
class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
Server(("::", {ECHO_PORT}), Handler).serve_forever()
"""


def echo_server() -> AbstractContextManager[None]:
    return serving("the echo server", in_server(sys.executable, "-c", ECHO_SERVER), settle=0.5)


def short_connections(host: str, count: int, payload: bytes = b"x" * 200) -> int:
    """Opens `count` TCP connections to the echo server, one after the other; returns how many echoed."""
    import socket

    echoed = 0
    for _ in range(count):
        with socket.create_connection((host, ECHO_PORT), timeout=5) as connection:
            connection.sendall(payload)
            received = b""
            while len(received) < len(payload):
                chunk = connection.recv(4096)
                if not chunk:
                    break
                received += chunk
            echoed += received == payload
    return echoed


def iperf3(host: str, seconds: float, *extra: str) -> dict:
    """Runs an iperf3 client (in this thread's namespace) and returns its JSON report."""
    for _attempt in range(20):
        result = run("iperf3", "-c", host, "-t", str(seconds), "-A", str(CLIENT_CPU), "-J", *extra, check=False)
        report = json.loads(result.stdout or "{}")
        if "error" not in report and result.returncode == 0:
            return report
        time.sleep(0.2)  # the server was not listening yet, or still busy with the previous test
    raise RuntimeError(f"iperf3 to {host} failed: {report.get('error', result.stderr.strip())}")


def tcp_bits_per_second(report: dict) -> float:
    return float(report["end"]["sum_received"]["bits_per_second"])


def udp_packets_per_second(report: dict) -> float:
    total = report["end"]["sum"]
    return (total["packets"] - total["lost_packets"]) / total["seconds"]


PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)  # Ethernet, microseconds


UDP_SINK_PORT = 5300
# Reads and discards every datagram to UDP_SINK_PORT in fsbench-b, so replayed flows end in a socket
# (as real traffic does) instead of being dropped as NO_SOCKET, which would make every packet a drop.
UDP_SINK = f"""
import socket
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE (root), which Python does not name
sink.bind(("0.0.0.0", {UDP_SINK_PORT}))
buffer = bytearray(2048)
while True:
    sink.recv_into(buffer)
"""


def udp_sink() -> AbstractContextManager[None]:
    return serving("the UDP sink", in_server(sys.executable, "-c", UDP_SINK))


def udp_frame(source: str, source_port: int, destination_port: int, frame_len: int) -> bytes:
    """An Ethernet IPv4/UDP frame of `frame_len` bytes from `source` to the lab's server, zero payload, with
    no IP header checksum (tc does not check it) and no UDP checksum (none, which IPv4 allows)."""
    eth = bytes.fromhex(SERVER_MAC.replace(":", "") + CLIENT_MAC.replace(":", "")) + b"\x08\x00"
    ip_header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, frame_len - 14, 0, 0, 64, 17, 0, _v4(source), _v4(SERVER_V4))
    udp = struct.pack("!HHHH", source_port, destination_port, frame_len - 34, 0)
    return eth + ip_header + udp + bytes(frame_len - 42)


def write_udp_flows_pcap(path: Path, flows: int) -> Path:
    """A pcap of `flows` 60-byte IPv4/UDP frames to the UDP sink, one per distinct flow.

    Flows differ by source port (1024-65023) and source address (10.205.0.10 upwards, one per 64000
    flows; fsbench-b routes all of 10.205.0.0/24 back through fsb0b, so reverse-path filtering keeps
    them). Built with numpy from one template frame (udp_frame), whose IP header checksum is set per flow."""
    frame_len = 60
    template = np.frombuffer(udp_frame("0.0.0.0", 0, UDP_SINK_PORT, frame_len), dtype=np.uint8)
    records = np.zeros((flows, 16 + frame_len), dtype=np.uint8)
    records[:, 16:] = template
    records[:, :16] = np.frombuffer(struct.pack("<IIII", 0, 0, frame_len, frame_len), dtype=np.uint8)
    index = np.arange(flows, dtype=np.int64)
    host = 10 + index // 64000
    if host.max(initial=0) > 254:
        raise ValueError(f"{flows} flows need more source addresses than 10.205.0.0/24 has")
    source = (np.uint32(0x0ACD0000) | host.astype(np.uint32)).astype(">u4")  # 10.205.0.<host>
    records[:, 16 + 26 : 16 + 30] = source.view(np.uint8).reshape(-1, 4)
    records[:, 16 + 34 : 16 + 36] = (1024 + index % 64000).astype(">u2").view(np.uint8).reshape(-1, 2)
    words = records[:, 16 + 14 : 16 + 34].copy().view(">u2").astype(np.uint32).sum(axis=1)
    while (words >> 16).any():
        words = (words & 0xFFFF) + (words >> 16)
    records[:, 16 + 24 : 16 + 26] = (~words & 0xFFFF).astype(">u2").view(np.uint8).reshape(-1, 2)
    with open(path, "wb") as out:
        out.write(PCAP_HEADER)
        out.write(records.tobytes())
    return path


def _v4(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


def tcpreplay(pcap: Path, pps: int | None = None, loops: int = 1) -> subprocess.Popen:
    """Starts tcpreplay on fsb0a (rate `pps`, or as fast as it can)."""
    rate = ["--pps", str(pps)] if pps else ["--topspeed"]
    return subprocess.Popen(
        ["tcpreplay", "-i", VETH_CLIENT, "--preload-pcap", *rate, "--loop", str(loops), str(pcap)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def tcpreplay_rate(output: str) -> tuple[int, float]:
    """(packets sent, packets per second) from tcpreplay's summary."""
    packets, seconds = 0, 0.0
    for line in output.splitlines():
        words = line.split()
        if words[:1] == ["Actual:"]:
            packets, seconds = int(words[1]), float(words[words.index("sent") + 2])
    return packets, packets / seconds if seconds else 0.0


# ---- the agent ----------------------------------------------------------------------------------------


class Agent:
    """flowscope's live pipeline (LiveSource) drained every interval on a background thread, as the agent
    does, with every batch handed to `on_batch` and the loss accounting summed over the run."""

    def __init__(self, options, interval: float = 1.0, on_batch: Callable | None = None) -> None:
        from flowscope.coverage import Coverage
        from flowscope.pipeline.live import LiveSource

        self.source = LiveSource(options, interval=interval)
        self.interval = interval
        self.on_batch = on_batch
        self.coverage = Coverage()
        self.batches = 0
        self.rows = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="flowscope-agent", daemon=True)

    def __enter__(self) -> Agent:
        self._thread.start()
        return self

    def _take(self, batch) -> None:
        self.batches += 1
        self.rows += len(batch.flows)
        self.coverage.merge(batch.coverage)
        if self.on_batch is not None:
            self.on_batch(batch)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._take(self.source.next_batch(self.interval))
        except BaseException as err:  # reported by stop(), on the main thread
            self.error = err

    def stop(self) -> None:
        """Stops the thread, then drains what the last interval left in the kernel."""
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error
        self._take(self.source.next_batch(0.05))

    def __exit__(self, *_exc) -> None:
        try:
            if self._thread.is_alive():
                self.stop()
        finally:
            self.source.close()


# ---- BPF run statistics --------------------------------------------------------------------------------


def run_stats(fds: dict[str, int]) -> dict[str, tuple[int, int]]:
    from flowscope.kernel.bpf_syscall import prog_run_stats

    return {name: prog_run_stats(fd) for name, fd in fds.items()}


def run_stats_delta(before: dict, after: dict) -> dict[str, dict[str, float | int | None]]:
    """Per program: runs, nanoseconds in total and per run between two run_stats snapshots."""
    delta = {}
    for name, (time_after, count_after) in after.items():
        time_before, count_before = before.get(name, (0, 0))
        runs = count_after - count_before
        nanoseconds = time_after - time_before
        delta[name] = {"runs": runs, "ns": nanoseconds, "ns_per_run": round(nanoseconds / runs, 1) if runs else None}
    return delta


# ---- process measurements ------------------------------------------------------------------------------


def process_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# ---- results -------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def save(name: str, result: dict) -> Path:
    """Writes bench/results/<name>.json (read by bench/report.py) and prints it."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    log(f"{name}: wrote {path}")
    return path

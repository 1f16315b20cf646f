"""Real flowscope agents (and relays) as subprocesses serving the gRPC flow API from `--replay` recordings, on
temporary unix sockets (and free loopback ports), and the recordings they replay.

    with Agent.start(tmp_path, recording) as agent:      # returns once the API answers SERVING
        client = agent.client()                           # flowscope.proto.client.Client
        hubble = agent.hubble()                           # a stub generated from the Hubble-subset protos
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pandas as pd

from flowscope.config import ClientConfig
from flowscope.coverage import Coverage
from flowscope.proto.client import Client, ClientError
from flowscope.proto.hubble.observer import observer_pb2, observer_pb2_grpc
from flowscope.proto.hubble.relay import relay_pb2
from flowscope.schema import FlowBatch, events_frame, flows_frame
from tests.ui.scenario import write_replay
from tests.waiting import wait_for

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
START_TIMEOUT = 60.0
# The agents of these tests write no flow log (their only output is the API).
ENVIRONMENT = {**os.environ, "FLOWSCOPE_FLOWLOG_ENABLED": "false"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_flowscope(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLOWSCOPE, *argv], capture_output=True, text=True, timeout=timeout, env=ENVIRONMENT)


@dataclass
class Agent:
    """A `flowscope agent` (or `flowscope relay`) subprocess and where its API is."""

    process: subprocess.Popen
    socket: str
    hubble_socket: str
    argv: list[str]
    log: Path
    address: str | None = None
    config: ClientConfig = field(default_factory=ClientConfig)

    @classmethod
    def start(
        cls, directory: Path, recording: Path | None, *extra: str, name: str = "agent", command: str = "agent",
        client: ClientConfig | None = None, wait: bool = True,
    ) -> Agent:  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        sockets = directory / f"{name}.sock", directory / f"{name}-hubble.sock"
        argv = [FLOWSCOPE, command, "--grpc-socket", str(sockets[0]), "--hubble-socket", str(sockets[1])]
        if command == "agent":
            argv += ["--status-socket", str(directory / f"{name}-status.sock"), "--node-name", name]
            argv += ["--replay", str(recording)] if recording is not None else []
        argv += list(extra)
        log = directory / f"{name}.log"
        with open(log, "w") as err:
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=ENVIRONMENT)
        agent = cls(process, str(sockets[0]), str(sockets[1]), argv, log)
        agent.config = client or ClientConfig(server=f"unix://{sockets[0]}", timeout=10.0)
        if wait:
            agent.wait_serving()
        return agent

    def wait_serving(self) -> None:
        def serving() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.argv} exited {self.process.returncode}: {self.log.read_text()}")
            try:
                client = Client(self.config)
                try:
                    return client.healthy() == "SERVING"
                finally:
                    client.close()
            except ClientError:
                return False

        wait_for(serving, START_TIMEOUT, f"the API of {' '.join(self.argv)}")

    def client(self, **overrides: object) -> Client:
        return Client(self.config.model_copy(update=overrides))

    def hubble(self) -> observer_pb2_grpc.ObserverStub:
        """A client of the Hubble service on the hubble socket, as `hubble --server unix://...` connects."""
        return observer_pb2_grpc.ObserverStub(grpc.insecure_channel(f"unix://{self.hubble_socket}"))

    def hubble_nodes(self) -> list[tuple[str, str, str, str, bool, str]]:
        """Hubble's GetNodes as `hubble list nodes` calls it: (name, state, version, address, TLS enabled, TLS
        server name) of each node."""
        nodes = self.hubble().GetNodes(observer_pb2.GetNodesRequest()).nodes
        return [(n.name, relay_pb2.NodeState.Name(n.state), n.version, n.address, n.tls.enabled, n.tls.server_name)
                for n in nodes]  # fmt: skip

    def hubble_node_counts(self) -> tuple[int | None, int | None, list[str]]:
        """Hubble's ServerStatus node counts (None: not sent): connected, unavailable, the unavailable's names."""
        status = self.hubble().ServerStatus(observer_pb2.ServerStatusRequest())
        return (
            status.num_connected_nodes.value if status.HasField("num_connected_nodes") else None,
            status.num_unavailable_nodes.value if status.HasField("num_unavailable_nodes") else None,
            list(status.unavailable_nodes),
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def interval_batches(
    start: pd.Timestamp, intervals: int, seconds: float, flows_per_interval: int, node: str, port: int = 8443
) -> list[FlowBatch]:
    """`intervals` batches of `seconds` each from `start`, each with `flows_per_interval` UDP flows from
    10.205.0.1 to 10.205.0.2 (flow i: source port 10000 + i % 50000, destination port + i // 50000; it ends
    at start + k*seconds + (i + 1) µs in interval k)."""
    batches = []
    for k in range(intervals):
        begin = start + pd.Timedelta(seconds=k * seconds)
        ends = [begin + pd.Timedelta(microseconds=i + 1) for i in range(flows_per_interval)]
        flows = pd.DataFrame(
            {
                "time_start": [begin] * flows_per_interval,
                "time_end": ends,
                "node": node,
                "ifname": "eth0",
                "direction": "egress",
                "ip_version": 4,
                "protocol": "UDP",
                "src_ip": "10.205.0.1",
                "src_port": [10000 + i % 50000 for i in range(flows_per_interval)],
                "dst_ip": "10.205.0.2",
                "dst_port": [port + i // 50000 for i in range(flows_per_interval)],
                "packets": k + 1,
                "bytes": 100 * (k + 1),
                "drop_packets": 0,
                "retransmits": 0,
                "resets": 0,
            }
        )
        batches.append(
            FlowBatch(
                begin,
                begin + pd.Timedelta(seconds=seconds),
                flows_frame(flows),
                events_frame(pd.DataFrame()),
                Coverage(),
            )
        )
    return batches


def recording(path: Path, batches: list[FlowBatch]) -> Path:
    return write_replay(path, batches)

"""`flowscope agent` with real probes watching a lab namespace, fed UDP flows by the lab's traffic tool: the run
the agent's kernel tests share (each checks what one output wrote), wherever the agent runs (a process in the
namespace, the image under runc, an installed root booted by systemd-nspawn)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowscope.analysis.flowlog import read_flowlog
from flowscope.pipeline.status import fetch
from tests.kernel.tc_flows import flow_totals, start_sink, udp_frame, udp_id
from tests.waiting import wait_for

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
FIRST_PORT, SINK_PORT = 21000, 7001


def status(socket_path: Path) -> dict:
    code, body = fetch(str(socket_path))
    assert code == 200
    return json.loads(body)


def udp_traffic_through(
    hosts: Any,
    start: Callable[[], subprocess.Popen],
    stop: Callable[[subprocess.Popen], None],
    status_socket: Path,
    flows: int,
    count: int,
    payload: int,
) -> tuple[dict, str]:
    """Starts an agent watching hosts.a's fstcA, sends `flows` UDP flows of `count` datagrams from a to b's port
    7001 (from ports FIRST_PORT...), waits until two more intervals are drained, stops the agent; returns the
    traffic tool's report and the agent's stderr (asserting it exited 0)."""
    agent = start()
    try:
        # an image or a booted root takes longer to come up than a process
        wait_for(lambda: status_socket.exists() and status(status_socket)["intervals"] >= 1, 300, "a first interval")
        report = hosts.udp("a", 4, FIRST_PORT, SINK_PORT, payload, count, "--flows", str(flows))
        drained = status(status_socket)["intervals"] + 2  # every packet sent is in an interval drained after this
        wait_for(lambda: status(status_socket)["intervals"] >= drained, 60, "two more intervals")
        stop(agent)
        _, errors = agent.communicate(timeout=120)
    finally:
        agent.kill()
        agent.wait()
    assert agent.returncode == 0, errors
    return report, errors or ""


def agent_with_udp_traffic(
    hosts: Any, tmp_path: Path, flows: int, count: int, payload: int, *agent_args: str, env: dict[str, str]
) -> tuple[dict, str]:
    """udp_traffic_through an agent process in namespace a (--interval 0.5), stopped with SIGTERM."""
    sock = tmp_path / "agent.sock"
    # the test's own sockets: another agent may hold /run/flowscope's
    argv = [FLOWSCOPE, "agent", "-i", "fstcA", "--interval", "0.5", "--status-socket", str(sock),
            "--grpc-socket", str(tmp_path / "api.sock"), "--hubble-socket", str(tmp_path / "hubble.sock"),
            *agent_args]  # fmt: skip
    return udp_traffic_through(
        hosts,
        lambda: hosts.a.popen(*argv, stderr=subprocess.PIPE, env=env),
        lambda agent: agent.send_signal(signal.SIGTERM),
        sock,
        flows,
        count,
        payload,
    )


def assert_agent_logs_lab_traffic(
    hosts: Any,
    start: Callable[[], subprocess.Popen],
    stop: Callable[[subprocess.Popen], None],
    status_socket: Path,
    data_dir: Path,
    flows: int = 6,
    count: int = 30,
    payload: int = 300,
) -> str:
    """udp_traffic_through the agent `start` runs, then finds exactly those packets and L2 bytes in its flow log
    under data_dir; returns what the agent wrote to stderr."""
    a4, b4 = hosts.port_a.ip4, hosts.port_b.ip4
    start_sink(hosts.b, "udp-sink", b4, str(SINK_PORT))
    report, errors = udp_traffic_through(hosts, start, stop, status_socket, flows, count, payload)
    assert report["per_flow"] == count
    totals = flow_totals(read_flowlog(data_dir), "fstcA", {a4, b4})
    frame = udp_frame(4, payload)
    expected = {udp_id("egress", 4, a4, FIRST_PORT + n, b4, SINK_PORT): (count, count * frame) for n in range(flows)}
    assert totals == expected, errors
    return errors

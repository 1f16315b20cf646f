"""The agent's OCI image, run for real by runc as the chart's DaemonSet runs it (host pid namespace, the node's
network namespace, every capability dropped but the smallest set): `flowscope doctor` loads every probe, the
agent logs the lab's traffic with the exact packet and byte counts sent, and a missing capability is one
sentence that names it. The image is built once (scripts/build-image: 2.5 min here, more where Debian's packages
must be downloaded) and rebuilt only when its inputs change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from flowscope.analysis.flowlog import read_flowlog
from flowscope.pipeline.status import fetch
from tests.kernel.image import built_image, run_container, runtime_config
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import flow_totals, start_sink, two_hosts, udp_frame, udp_id
from tests.waiting import wait_for

# The smallest set the agent loads its probes and logs flows with (kernels 5.8+ with tracefs and bpffs mounted;
# deploy/image/README.md says what the chart adds and why).
SMALLEST = ["BPF", "PERFMON", "NET_ADMIN"]
FLOWS, COUNT, PAYLOAD = 6, 30, 300

pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def image() -> Path:
    return built_image()


def container(tmp_path: Path, netns: str, capabilities: list[str], *args: str) -> tuple[str, Path, dict]:
    name = f"fsimg-{os.getpid()}-{len(list(tmp_path.iterdir()))}"
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir(exist_ok=True)
    run.mkdir(exist_ok=True)
    config = runtime_config(list(args), capabilities, netns, data, run, {"NODE_NAME": "node-1"})
    return name, tmp_path / f"bundle-{name}", config


def test_doctor_loads_every_probe_with_the_smallest_capability_set(image, tc_lab: Lab, tmp_path: Path) -> None:
    netns = tc_lab.namespace("a")
    name, bundle, config = container(tmp_path, f"/run/netns/{netns.name}", SMALLEST, "flowscope", "doctor")
    result = run_container(name, bundle, config, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "load check    ok: the runnable probes compile and load" in result.stdout
    assert "node name node-1" in result.stdout  # NODE_NAME, as the chart sets it from the downward API


@pytest.mark.parametrize("dropped", SMALLEST)
def test_a_missing_capability_is_one_sentence_that_names_it(image, tc_lab: Lab, tmp_path: Path, dropped: str) -> None:
    netns = tc_lab.namespace("a")
    kept = [cap for cap in SMALLEST if cap != dropped]
    name, bundle, config = container(tmp_path, f"/run/netns/{netns.name}", kept, "flowscope", "agent")
    result = run_container(name, bundle, config, timeout=300)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "flowscope agent: flowscope needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) to load probes and lacks "
        f"CAP_{dropped}; run it with sudo, or add the capability to its container or unit.\n"
    )


def status(socket_path: Path) -> dict:
    code, body = fetch(str(socket_path))
    assert code == 200
    return json.loads(body)


def test_the_agent_in_the_image_logs_the_lab_traffic_exactly(image, tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    a4, b4 = hosts.port_a.ip4, hosts.port_b.ip4
    start_sink(hosts.b, "udp-sink", b4, "7001")
    name, bundle, config = container(
        tmp_path, f"/run/netns/{hosts.a.name}", SMALLEST, "flowscope", "agent", "-i", "fstcA", "--interval", "0.5"
    )
    sock = tmp_path / "run" / "agent.sock"
    agent = run_container(name, bundle, config, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: sock.exists() and status(sock)["intervals"] >= 1, 300, "the agent's first interval")
        report = hosts.udp("a", 4, 22000, 7001, PAYLOAD, COUNT, "--flows", str(FLOWS))
        drained = status(sock)["intervals"] + 2  # every packet sent is in an interval drained after this
        wait_for(lambda: status(sock)["intervals"] >= drained, 60, "two more intervals")
        agent.send_signal(signal.SIGTERM)  # runc passes it to the agent, as the kubelet's stop does
        _, errors = agent.communicate(timeout=60)
    finally:
        agent.kill()
        agent.wait()
        subprocess.run(["runc", "delete", "--force", name], capture_output=True)
    assert agent.returncode == 0, errors
    assert report["per_flow"] == COUNT
    totals = flow_totals(read_flowlog(tmp_path / "data"), "fstcA", {a4, b4})
    frame = udp_frame(4, PAYLOAD)
    expected = {udp_id("egress", 4, a4, 22000 + n, b4, 7001): (COUNT, COUNT * frame) for n in range(FLOWS)}
    assert totals == expected, errors
    assert "lost nothing" in errors.splitlines()[-1], errors

"""The agent's OCI image, run for real by runc as the chart's DaemonSet runs it (host pid namespace, the node's
network namespace, every capability dropped but the smallest set): `flowscope doctor` loads every probe, the
agent logs the lab's traffic with the exact packet and byte counts sent, and a missing capability is one
sentence that names it. The image is built once (scripts/build-image: 2.5 min here, more where Debian's packages
must be downloaded) and rebuilt only when its inputs change."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.kernel.agent_runs import assert_agent_logs_lab_traffic
from tests.kernel.image import SMALLEST, bind, built_image, chart_daemonset, chart_mounts, run_container, runtime_config
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import two_hosts

pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def image() -> Path:
    return built_image()


@pytest.fixture(scope="module")
def daemonset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return chart_daemonset(tmp_path_factory.mktemp("render"))


@pytest.fixture
def container(daemonset: dict, tmp_path: Path):
    """(name, bundle, config) of a container of the image with the DaemonSet's mounts (the node's data, cache
    and run directories are the test's)."""

    def make(netns: str, capabilities: list[str], *args: str) -> tuple[str, Path, dict]:
        name = f"fsimg-{os.getpid()}-{len(list(tmp_path.iterdir()))}"
        node_dirs = {path: tmp_path / label for path, label in NODE_DIRS.items()}
        for directory in node_dirs.values():
            directory.mkdir(exist_ok=True)
        mounts = chart_mounts(daemonset, node_dirs, tmp_path / f"scratch-{name}")
        config = runtime_config(list(args), capabilities, netns, mounts, {"NODE_NAME": "node-1"})
        return name, tmp_path / f"bundle-{name}", config

    return make


NODE_DIRS = {"/var/lib/flowscope": "data", "/var/cache/flowscope": "cache", "/run/flowscope": "run"}


def test_the_container_has_the_charts_mounts(daemonset: dict, tmp_path: Path) -> None:
    mounts = {m["destination"]: m for m in chart_mounts(daemonset, {}, tmp_path)}
    assert mounts["/tmp"] == bind(tmp_path / "emptydir-tmp", "/tmp")  # the chart's emptyDir, nothing of the test's
    assert mounts["/sys/fs/bpf"] == bind("/sys/fs/bpf", "/sys/fs/bpf")
    assert mounts["/lib/modules"] == bind("/lib/modules", "/lib/modules", "ro")
    assert "/etc/flowscope/agent.yaml" not in mounts  # the ConfigMap: the tests give flags


def test_doctor_loads_every_probe_with_the_smallest_capability_set(image, container, tc_lab: Lab) -> None:
    netns = tc_lab.namespace("a")
    name, bundle, config = container(f"/run/netns/{netns.name}", SMALLEST, "flowscope", "doctor")
    result = run_container(name, bundle, config, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "load check    ok: the runnable probes compile and load" in result.stdout
    assert "node name node-1" in result.stdout  # NODE_NAME, as the chart sets it from the downward API


@pytest.mark.parametrize("dropped", SMALLEST)
def test_a_missing_capability_is_one_sentence_that_names_it(image, container, tc_lab: Lab, dropped: str) -> None:
    netns = tc_lab.namespace("a")
    kept = [cap for cap in SMALLEST if cap != dropped]
    name, bundle, config = container(f"/run/netns/{netns.name}", kept, "flowscope", "agent")
    result = run_container(name, bundle, config, timeout=300)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "flowscope agent: flowscope needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) to load probes and lacks "
        f"CAP_{dropped}; run it with sudo, or add the capability to its container or unit.\n"
    )


def test_the_agent_in_the_image_logs_the_lab_traffic_exactly(image, container, tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    name, bundle, config = container(
        f"/run/netns/{hosts.a.name}", SMALLEST, "flowscope", "agent", "-i", "fstcA", "--interval", "0.5"
    )
    try:
        errors = assert_agent_logs_lab_traffic(
            hosts,
            lambda: run_container(name, bundle, config, stderr=subprocess.PIPE),
            lambda agent: agent.send_signal(signal.SIGTERM),  # runc passes it on, as at the kubelet's stop
            tmp_path / "run" / "agent.sock",
            tmp_path / "data",
        )
    finally:
        subprocess.run(["runc", "delete", "--force", name], capture_output=True)
    assert "lost nothing" in errors.splitlines()[-1], errors

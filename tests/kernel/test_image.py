"""The agent's OCI image, run for real by runc from its OCI layout (the root filesystem umoci unpacks from the
layer, the process its image config says) as the chart's DaemonSet runs it (host pid namespace, the node's
network namespace, every capability dropped but the smallest set): `flowscope doctor` through the entrypoint
loads every probe, the agent of the image's Cmd logs the lab's traffic with the exact packet and byte counts
sent, and a missing capability is one sentence that names it; the relay runs from it as the chart's Deployment
runs it (uid 65534, no capability, its rendered config and certificates) and answers a status call on its unix
socket and, over TLS, flowscope's and Hubble's on its TCP port. The image is built once (scripts/build-image:
2.5 min here, more where Debian's packages must be downloaded) and rebuilt only when its inputs change; its
layout is unpacked once per build (half a minute)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.kernel.agent_runs import assert_agent_logs_lab_traffic
from tests.kernel.image import (
    PATH,
    ROOT,
    SMALLEST,
    Image,
    bind,
    chart_daemonset,
    chart_mounts,
    chart_objects,
    load_image,
    pod_mounts,
    run_container,
    runtime_config,
)
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import two_hosts

pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def image() -> Image:
    return load_image()


@pytest.fixture(scope="module")
def daemonset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return chart_daemonset(tmp_path_factory.mktemp("render"))


@pytest.fixture
def container(image: Image, daemonset: dict, tmp_path: Path):
    """(name, bundle, config) of a container of the image with the DaemonSet's mounts (the node's data, cache
    and run directories are the test's), running the image's Entrypoint with `args` (a pod's args)."""

    def make(netns: str, capabilities: list[str], *args: str) -> tuple[str, Path, dict]:
        name = f"fsimg-{os.getpid()}-{len(list(tmp_path.iterdir()))}"
        node_dirs = {path: tmp_path / label for path, label in NODE_DIRS.items()}
        for directory in node_dirs.values():
            directory.mkdir(exist_ok=True)
        mounts = chart_mounts(daemonset, node_dirs, tmp_path / f"scratch-{name}")
        config = runtime_config(image, list(args), capabilities, netns, mounts, {"NODE_NAME": "node-1"})
        return name, tmp_path / f"bundle-{name}", config

    return make


NODE_DIRS = {"/var/lib/flowscope": "data", "/var/cache/flowscope": "cache", "/run/flowscope": "run"}


def test_the_container_has_the_charts_mounts(daemonset: dict, tmp_path: Path) -> None:
    mounts = {m["destination"]: m for m in chart_mounts(daemonset, {}, tmp_path)}
    assert mounts["/tmp"] == bind(tmp_path / "emptydir-tmp", "/tmp")  # the chart's emptyDir, nothing of the test's
    assert mounts["/sys/fs/bpf"] == bind("/sys/fs/bpf", "/sys/fs/bpf")
    assert mounts["/host/lib/modules"] == bind("/lib/modules", "/host/lib/modules", "ro")  # beside the image's own
    assert "/lib/modules" not in mounts and "/usr/src" not in mounts
    assert "/etc/flowscope/agent.yaml" not in mounts  # the ConfigMap: the tests give flags


def test_the_image_config_runs_the_agent_as_the_chart_does(image: Image, daemonset: dict) -> None:
    assert image.config == {
        "Entrypoint": ["/opt/flowscope/bin/flowscope"], "Cmd": ["agent", "--config", "/etc/flowscope/agent.yaml"],
        "Env": [f"PATH={PATH}"], "WorkingDir": "/",
        "Labels": {
            "org.opencontainers.image.title": "flowscope", "org.opencontainers.image.version": VERSION,
            "org.opencontainers.image.description": "flowscope agent and relay (eBPF flows, drops, TCP health)",
        },
    }  # fmt: skip
    assert image.user() == (0, 0)  # no User: root, as the agent needs (the relay's pod sets 65534)
    # what umoci derives for a runtime from the same config: the entrypoint and the cmd, as root, in /
    process = json.loads((image.bundle / "config.json").read_text())["process"]
    assert (process["args"], process["user"], process["cwd"]) == (image.argv(), {"uid": 0, "gid": 0}, "/")
    assert image.argv() == ["/opt/flowscope/bin/flowscope", "agent", "--config", "/etc/flowscope/agent.yaml"]
    assert f"PATH={PATH}" in process["env"]
    agent = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert ("command" in agent, agent["args"]) == (False, image.config["Cmd"])  # the chart keeps the entrypoint
    assert (image.rootfs / "opt/flowscope/bin/flowscope").is_file()


def test_doctor_loads_every_probe_with_the_smallest_capability_set(image, container, tc_lab: Lab) -> None:
    netns = tc_lab.namespace("a")
    name, bundle, config = container(f"/run/netns/{netns.name}", SMALLEST, "doctor")
    assert config["process"]["args"] == ["/opt/flowscope/bin/flowscope", "doctor"]  # through the entrypoint
    result = run_container(name, bundle, config, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "load check    ok: the runnable probes compile and load" in result.stdout
    assert "node name node-1" in result.stdout  # NODE_NAME, as the chart sets it from the downward API


@pytest.mark.parametrize("dropped", SMALLEST)
def test_a_missing_capability_is_one_sentence_that_names_it(image, container, tc_lab: Lab, dropped: str) -> None:
    netns = tc_lab.namespace("a")
    kept = [cap for cap in SMALLEST if cap != dropped]
    name, bundle, config = container(f"/run/netns/{netns.name}", kept, "agent")
    result = run_container(name, bundle, config, timeout=300)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "flowscope agent: flowscope needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) to load probes and lacks "
        f"CAP_{dropped}; run it with sudo, or add the capability to its container or unit.\n"
    )


def test_the_agent_in_the_image_logs_the_lab_traffic_exactly(image, container, tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    # the image's Cmd (its own /etc/flowscope/agent.yaml: the status socket and the flow log where the chart's
    # run and data hostPaths are) with the lab's interface added
    cmd = [*image.config["Cmd"], "-i", "fstcA", "--interval", "0.5"]
    name, bundle, config = container(f"/run/netns/{hosts.a.name}", SMALLEST, *cmd)
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


FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
RELAY_PEERS = ["127.0.0.1:4244"]  # an agent that is not there, on loopback
RELAY_NAME = "fs-flowscope-relay.flowscope.svc"


def process_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def relay_status(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*argv, "-o", "json", "--timeout", "20"], capture_output=True, text=True, timeout=120)


# Hubble's ServerStatus over TLS, as `hubble observe --tls --tls-ca-cert-files CA --tls-server-name NAME` asks it;
# argv: server, CA, server name[, client certificate, client key]
HUBBLE_STATUS = """
import json, sys
import grpc
from google.protobuf.json_format import MessageToDict
from flowscope.proto.hubble.observer import observer_pb2, observer_pb2_grpc
server, ca, name, *client = sys.argv[1:]
read = lambda path: open(path, "rb").read()
credentials = grpc.ssl_channel_credentials(read(ca), *(read(path) for path in reversed(client)))
channel = grpc.secure_channel(server, credentials, options=[("grpc.ssl_target_name_override", name)])
status = observer_pb2_grpc.ObserverStub(channel).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=20)
print(json.dumps(MessageToDict(status, preserving_proto_field_name=True)))
"""


@pytest.mark.parametrize("client_auth", [False, True], ids=["tls", "mutual-tls"])
def test_the_relay_runs_from_the_image_unprivileged_and_answers_over_tls(
    image: Image, tc_lab: Lab, tmp_path: Path, client_auth: bool
) -> None:
    """The chart's relay Deployment (relay.enabled, TLS by default; relay.tls.clientAuth) as the kubelet runs
    it: its args after the image's entrypoint, runAsUser/runAsGroup/fsGroup 65534, every capability dropped, no
    privilege escalation, a read-only root, its ConfigMap and Secrets as files (0440, group 65534), its
    /run/flowscope emptyDir; in a network namespace of its own with loopback only (its one peer refuses)."""
    values = {"relay": {"enabled": True, "peers": RELAY_PEERS, "tls": {"clientAuth": client_auth}}}
    objects = chart_objects(tmp_path, values)
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-relay"))
    pod = deployment["spec"]["template"]["spec"]
    [spec] = pod["containers"]
    security = pod["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (65534, 65534, 65534)
    assert spec["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    context = spec["securityContext"]
    assert (context["allowPrivilegeEscalation"], context["readOnlyRootFilesystem"]) == (False, True)
    run = tmp_path / "run"
    mounts = pod_mounts(objects, pod, spec, tmp_path / "volumes", {"run": run})
    netns = tc_lab.namespace("r")
    config = runtime_config(image, spec["args"], [], f"/run/netns/{netns.name}", mounts, {"NODE_NAME": "node-1"},
                            user=(65534, 65534), groups=[65534], host_pid=False)  # fmt: skip
    assert config["process"]["args"] == [
        "/opt/flowscope/bin/flowscope", "relay", "--config", "/etc/flowscope/relay.yaml",
    ]  # fmt: skip
    name = f"fsimg-{os.getpid()}-relay-{int(client_auth)}"
    relay = run_container(name, tmp_path / "bundle", config, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120  # generous: a loaded machine imports grpc slowly
        while not (run / "flowscope.sock").exists():
            assert relay.poll() is None, relay.communicate()
            assert time.monotonic() < deadline, "the relay's socket did not appear within 120 s"
            time.sleep(0.1)
        state = json.loads(subprocess.run(["runc", "state", name], capture_output=True, text=True, check=True).stdout)
        process = process_status(state["pid"])
        assert {key: process[key] for key in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd",
                                              "CapAmb", "NoNewPrivs")} == {
            "Uid": "65534\t65534\t65534\t65534", "Gid": "65534\t65534\t65534\t65534", "Groups": "65534",
            **{cap: "0000000000000000" for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
            "NoNewPrivs": "1",
        }  # fmt: skip
        assert (run / "flowscope.sock").stat().st_uid == 65534
        on_socket = relay_status(FLOWSCOPE, "status", "--server", f"unix://{run / 'flowscope.sock'}")
        assert on_socket.returncode == 0, on_socket.stderr
        answer = json.loads(on_socket.stdout)
        expected = {
            "health": "SERVING", "node": "node-1", "capacity": "65536", "unavailable_nodes": ["127.0.0.1:4244"],
            "probes": [{"active": True, "hook": "1 agents: 127.0.0.1:4244", "name": "relay"}],
        }  # fmt: skip
        assert {key: answer.get(key) for key in expected} == expected, answer
        # TCP 4245 in the relay's network namespace: TLS with the chart's relay certificate, as the README's
        # port-forward lines reach it (the CA of the chart's Secret, the Service's name)
        secret = tmp_path / "volumes" / "volume-tls"  # the chart's Secret as the relay's pod has it
        tls = ["--server", "127.0.0.1:4245", "--tls-ca", str(secret / "ca.crt"), "--tls-server-name", RELAY_NAME]
        client = ["--tls-client-cert", str(secret / "client.crt"), "--tls-client-key", str(secret / "client.key")]
        if client_auth:  # without a certificate of the chart's CA the relay hangs up; the Secret's client.crt is one
            anonymous = relay_status(*netns.command(FLOWSCOPE, "status", *tls))
            assert (anonymous.returncode, anonymous.stdout) == (1, ""), anonymous.stderr
        over_tls = relay_status(*netns.command(FLOWSCOPE, "status", *tls, *(client if client_auth else [])))
        assert over_tls.returncode == 0, over_tls.stderr
        answer = json.loads(over_tls.stdout)
        assert {key: answer.get(key) for key in expected} == expected, answer
        # Hubble's API on the same port, over the same TLS
        hubble = subprocess.run(
            netns.command(sys.executable, "-c", HUBBLE_STATUS, "127.0.0.1:4245", str(secret / "ca.crt"), RELAY_NAME,
                          *([str(secret / "client.crt"), str(secret / "client.key")] if client_auth else [])),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert hubble.returncode == 0, hubble.stderr
        answer = json.loads(hubble.stdout)
        hubble_expected = {"max_flows": "65536", "num_connected_nodes": 0, "num_unavailable_nodes": 1,
                           "unavailable_nodes": ["127.0.0.1:4244"]}  # fmt: skip
        assert {key: answer.get(key) for key in hubble_expected} == hubble_expected, answer
        plaintext = relay_status(*netns.command(FLOWSCOPE, "status", "--server", "127.0.0.1:4245"))
        assert (plaintext.returncode, plaintext.stdout) == (1, ""), plaintext.stderr  # no plaintext on TCP
        assert "127.0.0.1:4245: Socket closed" in plaintext.stderr  # the TLS server hung up on the plaintext hello
        relay.send_signal(signal.SIGTERM)
        _out, errors = relay.communicate(timeout=120)
        assert relay.returncode == 0, errors
    finally:
        if relay.poll() is None:
            relay.kill()
        subprocess.run(["runc", "delete", "--force", name], capture_output=True)

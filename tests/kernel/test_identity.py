"""Identity end to end: `flowscope capture` on a node whose "pods" are network namespaces and cgroups laid
out as kubelet lays them out, with real processes talking to each other. Both ends of every flow must be
the right pod, workload and container; hostNetwork pods (the node's namespace, their own pod cgroup) must
be told apart from each other and from the node; metadata comes from the Kubernetes API (the local
list/watch server, through the real client) or from a static metadata file.

Lab: namespaces fsid-*, interfaces fsid*, 10.203.0.0/16 and fd00:203::/64; cgroups under
<cgroup v2 mount>/flowscope-test-fsid/, removed afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flowscope.kernel.features import cgroup2_mount
from tests.integration.test_k8s_apiserver import FakeApiServer, controller, node, pod
from tests.kernel import traffic
from tests.kernel.capture import Capture, CaptureResult
from tests.kernel.lab import Lab, Netns

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]

NODE_NAME = "fsid-node"
NODE_IP = "10.203.250.1"
PYTHON_COMM = Path(sys.executable).name[:15]  # the kernel's comm of a process exec'd as sys.executable


@dataclass
class FakePod:
    """A pod on the lab's node: its own network namespace (or the node's, for hostNetwork) and a kubelet
    cgroup per container (systemd driver, containerd naming), with a pause process holding the sandbox."""

    name: str
    namespace: str
    owner: tuple[str, str]
    containers: dict[str, str]  # container name -> runtime container id
    netns: Netns
    ip: str
    ip6: str | None  # hostNetwork pods: IPv4 only here
    host_network: bool
    cgroup: Path
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def container_cgroup(self, container: str) -> Path:
        return self.cgroup / f"cri-containerd-{self.containers[container]}.scope"


class NodeLab:
    def __init__(self, lab: Lab, cgroups: Path) -> None:
        self.lab = lab
        self.cgroups = cgroups
        self.node = lab.namespace("node")
        self.node.sysctl("net.ipv4.ip_forward", "1")
        self.node.sysctl("net.ipv6.conf.all.forwarding", "1")
        self.node.run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")  # the node's address
        self.pods: list[FakePod] = []
        self.interfaces: list[str] = ["lo"]

    def add_pod(self, name: str, namespace: str, owner: tuple[str, str], containers: list[str],
                host_network: bool = False) -> FakePod:  # fmt: skip
        index = len(self.pods) + 1
        if host_network:
            netns, ip, ip6 = self.node, NODE_IP, None
        else:
            netns = self.lab.namespace(f"pod{index}")
            veth = f"fsidv{index}"
            node_side, pod_side = self.lab.link(self.node, veth, netns, "eth0", subnet=index)
            netns.run("ip", "route", "add", "default", "via", node_side.ip4)
            netns.run("ip", "-6", "route", "add", "default", "via", node_side.ip6)
            ip, ip6 = pod_side.ip4, pod_side.ip6
            self.interfaces.append(veth)
        ids = {c: uuid.uuid4().hex * 2 for c in containers}
        fake = FakePod(name, namespace, owner, ids, netns, ip, ip6, host_network, Path())
        qos = self.cgroups / "kubepods.slice" / "kubepods-besteffort.slice"
        fake.cgroup = qos / f"kubepods-besteffort-pod{fake.uid.replace('-', '_')}.slice"
        sandbox = fake.cgroup / f"cri-containerd-{uuid.uuid4().hex * 2}.scope"
        for directory in [sandbox, *(fake.container_cgroup(c) for c in containers)]:
            directory.mkdir(parents=True)
        self.run(netns, sandbox, "sleep", "infinity")  # the pause container: holds the pod's namespace
        self.pods.append(fake)
        return fake

    def run(self, netns: Netns, cgroup: Path, *argv: str) -> subprocess.Popen:
        """A process inside `netns`, moved into `cgroup` before it execs `argv` (same pid throughout)."""
        script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        # nsenter rather than `ip netns exec`, which mounts a fresh /sys and so hides the cgroup v2 mount.
        argv = ["nsenter", f"--net=/run/netns/{netns.name}", "sh", "-c", script, str(cgroup), *argv]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.lab.processes.append(process)  # stopped at teardown
        return process

    def in_container(self, fake: FakePod, container: str, *argv: str) -> subprocess.Popen:
        return self.run(fake.netns, fake.container_cgroup(container), *argv)

    def sink(self, fake: FakePod, container: str, address: str, port: int, kind: str = "tcp") -> subprocess.Popen:
        process = self.in_container(fake, container, sys.executable, traffic.PATH, f"{kind}-sink", address, str(port))
        assert process.stdout.readline().strip() == "ready"
        return process

    def send(self, fake: FakePod, container: str, sport: int, peer: FakePod, dport: int, version: int = 4) -> int:
        """Connects from the container to the peer, sends 20 kB, waits for the close; returns the sender's pid."""
        src, dst = (fake.ip, peer.ip) if version == 4 else (fake.ip6, peer.ip6)
        process = self.in_container(fake, container, sys.executable, traffic.PATH, "tcp-send", "--src", src,
                                    "--sport", str(sport), "--dst", dst, "--dport", str(dport),
                                    "--bytes", "20000")  # fmt: skip
        assert process.wait(timeout=30) == 0
        return process.pid

    def datagrams(self, fake: FakePod, container: str, sport: int, peer: FakePod, dport: int) -> None:
        """Ten UDP datagrams from the container to the peer (no socket events: UDP has no connection)."""
        process = self.in_container(fake, container, sys.executable, traffic.PATH, "udp-send", "--src", fake.ip,
                                    "--sport", str(sport), "--dst", peer.ip, "--dport", str(dport), "--size", "100",
                                    "--count", "10")  # fmt: skip
        assert process.wait(timeout=30) == 0

    def api_objects(self) -> list[tuple[str, dict]]:
        objects = [("nodes", node(NODE_NAME, NODE_IP))]
        for fake in self.pods:
            owner = fake.owner
            if owner[0] == "ReplicaSet":
                objects.append(("replicasets", controller(fake.namespace, owner[1], owner=("Deployment", "checkout"))))
            fields = {"node": NODE_NAME, "uid": fake.uid, "owner": owner, "containers": fake.containers,
                      "host_network": fake.host_network, "more_ips": (fake.ip6,) if fake.ip6 else ()}  # fmt: skip
            objects.append(("pods", pod(fake.namespace, fake.name, fake.ip, **fields)))
        return objects

    def metadata_file(self, path: Path) -> Path:
        """The same pods in the static metadata format (workloads named directly)."""
        pods = []
        for f in self.pods:
            workload, kind = ("checkout", "Deployment") if f.owner[0] == "ReplicaSet" else (f.owner[1], f.owner[0])
            pods.append(
                {"namespace": f.namespace, "name": f.name, "uid": f.uid, "ips": [f.ip, *([f.ip6] if f.ip6 else [])],
                 "node": NODE_NAME, "hostNetwork": f.host_network, "workload": workload, "workload_kind": kind,
                 "containers": [{"name": n, "id": i} for n, i in f.containers.items()]}
            )  # fmt: skip
        path.write_text(yaml.safe_dump({"pods": pods, "nodes": [{"name": NODE_NAME, "ips": [NODE_IP]}]}))
        return path

    def close(self) -> None:
        for directory in sorted(self.cgroups.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if directory.is_dir():
                _rmdir(directory)
        _rmdir(self.cgroups)


def _rmdir(directory: Path) -> None:
    for _ in range(50):  # a killed process leaves its cgroup a moment after it is reaped
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    directory.rmdir()


@pytest.fixture
def node_lab() -> Iterator[NodeLab]:
    mount = cgroup2_mount()
    if mount is None:
        pytest.fail("no cgroup v2 mount: identity by cgroup needs one (mount -t cgroup2 none /sys/fs/cgroup/unified)")
    with Lab("fsid-", "10.203.0.0/16", "fd00:203::/64") as lab:
        cgroups = Path(mount) / "flowscope-test-fsid" / lab.tag
        built = None
        try:
            built = NodeLab(lab, cgroups)
            yield built
        finally:
            lab.close()  # the processes first: a cgroup with processes cannot be removed
            if built is not None:
                built.close()
            with contextlib.suppress(OSError):
                cgroups.parent.rmdir()


def shop(lab: NodeLab) -> dict[str, FakePod]:
    return {
        "checkout": lab.add_pod("checkout-7d9f-x2k", "shop", ("ReplicaSet", "checkout-7d9f"), ["app"]),
        "payments": lab.add_pod("payments-0", "shop", ("StatefulSet", "payments"), ["server", "proxy"]),
        "agent": lab.add_pod("agent-x", "monitoring", ("DaemonSet", "agent"), ["agent"], host_network=True),
        "exporter": lab.add_pod(
            "exporter-y", "monitoring", ("DaemonSet", "node-exporter"), ["exporter"], host_network=True
        ),
    }


def sides(
    flows: pd.DataFrame, src: tuple[str, int], dst: tuple[str, int], protocol: str = "TCP"
) -> list[dict[str, object]]:
    """Identity of every flow row on the 5-tuple, as {src_*, dst_*, ifname, direction} dicts."""
    match = flows[(flows["protocol"] == protocol) & (flows["src_ip"] == src[0]) & (flows["src_port"] == src[1])
                  & (flows["dst_ip"] == dst[0]) & (flows["dst_port"] == dst[1])]  # fmt: skip
    fields = ["ifname", "direction"] + [f"{s}_{n}" for s in ("src", "dst") for n in
                                        ("namespace", "pod", "workload", "workload_kind", "container", "pid", "comm",
                                         "node", "identity_source")]  # fmt: skip
    return [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in match[fields].to_dict("records")]


def identity(fake: FakePod, container: str | None, pid: int | None, side: str, source: str = "cgroup"
             ) -> dict[str, object]:  # fmt: skip
    workload = {"ReplicaSet": ("checkout", "Deployment")}.get(fake.owner[0], (fake.owner[1], fake.owner[0]))
    return {f"{side}_namespace": fake.namespace, f"{side}_pod": fake.name, f"{side}_workload": workload[0],
            f"{side}_workload_kind": workload[1], f"{side}_container": container, f"{side}_pid": pid,
            f"{side}_comm": PYTHON_COMM if pid else None, f"{side}_node": NODE_NAME,
            f"{side}_identity_source": source}  # fmt: skip


@dataclass
class End:
    """One end of a conversation: the pod, the container that owns the socket, its address and port, the pid."""

    pod: FakePod
    container: str
    ip: str
    port: int
    pid: int


def run_shop_traffic(lab: NodeLab, pods: dict[str, FakePod], extra: list[str]) -> tuple[CaptureResult, list]:
    """TCP conversations (IPv4 and IPv6, pod to pod, hostNetwork to pod, hostNetwork to hostNetwork) and one
    UDP one, seen by capture on the node; returns the capture and the TCP conversations as (client, server,
    interfaces crossed)."""
    checkout, payments = pods["checkout"], pods["payments"]
    agent, exporter = pods["agent"], pods["exporter"]
    server = lab.sink(payments, "server", payments.ip, 8080)
    server6 = lab.sink(payments, "server", payments.ip6, 8080)
    lab.sink(payments, "server", payments.ip, 5353, kind="udp")
    exporter_sink = lab.sink(exporter, "exporter", exporter.ip, 9100)
    run = Capture.start(lab.node, lab.interfaces, 0.5, "--node-name", NODE_NAME, *extra)
    conversations = [
        (End(checkout, "app", checkout.ip, 41001, lab.send(checkout, "app", 41001, payments, 8080)),
         End(payments, "server", payments.ip, 8080, server.pid), {"fsidv1", "fsidv2"}),
        (End(checkout, "app", checkout.ip6, 41005, lab.send(checkout, "app", 41005, payments, 8080, version=6)),
         End(payments, "server", payments.ip6, 8080, server6.pid), {"fsidv1", "fsidv2"}),
        (End(agent, "agent", agent.ip, 41002, lab.send(agent, "agent", 41002, payments, 8080)),
         End(payments, "server", payments.ip, 8080, server.pid), {"fsidv2"}),
        (End(agent, "agent", agent.ip, 41003, lab.send(agent, "agent", 41003, exporter, 9100)),
         End(exporter, "exporter", exporter.ip, 9100, exporter_sink.pid), {"lo"}),
    ]  # fmt: skip
    lab.datagrams(checkout, "app", 41004, payments, 5353)
    time.sleep(1.2)  # the closes, and one more interval
    return run.stop(), conversations


def assert_both_ends_named(result: CaptureResult, pods: dict[str, FakePod], conversations: list, by_address: str
                           ) -> None:  # fmt: skip
    """by_address: the identity source of a side named by its address ("ip" from the API, "static" from a file)."""
    assert result.returncode == 0, result.stderr
    for client, server, interfaces in conversations:
        forward = sides(result.flows, (client.ip, client.port), (server.ip, server.port))
        backward = sides(result.flows, (server.ip, server.port), (client.ip, client.port))
        assert {row["ifname"] for row in forward} == interfaces
        assert {row["ifname"] for row in backward} == interfaces
        expected = {**identity(client.pod, client.container, client.pid, "src"),
                    **identity(server.pod, server.container, server.pid, "dst")}  # fmt: skip
        for row in forward:
            assert {k: row[k] for k in expected} == expected, row
        expected = {**identity(server.pod, server.container, server.pid, "src"),
                    **identity(client.pod, client.container, client.pid, "dst")}  # fmt: skip
        for row in backward:
            assert {k: row[k] for k in expected} == expected, row
    # UDP has no socket events: the pod's veth names the pod on its side, the address the other pod (whose
    # container is unknown: payments-0 has two).
    checkout, payments = pods["checkout"], pods["payments"]
    udp = {(row["ifname"], row["direction"]): row for row in sides(result.flows, (checkout.ip, 41004),
                                                                    (payments.ip, 5353), "UDP")}  # fmt: skip
    assert set(udp) == {("fsidv1", "ingress"), ("fsidv2", "egress")}
    expected = {**identity(checkout, "app", None, "src", "netns"), **identity(payments, None, None, "dst", by_address)}
    assert {k: udp[("fsidv1", "ingress")][k] for k in expected} == expected
    expected = {**identity(checkout, "app", None, "src", by_address), **identity(payments, None, None, "dst", "netns")}
    assert {k: udp[("fsidv2", "egress")][k] for k in expected} == expected
    events = pd.concat([batch.events for batch in result.batches], ignore_index=True)
    connect = events[(events["kind"] == "connect") & (events["src_port"] == 41001)]
    assert len(connect) == 1
    assert (connect["src_pod"].iloc[0], connect["src_container"].iloc[0]) == ("checkout-7d9f-x2k", "app")
    assert (connect["dst_pod"].iloc[0], connect["dst_container"].iloc[0]) == ("payments-0", "server")
    node_health = result.summary["identity"]["sources"]["node"]
    assert (node_health["pods"], node_health["pod_netns"], node_health["pod_interfaces"]) == (4, 2, 2)


def test_both_ends_of_every_flow_are_named_with_metadata_from_the_kubernetes_api(node_lab, tmp_path):
    pods = shop(node_lab)
    api = FakeApiServer().start(netns=f"/run/netns/{node_lab.node.name}")
    try:
        for resource, obj in node_lab.api_objects():
            api.add(resource, obj)
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        result, conversations = run_shop_traffic(node_lab, pods, ["--kubeconfig", str(kubeconfig)])
    finally:
        api.stop()
    assert_both_ends_named(result, pods, conversations, "ip")
    kubernetes = result.summary["identity"]["sources"]["kubernetes"]
    assert kubernetes["state"] == "synced" and kubernetes["objects"]["pods"] == 4


def test_both_ends_of_every_flow_are_named_with_metadata_from_a_static_file(node_lab, tmp_path):
    pods = shop(node_lab)
    metadata = node_lab.metadata_file(tmp_path / "metadata.yaml")
    result, conversations = run_shop_traffic(node_lab, pods, ["--metadata", str(metadata)])
    assert_both_ends_named(result, pods, conversations, "static")
    assert result.summary["identity"]["sources"]["static"]["objects"]["pods"] == 4


def test_with_the_api_unreachable_flows_still_flow_and_the_misses_are_counted(node_lab, tmp_path):
    pods = shop(node_lab)
    api = FakeApiServer().start(netns=f"/run/netns/{node_lab.node.name}")
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    api.stop()  # the port is known; nothing answers on it
    result, _ = run_shop_traffic(node_lab, pods, ["--kubeconfig", str(kubeconfig)])
    assert result.returncode == 0, result.stderr
    forward = sides(result.flows, (pods["checkout"].ip, 41001), (pods["payments"].ip, 8080))
    assert {row["ifname"] for row in forward} == {"fsidv1", "fsidv2"}
    assert all(row["src_pod"] is None and row["src_identity_source"] == "none" for row in forward)
    identity_health = result.summary["identity"]
    assert identity_health["sources"]["kubernetes"]["state"] == "unreachable"
    assert identity_health["misses"]["pod_unknown"] > 0 and identity_health["unresolved"] > 0

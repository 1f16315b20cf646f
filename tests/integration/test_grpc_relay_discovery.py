"""`flowscope relay --discover-selector`: the agents are the pods of a label selector (in --discover-namespace),
listed and watched through the Kubernetes API (the local server of test_k8s_apiserver, driven by the real
client). Real agents serve on loopback addresses that stand for pod IPs (127.0.0.2-5, one API port, found by
its container port's name): a pod added, removed or replaced changes the relay's agents, GetNodes names them,
and the follower gets every record of every agent once."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

from flowscope.proto import codec
from flowscope.proto.client import request
from flowscope.proto.flowscope.v1 import flowscope_pb2 as pb
from tests.integration.grpc_agents import Agent, free_port, interval_batches, recording, run_flowscope
from tests.integration.test_k8s_apiserver import FakeApiServer, pod
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(240)
START = pd.Timestamp("2025-03-01T12:00:00Z")
SELECTOR = {"app.kubernetes.io/name": "flowscope", "app.kubernetes.io/component": "agent"}


def agent_pod(name: str, ip: str | None, node: str, port: int, port_name: str = "grpc") -> dict:
    """An agent's pod whose container declares its flow API port by name (as the chart's DaemonSet does)."""
    return pod("flowscope", name, ip, node=node, labels=SELECTOR, ports={"metrics": 9464, port_name: port})


def test_agent_pods_added_removed_and_replaced_are_the_relays_agents(tmp_path):
    api = FakeApiServer().start()
    port = free_port()
    # every agent's records in a time range of its own, each later than what went out before it joined
    ranges = {"a": 0, "b": 0, "c1": 2, "c2": 4}
    batches = {key: interval_batches(START + pd.Timedelta(seconds=s), 10, 0.1, 5, key[0]) for key, s in ranges.items()}

    def start_agent(key: str, ip: str) -> Agent:
        path = recording(tmp_path / f"{key}.jsonl", batches[key])
        return Agent.start(tmp_path, path, "--speed", "0", "--grpc-addr", f"{ip}:{port}", name=key[0])

    def nodes() -> set[tuple[str, int, str]]:
        return {(n.name, n.state, n.address) for n in relay.client().nodes().nodes}

    pods = {name: api.add("pods", agent_pod(name, ip, node, port)) for name, ip, node in
            (("agent-a", "127.0.0.2", "a"), ("agent-b", "127.0.0.3", "b"), ("agent-c", None, "c"))}  # fmt: skip
    api.add("pods", pod("flowscope", "web", "127.0.0.9", node="a", labels={"app.kubernetes.io/name": "flowscope"}))
    # a pod of the selection whose container names no port grpc (an older agent) is no agent either
    api.add("pods", agent_pod("agent-old", "127.0.0.6", "d", port, port_name="api"))
    # nor one of another namespace (another release's agents): the relay reads its own namespace's pods only
    api.add("pods", pod("elsewhere", "agent-e", "127.0.0.7", node="e", labels=SELECTOR, ports={"grpc": port}))
    agents = {"a": start_agent("a", "127.0.0.2"), "b": start_agent("b", "127.0.0.3")}
    selector = ",".join(f"{k}={v}" for k, v in SELECTOR.items())
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    relay = Agent.start(
        tmp_path, None, "--discover-selector", selector, "--discover-port", "grpc", "--discover-namespace",
        "flowscope", "--kubeconfig", str(kubeconfig), "--relay-interval", "0.1", "--backoff", "0.1",
        "--drain-timeout", "1", name="relay", command="relay",
    )  # fmt: skip
    got: list[pb.GetFlowsResponse] = []
    client = relay.client()
    follower = threading.Thread(
        target=lambda: got.extend(client.flows(request(follow=True, since=pd.Timestamp(0, tz="UTC")))), daemon=True
    )
    connected, address = pb.NODE_CONNECTED, {n: f"127.0.0.{n}:{port}" for n in range(2, 6)}

    def records(node: str) -> int:
        return sum(r.flow.node == node for r in list(got))

    try:
        follower.start()
        # the pending pod (no IP yet) and the pod outside the selector are no agents
        wait_for(lambda: nodes() == {("a", connected, address[2]), ("b", connected, address[3])}, 60, "a and b")
        wait_for(lambda: records("a") == records("b") == 50, 60, "a's and b's records")
        agents["c"] = start_agent("c1", "127.0.0.4")
        api.modify("pods", agent_pod("agent-c", "127.0.0.4", "c", port) | {"metadata": pods["agent-c"]["metadata"]})
        wait_for(lambda: nodes() == {("a", connected, address[2]), ("b", connected, address[3]),
                                     ("c", connected, address[4])}, 60, "c once its pod has an IP")  # fmt: skip
        wait_for(lambda: records("c") == 50, 60, "c's records")
        api.delete("pods", pods["agent-b"])
        agents.pop("b").stop()
        wait_for(lambda: nodes() == {("a", connected, address[2]), ("c", connected, address[4])}, 60, "b gone")
        # c's pod replaced: the old one deleted, a new one (another uid and IP) on the same node
        agents.pop("c").stop()
        api.delete("pods", pods["agent-c"])
        api.add("pods", agent_pod("agent-c-2", "127.0.0.5", "c", port))
        agents["c"] = start_agent("c2", "127.0.0.5")
        wait_for(lambda: nodes() == {("a", connected, address[2]), ("c", connected, address[5])}, 60, "c replaced")
        wait_for(lambda: records("c") == 100, 60, "the new c's records")
        status = relay.client().status()
    finally:
        client.cancel()
        relay.stop()
        for agent in agents.values():
            agent.stop()
        api.stop()
    flows = codec.flows_from(r.flow for r in got if r.HasField("flow"))
    assert flows["time_end"].is_monotonic_increasing
    for node, keys in (("a", ["a"]), ("b", ["b"]), ("c", ["c1", "c2"])):
        want = pd.concat([b.flows for key in keys for b in batches[key]])["time_end"].tolist()
        assert flows.loc[flows["node"] == node, "time_end"].tolist() == want
    assert (status.connected_nodes, list(status.unavailable_nodes)) == (2, [])
    assert not any(r.HasField("lost") for r in got)
    lists = api.requests_for("pods", watch=False)
    assert lists and all(r["query"]["labelSelector"] == selector for r in lists)
    # list_namespaced_pod: /api/v1/namespaces/flowscope/pods, what a Role in that namespace grants
    assert {r["namespace"] for r in lists + api.requests_for("pods", watch=True)} == {"flowscope"}


def test_discovery_with_an_unusable_kubeconfig_is_one_sentence(tmp_path):
    absent = tmp_path / "absent"
    sockets = ["--grpc-socket", str(tmp_path / "r.sock"), "--hubble-socket", str(tmp_path / "h.sock")]
    result = run_flowscope("relay", "--discover-selector", "app=flowscope", "--kubeconfig", str(absent), *sockets)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"flowscope relay: cannot read kubeconfig {absent}: No such file or directory.\n"


def test_a_bad_label_selector_is_one_sentence(tmp_path):
    result = run_flowscope("relay", "--discover-selector", "app=flow scope", "--grpc-socket", str(tmp_path / "r.sock"))
    assert (result.returncode, result.stdout) == (2, "")  # a usage error, as argparse exits
    assert result.stderr == (
        "flowscope relay: argument --discover-selector: 'app=flow scope' is not a label selector such as "
        "app.kubernetes.io/name=flowscope,tier in (node); see `flowscope relay --help`.\n"
    )

"""The enricher on synthetic batches: cgroup before netns before IP, the socket table naming both ends of a
connection, hostNetwork pods told apart, events, misses counted, and rows that already carry identity."""

import dataclasses
import os

import pandas as pd
import pytest

from flowscope.enrich import ipindex
from flowscope.enrich.catalog import Catalog
from flowscope.enrich.enricher import PURGE_EVERY, Enricher
from flowscope.enrich.model import NodeMeta, PodMeta, ServiceMeta, parse_controller, parse_pod
from flowscope.enrich.node import NodeScanner
from flowscope.schema import EVENT_COLUMNS, FLOW_COLUMNS, FlowBatch, events_frame, flows_frame

NOW = pd.Timestamp("2026-05-01T12:00:00Z")
NODE_IP = "192.168.7.1"
CHECKOUT, PAYMENTS, AGENT, EXPORTER = (f"{n}1111111-2222-4333-8444-555555555555" for n in "abcd")
CID = {name: name[:2] * 32 for name in ("checkout", "payments", "agent", "exporter", "search")}


def k8s_pod(uid, name, ip, container, host_network=False, owner=None):
    metadata = {"namespace": "shop", "name": name, "uid": uid, "labels": {"app": name.split("-")[0]}}
    if owner:
        metadata["ownerReferences"] = [{"kind": owner[0], "name": owner[1], "controller": True}]
    return parse_pod(
        {"metadata": metadata, "spec": {"nodeName": "node-a", "hostNetwork": host_network,
                                        "containers": [{"name": container}]},
         "status": {"phase": "Running", "podIP": ip,
                    "containerStatuses": [{"name": container, "containerID": f"containerd://{CID[name.split('-')[0]]}"}]}}
    )  # fmt: skip


@pytest.fixture
def world(tmp_path):
    """Four pods on node-a: two with their own netns, two hostNetwork, each with a kubelet-style cgroup."""
    catalog = Catalog("kubernetes", grace=60)
    catalog.put("pods", k8s_pod(CHECKOUT, "checkout-7d9f", "10.203.1.5", "app", owner=("StatefulSet", "checkout")),
                listed=True)  # fmt: skip
    catalog.put("pods", k8s_pod(PAYMENTS, "payments-0", "10.203.1.6", "server"), listed=True)
    catalog.put("pods", k8s_pod(AGENT, "agent-x", NODE_IP, "agent", host_network=True), listed=True)
    catalog.put("pods", k8s_pod(EXPORTER, "exporter-y", NODE_IP, "exporter", host_network=True), listed=True)
    cgroups = {}
    for uid, name in ((CHECKOUT, "checkout"), (PAYMENTS, "payments"), (AGENT, "agent"), (EXPORTER, "exporter")):
        pod_slice = f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
        path = (
            tmp_path / "kubepods.slice" / "kubepods-besteffort.slice" / pod_slice / f"cri-containerd-{CID[name]}.scope"
        )
        path.mkdir(parents=True)
        (path / "cgroup.procs").write_text(f"{os.getpid()}\n")
        cgroups[name] = path.stat().st_ino
    host = tmp_path / "system.slice" / "sshd.service"
    host.mkdir(parents=True)
    cgroups["sshd"] = host.stat().st_ino
    scanner = NodeScanner(cgroup_root=str(tmp_path))
    scanner.scan()
    scanner.view = dataclasses.replace(scanner.view, ifindex_pods={17: CHECKOUT}, netns_pods={4026532999: PAYMENTS})
    enricher = Enricher("node-a", [catalog], scanner, grace=60, clock=lambda: NOW.timestamp())
    return enricher, cgroups


def flow_batch(*rows, events=()):
    base = {"time_start": NOW, "time_end": NOW, "protocol": "TCP", "packets": 1, "bytes": 100}
    flows = flows_frame(pd.DataFrame([{**base, **row} for row in rows], columns=list(FLOW_COLUMNS)))
    event_rows = [{"time": NOW, "protocol": "TCP", **row} for row in events]
    return FlowBatch(NOW, NOW, flows, events_frame(pd.DataFrame(event_rows, columns=list(EVENT_COLUMNS))))


def sides(frame, row, which, fields=("namespace", "pod", "workload", "workload_kind", "container", "pid", "comm",
                                     "node", "identity_source")):  # fmt: skip
    values = [frame.loc[row, f"{which}_{name}"] for name in fields]
    return tuple(None if pd.isna(v) else v for v in values)


def tcp(src, sport, dst, dport, **extra):
    return {"src_ip": src, "src_port": sport, "dst_ip": dst, "dst_port": dport, **extra}


def test_tc_egress_names_the_sender_by_cgroup_and_the_receiver_by_ip(world):
    enricher, cgroups = world
    enriched = enricher.enrich(flow_batch(tcp("10.203.1.5", 40000, "10.203.1.6", 8080, direction="egress",
                                              ifindex=2, cgroup_id=cgroups["checkout"])))  # fmt: skip
    with open(f"/proc/{os.getpid()}/comm") as handle:
        comm = handle.read().strip()
    assert sides(enriched.flows, 0, "src") == (
        "shop",
        "checkout-7d9f",
        "checkout",
        "StatefulSet",
        "app",
        os.getpid(),
        comm,
        "node-a",
        "cgroup",
    )
    assert sides(enriched.flows, 0, "dst") == (
        "shop", "payments-0", "payments-0", "Pod", "server", None, None, "node-a", "ip")  # fmt: skip
    assert enriched.flows.loc[0, "src_labels"] == {"app": "checkout"}


def test_a_pods_host_side_veth_names_the_pod_on_the_side_the_direction_says(world):
    enricher, _ = world
    enriched = enricher.enrich(
        flow_batch(tcp("10.203.1.5", 40000, "10.203.1.6", 8080, direction="ingress", ifindex=17, ifname="veth17"),
                   tcp("10.203.1.6", 8080, "10.203.1.5", 40000, direction="egress", ifindex=17, ifname="veth17"),
                   # a row from another network namespace: its ifindex 17 is some other interface
                   tcp("10.203.9.9", 40000, "10.203.1.6", 8080, direction="ingress", ifindex=17))
    )  # fmt: skip
    assert sides(enriched.flows, 0, "src", ("pod", "container", "identity_source")) == ("checkout-7d9f", "app", "netns")
    assert sides(enriched.flows, 1, "dst", ("pod", "container", "identity_source")) == ("checkout-7d9f", "app", "netns")
    assert sides(enriched.flows, 1, "src", ("pod", "identity_source")) == ("payments-0", "ip")
    assert sides(enriched.flows, 2, "src", ("pod", "identity_source")) == (None, "none")


def test_two_hostnetwork_pods_on_one_address_are_told_apart_by_cgroup_and_never_by_ip(world):
    enricher, cgroups = world
    enriched = enricher.enrich(
        flow_batch(tcp(NODE_IP, 41000, "10.203.1.6", 8080, direction="egress", ifindex=2, cgroup_id=cgroups["agent"]),
                   tcp(NODE_IP, 42000, "10.203.1.6", 8080, direction="egress", ifindex=2,
                       cgroup_id=cgroups["exporter"]),
                   tcp("10.203.1.6", 8080, NODE_IP, 41000, direction="ingress", ifindex=2),
                   tcp(NODE_IP, 22, "10.203.1.6", 5555, direction="egress", ifindex=2, cgroup_id=cgroups["sshd"]))
    )  # fmt: skip
    assert sides(enriched.flows, 0, "src", ("pod", "container", "identity_source")) == ("agent-x", "agent", "cgroup")
    assert sides(enriched.flows, 1, "src", ("pod", "container", "identity_source")) == (
        "exporter-y", "exporter", "cgroup")  # fmt: skip
    # By address alone the node is certain, which of its hostNetwork pods is not.
    assert sides(enriched.flows, 2, "dst", ("pod", "node", "identity_source")) == (None, "node-a", "ip")
    # A host process outside any pod is the node.
    assert sides(enriched.flows, 3, "src", ("pod", "node", "identity_source")) == (None, "node-a", "cgroup")


def test_socket_events_name_both_ends_of_a_connection_with_pid_and_comm(world):
    enricher, cgroups = world
    connect = {"kind": "connect", **tcp(NODE_IP, 43000, NODE_IP, 9100), "pid": 4242, "comm": "scraper",
               "cgroup_id": cgroups["agent"]}  # fmt: skip
    accept = {"kind": "accept", **tcp(NODE_IP, 9100, NODE_IP, 43000), "pid": 777, "comm": "node_exporter",
              "cgroup_id": cgroups["exporter"]}  # fmt: skip
    enriched = enricher.enrich(
        flow_batch(tcp(NODE_IP, 43000, NODE_IP, 9100, direction="ingress", ifindex=1),
                   tcp(NODE_IP, 9100, NODE_IP, 43000, direction="ingress", ifindex=1),
                   events=[connect, accept])
    )  # fmt: skip
    fields = ("pod", "container", "pid", "comm", "identity_source")
    assert sides(enriched.flows, 0, "src", fields) == ("agent-x", "agent", 4242, "scraper", "cgroup")
    assert sides(enriched.flows, 0, "dst", fields) == ("exporter-y", "exporter", 777, "node_exporter", "cgroup")
    assert sides(enriched.flows, 1, "src", fields) == ("exporter-y", "exporter", 777, "node_exporter", "cgroup")
    assert sides(enriched.events, 0, "src", fields) == ("agent-x", "agent", 4242, "scraper", "cgroup")
    assert sides(enriched.events, 0, "dst", fields) == ("exporter-y", "exporter", 777, "node_exporter", "cgroup")
    # The close comes from a timer (no process): it marks the socket closed; the facts stay the accept's.
    close = {"kind": "close", **tcp(NODE_IP, 9100, NODE_IP, 43000), "pid": 0, "comm": "swapper/3",
             "cgroup_id": 1, "time": NOW + pd.Timedelta(seconds=1)}  # fmt: skip
    enricher.enrich(flow_batch(events=[close]))
    later = enricher.enrich(flow_batch(tcp(NODE_IP, 43000, NODE_IP, 9100, direction="ingress", ifindex=1)))
    assert sides(later.flows, 0, "dst", fields) == ("exporter-y", "exporter", 777, "node_exporter", "cgroup")
    assert len(enricher.sockets) == 2
    enricher.clock = lambda: NOW.timestamp() + 62  # the grace after the close has passed
    enricher.enrich(flow_batch())
    assert len(enricher.sockets) == 1  # the connect side never saw its close


def test_events_outside_process_context_are_named_by_address_not_by_their_cgroup(world):
    enricher, cgroups = world
    drop = {"kind": "drop", **tcp("10.203.1.5", 40000, "10.203.1.6", 8080), "drop_reason": "NO_SOCKET", "pid": 0,
            "comm": "swapper/0", "cgroup_id": cgroups["sshd"]}  # fmt: skip
    enriched = enricher.enrich(flow_batch(events=[drop]))
    fields = ("pod", "pid", "comm", "identity_source")
    assert sides(enriched.events, 0, "src", fields) == ("checkout-7d9f", None, None, "ip")
    assert sides(enriched.events, 0, "dst", fields) == ("payments-0", None, None, "ip")


def test_a_socket_event_in_a_pod_namespace_is_named_by_netns_when_its_cgroup_is_unknown(world):
    enricher, _ = world
    connect = {"kind": "connect", **tcp("10.203.1.6", 45000, "198.51.100.7", 443), "pid": 31, "comm": "server",
               "netns": 4026532999}  # fmt: skip
    enriched = enricher.enrich(flow_batch(events=[connect]))
    assert sides(enriched.events, 0, "src", ("pod", "pid", "comm", "identity_source")) == (
        "payments-0", 31, "server", "netns")  # fmt: skip
    assert sides(enriched.events, 0, "dst", ("pod", "identity_source")) == (None, "none")


def test_misses_are_counted_per_row_and_flows_keep_flowing(world):
    enricher, _ = world
    rows = [tcp("198.51.100.9", 1000 + i, "10.203.1.6", 80, direction="egress", ifindex=2, cgroup_id=999999)
            for i in range(3)]  # fmt: skip
    enriched = enricher.enrich(flow_batch(*rows))
    assert len(enriched.flows) == 3
    assert list(enriched.flows["src_identity_source"]) == ["none"] * 3
    assert list(enriched.flows["dst_pod"]) == ["payments-0"] * 3
    health = enricher.health()
    assert health["misses"] == {"cgroup_unknown": 3, "ip_unknown": 3}
    assert (health["resolved"], health["unresolved"]) == ({"ip": 3}, 3)
    assert enricher.node._wake.is_set()  # an unknown cgroup asks for a rescan


def test_a_cgroup_of_a_pod_the_api_does_not_know_is_a_counted_miss(world, tmp_path):
    enricher, _ = world
    stranger = tmp_path / "kubepods.slice" / f"kubepods-pod{'e' * 8}_1111_4222_8333_{'4' * 12}.slice"
    stranger.mkdir(parents=True)
    enricher.node.scan()
    enriched = enricher.enrich(flow_batch(tcp("10.203.99.1", 1, "10.203.1.6", 80, direction="egress",
                                              cgroup_id=stranger.stat().st_ino)))  # fmt: skip
    assert sides(enriched.flows, 0, "src", ("pod", "identity_source")) == (None, "none")
    assert enricher.health()["misses"] == {"pod_unknown": 1, "ip_unknown": 1}


def test_rows_that_already_carry_identity_keep_it_and_none_rows_are_resolved_again(world):
    enricher, _ = world
    batch = flow_batch(tcp("10.203.1.5", 1, "10.203.1.6", 80, direction="egress", src_pod="from-replay",
                           src_identity_source="static", dst_identity_source="none"))  # fmt: skip
    enriched = enricher.enrich(batch)
    assert sides(enriched.flows, 0, "src", ("pod", "identity_source")) == ("from-replay", "static")
    assert sides(enriched.flows, 0, "dst", ("pod", "identity_source")) == ("payments-0", "ip")
    assert batch.flows.loc[0, "dst_identity_source"] == "none"  # the input batch is not modified


def test_one_batch_across_an_ip_hand_over_gets_answers_per_row(world):
    enricher, _ = world
    catalog = enricher.catalogs[0]
    t = NOW.timestamp()
    catalog.remove("pods", CHECKOUT, now=t - 10)
    catalog.put("pods", k8s_pod("f1111111-2222-4333-8444-555555555555", "search-0", "10.203.1.5", "search"), now=t)
    early = {"time_start": NOW - pd.Timedelta(seconds=12), "time_end": NOW - pd.Timedelta(seconds=11)}
    late = {"time_start": NOW + pd.Timedelta(seconds=1), "time_end": NOW + pd.Timedelta(seconds=2)}
    rows = [tcp("10.203.1.5", port, "10.203.1.6", 80, direction="egress", **window)
            for port, window in ((1, early), (2, late))]  # fmt: skip
    enriched = enricher.enrich(flow_batch(*rows))
    assert list(enriched.flows["src_pod"]) == ["checkout-7d9f", "search-0"]


def test_an_empty_batch_passes_through(world):
    enricher, _ = world
    enriched = enricher.enrich(FlowBatch.empty(NOW, NOW))
    assert enriched.flows.empty and enriched.events.empty
    assert list(enriched.flows.columns) == list(FLOW_COLUMNS)


def test_identities_named_by_ip_follow_the_catalogs_between_batches(world):
    enricher, _ = world
    catalog = enricher.catalogs[0]
    static = Catalog("static", grace=60)
    enricher = Enricher("node-a", [catalog, static], None, grace=60, clock=lambda: NOW.timestamp())
    rows = [tcp("198.51.100.9", 1, "10.203.1.6", 80, direction="egress"),
            tcp("198.51.100.9", 2, NODE_IP, 80, direction="egress")]  # fmt: skip
    fields = ("pod", "workload", "workload_kind", "node", "identity_source")
    first = enricher.enrich(flow_batch(*rows)).flows
    assert sides(first, 0, "dst", fields) == ("payments-0", "payments-0", "Pod", "node-a", "ip")
    assert (sides(first, 1, "dst", fields), first.loc[1, "dst_labels"]) == ((None, None, None, "node-a", "ip"), None)
    # The pod gets a ReplicaSet of a Deployment and new labels; the node becomes known, in the other catalog.
    owned = k8s_pod(PAYMENTS, "payments-0", "10.203.1.6", "server", owner=("ReplicaSet", "payments-5c"))
    catalog.put("pods", dataclasses.replace(owned, labels={"app": "payments", "v": "2"}))
    catalog.put("replicasets", parse_controller({"metadata": {"namespace": "shop", "name": "payments-5c",
                "ownerReferences": [{"kind": "Deployment", "name": "payments", "controller": True}]}}))  # fmt: skip
    static.put("nodes", NodeMeta("node-a", {"zone": "a"}))
    second = enricher.enrich(flow_batch(*rows)).flows
    assert sides(second, 0, "dst", fields) == ("payments-0", "payments", "Deployment", "node-a", "ip")
    assert second.loc[0, "dst_labels"] == {"app": "payments", "v": "2"}
    assert second.loc[1, "dst_labels"] == {"zone": "a"}
    assert first.loc[0, "dst_labels"] == {"app": "payments"}  # an earlier batch keeps what it was given


def test_late_flows_of_an_owner_purged_from_the_catalog_are_counted_misses(world):
    enricher, _ = world
    catalog = enricher.catalogs[0]
    t = NOW.timestamp()
    catalog.put("services", ServiceMeta("shop", "web", {}, ("10.96.0.10",)), now=t - 200, listed=True)
    catalog.remove("services", ("shop", "web"), now=t - 100)
    catalog.remove("pods", PAYMENTS, now=t - 100)
    late = {"time_start": NOW - pd.Timedelta(seconds=50), "time_end": NOW - pd.Timedelta(seconds=50)}
    rows = [tcp("10.203.1.5", 1, "10.203.1.6", 80, **late), tcp("10.203.1.5", 2, "10.96.0.10", 80, **late)]
    before = enricher.health()["misses"]
    enriched = enricher.enrich(flow_batch(*rows)).flows  # the first batch purges: both objects are gone
    # The addresses still name them (their claims are within their grace), the catalog no longer does: the pod
    # is a miss; a service is only a name, so nothing is named and nothing missed.
    assert list(enriched["dst_identity_source"]) == ["none", "none"]
    assert enricher.health()["misses"]["ip_unknown"] - before.get("ip_unknown", 0) == 1


def test_renumbered_owners_are_named_again(world, monkeypatch):
    monkeypatch.setattr(ipindex, "COMPACT_AFTER", 2)
    enricher, _ = world
    catalog = enricher.catalogs[0]
    t = NOW.timestamp()
    rows = [tcp(ip, 1, "10.203.9.9", 80) for ip in ("10.203.1.5", "10.203.1.6", NODE_IP)]
    first = enricher.enrich(flow_batch(*rows)).flows  # builds the identity of each owner
    assert [first.loc[0, "src_pod"], first.loc[1, "src_pod"], first.loc[2, "src_node"]] == [
        "checkout-7d9f", "payments-0", "node-a"]  # fmt: skip
    catalog.remove("pods", CHECKOUT, now=t - 400)
    for index in range(6):  # more pods come and go
        uid = f"{index}0000000-2222-4333-8444-555555555555"
        catalog.put("pods", PodMeta(uid, "shop", f"job-{index}", ips=(f"10.203.2.{index}",)), now=t - 500)
        catalog.remove("pods", uid, now=t - 400)
    epoch = catalog.ips.epoch
    enricher.clock = lambda: t + PURGE_EVERY  # purges the pods that went; payments gets checkout's number
    enriched = enricher.enrich(flow_batch(*rows)).flows
    assert catalog.ips.epoch == epoch + 1
    assert [enriched.loc[0, "src_pod"], enriched.loc[1, "src_pod"], enriched.loc[2, "src_node"]] == [
        pd.NA, "payments-0", "node-a"]  # fmt: skip


def test_identity_columns_nobody_resolved_share_buffers_but_are_written_alone(world):
    enricher, _ = world
    frame = enricher.enrich(flow_batch(tcp("198.51.100.1", 4000, "198.51.100.2", 443))).flows
    assert sides(frame, 0, "src") == sides(frame, 0, "dst") == (None,) * 8 + ("none",)
    frame.loc[0, "src_pod"] = "web-1"
    assert sides(frame, 0, "src")[:3] == (None, "web-1", None)
    assert sides(frame, 0, "dst") == (None,) * 8 + ("none",)


def test_the_enriched_frame_shares_the_columns_it_keeps_but_writes_to_it_are_its_own(world):
    enricher, _ = world
    batch = flow_batch(tcp("198.51.100.1", 4000, "198.51.100.2", 443))
    enriched = enricher.enrich(batch).flows
    enriched.loc[0, "packets"] = 99
    enriched.loc[0, "protocol"] = "UDP"
    assert (batch.flows.loc[0, "packets"], batch.flows.loc[0, "protocol"]) == (1, "TCP")
    batch.flows.loc[0, "bytes"] = 7
    assert enriched.loc[0, "bytes"] == 100

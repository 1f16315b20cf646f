"""Kubernetes objects as the API sends them -> the catalog: parsing, workloads, relists, grace and purge."""

import pytest

from flowscope.enrich import catalog as catalog_module
from flowscope.enrich.catalog import Catalog
from flowscope.enrich.model import (
    Controller,
    MalformedObject,
    parse_controller,
    parse_node,
    parse_pod,
    parse_service,
)

CID = "3f" * 32


def pod_object(**overrides):
    obj = {
        "metadata": {
            "namespace": "shop",
            "name": "checkout-7d9f-x2k",
            "uid": "11111111-2222-3333-4444-555555555555",
            "labels": {"app": "checkout"},
            "ownerReferences": [
                {"kind": "ReplicaSet", "name": "checkout-7d9f", "controller": True},
                {"kind": "Other", "name": "not-the-controller"},
            ],
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "app"}]},
        "status": {
            "phase": "Running",
            "podIP": "10.203.1.5",
            "podIPs": [{"ip": "10.203.1.5"}, {"ip": "FD00:203:0::5"}],
            "startTime": "2026-03-01T10:00:00Z",
            "containerStatuses": [{"name": "app", "containerID": f"containerd://{CID}"}],
        },
    }
    for path, value in overrides.items():
        target = obj
        *parents, leaf = path.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return obj


def test_a_pod_is_read_with_canonical_addresses_containers_and_its_controller():
    pod = parse_pod(pod_object())
    assert pod.ips == ("10.203.1.5", "fd00:203::5")
    assert pod.containers == {CID: "app"}
    assert pod.sole_container == "app"
    assert pod.controller == Controller("ReplicaSet", "checkout-7d9f")
    assert pod.node == "node-a" and not pod.host_network and not pod.terminated
    assert pod.start_time == 1772359200.0


def test_container_ids_of_every_runtime_lose_their_scheme():
    statuses = [
        {"name": "a", "containerID": "cri-o://" + "a" * 64},
        {"name": "b", "containerID": "docker://" + "b" * 64},
        {"name": "c", "containerID": ""},  # not started yet
    ]
    pod = parse_pod(pod_object(**{"status.containerStatuses": statuses}))
    assert pod.containers == {"a" * 64: "a", "b" * 64: "b"}


def test_a_native_sidecar_makes_the_container_of_netns_traffic_unknown():
    spec = {"containers": [{"name": "app"}], "initContainers": [{"name": "init"}, {"name": "proxy",
            "restartPolicy": "Always"}]}  # fmt: skip
    assert parse_pod(pod_object(spec=spec)).sole_container is None
    spec = {"containers": [{"name": "app"}], "initContainers": [{"name": "init"}]}
    assert parse_pod(pod_object(spec=spec)).sole_container == "app"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("metadata.uid", None, "metadata.uid is missing or not a string"),
        ("metadata.labels", ["app"], "metadata.labels is not an object"),
        ("metadata.labels", {"app": 3}, "metadata.labels must map strings to strings"),
        ("status.podIP", "10.0.0.300", "status.podIP '10.0.0.300' is not an IP address"),
        ("status.startTime", "yesterday", "status.startTime 'yesterday' is not an RFC 3339 time"),
        ("spec.hostNetwork", "yes", "spec.hostNetwork is not a boolean"),
        ("status.containerStatuses", {"app": 1}, "status.containerStatuses is not a list"),
        (
            "metadata.ownerReferences",
            [{"kind": "ReplicaSet", "controller": True}],
            "ownerReferences.name is missing or not a string",
        ),
    ],
)
def test_malformed_pods_say_which_field(path, value, message):
    with pytest.raises(MalformedObject) as raised:
        parse_pod(pod_object(**{path: value}))
    assert str(raised.value) == message


def test_services_nodes_and_controllers():
    service = parse_service(
        {"metadata": {"namespace": "shop", "name": "payments"},
         "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:96::14"], "externalIPs": ["192.0.2.4"]},
         "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}, {"hostname": "lb.example"}]}}}
    )  # fmt: skip
    assert service.ips == ("10.96.0.20", "fd00:96::14", "192.0.2.4", "203.0.113.9")
    headless = parse_service({"metadata": {"namespace": "shop", "name": "db"}, "spec": {"clusterIP": "None"}})
    assert headless.ips == ()
    node = parse_node(
        {"metadata": {"name": "node-a"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "192.168.1.10"}, {"type": "Hostname", "address": "node-a"}]}}
    )  # fmt: skip
    assert node.ips == ("192.168.1.10",)
    replica_set = parse_controller(
        {"metadata": {"namespace": "shop", "name": "checkout-7d9f",
                      "ownerReferences": [{"kind": "Deployment", "name": "checkout", "controller": True}]}}
    )  # fmt: skip
    assert replica_set.controller == Controller("Deployment", "checkout")


def test_workloads_follow_replicasets_and_jobs_to_their_controllers():
    catalog = Catalog("kubernetes", grace=60)
    pod = parse_pod(pod_object())
    catalog.put("pods", pod, listed=True)
    # The ReplicaSet is not known yet: the pod's own controller is the best fact there is.
    assert catalog.workload(pod) == Controller("ReplicaSet", "checkout-7d9f")
    deployment = [{"kind": "Deployment", "name": "checkout", "controller": True}]
    replica_set = {"metadata": {"namespace": "shop", "name": "checkout-7d9f", "ownerReferences": deployment}}
    catalog.put("replicasets", parse_controller(replica_set))
    assert catalog.workload(pod) == Controller("Deployment", "checkout")
    bare = parse_pod(pod_object(**{"metadata.ownerReferences": []}))
    assert catalog.workload(bare) == Controller("Pod", "checkout-7d9f-x2k")
    mirror = parse_pod(pod_object(**{"metadata.ownerReferences": [{"kind": "Node", "name": "node-a",
                                                                     "controller": True}]}))  # fmt: skip
    assert catalog.workload(mirror) == Controller("Pod", "checkout-7d9f-x2k")


def test_a_relist_deletes_what_it_lacks_and_the_grace_keeps_it_readable_until_purge():
    catalog = Catalog("kubernetes", grace=60)
    first = parse_pod(pod_object())
    second = parse_pod(
        pod_object(
            **{"metadata.uid": "22222222-2222-3333-4444-555555555555", "metadata.name": "other",
               "status.podIP": "10.203.1.6", "status.podIPs": [],
               "status.containerStatuses": [{"name": "app", "containerID": "containerd://" + "4a" * 32}]}
        )
    )  # fmt: skip
    catalog.replace("pods", [first, second], now=100)
    catalog.replace("pods", [second], now=200)
    assert catalog.deleted_at == {("pods", first.uid): 200}
    assert catalog.pod(first.uid) is first
    assert catalog.pod_of_container(CID) is first
    assert catalog.ips.claims("10.203.1.5")[0].end == 200
    assert catalog.purge(now=259) == 0
    assert catalog.purge(now=261) == 1
    assert catalog.pod(first.uid) is None and catalog.pod_of_container(CID) is None
    assert catalog.counts()["pods"] == 1


def test_a_pod_that_completes_gives_its_address_back_but_keeps_its_name():
    catalog = Catalog("kubernetes", grace=60)
    running = parse_pod(pod_object())
    catalog.put("pods", running, now=100)
    catalog.put("pods", parse_pod(pod_object(**{"status.phase": "Succeeded"})), now=150)
    claims = {c.owner: (c.end, c.until) for c in catalog.ips.claims("10.203.1.5")}
    assert claims == {("pod", running.uid): (150, 210)}
    assert catalog.pod(running.uid).terminated


def test_a_static_pod_is_found_by_the_uid_its_cgroup_carries():
    catalog = Catalog("kubernetes", grace=60)
    mirror = parse_pod(pod_object(**{"metadata.annotations": {"kubernetes.io/config.hash": "c" * 32}}))
    catalog.put("pods", mirror)
    assert catalog.pod("c" * 32) is mirror


def test_the_change_log_names_the_owners_whose_identity_may_have_changed():
    catalog = Catalog("kubernetes", grace=60)
    pod = parse_pod(pod_object())
    catalog.put("pods", pod, now=100)
    start = catalog.version
    catalog.put("pods", parse_pod(pod_object()), now=110)  # a status update flowscope does not read
    catalog.remove("pods", pod.uid, now=120)  # still readable during the grace: same identity
    assert catalog.changes_since(start) == []
    catalog.put("pods", parse_pod(pod_object(**{"metadata.labels": {"app": "checkout", "v": "2"}})), now=130)
    deployment = [{"kind": "Deployment", "name": "checkout", "controller": True}]
    replica_set = {"metadata": {"namespace": "shop", "name": "checkout-7d9f", "ownerReferences": deployment}}
    catalog.put("replicasets", parse_controller(replica_set), now=130)  # names the workload of its pods
    catalog.put("services", parse_service({"metadata": {"namespace": "shop", "name": "web"}}), now=130)
    catalog.put("nodes", parse_node({"metadata": {"name": "node-a"}}), now=130)
    catalog.remove("services", ("shop", "web"), now=130)
    catalog.purge(now=200)  # the service's grace is over: it names nobody any more
    assert catalog.changes_since(start) == [
        ("pod", pod.uid), ("pod", pod.uid), ("service", "shop", "web"), ("node", "node-a"), ("service", "shop", "web")
    ]  # fmt: skip
    assert catalog.changes_since(catalog.version) == []


def test_a_reader_the_change_log_left_behind_is_told_to_start_over(monkeypatch):
    monkeypatch.setattr(catalog_module, "CHANGE_LOG", 4)
    catalog = Catalog("kubernetes", grace=60)
    for index in range(6):
        catalog.put("nodes", parse_node({"metadata": {"name": f"node-{index}"}}), now=100)
    assert catalog.version == 6
    assert catalog.changes_since(0) is None
    assert catalog.changes_since(4) == [("node", "node-4"), ("node", "node-5")]

"""The static metadata file: YAML and JSON, what it names, and one-sentence errors that say where."""

import json

import pytest

from flowscope.enrich import IdentityConfigError, build_enricher
from flowscope.enrich.catalog import Catalog
from flowscope.enrich.model import Controller, NodeMeta, ServiceMeta
from flowscope.enrich.static import load_metadata
from tests.settings import identity_settings

DOCUMENT = """
pods:
  - namespace: shop
    name: checkout-7d9f
    uid: 6f1c0a52-0000-4000-8000-000000000001
    ips: [10.203.1.5, "FD00:203::5"]
    labels: {app: checkout}
    workload: checkout
    node: node-a
    containers: [{name: app, id: 3f2a}]
  - namespace: vms
    name: billing-vm
    ips: 192.0.2.14
    workload: billing
    workload_kind: VirtualMachine
  - namespace: external
    name: partner-api
    ips: [198.51.100.0/24]
  - namespace: kube-system
    name: etcd-node-a
    hostNetwork: true
    ips: [192.168.1.10]
    node: node-a
services:
  - {namespace: shop, name: payments, ips: [10.96.0.20], labels: {app: payments}}
nodes:
  - {name: node-a, ips: [192.168.1.10], labels: {zone: a}}
"""


def test_a_yaml_file_names_pods_vms_networks_services_and_nodes(tmp_path):
    path = tmp_path / "metadata.yaml"
    path.write_text(DOCUMENT)
    catalog = Catalog("static", grace=60)
    load_metadata(str(path), catalog)
    pod = catalog.pod("6f1c0a52-0000-4000-8000-000000000001")
    assert (pod.namespace, pod.name, pod.ips, pod.labels) == ("shop", "checkout-7d9f", ("10.203.1.5", "fd00:203::5"),
                                                              {"app": "checkout"})  # fmt: skip
    assert catalog.workload(pod) == Controller("Deployment", "checkout")
    assert pod.containers == {"3f2a": "app"} and pod.sole_container == "app"
    vm = catalog.pod("static:vms/billing-vm")
    assert vm.ips == ("192.0.2.14",) and catalog.workload(vm) == Controller("VirtualMachine", "billing")
    assert catalog.ips.network_owner("198.51.100.77") == ("pod", "static:external/partner-api")
    assert catalog.service("shop", "payments").ips == ("10.96.0.20",)
    assert catalog.node("node-a").labels == {"zone": "a"}
    counts = catalog.counts()
    assert (counts["pods"], counts["services"], counts["nodes"], counts["networks"]) == (4, 1, 1, 1)


def test_json_works_too(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text(
        json.dumps(
            {
                "pods": [{"namespace": "a", "name": "web", "uid": "u-1", "ips": ["10.0.0.7"], "node": "n1"}],
                "services": [{"namespace": "a", "name": "b", "ips": ["10.96.0.1"], "labels": {"app": "web"}}],
                "nodes": [{"name": "n1", "ips": ["192.168.1.1"], "labels": {"zone": "x"}}],
            }
        )
    )
    catalog = Catalog("static", grace=60)
    load_metadata(str(path), catalog)
    pod = catalog.pod("u-1")
    assert (pod.namespace, pod.name, pod.ips, pod.node, pod.labels) == ("a", "web", ("10.0.0.7",), "n1", {})
    assert catalog.service("a", "b") == ServiceMeta("a", "b", {"app": "web"}, ("10.96.0.1",))
    assert catalog.node("n1") == NodeMeta("n1", {"zone": "x"}, ("192.168.1.1",))
    counts = catalog.counts()
    assert (counts["pods"], counts["services"], counts["nodes"]) == (1, 1, 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("pods: [unclosed", "metadata file {path} is not valid YAML at line 1."),
        ("- just a list", "{path}: the top level must be a mapping with pods, services and nodes lists."),
        ("pod: []", "{path}: unknown section 'pod' (the sections are pods, services and nodes)."),
        ("pods: {a: 1}", "{path}: pods must be a list."),
        ("pods: [{namespace: shop}]", "{path}: pods[0]: name is missing or not a string."),
        ("pods: [{namespace: a, name: b, lables: {}}]", "{path}: pods[0]: unknown field 'lables'."),
        ("pods: [{namespace: a, name: b, ips: [10.0.0.300]}]", "{path}: pods[0]: ips entry '10.0.0.300' is not an IP "
                                                               "address."),
        ("pods: [{namespace: a, name: b, hostNetwork: yes-please}]", "{path}: pods[0]: hostNetwork must be true or "
                                                                     "false."),
        ("services: [{namespace: a, name: b, ips: [10.0.0.0/8]}]", "{path}: services[0]: a service's ips must be "
                                                                   "addresses, not networks."),
        ("nodes: [{name: n, labels: {zone: 1}}]", "{path}: nodes[0]: labels must map strings to strings."),
    ],
)  # fmt: skip
def test_mistakes_are_one_sentence_naming_the_entry(tmp_path, content, message):
    path = tmp_path / "metadata.yaml"
    path.write_text(content)
    with pytest.raises(IdentityConfigError) as raised:
        load_metadata(str(path), Catalog("static", grace=60))
    assert str(raised.value) == message.format(path=path)


def test_an_unreadable_file_is_one_sentence(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(IdentityConfigError) as raised:
        load_metadata(str(path), Catalog("static", grace=60))
    assert str(raised.value) == f"cannot read metadata file {path}: No such file or directory."
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"pods": [}')
    with pytest.raises(IdentityConfigError) as raised:
        load_metadata(str(bad_json), Catalog("static", grace=60))
    assert str(raised.value) == f"metadata file {bad_json} is not valid JSON at line 1."


def test_build_enricher_reports_a_bad_metadata_file_and_accepts_a_good_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [{ips: [1.2.3.4]}]")
    with pytest.raises(IdentityConfigError, match=r"nodes\[0\]: name is missing"):
        build_enricher(identity_settings("--metadata", str(bad)))
    good = tmp_path / "good.yaml"
    good.write_text(DOCUMENT)
    enricher = build_enricher(
        identity_settings("--metadata", str(good), "--node-name", "node-a", "--identity-grace", "5")
    )
    try:
        health = enricher.health()
        assert health["node_name"] == "node-a" and health["grace_seconds"] == 5
        assert health["sources"]["static"] == {"state": "loaded", "file": str(good), "objects": {
            "pods": 4, "services": 1, "nodes": 1, "replicasets": 0, "jobs": 0, "deleted_in_grace": 0,
            "ip_addresses": 5, "networks": 1, "containers": 1}}  # fmt: skip
        assert sorted(health["sources"]) == ["node", "static"]  # no kubeconfig: no Kubernetes source
    finally:
        enricher.close()

"""The Kubernetes identity source, driven through the real `kubernetes` client against a local server that
speaks the list/watch protocol (test_k8s_apiserver.FakeApiServer): workloads, services, nodes, IP reuse,
deletion grace, bookmarks, 410 Gone, an unreachable API and malformed objects."""

from __future__ import annotations

import logging
import time

import pandas as pd
import pytest
from test_k8s_apiserver import FakeApiServer, controller, node, pod, service

from flowscope.config import IdentityConfig
from flowscope.enrich import IdentityConfigError, build_enricher, kube
from flowscope.enrich.catalog import Catalog
from flowscope.enrich.enricher import Enricher
from flowscope.enrich.kube import KubernetesSource
from flowscope.schema import FlowBatch, events_frame, flows_frame
from tests.settings import identity_settings
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def batch(pairs: list[tuple[str, str]], at: float | tuple[float, float] | None = None) -> FlowBatch:
    """One flow per (src_ip, dst_ip), TCP, seen on eth0 egress during [start, end] (epoch seconds)."""
    start, end = (at, at) if not isinstance(at, tuple) else at
    if at is None:
        start = end = time.time()
    times = {"time_start": pd.Timestamp(start, unit="s", tz="UTC"), "time_end": pd.Timestamp(end, unit="s", tz="UTC")}
    flows = flows_frame(
        pd.DataFrame(
            [
                {**times, "ifname": "eth0", "ifindex": 2, "direction": "egress", "protocol": "TCP", "src_ip": src,
                 "src_port": 40000 + i, "dst_ip": dst, "dst_port": 8080, "packets": 1, "bytes": 60}
                for i, (src, dst) in enumerate(pairs)
            ]
        )
    )  # fmt: skip
    return FlowBatch(times["time_start"], times["time_end"], flows, events_frame(pd.DataFrame()))


def side(enriched: FlowBatch, row: int, which: str) -> dict[str, object]:
    names = ("namespace", "pod", "workload", "workload_kind", "container", "node", "labels", "identity_source")
    values = {name: enriched.flows.loc[row, f"{which}_{name}"] for name in names}
    return {k: (None if not isinstance(v, dict) and pd.isna(v) else v) for k, v in values.items()}


@pytest.fixture
def api():
    server = FakeApiServer().start()
    yield server
    server.stop()


@pytest.fixture
def source_factory(api, tmp_path):
    made: list[KubernetesSource] = []

    def make(grace: float = 60.0, watch_seconds: tuple[int, int] = (30, 30)) -> tuple[Enricher, KubernetesSource]:
        catalog = Catalog("kubernetes", grace)
        source = KubernetesSource(catalog, str(api.write_kubeconfig(tmp_path / "kubeconfig")),
                                  watch_seconds=watch_seconds)  # fmt: skip
        made.append(source)
        source.start()
        return Enricher("node-a", [catalog], None, {"kubernetes": source}, grace), source

    yield make
    for source in made:
        source.close()


def shop(api: FakeApiServer) -> None:
    """A small cluster: Deployment, StatefulSet, DaemonSet, CronJob and bare pods, a service, two nodes."""
    api.add("nodes", node("node-a", "192.168.50.1", {"topology.kubernetes.io/zone": "a"}))
    api.add("nodes", node("node-b", "192.168.50.2"))
    api.add("replicasets", controller("shop", "checkout-7d9f", owner=("Deployment", "checkout")))
    api.add("jobs", controller("ops", "report-28101", owner=("CronJob", "report")))
    api.add("pods", pod("shop", "checkout-7d9f-x2k", "10.203.1.5", labels={"app": "checkout"},
                        owner=("ReplicaSet", "checkout-7d9f")))  # fmt: skip
    api.add("pods", pod("shop", "payments-0", "10.203.1.6", node="node-b", owner=("StatefulSet", "payments")))
    api.add("pods", pod("kube-system", "proxy-abcde", "10.203.1.7", owner=("DaemonSet", "proxy")))
    api.add("pods", pod("ops", "report-28101-q8", "10.203.1.8", owner=("Job", "report-28101")))
    api.add("pods", pod("default", "debug", "10.203.1.9"))
    api.add("services", service("shop", "payments", "10.96.0.20", {"app": "payments"}))


def test_workloads_services_and_nodes_are_named_from_the_api(api, source_factory):
    shop(api)
    enricher, source = source_factory()
    assert source.wait_synced(10)
    enriched = enricher.enrich(
        batch([("10.203.1.5", "10.96.0.20"), ("10.203.1.6", "192.168.50.2"), ("10.203.1.7", "10.203.1.8"),
               ("10.203.1.9", "198.51.100.1")])
    )  # fmt: skip
    assert side(enriched, 0, "src") == {
        "namespace": "shop", "pod": "checkout-7d9f-x2k", "workload": "checkout", "workload_kind": "Deployment",
        "container": "app", "node": "node-a", "labels": {"app": "checkout"}, "identity_source": "ip",
    }  # fmt: skip
    assert side(enriched, 0, "dst") == {
        "namespace": "shop", "pod": None, "workload": "payments", "workload_kind": "Service", "container": None,
        "node": None, "labels": {"app": "payments"}, "identity_source": "ip",
    }  # fmt: skip
    assert (side(enriched, 1, "src")["workload"], side(enriched, 1, "src")["workload_kind"]) == (
        "payments", "StatefulSet")  # fmt: skip
    assert side(enriched, 1, "dst") == {
        "namespace": None, "pod": None, "workload": None, "workload_kind": None, "container": None,
        "node": "node-b", "labels": {}, "identity_source": "ip",
    }  # fmt: skip
    assert (side(enriched, 2, "src")["workload"], side(enriched, 2, "src")["workload_kind"]) == ("proxy", "DaemonSet")
    assert (side(enriched, 2, "dst")["workload"], side(enriched, 2, "dst")["workload_kind"]) == ("report", "CronJob")
    assert (side(enriched, 3, "src")["workload"], side(enriched, 3, "src")["workload_kind"]) == ("debug", "Pod")
    assert side(enriched, 3, "dst")["identity_source"] == "none"
    health = enricher.health()
    assert health["misses"] == {"ip_unknown": 1}
    assert health["resolved"] == {"ip": 7}
    k8s = health["sources"]["kubernetes"]
    assert k8s["state"] == "synced"
    assert k8s["objects"]["pods"] == 5 and k8s["objects"]["services"] == 1 and k8s["objects"]["nodes"] == 2
    assert k8s["skipped_objects"] == 0


def test_watch_events_keep_the_catalog_current_and_deleted_pods_keep_their_name_for_the_grace(api, source_factory):
    api.add("pods", pod("shop", "early", "10.203.2.1"))
    enricher, source = source_factory(grace=1.0)
    assert source.wait_synced(10)
    late = api.add("pods", pod("shop", "late", "10.203.2.2"))
    wait_for(lambda: enricher.catalogs[0].pod(late["metadata"]["uid"]) is not None)
    before_delete = time.time()
    api.delete("pods", late)
    wait_for(lambda: enricher.catalogs[0].deleted_at)
    deleted_at = next(iter(enricher.catalogs[0].deleted_at.values()))
    named = [side(enricher.enrich(batch([("10.203.2.1", "10.203.2.2")], at=t)), 0, "dst")["pod"]
             for t in (before_delete, deleted_at + 0.5, deleted_at + 1.5)]  # fmt: skip
    # Alive, then deleted but within the grace (late flows), then past it.
    assert named == ["late", "late", None]


def test_an_ip_that_moves_between_pods_is_attributed_by_time(api, source_factory):
    old = api.add("pods", pod("shop", "cart-old", "10.203.3.3", owner=("StatefulSet", "cart")))
    enricher, source = source_factory()
    assert source.wait_synced(10)
    catalog = enricher.catalogs[0]
    t_old = time.time()
    api.delete("pods", old)
    wait_for(lambda: catalog.deleted_at)
    new = api.add("pods", pod("shop", "search-new", "10.203.3.3", owner=("StatefulSet", "search")))
    wait_for(lambda: catalog.pod(new["metadata"]["uid"]) is not None)
    released = next(iter(catalog.deleted_at.values()))
    taken = next(c.start for c in catalog.ips.claims("10.203.3.3") if c.owner[1] == new["metadata"]["uid"])
    assert released < taken
    windows = {
        "while the old pod lived": (t_old, t_old),
        "after release, before the new pod (grace)": ((released + taken) / 2, (released + taken) / 2),
        "after the new pod got it": (taken + 0.01, taken + 0.02),
        "straddling the hand-over": (released - 0.01, taken + 0.01),
    }
    pods = {name: side(enricher.enrich(batch([("10.203.3.3", "10.203.9.9")], at=w)), 0, "src")["pod"]
            for name, w in windows.items()}  # fmt: skip
    assert pods == {
        "while the old pod lived": "cart-old",
        "after release, before the new pod (grace)": "cart-old",
        "after the new pod got it": "search-new",
        "straddling the hand-over": None,  # both owned it during the window: no guess
    }
    assert enricher.health()["misses"]["ip_ambiguous"] == 1


def test_hostnetwork_pods_and_completed_pods_never_take_an_ip_by_guess(api, source_factory):
    api.add("nodes", node("node-a", "192.168.50.1"))
    api.add("pods", pod("kube-system", "etcd-node-a", "192.168.50.1", host_network=True))
    api.add("pods", pod("monitoring", "node-exporter-7x", "192.168.50.1", host_network=True,
                        owner=("DaemonSet", "node-exporter")))  # fmt: skip
    api.add("pods", pod("ops", "report-done", "10.203.4.4", phase="Succeeded"))
    api.add("pods", pod("shop", "cart-live", "10.203.4.4"))
    enricher, source = source_factory()
    assert source.wait_synced(10)
    enriched = enricher.enrich(batch([("192.168.50.1", "10.203.4.4")]))
    assert side(enriched, 0, "src")["pod"] is None
    assert side(enriched, 0, "src")["node"] == "node-a"  # the node is certain, which of its pods is not
    assert side(enriched, 0, "dst")["pod"] == "cart-live"


def test_bookmarks_move_the_resource_version_the_next_watch_starts_from(api, source_factory):
    api.add("pods", pod("shop", "a", "10.203.5.1"))
    _, source = source_factory()
    assert source.wait_synced(10)
    wait_for(lambda: api.open_watches("pods") == 1)
    api.add("services", service("shop", "unrelated", "10.96.0.99"))  # moves the global version on
    api.bookmark("pods")
    wait_for(lambda: source.reflectors["pods"].bookmarks == 1)
    assert source.reflectors["pods"].resource_version == str(api.version)
    api.end_watches()
    wait_for(lambda: len(api.requests_for("pods", watch=True)) == 2)
    second = api.requests_for("pods", watch=True)[1]["query"]
    assert second["resourceVersion"] == str(api.version)
    assert second["allowWatchBookmarks"] == "true"
    assert source.reflectors["pods"].lists == 1  # a watch that ends is resumed, not re-listed


def test_410_gone_relists_and_objects_missed_meanwhile_are_deleted(api, source_factory):
    keep = api.add("pods", pod("shop", "keep", "10.203.6.1"))
    gone = api.add("pods", pod("shop", "gone", "10.203.6.2"))
    enricher, source = source_factory()
    assert source.wait_synced(10)
    catalog = enricher.catalogs[0]
    # The watch is cut while the pod is deleted, and the history is compacted before the client is back.
    api.stop()
    api.delete("pods", gone)
    api.add("pods", pod("shop", "new", "10.203.6.3"))
    api.compact("pods")
    api.start()
    reflector = source.reflectors["pods"]
    wait_for(lambda: reflector.relists_gone >= 1 and reflector.lists >= 2, timeout=20)
    assert catalog.pod(keep["metadata"]["uid"]) is not None
    assert (gone["metadata"]["uid"] and ("pods", gone["metadata"]["uid"])) in catalog.deleted_at
    names = {p.name for p in catalog.objects["pods"].values()}
    assert names == {"keep", "gone", "new"}  # "gone" stays readable for the grace period
    relists = [r for r in api.requests_for("pods", watch=False)]
    assert len(relists) >= 2 and "continue" not in relists[-1]["query"]


def test_an_open_watch_told_410_relists(api, source_factory):
    api.add("pods", pod("shop", "a", "10.203.7.1"))
    _, source = source_factory()
    assert source.wait_synced(10)
    wait_for(lambda: api.open_watches("pods") == 1)
    api.compact("pods")
    reflector = source.reflectors["pods"]
    wait_for(lambda: reflector.relists_gone == 1 and reflector.lists == 2)
    wait_for(lambda: reflector.state == "watching")
    assert reflector.errors == 0


def test_api_unreachable_flows_still_flow_misses_are_counted_and_it_recovers(api, source_factory, caplog):
    caplog.set_level(logging.DEBUG, logger=kube.__name__)
    api.stop()  # the port is known, nothing listens on it
    enricher, source = source_factory()

    def pods_retry_delays() -> list[str]:
        return [m.split("retrying in ")[1] for m in caplog.messages if m.startswith("kubernetes pods: API unreachable")]

    # Every resource has failed, and the pods' reflector has backed off twice.
    wait_for(lambda: all(r.consecutive_errors for r in source.reflectors.values()) and len(pods_retry_delays()) >= 2)
    enriched = enricher.enrich(batch([("10.203.8.1", "10.203.8.2")]))
    assert len(enriched.flows) == 1 and enriched.flows.loc[0, "packets"] == 1
    assert side(enriched, 0, "src")["identity_source"] == "none"
    health = enricher.health()
    assert health["unresolved"] == 2
    assert health["misses"] == {"ip_unknown": 2}
    k8s = health["sources"]["kubernetes"]
    assert k8s["state"] == "unreachable"
    pods = k8s["resources"]["pods"]
    assert pods["synced"] is False and pods["last_error"].startswith("API unreachable")
    # Exponential backoff from 0.5 s (each wait then shortened by a random jitter down to half), not a busy loop.
    delays = pods_retry_delays()
    assert delays == [f"{0.5 * 2**attempt:.1f}s" for attempt in range(len(delays))]
    api.add("pods", pod("shop", "back", "10.203.8.1"))
    api.start()
    assert source.wait_synced(40)
    assert side(enricher.enrich(batch([("10.203.8.1", "10.203.8.2")])), 0, "src")["pod"] == "back"


def test_enrich_does_not_wait_for_an_api_that_hangs(api, source_factory):
    api.add("pods", pod("shop", "slow", "10.203.8.5"))
    api.answering.clear()
    enricher, source = source_factory()
    wait_for(lambda: len(api.requests_for("pods", watch=False)) == 1)
    enriched = enricher.enrich(batch([("10.203.8.5", "10.203.8.6")]))  # while the list request hangs
    assert side(enriched, 0, "src")["identity_source"] == "none"
    assert source.reflectors["pods"].state == "listing"
    api.answering.set()
    assert source.wait_synced(10)
    assert side(enricher.enrich(batch([("10.203.8.5", "10.203.8.6")])), 0, "src")["pod"] == "slow"


def test_malformed_objects_are_skipped_and_counted_never_a_crash(api, source_factory):
    api.add("pods", pod("shop", "good-listed", "10.203.9.1"))
    broken = pod("shop", "no-uid", "10.203.9.2")
    del broken["metadata"]["uid"]
    api.add("pods", broken)
    enricher, source = source_factory()
    assert source.wait_synced(10)
    reflector = source.reflectors["pods"]
    assert reflector.skipped == 1 and "metadata.uid" in reflector.last_skipped
    wait_for(lambda: api.open_watches("pods") == 1)
    api.inject("pods", "this is not json")
    api.inject("pods", '{"type": "EXPLODED", "object": {}}')
    api.inject("pods", '["a", "list"]')
    bad_labels = pod("shop", "bad-labels", "10.203.9.3")
    bad_labels["metadata"]["labels"] = ["app", "x"]
    api.add("pods", bad_labels)
    bad_ip = pod("shop", "bad-ip", "10.203.9.300")
    api.add("pods", bad_ip)
    api.inject("pods", '{"type": "ADDED", "object": {"metadata": "not an object"}}')
    good = api.add("pods", pod("shop", "good-watched", "10.203.9.4"))
    wait_for(lambda: enricher.catalogs[0].pod(good["metadata"]["uid"]) is not None)
    assert reflector.skipped == 7
    assert reflector.state == "watching" and reflector.errors == 0
    assert enricher.health()["sources"]["kubernetes"]["skipped_objects"] == 7
    enriched = enricher.enrich(batch([("10.203.9.1", "10.203.9.4")]))
    assert (side(enriched, 0, "src")["pod"], side(enriched, 0, "dst")["pod"]) == ("good-listed", "good-watched")


def test_a_rejected_token_is_reported_as_an_error_not_a_crash(api, tmp_path):
    catalog = Catalog("kubernetes", 60)
    source = KubernetesSource(catalog, str(api.write_kubeconfig(tmp_path / "kubeconfig", token="wrong")))
    source.start()
    try:
        wait_for(lambda: all(r.errors >= 1 for r in source.reflectors.values()))
        health = source.health()
        assert health["state"] == "failing"
        assert health["resources"]["nodes"]["last_error"] == "HTTP 401 Unauthorized"
    finally:
        source.close()


def parse(argv: list[str]) -> IdentityConfig:
    return identity_settings(*argv)


def test_build_enricher_with_a_kubeconfig_watches_the_api(api, tmp_path):
    shop(api)
    args = parse(["--kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig")), "--node-name", "node-a"])
    enricher = build_enricher(args)
    try:
        assert enricher.sources["kubernetes"].wait_synced(10)
        assert side(enricher.enrich(batch([("10.203.1.5", "10.96.0.20")])), 0, "src")["pod"] == "checkout-7d9f-x2k"
        assert enricher.health()["sources"]["kubernetes"]["server"] == api.url
    finally:
        enricher.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read kubeconfig {path}: No such file or directory."),
        ("clusters: [unclosed", "kubeconfig {path} is not valid YAML."),
        ("apiVersion: v1\nkind: Config\n", "cannot use kubeconfig {path}: "),
    ],
)
def test_a_bad_kubeconfig_is_one_sentence(tmp_path, content, message):
    path = tmp_path / "kubeconfig"
    if content is not None:
        path.write_text(content)
    with pytest.raises(IdentityConfigError) as raised:
        build_enricher(parse(["--kubeconfig", str(path)]))
    text = str(raised.value)
    assert text.startswith(message.format(path=path)) and text.endswith(".") and "\n" not in text

"""Identity enrichment cost: how long `Enricher.enrich` takes on a FlowBatch, by batch size and key mix.

A synthetic cluster (5000 pods on 50 nodes, 500 services, ReplicaSet -> Deployment owners) fills the
Kubernetes catalog; this node has 100 pods with kubelet-style cgroups and host-side veths. Batches mix
flows between pods, to services and to outside addresses, with tc egress cgroup ids on a share of them,
and connect/accept events that fill the socket table. Printed per case: milliseconds per batch (median
of 7) and microseconds per flow, for many distinct peers and for few: the cost follows the distinct keys
(addresses, cgroups, interfaces), plus a small per-row cost for the columns.

    .venv/bin/python -m bench.enrich [--rows 10000 100000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd

from flowscope.enrich.catalog import Catalog
from flowscope.enrich.enricher import Enricher
from flowscope.enrich.model import Controller, ControllerMeta, NodeMeta, PodMeta, ServiceMeta
from flowscope.enrich.node import CgroupEntry, NodeScanner, NodeView, ProcessInfo
from flowscope.schema import FlowBatch, events_frame, flows_frame

PODS, NODES, SERVICES, LOCAL_PODS = 5000, 50, 500, 100
REPEATS = 7


def cluster(now: float) -> tuple[Catalog, NodeScanner]:
    catalog = Catalog("kubernetes", grace=60)
    for n in range(NODES):
        catalog.put("nodes", NodeMeta(f"node-{n}", {"zone": str(n % 3)}, (f"192.168.{n // 250}.{n % 250 + 1}",)),
                    listed=True)  # fmt: skip
    for d in range(PODS // 10):
        catalog.put("replicasets", ControllerMeta("shop", f"app{d}-7d9f", Controller("Deployment", f"app{d}")),
                    listed=True)  # fmt: skip
    cgroups, ifindexes, processes = {1: CgroupEntry("")}, {}, {}
    for p in range(PODS):
        uid = f"{p:08x}-0000-4000-8000-000000000000"
        container = f"{p:064x}"
        catalog.put(
            "pods",
            PodMeta(uid, "shop", f"app{p // 10}-7d9f-{p}", {"app": f"app{p // 10}"}, f"node-{p % NODES}", False,
                    (f"10.{p // 65536 + 10}.{p // 256 % 256}.{p % 256}",), controller=Controller("ReplicaSet",
                    f"app{p // 10}-7d9f"), containers={container: "app"}, sole_container="app"),
            listed=True,
        )  # fmt: skip
        if p < LOCAL_PODS:
            cgroups[1000 + p] = CgroupEntry(f"kubepods/pod{uid}/{container}", uid, container)
            processes[1000 + p] = ProcessInfo(5000 + p, "app")
            ifindexes[100 + p] = uid
    for s in range(SERVICES):
        catalog.put("services", ServiceMeta("shop", f"svc{s}", {}, (f"10.96.{s // 256}.{s % 256}",)), listed=True)
    scanner = NodeScanner(cgroup_root="/nonexistent")
    scanner.view = NodeView(cgroups, processes, {}, frozenset(), ifindexes, now)
    return catalog, scanner


def batch(rows: int, now: pd.Timestamp, rng: np.random.Generator, peers: int) -> FlowBatch:
    """Flows from this node's pods to `peers` of the cluster's pods, to services and to the outside."""
    pod_ips = np.array([f"10.{p // 65536 + 10}.{p // 256 % 256}.{p % 256}" for p in range(peers)], dtype=object)
    local = pod_ips[:LOCAL_PODS]
    services = np.array([f"10.96.{s // 256}.{s % 256}" for s in range(SERVICES)], dtype=object)
    outside = np.array([f"203.0.{i // 256}.{i % 256}" for i in range(max(peers // 5, 10))], dtype=object)
    src = rng.choice(local, rows)
    kind = rng.random(rows)
    dst = np.where(kind < 0.6, rng.choice(pod_ips, rows), np.where(kind < 0.85, rng.choice(services, rows),
                                                                   rng.choice(outside, rows)))  # fmt: skip
    egress = rng.random(rows) < 0.5
    local_index = np.array([int(ip.split(".")[3]) + 256 * int(ip.split(".")[2]) for ip in src])
    columns = {
        "time_start": now, "time_end": now, "node": "node-0", "direction": np.where(egress, "egress", "ingress"),
        "ifindex": 100 + local_index, "ifname": "veth", "protocol": "TCP", "src_ip": src,
        "src_port": rng.integers(30000, 60000, rows), "dst_ip": dst, "dst_port": 8080, "packets": 1, "bytes": 100,
        "cgroup_id": pd.array(np.where(egress, 1000 + local_index, 0), dtype="UInt64"),
    }  # fmt: skip
    flows = flows_frame(pd.DataFrame(columns).assign(cgroup_id=lambda f: f["cgroup_id"].where(f["cgroup_id"] != 0)))
    connects = flows.iloc[: rows // 20]
    events = events_frame(
        pd.DataFrame(
            {"time": now, "kind": "connect", "protocol": "TCP", "src_ip": connects["src_ip"].to_numpy(),
             "src_port": connects["src_port"].to_numpy(), "dst_ip": connects["dst_ip"].to_numpy(), "dst_port": 8080,
             "pid": 4242, "comm": "client", "cgroup_id": 1000}
        )
    )  # fmt: skip
    return FlowBatch(now, now, flows, events)


def timed(function, repeats: int = REPEATS) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    now = pd.Timestamp.now(tz="UTC")
    catalog, scanner = cluster(now.timestamp())
    rng = np.random.default_rng(7)
    print(f"cluster: {PODS} pods, {SERVICES} services, {NODES} nodes; {LOCAL_PODS} pods on this node")
    for rows in args.rows:
        for peers in (PODS, 200):
            sample = batch(rows, now, rng, peers)
            enricher = Enricher("node-0", [catalog], scanner, grace=60)
            enricher.enrich(sample)  # warm: the socket table holds this batch's connects
            seconds = timed(lambda sample=sample, enricher=enricher: enricher.enrich(sample))
            named = enricher.enrich(sample).flows
            share = (named[["src_identity_source", "dst_identity_source"]] != "none").to_numpy().mean()
            distinct = pd.concat([sample.flows["src_ip"], sample.flows["dst_ip"]]).nunique()
            print(
                f"{rows:>7} flows + {len(sample.events):>5} events, {distinct:>5} distinct addresses: "
                f"{seconds * 1000:7.1f} ms per batch, {seconds / rows * 1e6:5.2f} us per flow; "
                f"sides named {share:.0%}"
            )


if __name__ == "__main__":
    main()

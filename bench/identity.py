"""Identity: time to enrich a 100k-row FlowBatch against 10k pods (no root, no kernel), and what moves it.

The catalog is filled as the Kubernetes source fills it: API-shaped pod, ReplicaSet, service and node
objects through flowscope's own parsers (parse_pod, parse_controller, ...) into a Catalog, 10k pods of 1000
Deployments in 100 namespaces on 100 nodes. The headline batch has 100k flows with distinct 5-tuples
between those pods (60%), from pods to outside addresses (25%) and from outside to pods (15%), as the node
"node-000" would see them. enrich() is timed on a first batch (cold: every address's timeline and every
owner's identity is built) and then on fresh batches of the same traffic (steady state, as every interval
after the first); the pods each side was named as are counted and checked against what the batch was
built from. Then, each the same way (median of the steady batches, every side checked):

  rows_10k     the headline traffic in 10k-row batches (cost per row as batches shrink)
  few_peers    100k rows between only 200 of the pods (the cost follows rows, not distinct addresses)
  node_local   100k rows as node-000 sees its 100 pods talk to the cluster's pods, 500 services and the
               outside: half leave by eth0 carrying the sender's cgroup (tc egress), half are seen entering
               the host from the pod's veth (tc ingress), and connect events for 5% of them fill the socket
               table (every stage: socket table, cgroup, veth, IP)
  churn        the headline batch after 100 pods were replaced (deleted, their addresses taken by new
               pods) since the previous one: the catalog's changes are rebuilt before the batch is named
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from bench import lab

NODE = "node-000"
PODS, PER_DEPLOYMENT, NAMESPACES, NODES, SERVICES = 10_000, 10, 100, 100, 500
STEADY = 5  # steady-state batches per case
CHURN = 100  # pods replaced before each batch of the churn case


def pod_ip(index: np.ndarray) -> np.ndarray:
    return np.array([f"10.244.{i // 250}.{i % 250 + 1}" for i in index.tolist()], dtype=object)


def service_ip(index: np.ndarray) -> np.ndarray:
    return np.array([f"10.96.{i // 250}.{i % 250 + 1}" for i in index.tolist()], dtype=object)


def pod_uid(index: int, generation: int = 0) -> str:
    return f"{index:08d}-{generation:04d}-4000-8000-000000000000"


def pod_object(index: int, generation: int = 0, start: str = "2026-01-01T00:00:00Z") -> dict:
    deployment = index // PER_DEPLOYMENT
    app, namespace = f"app-{deployment:04d}", f"ns-{deployment % NAMESPACES:03d}"
    return {
        "metadata": {
            "namespace": namespace,
            "name": f"{app}-5d8f7c-{index:05d}-{generation}",
            "uid": pod_uid(index, generation),
            "labels": {"app": app, "tier": "backend"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": f"{app}-5d8f7c", "controller": True}],
        },
        "spec": {"nodeName": f"node-{index % NODES:03d}", "containers": [{"name": "main"}]},
        "status": {
            "phase": "Running",
            "podIP": pod_ip(np.array([index]))[0],
            "startTime": start,
            "containerStatuses": [{"name": "main", "containerID": f"containerd://{index:060x}{generation:04x}"}],
        },
    }


def cluster(services: int = 0):
    """A catalog of the PODS pods (with their ReplicaSets), and `services` services and the nodes if asked."""
    from flowscope.enrich.catalog import Catalog
    from flowscope.enrich.model import parse_controller, parse_node, parse_pod, parse_service

    catalog = Catalog("kubernetes", grace=60)
    for deployment in range(PODS // PER_DEPLOYMENT):
        app = f"app-{deployment:04d}"
        replica_set = {
            "metadata": {
                "namespace": f"ns-{deployment % NAMESPACES:03d}",
                "name": f"{app}-5d8f7c",
                "ownerReferences": [{"kind": "Deployment", "name": app, "controller": True}],
            }
        }
        catalog.put("replicasets", parse_controller(replica_set), listed=True)
    for index in range(PODS):
        catalog.put("pods", parse_pod(pod_object(index)), listed=True)
    if services:
        for index, ip in enumerate(service_ip(np.arange(services)).tolist()):
            service = {"metadata": {"namespace": f"ns-{index % NAMESPACES:03d}", "name": f"svc-{index:04d}"},
                       "spec": {"clusterIP": ip}}  # fmt: skip
            catalog.put("services", parse_service(service), listed=True)
        for index in range(NODES):
            address = {"type": "InternalIP", "address": f"192.168.0.{index + 1}"}
            node = {"metadata": {"name": f"node-{index:03d}", "labels": {"zone": f"z{index % 3}"}},
                    "status": {"addresses": [address]}}  # fmt: skip
            catalog.put("nodes", parse_node(node), listed=True)
    return catalog


def flows(columns: dict):
    from flowscope.schema import flows_frame

    return flows_frame(pd.DataFrame(columns))


def cluster_batch(rows: int, seed: int, peers: int = PODS, at: float | None = None):
    """Flows between pods (60%), pod to outside (25%), outside to pod (15%) during the second before `at`;
    with the number of sides that must be named."""
    from flowscope.schema import EVENT_COLUMNS, FlowBatch, empty_frame

    rng = np.random.default_rng(seed)
    now = pd.Timestamp.now(tz="UTC") if at is None else pd.Timestamp(at, unit="s", tz="UTC")
    kind = rng.choice(3, rows, p=[0.60, 0.25, 0.15])  # pod->pod, pod->outside, outside->pod
    outside = np.array([f"203.0.113.{i}" for i in range(1, 255)], dtype=object)[rng.integers(0, 254, rows)]
    src_ip = np.where(kind == 2, outside, pod_ip(rng.integers(0, peers, rows)))
    dst_ip = np.where(kind == 1, outside, pod_ip(rng.integers(0, peers, rows)))
    frame = flows(
        {
            "time_start": now - pd.Timedelta(seconds=1),
            "time_end": now,
            "node": NODE,
            "ifname": "eth0",
            "ifindex": 2,
            "direction": np.where(np.arange(rows) % 2 == 0, "egress", "ingress"),
            "ip_version": 4,
            "protocol": "TCP",
            "src_ip": src_ip,
            "src_port": 1024 + np.arange(rows) % 60000,
            "dst_ip": dst_ip,
            "dst_port": rng.choice([80, 443, 5432, 6379, 8080], rows),
            "packets": rng.integers(1, 100, rows),
            "bytes": rng.integers(100, 100_000, rows),
        }
    )
    batch = FlowBatch(now - pd.Timedelta(seconds=1), now, frame, empty_frame(EVENT_COLUMNS))
    return batch, {"src": int((kind != 2).sum()), "dst": int((kind != 1).sum())}


def local_node():
    """node-000's view of its own pods (every 100th): kubelet cgroups, one process each, host-side veths."""
    from flowscope.enrich.node import CgroupEntry, NodeScanner, NodeView, ProcessInfo

    local = np.arange(0, PODS, NODES)  # the pods scheduled on node-000
    cgroups = {1: CgroupEntry("")}
    processes, veths = {}, {}
    for position, index in enumerate(local.tolist()):
        uid, container = pod_uid(index), f"{index:060x}0000"
        cgroups[1000 + position] = CgroupEntry(f"kubepods/pod{uid}/{container}", uid, container)
        processes[1000 + position] = ProcessInfo(5000 + position, "app")
        veths[100 + position] = uid
    scanner = NodeScanner(cgroup_root="/nonexistent")
    scanner.view = NodeView(cgroups, processes, {}, frozenset(), veths, time.time())
    return scanner, local


def local_batch(rows: int, seed: int, local: np.ndarray):
    """node-000's pods to cluster pods (60%), services (25%) and outside (15%): half seen leaving by eth0
    with the sender's cgroup, half seen entering the host from the pod's veth; connect events for 5%."""
    from flowscope.schema import FlowBatch, events_frame

    rng = np.random.default_rng(seed)
    now = pd.Timestamp.now(tz="UTC")
    position = rng.integers(0, len(local), rows)
    kind = rng.choice(3, rows, p=[0.60, 0.25, 0.15])
    outside = np.array([f"203.0.113.{i}" for i in range(1, 255)], dtype=object)[rng.integers(0, 254, rows)]
    dst_ip = np.where(kind == 0, pod_ip(rng.integers(0, PODS, rows)),
                      np.where(kind == 1, service_ip(rng.integers(0, SERVICES, rows)), outside))  # fmt: skip
    egress = np.arange(rows) % 2 == 0
    frame = flows(
        {
            "time_start": now - pd.Timedelta(seconds=1),
            "time_end": now,
            "node": NODE,
            "ifname": np.where(egress, "eth0", "veth"),
            "ifindex": np.where(egress, 2, 100 + position),
            "direction": np.where(egress, "egress", "ingress"),
            "protocol": "TCP",
            "src_ip": pod_ip(local[position]),
            "src_port": 1024 + np.arange(rows) % 60000,
            "dst_ip": dst_ip,
            "dst_port": 8080,
            "packets": 1,
            "bytes": 100,
            "cgroup_id": pd.array(np.where(egress, 1000 + position, 0), dtype="UInt64"),
        }
    ).assign(cgroup_id=lambda frame: frame["cgroup_id"].where(frame["cgroup_id"] != 0))
    connects = frame.iloc[: rows // 20]
    events = events_frame(
        pd.DataFrame(
            {"time": now, "kind": "connect", "protocol": "TCP", "src_ip": connects["src_ip"].to_numpy(),
             "src_port": connects["src_port"].to_numpy(), "dst_ip": connects["dst_ip"].to_numpy(),
             "dst_port": 8080, "pid": 4242, "comm": "client", "cgroup_id": 1000}
        )
    )  # fmt: skip
    return FlowBatch(now - pd.Timedelta(seconds=1), now, frame, events), {"src": rows, "dst": int((kind != 2).sum())}


def named(enriched, expected: dict[str, int]) -> bool:
    frame = enriched.flows
    return all(int((frame[f"{side}_identity_source"] != "none").sum()) == count for side, count in expected.items())


def timed(enricher, batches: list, before: Callable[[int], None] | None = None) -> dict:
    """Enriches each (batch, expected) in turn: wall and thread CPU ms of each, and whether every side was
    named as the batch was built; `before(i)` runs untimed before batch i."""
    wall, cpu, checks = [], [], []
    for number, (batch, expected) in enumerate(batches):
        if before is not None:
            before(number)
        began, cpu_began = time.perf_counter(), time.thread_time()
        enriched = enricher.enrich(batch)
        wall.append((time.perf_counter() - began) * 1e3)
        cpu.append((time.thread_time() - cpu_began) * 1e3)
        checks.append(named(enriched, expected))
    return {"wall": wall, "cpu": cpu, "named": all(checks)}


def case(name: str, rows: int, runs: dict, distinct: int) -> dict:
    steady = lab.median(runs["wall"][1:])
    result = {
        "name": name,
        "rows": rows,
        "distinct_addresses": distinct,
        "median_ms": round(steady, 1),
        "median_cpu_ms": round(lab.median(runs["cpu"][1:]), 1),
        "us_per_row": round(steady * 1e3 / rows, 2),
        "every_side_named_as_built": runs["named"],
    }
    lab.log(f"identity {name}: {rows:,} rows, {distinct:,} distinct addresses: median {result['median_ms']} ms")
    return result


def distinct_addresses(batch) -> int:
    return int(pd.concat([batch.flows["src_ip"], batch.flows["dst_ip"]]).nunique())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=STEADY)
    args = parser.parse_args()
    from flowscope.enrich.enricher import Enricher

    started = time.monotonic()
    catalog = cluster()
    catalog_s = time.monotonic() - started
    enricher = Enricher(NODE, [catalog], node=None, grace=60)
    headline = timed(enricher, [cluster_batch(args.rows, seed) for seed in range(args.repeats + 1)])
    profile = cProfile.Profile()
    profile.runcall(enricher.enrich, cluster_batch(args.rows, seed=args.repeats + 1)[0])
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(40)

    cases = []
    small = [cluster_batch(args.rows // 10, seed) for seed in range(args.repeats + 1)]
    runs = timed(Enricher(NODE, [catalog], node=None, grace=60), small)
    cases.append(case("rows_10k", args.rows // 10, runs, distinct_addresses(small[0][0])))
    few = [cluster_batch(args.rows, seed, peers=200) for seed in range(args.repeats + 1)]
    runs = timed(Enricher(NODE, [catalog], node=None, grace=60), few)
    cases.append(case("few_peers", args.rows, runs, distinct_addresses(few[0][0])))
    scanner, local = local_node()
    busy = [local_batch(args.rows, seed, local) for seed in range(args.repeats + 1)]
    runs = timed(Enricher(NODE, [cluster(services=SERVICES)], node=scanner, grace=60), busy)
    cases.append(case("node_local", args.rows, runs, distinct_addresses(busy[0][0])))
    cases.append(churn_case(args.rows, args.repeats))

    result = {
        "profile_top": [line for line in text.getvalue().splitlines() if "flowscope/" in line or "ncalls" in line],
        "rows": args.rows,
        "pods": PODS,
        "catalog_fill_s": round(catalog_s, 2),
        "first_ms": round(headline["wall"][0], 1),
        "steady_ms": [round(t, 1) for t in headline["wall"][1:]],
        "median_steady_ms": round(lab.median(headline["wall"][1:]), 1),
        "median_steady_cpu_ms": round(lab.median(headline["cpu"][1:]), 1),
        "every_side_named_as_built": headline["named"],
        "cases": cases,
        "health": {k: v for k, v in enricher.health().items() if k in ("resolved", "unresolved", "misses")},
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    lab.log(
        f"identity: {args.rows:,} rows against {PODS:,} pods: first {result['first_ms']} ms, then median "
        f"{result['median_steady_ms']} ms; every side named as built: {result['every_side_named_as_built']}"
    )
    lab.save("identity", result)


def churn_case(rows: int, repeats: int) -> dict:
    """The headline traffic after CHURN pods were replaced (deleted, a new pod on the same address) since
    the previous batch; on a clock of its own, each batch's flows a second after the replacements."""
    from flowscope.enrich.enricher import Enricher
    from flowscope.enrich.model import parse_pod

    catalog = cluster()
    changed_at = time.time() + 10 * np.arange(1, repeats + 2)
    clock = [changed_at[0]]
    enricher = Enricher(NODE, [catalog], node=None, grace=60, clock=lambda: clock[0])
    batches = [cluster_batch(rows, seed, at=at + 2) for seed, at in enumerate(changed_at.tolist())]
    generation = np.zeros(PODS, np.int64)
    rng = np.random.default_rng(0)

    def replace_pods(number: int) -> None:
        clock[0] = changed_at[number]
        start = pd.Timestamp(clock[0], unit="s", tz="UTC").isoformat().replace("+00:00", "Z")
        for index in rng.choice(PODS, CHURN, replace=False).tolist():
            catalog.remove("pods", pod_uid(index, generation[index]), now=clock[0])
            generation[index] += 1
            catalog.put("pods", parse_pod(pod_object(index, generation[index], start)), now=clock[0])

    runs = timed(enricher, batches, replace_pods)
    return case("churn", rows, runs, distinct_addresses(batches[0][0]))


if __name__ == "__main__":
    main()

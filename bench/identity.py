"""Identity: time to enrich a 100k-row FlowBatch against 10k pods (no root, no kernel).

The catalog is filled as the Kubernetes source fills it: API-shaped pod and ReplicaSet objects through
flowscope's own parsers (parse_pod, parse_controller) into a Catalog, 10k pods of 1000 Deployments in
100 namespaces on 100 nodes. The batch has 100k flows with distinct 5-tuples between those pods (60%),
from pods to outside addresses (25%) and from outside to pods (15%), as the node "node-000" would see
them. enrich() is timed on a first batch (cold caches) and then on fresh batches of the same traffic
(steady state, as every interval after the first); the pods each side was named as are counted and
checked against what the batch was built from.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np
import pandas as pd

from bench import lab

NODE = "node-000"


def pod_ip(index: np.ndarray) -> np.ndarray:
    return np.array([f"10.244.{i // 250}.{i % 250 + 1}" for i in index.tolist()], dtype=object)


def catalog_with_pods(pods: int, per_deployment: int = 10, namespaces: int = 100, nodes: int = 100):
    from flowscope.enrich.catalog import Catalog
    from flowscope.enrich.model import parse_controller, parse_pod

    catalog = Catalog("kubernetes", grace=60)
    ips = pod_ip(np.arange(pods))
    for deployment in range(pods // per_deployment):
        namespace = f"ns-{deployment % namespaces:03d}"
        app = f"app-{deployment:04d}"
        replica_set = f"{app}-5d8f7c"
        catalog.put(
            "replicasets",
            parse_controller(
                {
                    "kind": "ReplicaSet",
                    "metadata": {
                        "namespace": namespace,
                        "name": replica_set,
                        "uid": f"rs-{deployment:08d}",
                        "ownerReferences": [{"kind": "Deployment", "name": app, "controller": True}],
                    },
                }
            ),
            listed=True,
        )
        for replica in range(per_deployment):
            index = deployment * per_deployment + replica
            pod = {
                "metadata": {
                    "namespace": namespace,
                    "name": f"{replica_set}-{replica:05d}",
                    "uid": f"{index:08d}-0000-4000-8000-000000000000",
                    "labels": {"app": app, "tier": "backend"},
                    "ownerReferences": [{"kind": "ReplicaSet", "name": replica_set, "controller": True}],
                },
                "spec": {"nodeName": f"node-{index % nodes:03d}", "containers": [{"name": "main"}]},
                "status": {
                    "phase": "Running",
                    "podIP": ips[index],
                    "startTime": "2026-01-01T00:00:00Z",
                    "containerStatuses": [{"name": "main", "containerID": f"containerd://{index:064x}"}],
                },
            }
            catalog.put("pods", parse_pod(pod), listed=True)
    return catalog, ips


def flow_batch(rows: int, pods: int, seed: int):
    from flowscope.schema import EVENT_COLUMNS, FlowBatch, empty_frame, flows_frame

    rng = np.random.default_rng(seed)
    now = pd.Timestamp.now(tz="UTC")
    kind = rng.choice(3, rows, p=[0.60, 0.25, 0.15])  # pod->pod, pod->outside, outside->pod
    src_pod = rng.integers(0, pods, rows)
    dst_pod = rng.integers(0, pods, rows)
    outside = np.array([f"203.0.113.{i}" for i in range(1, 255)], dtype=object)[rng.integers(0, 254, rows)]
    src_ip = np.where(kind == 2, outside, pod_ip(src_pod))
    dst_ip = np.where(kind == 1, outside, pod_ip(dst_pod))
    flows = flows_frame(
        pd.DataFrame(
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
    )
    batch = FlowBatch(now - pd.Timedelta(seconds=1), now, flows, empty_frame(EVENT_COLUMNS))
    expected = {"src_named": int((kind != 2).sum()), "dst_named": int((kind != 1).sum())}
    return batch, expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from flowscope.enrich.enricher import Enricher

    started = time.monotonic()
    catalog, _ips = catalog_with_pods(args.pods)
    catalog_s = time.monotonic() - started
    enricher = Enricher(NODE, [catalog], node=None, grace=60)
    timings: list[float] = []
    cpu: list[float] = []  # this thread's CPU time: without the waits for a CPU on a busy machine
    checks = []
    for repeat in range(args.repeats + 1):
        batch, expected = flow_batch(args.rows, args.pods, seed=repeat)
        began, cpu_began = time.perf_counter(), time.thread_time()
        enriched = enricher.enrich(batch)
        timings.append((time.perf_counter() - began) * 1e3)
        cpu.append((time.thread_time() - cpu_began) * 1e3)
        named = {
            "src_named": int(enriched.flows["src_pod"].notna().sum()),
            "dst_named": int(enriched.flows["dst_pod"].notna().sum()),
        }
        checks.append(named == expected)
    profile = cProfile.Profile()
    profile.runcall(enricher.enrich, flow_batch(args.rows, args.pods, seed=args.repeats + 1)[0])
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    result = {
        "profile_top": [line for line in text.getvalue().splitlines() if "flowscope/" in line or "ncalls" in line],
        "rows": args.rows,
        "pods": args.pods,
        "catalog_fill_s": round(catalog_s, 2),
        "first_ms": round(timings[0], 1),
        "steady_ms": [round(t, 1) for t in timings[1:]],
        "median_steady_ms": round(lab.median(timings[1:]), 1),
        "median_steady_cpu_ms": round(lab.median(cpu[1:]), 1),
        "every_side_named_as_built": all(checks),
        "health": {k: v for k, v in enricher.health().items() if k in ("resolved", "unresolved", "misses")},
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    lab.log(
        f"identity: {args.rows:,} rows against {args.pods:,} pods: first {result['first_ms']} ms, then median "
        f"{result['median_steady_ms']} ms; every side named as built: {result['every_side_named_as_built']}"
    )
    lab.save("identity", result)


if __name__ == "__main__":
    main()

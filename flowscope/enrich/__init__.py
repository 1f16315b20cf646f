"""Identity: every flow and event attributed to pod, workload, namespace, container, process and node.

Sources, in order of trust: the node itself (cgroup, network namespace, host-side veth; always on),
the Kubernetes API (in-cluster, or `--kubeconfig FILE`), and a static metadata file (`--metadata FILE`).

    add_identity_arguments(parser)      --kubeconfig, --metadata, --node-name, --identity-grace
    enricher = build_enricher(args)     raises IdentityConfigError (a ValueError) with one sentence
    batch = enricher.enrich(batch)      vectorised; reads caches only, never waits for the API
    enricher.health()                   sources, their state and object counts, misses (for doctor)
    enricher.close()

The `kubernetes` client is imported only when the Kubernetes source is used.
"""

from __future__ import annotations

import argparse
import math
import os
import socket

from flowscope.enrich.catalog import Catalog
from flowscope.enrich.enricher import Enricher
from flowscope.enrich.model import IdentityConfigError
from flowscope.enrich.node import NodeScanner
from flowscope.enrich.static import load_metadata

DEFAULT_GRACE = 60.0
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

__all__ = [
    "DEFAULT_GRACE",
    "Enricher",
    "IdentityConfigError",
    "add_identity_arguments",
    "build_enricher",
    "enricher_for",
    "node_name",
]


def _grace(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0 or math.isinf(value) or math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return value


def add_identity_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("identity")
    group.add_argument(
        "--kubeconfig", metavar="FILE",
        help="watch pods, services and nodes through this kubeconfig (default: in-cluster when run in a pod)",
    )  # fmt: skip
    group.add_argument(
        "--metadata", metavar="FILE",
        help="YAML or JSON naming pods, services and nodes by IP (hosts without Kubernetes, VMs, external peers)",
    )  # fmt: skip
    group.add_argument("--node-name", metavar="NAME", help="this node's name (default: $NODE_NAME, the host name)")
    group.add_argument(
        "--identity-grace", type=_grace, default=DEFAULT_GRACE, metavar="SECONDS",
        help=f"keep a deleted pod's identity this long for late flows (default {DEFAULT_GRACE:g})",
    )  # fmt: skip


def node_name(args: argparse.Namespace) -> str:
    """This node's name: --node-name, else $NODE_NAME, else the host name (flow rows and identity alike)."""
    return getattr(args, "node_name", None) or os.environ.get("NODE_NAME") or socket.gethostname()


def build_enricher(args: argparse.Namespace) -> Enricher:
    """The enricher the flags ask for, with its sources started (the API is listed in the background)."""
    grace = getattr(args, "identity_grace", DEFAULT_GRACE)
    catalogs: list[Catalog] = []
    sources = {}
    kubeconfig = getattr(args, "kubeconfig", None)
    kubernetes = None
    if kubeconfig is not None or in_cluster():
        from flowscope.enrich.kube import KubernetesSource

        catalog = Catalog("kubernetes", grace)
        kubernetes = KubernetesSource(catalog, kubeconfig)
        catalogs.append(catalog)
        sources["kubernetes"] = kubernetes
    metadata = getattr(args, "metadata", None)
    if metadata is not None:
        catalog = Catalog("static", grace)
        load_metadata(metadata, catalog)
        catalogs.append(catalog)
        sources["static"] = StaticSource(metadata, catalog)
    scanner = NodeScanner(grace=grace)
    scanner.start()
    if kubernetes is not None:
        kubernetes.start()
    return Enricher(node_name(args), catalogs, scanner, sources, grace)


def enricher_for(args: argparse.Namespace) -> Enricher | None:
    """The enricher a command's records get, or None for a replay without identity flags: a recording carries
    the identity of the node it was made on, and this machine's cgroups and interfaces would name it wrongly;
    only --kubeconfig and --metadata add to it."""
    if getattr(args, "replay", None) and args.kubeconfig is None and args.metadata is None:
        return None
    return build_enricher(args)


def in_cluster() -> bool:
    """Whether this process runs in a pod with a service account (the in-cluster configuration)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(IN_CLUSTER_TOKEN)


class StaticSource:
    """The metadata file: read once at start."""

    def __init__(self, path: str, catalog: Catalog) -> None:
        self.path = path
        self.catalog = catalog

    def health(self) -> dict[str, object]:
        return {"state": "loaded", "file": self.path, "objects": self.catalog.counts()}

    def close(self) -> None:
        return None

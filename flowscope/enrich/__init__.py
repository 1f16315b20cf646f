"""Identity: every flow and event attributed to pod, workload, namespace, container, process and node.

Sources, in order of trust: the node itself (cgroup, network namespace, host-side veth; always on),
the Kubernetes API (in-cluster, or `--kubeconfig FILE`), and a static metadata file (`--metadata FILE`).

    enricher = build_enricher(identity) identity: config.IdentityConfig (--kubeconfig, --metadata,
                                        --node-name, --identity-grace); raises IdentityConfigError (a
                                        ValueError) with one sentence
    batch = enricher.enrich(batch)      vectorised; reads caches only, never waits for the API
    enricher.health()                   sources, their state and object counts, misses (for doctor)
    enricher.close()

The `kubernetes` client is imported only when the Kubernetes source is used.
"""

from __future__ import annotations

import os
import socket

from flowscope.config import Config, IdentityConfig
from flowscope.enrich.catalog import Catalog
from flowscope.enrich.enricher import Enricher
from flowscope.enrich.model import IdentityConfigError
from flowscope.enrich.node import NodeScanner
from flowscope.enrich.static import load_metadata

IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

__all__ = [
    "Enricher",
    "IdentityConfigError",
    "build_enricher",
    "enricher_for",
    "node_name",
]


def node_name(identity: IdentityConfig) -> str:
    """This node's name: --node-name, else $NODE_NAME, else the host name (flow rows and identity alike)."""
    return identity.node_name or os.environ.get("NODE_NAME") or socket.gethostname()


def build_enricher(identity: IdentityConfig) -> Enricher:
    """The enricher the settings ask for, with its sources started (the API is listed in the background)."""
    grace = identity.grace
    catalogs: list[Catalog] = []
    sources = {}
    kubeconfig = identity.kubeconfig
    kubernetes = None
    if kubeconfig is not None or in_cluster():
        from flowscope.enrich.kube import KubernetesSource

        catalog = Catalog("kubernetes", grace)
        kubernetes = KubernetesSource(catalog, kubeconfig)
        catalogs.append(catalog)
        sources["kubernetes"] = kubernetes
    metadata = identity.metadata
    if metadata is not None:
        catalog = Catalog("static", grace)
        load_metadata(metadata, catalog)
        catalogs.append(catalog)
        sources["static"] = StaticSource(metadata, catalog)
    scanner = NodeScanner(grace=grace)
    scanner.start()
    if kubernetes is not None:
        kubernetes.start()
    return Enricher(node_name(identity), catalogs, scanner, sources, grace)


def enricher_for(config: Config) -> Enricher | None:
    """The enricher a command's records get, or None for a replay without identity settings: a recording
    carries the identity of the node it was made on, and this machine's cgroups and interfaces would name it
    wrongly; only --kubeconfig and --metadata add to it."""
    identity = config.identity
    if config.replay.file and identity.kubeconfig is None and identity.metadata is None:
        return None
    return build_enricher(identity)


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

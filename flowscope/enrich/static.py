"""The static metadata file (`--metadata FILE`): names for hosts without Kubernetes, VMs and external peers.

YAML or JSON, three optional lists:

    pods:
      - namespace: shop                 # required
        name: checkout-7d9f             # required
        uid: 6f1c...                    # names its kubelet cgroup (attribution by cgroup)
        ips: [10.1.2.3, fd00::3]        # addresses; a CIDR (192.0.2.0/24) names a whole network
        labels: {app: checkout}
        workload: checkout              # with workload_kind (default Deployment)
        workload_kind: Deployment
        node: node-1
        hostNetwork: false
        containers: [{name: app, id: 3f2a...}]   # container ids name the container (by cgroup)
    services:
      - {namespace: shop, name: payments, ips: [10.96.0.12], labels: {app: payments}}
    nodes:
      - {name: node-1, ips: [192.168.0.10], labels: {}}

Any mistake is an error naming the entry and the field: a metadata file is written by hand and read once.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any

import yaml

from flowscope.enrich.catalog import Catalog
from flowscope.enrich.model import (
    Controller,
    IdentityConfigError,
    MalformedObject,
    NodeMeta,
    PodMeta,
    ServiceMeta,
    canonical_ip,
    labels_of,
    text,
)

FIELDS = {
    "pods": {"namespace", "name", "uid", "ips", "labels", "workload", "workload_kind", "node", "hostNetwork",
             "containers"},
    "services": {"namespace", "name", "ips", "labels"},
    "nodes": {"name", "ips", "labels"},
}  # fmt: skip
DEFAULT_WORKLOAD_KIND = "Deployment"


class MetadataFileError(IdentityConfigError):
    """A metadata file that cannot be read or does not follow the format; the message says where."""


def _addresses(entry: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(addresses, networks) of an entry's `ips` (a string or a list)."""
    raw = entry.get("ips", [])
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, list):
        raise MalformedObject("ips must be a list of addresses")
    addresses, networks = [], []
    for value in values:
        if isinstance(value, str) and "/" in value:
            try:
                network = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise MalformedObject(f"ips: {value!r} is not an address or a CIDR") from None
            if network.num_addresses == 1:
                addresses.append(str(network.network_address))
            else:
                networks.append(str(network))
        else:
            addresses.append(canonical_ip(value, "ips entry"))
    return addresses, networks


def _pod(entry: Mapping[str, Any]) -> tuple[PodMeta, list[str]]:
    """The pod and the networks it names."""
    namespace, name = text(entry.get("namespace"), "namespace"), text(entry.get("name"), "name")
    ips, networks = _addresses(entry)
    containers: dict[str, str] = {}
    raw_containers = entry.get("containers", [])
    if not isinstance(raw_containers, list):
        raise MalformedObject("containers must be a list of {name, id}")
    for item in raw_containers:
        if not isinstance(item, Mapping):
            raise MalformedObject("containers must be a list of {name, id}")
        containers[text(item.get("id"), "containers[].id")] = text(item.get("name"), "containers[].name")
    workload = None
    if entry.get("workload") is not None:
        workload = Controller(
            text(entry.get("workload_kind", DEFAULT_WORKLOAD_KIND), "workload_kind"),
            text(entry["workload"], "workload"),
        )
    host_network = entry.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        raise MalformedObject("hostNetwork must be true or false")
    names = sorted(set(containers.values()))
    pod = PodMeta(
        uid=text(entry["uid"], "uid") if entry.get("uid") is not None else f"static:{namespace}/{name}",
        namespace=namespace,
        name=name,
        labels=labels_of(entry.get("labels"), "labels"),
        node=text(entry["node"], "node") if entry.get("node") is not None else None,
        host_network=host_network,
        ips=tuple(ips),
        workload=workload,
        containers=containers,
        sole_container=names[0] if len(names) == 1 else None,
    )
    return pod, networks


def _service(entry: Mapping[str, Any]) -> ServiceMeta:
    ips, networks = _addresses(entry)
    if networks:
        raise MalformedObject("a service's ips must be addresses, not networks")
    return ServiceMeta(
        text(entry.get("namespace"), "namespace"), text(entry.get("name"), "name"), labels_of(entry.get("labels")),
        tuple(ips),
    )  # fmt: skip


def _node(entry: Mapping[str, Any]) -> NodeMeta:
    ips, networks = _addresses(entry)
    if networks:
        raise MalformedObject("a node's ips must be addresses, not networks")
    return NodeMeta(text(entry.get("name"), "name"), labels_of(entry.get("labels")), tuple(ips))


def parse_metadata(document: Any, catalog: Catalog, path: str = "metadata file") -> None:
    """Fills `catalog` from a parsed metadata document; raises MetadataFileError naming the bad entry."""
    if document is None:
        document = {}
    if not isinstance(document, Mapping):
        raise MetadataFileError(f"{path}: the top level must be a mapping with pods, services and nodes lists.")
    unknown = set(document) - set(FIELDS)
    if unknown:
        raise MetadataFileError(
            f"{path}: unknown section {sorted(unknown)[0]!r} (the sections are pods, services and nodes)."
        )
    for section in ("nodes", "services", "pods"):
        entries = document.get(section) or []
        if not isinstance(entries, list):
            raise MetadataFileError(f"{path}: {section} must be a list.")
        for index, entry in enumerate(entries):
            where = f"{path}: {section}[{index}]"
            try:
                if not isinstance(entry, Mapping):
                    raise MalformedObject("must be a mapping")
                extra = set(entry) - FIELDS[section]
                if extra:
                    raise MalformedObject(f"unknown field {sorted(extra)[0]!r}")
                if section == "pods":
                    pod, networks = _pod(entry)
                    catalog.put("pods", pod, listed=True)
                    for network in networks:
                        catalog.add_network(network, ("pod", pod.uid))
                elif section == "services":
                    catalog.put("services", _service(entry), listed=True)
                else:
                    catalog.put("nodes", _node(entry), listed=True)
            except MalformedObject as err:
                raise MetadataFileError(f"{where}: {err}.") from None


def load_metadata(path: str, catalog: Catalog) -> None:
    try:
        with open(path, encoding="utf-8") as handle:
            content = handle.read()
    except OSError as err:
        raise MetadataFileError(f"cannot read metadata file {path}: {err.strerror}.") from None
    except UnicodeDecodeError:
        raise MetadataFileError(f"metadata file {path} is not UTF-8 text.") from None
    try:
        document = json.loads(content) if path.endswith(".json") else yaml.safe_load(content)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else f" at line {getattr(err, 'lineno', '?')}"
        raise MetadataFileError(f"metadata file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}"
                                f"{where}.") from None  # fmt: skip
    parse_metadata(document, catalog, path)

"""What the identity sources know about pods, services, nodes and workload controllers.

The Kubernetes source and the static metadata file both produce these records; the parsers here read
Kubernetes objects as the API sends them (JSON dicts), so a malformed object raises `MalformedObject`
with a short reason instead of failing somewhere deeper.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# Pods in these phases have given their IP back to the network plugin (it may be reused at once), even
# though status.podIP still shows it: they must not own it in the IP index.
TERMINATED_PHASES = frozenset({"Succeeded", "Failed"})
# A mirror pod (static pod) carries the UID kubelet gave it on the node, which names its cgroup.
CONFIG_HASH_ANNOTATION = "kubernetes.io/config.hash"
CONTAINER_ID_SCHEMES = ("containerd://", "cri-o://", "docker://", "crio://")


class IdentityConfigError(ValueError):
    """Identity configuration that cannot be used (metadata file, kubeconfig); the message is one sentence."""


class MalformedObject(ValueError):
    """An API object (or metadata file entry) missing a field flowscope needs, or with one of the wrong type."""


@dataclass(frozen=True)
class Controller:
    """The controlling owner of an object (metadata.ownerReferences with controller: true)."""

    kind: str
    name: str


@dataclass(frozen=True)
class PodMeta:
    uid: str
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    node: str | None = None
    host_network: bool = False
    ips: tuple[str, ...] = ()
    terminated: bool = False
    controller: Controller | None = None
    # From the static file: the workload as the user names it (wins over the controller chain).
    workload: Controller | None = None
    containers: Mapping[str, str] = field(default_factory=dict)  # container id -> container name
    ports: Mapping[str, int] = field(default_factory=dict)  # named TCP container ports: name -> port
    # The pod's only long-running container, when it has exactly one: traffic seen by netns or IP is its.
    sole_container: str | None = None
    config_hash: str | None = None
    start_time: float | None = None  # epoch seconds


@dataclass(frozen=True)
class ServiceMeta:
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeMeta:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class ControllerMeta:
    """A ReplicaSet or Job: only its own controller matters (Deployment, CronJob)."""

    namespace: str
    name: str
    controller: Controller | None


# ---- field readers ---------------------------------------------------------------------------------------


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MalformedObject(f"{what} is not an object")
    return value


def _optional_mapping(value: Any, what: str) -> Mapping[str, Any]:
    return {} if value is None else _mapping(value, what)


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedObject(f"{what} is not a list")
    return value


def text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedObject(f"{what} is missing or not a string")
    return value


def _optional_text(value: Any, what: str) -> str | None:
    return None if value is None or value == "" else text(value, what)


def labels_of(value: Any, what: str = "labels") -> dict[str, str]:
    labels = _optional_mapping(value, what)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise MalformedObject(f"{what} must map strings to strings")
    return dict(labels)


def canonical_ip(value: Any, what: str = "IP") -> str:
    """The address as flows print it (RFC 5952 for IPv6); raises MalformedObject when it is not one."""
    try:
        return str(ipaddress.ip_address(text(value, what)))
    except ValueError:
        raise MalformedObject(f"{what} {value!r} is not an IP address") from None


def _timestamp(value: Any, what: str) -> float | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(text(value, what).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise MalformedObject(f"{what} {value!r} is not an RFC 3339 time") from None


def _controller(metadata: Mapping[str, Any]) -> Controller | None:
    for index, ref in enumerate(_list(metadata.get("ownerReferences"), "metadata.ownerReferences")):
        ref = _mapping(ref, f"metadata.ownerReferences[{index}]")
        if ref.get("controller") is True:
            return Controller(
                text(ref.get("kind"), "ownerReferences.kind"), text(ref.get("name"), "ownerReferences.name")
            )
    return None


def _bool(value: Any, what: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MalformedObject(f"{what} is not a boolean")
    return value


def container_id(value: Any) -> str | None:
    """The bare id of a runtime container id such as "containerd://3f2a…" (None when not started yet)."""
    if value is None or value == "":
        return None
    raw = text(value, "containerID")
    for scheme in CONTAINER_ID_SCHEMES:
        if raw.startswith(scheme):
            return raw[len(scheme) :]
    return raw.rsplit("://", 1)[-1]


def metadata_of(obj: Any) -> Mapping[str, Any]:
    return _mapping(_mapping(obj, "object").get("metadata"), "metadata")


def resource_version(obj: Any) -> str | None:
    """metadata.resourceVersion when the object has one (also for objects that are otherwise malformed)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("metadata"), Mapping):
        value = obj["metadata"].get("resourceVersion")
        return value if isinstance(value, str) and value else None
    return None


# ---- Kubernetes objects ------------------------------------------------------------------------------------


def _long_running_containers(spec: Mapping[str, Any]) -> list[str]:
    """Containers that run for the pod's lifetime: the regular ones and sidecars (init, restartPolicy Always)."""
    names = []
    for key in ("containers", "initContainers"):
        for index, entry in enumerate(_list(spec.get(key), f"spec.{key}")):
            entry = _mapping(entry, f"spec.{key}[{index}]")
            if key == "containers" or entry.get("restartPolicy") == "Always":
                names.append(text(entry.get("name"), f"spec.{key}[{index}].name"))
    return names


def _named_ports(spec: Mapping[str, Any]) -> dict[str, int]:
    """The pod's named TCP container ports (name -> containerPort), as a Service's targetPort names them."""
    ports: dict[str, int] = {}
    for index, entry in enumerate(_list(spec.get("containers"), "spec.containers")):
        entry = _mapping(entry, f"spec.containers[{index}]")
        for number, port in enumerate(_list(entry.get("ports"), f"spec.containers[{index}].ports")):
            port = _mapping(port, f"spec.containers[{index}].ports[{number}]")
            value = port.get("containerPort")
            if port.get("name") and port.get("protocol", "TCP") == "TCP" and isinstance(value, int):
                ports.setdefault(text(port["name"], f"spec.containers[{index}].ports[{number}].name"), value)
    return ports


def parse_pod(obj: Any) -> PodMeta:
    metadata = metadata_of(obj)
    spec = _optional_mapping(obj.get("spec"), "spec")
    status = _optional_mapping(obj.get("status"), "status")
    ips: list[str] = []
    primary = status.get("podIP")
    if primary:
        ips.append(canonical_ip(primary, "status.podIP"))
    for index, entry in enumerate(_list(status.get("podIPs"), "status.podIPs")):
        address = canonical_ip(_mapping(entry, f"status.podIPs[{index}]").get("ip"), f"status.podIPs[{index}].ip")
        if address not in ips:
            ips.append(address)
    containers: dict[str, str] = {}
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for index, entry in enumerate(_list(status.get(key), f"status.{key}")):
            entry = _mapping(entry, f"status.{key}[{index}]")
            cid = container_id(entry.get("containerID"))
            if cid:
                containers[cid] = text(entry.get("name"), f"status.{key}[{index}].name")
    long_running = _long_running_containers(spec)
    annotations = _optional_mapping(metadata.get("annotations"), "metadata.annotations")
    config_hash = annotations.get(CONFIG_HASH_ANNOTATION)
    return PodMeta(
        uid=text(metadata.get("uid"), "metadata.uid"),
        namespace=text(metadata.get("namespace"), "metadata.namespace"),
        name=text(metadata.get("name"), "metadata.name"),
        labels=labels_of(metadata.get("labels"), "metadata.labels"),
        node=_optional_text(spec.get("nodeName"), "spec.nodeName"),
        host_network=_bool(spec.get("hostNetwork"), "spec.hostNetwork"),
        ips=tuple(ips),
        terminated=status.get("phase") in TERMINATED_PHASES,
        controller=_controller(metadata),
        containers=containers,
        ports=_named_ports(spec),
        sole_container=long_running[0] if len(long_running) == 1 else None,
        config_hash=config_hash if isinstance(config_hash, str) and config_hash else None,
        start_time=_timestamp(status.get("startTime"), "status.startTime"),
    )


def parse_service(obj: Any) -> ServiceMeta:
    metadata = metadata_of(obj)
    spec = _optional_mapping(obj.get("spec"), "spec")
    status = _optional_mapping(obj.get("status"), "status")
    candidates = [spec.get("clusterIP"), *_list(spec.get("clusterIPs"), "spec.clusterIPs")]
    candidates += _list(spec.get("externalIPs"), "spec.externalIPs")
    load_balancer = _optional_mapping(status.get("loadBalancer"), "status.loadBalancer")
    candidates += [
        _mapping(entry, "status.loadBalancer.ingress[]").get("ip")
        for entry in _list(load_balancer.get("ingress"), "status.loadBalancer.ingress")
    ]
    ips: list[str] = []
    for candidate in candidates:
        if candidate in (None, "", "None"):  # headless services have clusterIP "None"
            continue
        address = canonical_ip(candidate, "service IP")
        if address not in ips:
            ips.append(address)
    return ServiceMeta(
        namespace=text(metadata.get("namespace"), "metadata.namespace"),
        name=text(metadata.get("name"), "metadata.name"),
        labels=labels_of(metadata.get("labels"), "metadata.labels"),
        ips=tuple(ips),
    )


def parse_node(obj: Any) -> NodeMeta:
    metadata = metadata_of(obj)
    status = _optional_mapping(obj.get("status"), "status")
    ips: list[str] = []
    for index, entry in enumerate(_list(status.get("addresses"), "status.addresses")):
        entry = _mapping(entry, f"status.addresses[{index}]")
        if entry.get("type") in ("InternalIP", "ExternalIP"):
            address = canonical_ip(entry.get("address"), f"status.addresses[{index}].address")
            if address not in ips:
                ips.append(address)
    return NodeMeta(
        name=text(metadata.get("name"), "metadata.name"),
        labels=labels_of(metadata.get("labels"), "metadata.labels"),
        ips=tuple(ips),
    )


def parse_controller(obj: Any) -> ControllerMeta:
    metadata = metadata_of(obj)
    return ControllerMeta(
        namespace=text(metadata.get("namespace"), "metadata.namespace"),
        name=text(metadata.get("name"), "metadata.name"),
        controller=_controller(metadata),
    )

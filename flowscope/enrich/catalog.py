"""What one identity source knows (pods, services, nodes, workload controllers, IP claims), under one lock.

The Kubernetes watch threads write into a catalog; the enricher reads it, holding the lock only while it
resolves the unique keys of one batch. Deleted objects stay readable for the grace period, so late flows
are still named. Every change to what names an owner of an address (a pod, its ReplicaSet or Job, a
service, a node) is logged by owner, so the enricher rebuilds only those owners' identities.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from flowscope.enrich.ipindex import IpIndex, Owner
from flowscope.enrich.model import Controller, ControllerMeta, NodeMeta, PodMeta, ServiceMeta

KINDS = ("pods", "services", "nodes", "replicasets", "jobs")
REPLACE_SLICE = 500  # objects put per lock hold during a relist
CHANGE_LOG = 1 << 16  # owners kept in the change log; a reader further behind starts over

_KEYS: dict[str, Callable[[Any], Hashable]] = {
    "pods": lambda pod: pod.uid,
    "services": lambda service: (service.namespace, service.name),
    "nodes": lambda node: node.name,
    "replicasets": lambda controller: (controller.namespace, controller.name),
    "jobs": lambda controller: (controller.namespace, controller.name),
}
# Controllers whose own controller is the workload people name: ReplicaSet -> Deployment, Job -> CronJob.
_INTERMEDIATE = {"ReplicaSet": "replicasets", "Job": "jobs"}


def key_of(kind: str, obj: Any) -> Hashable:
    return _KEYS[kind](obj)


def _claims_of(kind: str, obj: Any) -> list[tuple[str, Owner, bool, str | None]]:
    """(ip, owner, shared, node) for every address the object holds."""
    if kind == "pods":
        pod: PodMeta = obj
        if pod.terminated:
            return []
        return [(ip, ("pod", pod.uid), pod.host_network, pod.node) for ip in pod.ips]
    if kind == "services":
        return [(ip, ("service", obj.namespace, obj.name), False, None) for ip in obj.ips]
    if kind == "nodes":
        return [(ip, ("node", obj.name), True, obj.name) for ip in obj.ips]
    return []


class Catalog:
    def __init__(self, name: str, grace: float, clock: Callable[[], float] = time.time) -> None:
        self.name = name  # "kubernetes" | "static"
        self.grace = grace
        self.clock = clock
        self.lock = threading.RLock()
        self.objects: dict[str, dict[Hashable, Any]] = {kind: {} for kind in KINDS}
        self.deleted_at: dict[tuple[str, Hashable], float] = {}
        self.ips = IpIndex(grace)
        self._by_container: dict[str, str] = {}  # container id -> pod uid
        self._by_config_hash: dict[str, str] = {}  # static pod's node-local UID -> mirror pod uid
        self._pods_of: dict[tuple[str, str, str], set[str]] = {}  # (replicasets|jobs, namespace, name) -> uids
        self._changes: list[Owner] = []  # owners whose identity may have changed, oldest first
        self._changes_start = 0  # the version of _changes[0]

    # ---- writers ----------------------------------------------------------------------------------------

    def put(self, kind: str, obj: Any, now: float | None = None, listed: bool = False) -> None:
        """Adds or replaces an object. `listed`: it comes from a list, so its addresses may predate `now`."""
        now = self.clock() if now is None else now
        key = key_of(kind, obj)
        with self.lock:
            old = self.objects[kind].get(key)
            if old is not None and (kind, key) in self.deleted_at:
                old = None  # recreated (a service or node of the same name): the old claims were released
            self.deleted_at.pop((kind, key), None)
            if self.objects[kind].get(key) != obj:
                self._changed(kind, key)
            self.objects[kind][key] = obj
            old_claims = {(ip, owner) for ip, owner, _, _ in _claims_of(kind, old)} if old is not None else set()
            new_claims = _claims_of(kind, obj)
            for ip, owner in old_claims - {(ip, owner) for ip, owner, _, _ in new_claims}:
                self.ips.release(ip, owner, now)
            start = self._claim_start(kind, obj, now, listed)
            for ip, owner, shared, node in new_claims:
                if (ip, owner) not in old_claims:
                    self.ips.claim(ip, owner, start, shared, node)
            if kind == "pods":
                self._index_pod(obj, old)

    @staticmethod
    def _claim_start(kind: str, obj: Any, now: float, listed: bool) -> float:
        # A pod gets its IP after kubelet acknowledged it (status.startTime), never before; objects seen in
        # a list were there before we looked; objects seen in a watch event got their address just now.
        if kind == "pods" and obj.start_time is not None:
            return min(obj.start_time, now)
        return -math.inf if listed else now

    def _index_pod(self, pod: PodMeta, old: PodMeta | None) -> None:
        if old is not None:
            for cid in old.containers:
                self._by_container.pop(cid, None)
        self._unindex_controller(old)
        for cid in pod.containers:
            self._by_container[cid] = pod.uid
        if pod.config_hash:
            self._by_config_hash[pod.config_hash] = pod.uid
        controller = self._controller_key(pod)
        if controller is not None:
            self._pods_of.setdefault(controller, set()).add(pod.uid)

    @staticmethod
    def _controller_key(pod: PodMeta | None) -> tuple[str, str, str] | None:
        owner = pod.controller if pod is not None else None
        kind = _INTERMEDIATE.get(owner.kind) if owner is not None else None
        return None if kind is None else (kind, pod.namespace, owner.name)

    def _unindex_controller(self, pod: PodMeta | None) -> None:
        controller = self._controller_key(pod)
        pods = self._pods_of.get(controller) if controller is not None else None
        if pods is not None:
            pods.discard(pod.uid)
            if not pods:
                del self._pods_of[controller]

    # ---- the change log ---------------------------------------------------------------------------------

    def _changed(self, kind: str, key: Hashable) -> None:
        if kind == "pods":
            self._changes.append(("pod", key))
        elif kind == "services":
            self._changes.append(("service", *key))
        elif kind == "nodes":
            self._changes.append(("node", key))
        else:  # a ReplicaSet or Job names the workload of its pods
            self._changes.extend(("pod", uid) for uid in self._pods_of.get((kind, *key), ()))
        if len(self._changes) > CHANGE_LOG:
            dropped = len(self._changes) - CHANGE_LOG // 2
            del self._changes[:dropped]
            self._changes_start += dropped

    @property
    def version(self) -> int:
        """Changes logged so far."""
        return self._changes_start + len(self._changes)

    def changes_since(self, version: int) -> list[Owner] | None:
        """Owners whose identity may have changed since `version`; None when the log no longer goes back
        that far (the reader must assume every owner changed)."""
        if version < self._changes_start:
            return None
        return self._changes[version - self._changes_start :]

    def remove(self, kind: str, key: Hashable, now: float | None = None) -> None:
        """The object is gone; it stays readable for the grace period, its addresses are released now."""
        now = self.clock() if now is None else now
        with self.lock:
            obj = self.objects[kind].get(key)
            if obj is None or (kind, key) in self.deleted_at:
                return
            self.deleted_at[(kind, key)] = now
            for ip, owner, _, _ in _claims_of(kind, obj):
                self.ips.release(ip, owner, now)

    def replace(self, kind: str, objects: Iterable[Any], now: float | None = None) -> None:
        """A fresh list: objects it lacks were deleted (now), the others are put as listed.

        Applied in slices, releasing the lock in between, so a large relist never holds up enrich for long.
        """
        now = self.clock() if now is None else now
        fresh = {key_of(kind, obj): obj for obj in objects}
        with self.lock:
            for key in list(self.objects[kind]):
                if key not in fresh:
                    self.remove(kind, key, now)
        pending = list(fresh.values())
        for start in range(0, len(pending), REPLACE_SLICE):
            with self.lock:
                for obj in pending[start : start + REPLACE_SLICE]:
                    self.put(kind, obj, now, listed=True)

    def add_network(self, cidr: str, owner: Owner) -> None:
        with self.lock:
            self.ips.add_network(cidr, owner)

    def purge(self, now: float | None = None) -> int:
        """Forgets objects deleted more than the grace period ago, and IP claims past their grace."""
        now = self.clock() if now is None else now
        with self.lock:
            expired = [item for item, at in self.deleted_at.items() if at + self.grace < now]
            for kind, key in expired:
                del self.deleted_at[(kind, key)]
                self._changed(kind, key)
                obj = self.objects[kind].pop(key)
                if kind == "pods":
                    for cid in obj.containers:
                        if self._by_container.get(cid) == obj.uid:
                            del self._by_container[cid]
                    if obj.config_hash and self._by_config_hash.get(obj.config_hash) == obj.uid:
                        del self._by_config_hash[obj.config_hash]
                    self._unindex_controller(obj)
            self.ips.purge(now)
            return len(expired)

    # ---- readers (hold self.lock around a batch of calls) -----------------------------------------------------

    def pod(self, uid: str) -> PodMeta | None:
        """A pod by its UID, or by the node-local UID of a static pod (which names its cgroup)."""
        pods = self.objects["pods"]
        found = pods.get(uid)
        if found is None and uid in self._by_config_hash:
            found = pods.get(self._by_config_hash[uid])
        return found

    def pod_of_container(self, container_id: str) -> PodMeta | None:
        uid = self._by_container.get(container_id)
        return None if uid is None else self.objects["pods"].get(uid)

    def service(self, namespace: str, name: str) -> ServiceMeta | None:
        return self.objects["services"].get((namespace, name))

    def node(self, name: str) -> NodeMeta | None:
        return self.objects["nodes"].get(name)

    def controller_of(self, pod: PodMeta) -> ControllerMeta | None:
        """The ReplicaSet or Job between a pod and its workload, when the pod has one and it is known."""
        key = self._controller_key(pod)
        return None if key is None else self.objects[key[0]].get(key[1:])

    def workload(self, pod: PodMeta) -> Controller:
        """The workload a pod belongs to: Deployment, StatefulSet, DaemonSet, CronJob, Job, ... or the pod."""
        if pod.workload is not None:
            return pod.workload
        owner = pod.controller
        # A bare pod is its own workload; so is a static pod, whose mirror's "owner" is the Node.
        if owner is None or owner.kind == "Node":
            return Controller("Pod", pod.name)
        parent = self.controller_of(pod)
        return parent.controller if parent is not None and parent.controller is not None else owner

    def counts(self) -> dict[str, int]:
        with self.lock:
            counts = {kind: len(objects) for kind, objects in self.objects.items()}
            counts["deleted_in_grace"] = len(self.deleted_at)
            counts["ip_addresses"] = len(self.ips)
            if self.ips.networks:
                counts["networks"] = self.ips.networks
            counts["containers"] = len(self._by_container)
            return counts

"""A local HTTP server that speaks the Kubernetes list/watch protocol, and tests that it does.

No Kubernetes API server can run here, so the identity tests drive the real `kubernetes` client against
this one. It implements what a reflector relies on: lists with a resourceVersion (and limit/continue
pages), watches that stream JSON lines from a resourceVersion (chunked HTTP), both of every namespace or of
one, with a label selector or not, BOOKMARK events when asked for, `410 Gone` for versions older than the
compacted history (as an ERROR event on a watch, as an HTTP status on an expired continue token), bearer-token
authentication, and going away entirely (unreachable).
The tests at the bottom check the server against the client library's own Watch helper.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import re
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

RESOURCES = {
    "/api/v1/pods": ("pods", "Pod", "v1"),
    "/api/v1/services": ("services", "Service", "v1"),
    "/api/v1/nodes": ("nodes", "Node", "v1"),
    "/apis/apps/v1/replicasets": ("replicasets", "ReplicaSet", "apps/v1"),
    "/apis/batch/v1/jobs": ("jobs", "Job", "batch/v1"),
}
# /api/v1/namespaces/NS/pods: the same resources, in one namespace (list_namespaced_pod)
NAMESPACED_PATH = re.compile(r"^(?P<group>/api/v1|/apis/[^/]+/v1)/namespaces/(?P<namespace>[^/]+)(?P<resource>/[^/]+)$")
_END = object()  # queue item: end this watch stream
CLONE_NEWNET = 0x40000000


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    metadata = obj["metadata"]
    return metadata.get("namespace", ""), metadata["name"]


def selects(selector: str, obj: dict[str, Any]) -> bool:
    """Whether a label selector's requirements (k=v, k==v, k!=v, k, !k; comma-separated) all hold for `obj`."""
    labels = obj.get("metadata", {}).get("labels") or {}
    for requirement in filter(None, (part.strip() for part in selector.split(","))):
        key, operator, value = next(
            ((k, op, v) for op in ("!=", "==", "=") for k, sep, v in [requirement.partition(op)] if sep),
            (requirement, "", ""),
        )
        if operator == "!=":
            held = labels.get(key) != value
        elif operator:
            held = labels.get(key) == value
        else:
            held = key[1:] not in labels if key.startswith("!") else key in labels
        if not held:
            return False
    return True


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


class FakeApiServer:
    def __init__(self, token: str = "flowscope-test-token") -> None:
        self.token = token
        self.version = 1000
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {r[0]: {} for r in RESOURCES.values()}
        self.history: dict[str, list[tuple[int, str, dict[str, Any]]]] = {r[0]: [] for r in RESOURCES.values()}
        self.compacted: dict[str, int] = {r[0]: 0 for r in RESOURCES.values()}
        # resource -> open watches: (their feed, whether they asked for bookmarks, what they select)
        self.watchers: dict[str, list[tuple[queue.Queue[Any], bool, Selection]]] = {
            r[0]: [] for r in RESOURCES.values()
        }
        self.requests: list[dict[str, Any]] = []
        self.answering = threading.Event()  # cleared: requests are taken but not answered (a hung API)
        self.answering.set()
        self.lock = threading.Lock()
        self.port = 0
        self.netns: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def start(self, netns: str | None = None) -> FakeApiServer:
        """Listens on 127.0.0.1; with `netns` (a path such as /run/netns/NAME), on that namespace's loopback."""
        self.netns = netns if netns is not None else self.netns
        address = ("127.0.0.1", self.port)
        if self.netns is None:
            server = ThreadingHTTPServer(address, _handler_for(self))
        else:
            server = _in_netns(self.netns, lambda: ThreadingHTTPServer(address, _handler_for(self)))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Goes away: no listener, open connections cut (the API is unreachable until start())."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        self.end_watches()
        with self.lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path, token: str | None = None) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: {self.url}\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n"
            f"users:\n- name: tester\n  user:\n    token: {token or self.token}\n"
        )
        return path

    # ---- state changes (each one is a watch event) --------------------------------------------------------

    def _publish(self, resource: str, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.version += 1
            obj = json.loads(json.dumps(obj))
            obj.setdefault("metadata", {})["resourceVersion"] = str(self.version)
            before = self.objects[resource].get(_key(obj))
            if kind == "DELETED":
                self.objects[resource].pop(_key(obj), None)
            else:
                self.objects[resource][_key(obj)] = obj
            self.history[resource].append((self.version, kind, obj))
            for watcher, _, selection in self.watchers[resource]:
                seen = _as_selected(kind, before, obj, selection)
                if seen is not None:
                    watcher.put(json.dumps({"type": seen, "object": obj}))
            return obj

    def add(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self._publish(resource, "ADDED", obj)

    def modify(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self._publish(resource, "MODIFIED", obj)

    def delete(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self._publish(resource, "DELETED", obj)

    def inject(self, resource: str, line: str) -> None:
        """A raw line into the open watch streams (malformed events)."""
        with self.lock:
            for watcher, _, _ in self.watchers[resource]:
                watcher.put(line)

    def bookmark(self, resource: str) -> None:
        with self.lock:
            kind, api_version = next((k, v) for r, k, v in RESOURCES.values() if r == resource)
            marker = {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": str(self.version)}}
            line = json.dumps({"type": "BOOKMARK", "object": marker})
            for watcher, bookmarks, _ in self.watchers[resource]:
                if bookmarks:
                    watcher.put(line)

    def compact(self, resource: str) -> None:
        """Forgets the history: watches from older versions get 410 Gone, open ones are told so now."""
        with self.lock:
            self.compacted[resource] = self.version
            self.history[resource].clear()
            gone = json.dumps({"type": "ERROR", "object": _status(410, "Expired", "too old resource version")})
            for watcher, _, _ in self.watchers[resource]:
                watcher.put(gone)
                watcher.put(_END)

    def end_watches(self) -> None:
        """Ends every open watch stream normally (as the server's watch timeout does)."""
        with self.lock:
            for watchers in self.watchers.values():
                for watcher, _, _ in watchers:
                    watcher.put(_END)

    def open_watches(self, resource: str) -> int:
        with self.lock:
            return len(self.watchers[resource])

    def requests_for(self, resource: str, watch: bool) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["resource"] == resource and r["watch"] == watch]


@dataclass(frozen=True)
class Selection:
    """What a list or watch asks for: the objects of its label selector, in its namespace (None: in all)."""

    selector: str = ""
    namespace: str | None = None

    def __call__(self, obj: dict[str, Any]) -> bool:
        return (self.namespace is None or _key(obj)[0] == self.namespace) and selects(self.selector, obj)


def _as_selected(kind: str, before: dict[str, Any] | None, obj: dict[str, Any], selection: Selection) -> str | None:
    """The event a watch of `selection` sees of a change (None: nothing), as the API server sends it: an object
    that comes to match is ADDED, one that stops matching is DELETED."""
    was, now = before is not None and selection(before), selection(obj)
    if kind == "DELETED":
        return kind if was or (before is None and now) else None
    if now:
        return "MODIFIED" if kind == "MODIFIED" and was else "ADDED"
    return "DELETED" if was else None


def _in_netns(path: str, factory: Callable[[], Any]) -> Any:
    """Calls `factory` on a thread switched into the network namespace at `path` (sockets it creates stay
    there); the caller's threads are not affected."""
    libc = ctypes.CDLL(None, use_errno=True)
    outcome: dict[str, Any] = {}

    def run() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {path}")
            outcome["value"] = factory()
        except Exception as err:
            outcome["error"] = err
        finally:
            libc.setns(own, CLONE_NEWNET)
            os.close(own)
            os.close(target)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _handler_for(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def setup(self) -> None:
            super().setup()
            with api.lock:
                api._connections.add(self.connection)

        def finish(self) -> None:
            with api.lock:
                api._connections.discard(self.connection)
            super().finish()

        def _json(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            scoped = NAMESPACED_PATH.match(url.path)
            namespace = scoped["namespace"] if scoped else None
            target = RESOURCES.get(scoped["group"] + scoped["resource"] if scoped else url.path)
            watch = query.get("watch") in ("true", "1", "True")
            with api.lock:
                api.requests.append(
                    {"resource": target[0] if target else url.path, "namespace": namespace, "watch": watch,
                     "query": query, "authorization": self.headers.get("Authorization")}
                )  # fmt: skip
            while not api.answering.wait(0.05):
                if api._server is None:
                    return
            if self.headers.get("Authorization") != f"Bearer {api.token}":
                self._json(401, _status(401, "Unauthorized", "Unauthorized"))
                return
            if target is None:
                self._json(404, _status(404, "NotFound", f"the server could not find {url.path}"))
                return
            selection = Selection(query.get("labelSelector", ""), namespace)
            if watch:
                self._watch(target, query, selection)
            else:
                self._list(target, query, selection)

        def _list(self, target: tuple[str, str, str], query: dict[str, str], selection: Selection) -> None:
            resource, kind, api_version = target
            with api.lock:
                if "continue" in query:
                    version_text, _, offset_text = query["continue"].partition(":")
                    version, offset = int(version_text), int(offset_text)
                    if version < api.compacted[resource]:
                        self._json(410, _status(410, "Expired", "the continue token has expired"))
                        return
                else:
                    version, offset = api.version, 0
                items = [api.objects[resource][k] for k in sorted(api.objects[resource])]
                items = [obj for obj in items if selection(obj)]
            limit = int(query.get("limit", 0)) or len(items) or 1
            page = items[offset : offset + limit]
            metadata: dict[str, Any] = {"resourceVersion": str(version)}
            if offset + limit < len(items):
                metadata["continue"] = f"{version}:{offset + limit}"
            self._json(200, {"kind": f"{kind}List", "apiVersion": api_version, "metadata": metadata, "items": page})

        def _chunk(self, text: str) -> None:
            data = (text + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _watch(self, target: tuple[str, str, str], query: dict[str, str], selection: Selection) -> None:
            resource = target[0]
            bookmarks = query.get("allowWatchBookmarks") in ("true", "1", "True")
            timeout = float(query.get("timeoutSeconds", 1800))
            feed: queue.Queue[Any] = queue.Queue()
            with api.lock:
                since = int(query.get("resourceVersion") or 0)
                if since and since < api.compacted[resource]:
                    feed.put(
                        json.dumps({"type": "ERROR", "object": _status(410, "Expired", "too old resource version")})
                    )
                    feed.put(_END)
                elif since:
                    for version, kind, obj in api.history[resource]:
                        if version > since and selection(obj):
                            feed.put(json.dumps({"type": kind, "object": obj}))
                else:  # no version: the current state as ADDED events first
                    for obj in api.objects[resource].values():
                        if selection(obj):
                            feed.put(json.dumps({"type": "ADDED", "object": obj}))
                api.watchers[resource].append((feed, bookmarks, selection))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while True:
                    try:
                        item = feed.get(timeout=timeout)
                    except queue.Empty:
                        break
                    if item is _END:
                        break
                    self._chunk(item)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True
            finally:
                with api.lock:
                    api.watchers[resource] = [w for w in api.watchers[resource] if w[0] is not feed]

    return Handler


# ---- object builders -------------------------------------------------------------------------------------------


def pod(
    namespace: str,
    name: str,
    ip: str | None,
    node: str = "node-a",
    uid: str | None = None,
    labels: dict[str, str] | None = None,
    owner: tuple[str, str] | None = None,
    containers: dict[str, str] | None = None,
    host_network: bool = False,
    phase: str = "Running",
    more_ips: tuple[str, ...] = (),
    ports: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A pod as the API sends it; `containers` maps container name -> runtime container id; `more_ips` are
    the pod's further addresses (dual stack); `ports` the first container's named TCP ports (name -> port)."""
    containers = containers if containers is not None else {"app": uuid.uuid4().hex * 2}
    metadata: dict[str, Any] = {"namespace": namespace, "name": name, "uid": uid or str(uuid.uuid4()),
                                "labels": labels or {}}  # fmt: skip
    if owner:
        metadata["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                        "uid": str(uuid.uuid4()), "controller": True}]  # fmt: skip
    status: dict[str, Any] = {
        "phase": phase,
        "startTime": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "containerStatuses": [_container_status(name, cid) for name, cid in containers.items()],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": address} for address in (ip, *more_ips)]
    specs: list[dict[str, Any]] = [{"name": n, "image": "registry.example/app:1"} for n in containers]
    if ports:
        specs[0]["ports"] = [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports.items()]
    return {
        "metadata": metadata,
        "spec": {"nodeName": node, "hostNetwork": host_network, "containers": specs},
        "status": status,
    }


def _container_status(name: str, cid: str) -> dict[str, Any]:
    return {"name": name, "containerID": f"containerd://{cid}", "ready": True, "restartCount": 0,
            "image": "registry.example/app:1", "imageID": "registry.example/app@sha256:" + "0" * 64}  # fmt: skip


def controller(namespace: str, name: str, owner: tuple[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"namespace": namespace, "name": name, "uid": str(uuid.uuid4())}
    if owner:
        metadata["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                        "uid": str(uuid.uuid4()), "controller": True}]  # fmt: skip
    return {"metadata": metadata}


def service(namespace: str, name: str, cluster_ip: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "labels": labels or {}},
            "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "type": "ClusterIP"}}  # fmt: skip


def node(name: str, ip: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    addresses = [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]
    return {"metadata": {"name": name, "labels": labels or {}}, "status": {"addresses": addresses}}


# ---- the server against the client library's own Watch helper -------------------------------------------------


@pytest.fixture
def api():
    server = FakeApiServer().start()
    yield server
    server.stop()


def _client(api: FakeApiServer, tmp_path: Path):
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(str(api.write_kubeconfig(tmp_path / "kubeconfig")), client_configuration=configuration)
    return client.CoreV1Api(client.ApiClient(configuration))


def test_list_has_items_and_a_resource_version_and_pages(api, tmp_path):
    for index in range(3):
        api.add("pods", pod("shop", f"p{index}", f"10.203.9.{index + 1}"))
    core = _client(api, tmp_path)
    first = core.list_pod_for_all_namespaces(limit=2)
    assert [p.metadata.name for p in first.items] == ["p0", "p1"]
    assert first.metadata.resource_version == "1003"
    second = core.list_pod_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    assert [p.metadata.name for p in second.items] == ["p2"]
    assert second.metadata._continue is None


def test_watch_streams_changes_after_the_version_with_bookmarks(api, tmp_path):
    from kubernetes import watch

    api.add("pods", pod("shop", "before", "10.203.9.1"))
    core = _client(api, tmp_path)
    version = core.list_pod_for_all_namespaces().metadata.resource_version
    seen = []
    watcher = watch.Watch()

    def feed() -> None:
        while api.open_watches("pods") == 0:
            threading.Event().wait(0.01)
        api.add("pods", pod("shop", "after", "10.203.9.2"))
        api.bookmark("pods")
        api.delete("pods", pod("shop", "after", "10.203.9.2"))

    threading.Thread(target=feed, daemon=True).start()
    for event in watcher.stream(core.list_pod_for_all_namespaces, resource_version=version,
                                allow_watch_bookmarks=True, timeout_seconds=5):  # fmt: skip
        seen.append((event["type"], event["raw_object"]["metadata"].get("name")))
        if len(seen) == 3:
            watcher.stop()
    assert seen == [("ADDED", "after"), ("BOOKMARK", None), ("DELETED", "after")]


def test_a_compacted_version_is_410_gone(api, tmp_path):
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    api.add("pods", pod("shop", "old", "10.203.9.1"))
    api.compact("pods")
    core = _client(api, tmp_path)
    with pytest.raises(ApiException) as raised:
        for _ in watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version="1000", timeout_seconds=2):
            pass
    assert raised.value.status == 410


def test_a_wrong_token_is_401(api, tmp_path):
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    configuration = client.Configuration()
    path = api.write_kubeconfig(tmp_path / "kubeconfig", token="wrong")
    config.load_kube_config(str(path), client_configuration=configuration)
    with pytest.raises(ApiException) as raised:
        client.CoreV1Api(client.ApiClient(configuration)).list_node()
    assert raised.value.status == 401


def test_a_label_selector_selects_in_lists_and_watches(api, tmp_path):
    from kubernetes import watch

    api.add("pods", pod("shop", "agent", "10.203.9.1", labels={"app": "agent", "tier": "node"}))
    api.add("pods", pod("shop", "web", "10.203.9.2", labels={"app": "web"}))
    core = _client(api, tmp_path)
    listed = core.list_pod_for_all_namespaces(label_selector="app=agent,tier")
    assert [p.metadata.name for p in listed.items] == ["agent"]
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(label_selector="app!=agent,!tier").items] == [
        "web"
    ]
    seen = []
    watcher = watch.Watch()

    def feed() -> None:
        while api.open_watches("pods") == 0:
            threading.Event().wait(0.01)
        api.modify("pods", pod("shop", "web", "10.203.9.2", labels={"app": "agent", "tier": "node"}))  # comes in
        api.modify("pods", pod("shop", "agent", "10.203.9.1", labels={"app": "agent"}))  # goes out
        api.add("pods", pod("shop", "other", "10.203.9.3"))  # never in

    threading.Thread(target=feed, daemon=True).start()
    for event in watcher.stream(core.list_pod_for_all_namespaces, label_selector="app=agent,tier",
                                resource_version=listed.metadata.resource_version, timeout_seconds=5):  # fmt: skip
        seen.append((event["type"], event["raw_object"]["metadata"]["name"]))
        if len(seen) == 2:
            watcher.stop()
    assert seen == [("ADDED", "web"), ("DELETED", "agent")]


def test_a_namespaced_list_and_watch_see_that_namespace_only(api, tmp_path):
    from kubernetes import watch

    api.add("pods", pod("flowscope", "agent-a", "10.203.9.1", labels={"app": "agent"}))
    api.add("pods", pod("shop", "agent-b", "10.203.9.2", labels={"app": "agent"}))
    core = _client(api, tmp_path)
    listed = core.list_namespaced_pod("flowscope", label_selector="app=agent")
    assert [(p.metadata.namespace, p.metadata.name) for p in listed.items] == [("flowscope", "agent-a")]
    seen = []
    watcher = watch.Watch()

    def feed() -> None:
        while api.open_watches("pods") == 0:
            threading.Event().wait(0.01)
        api.add("pods", pod("shop", "agent-c", "10.203.9.3", labels={"app": "agent"}))  # another namespace's
        api.add("pods", pod("flowscope", "agent-d", "10.203.9.4", labels={"app": "agent"}))

    threading.Thread(target=feed, daemon=True).start()
    for event in watcher.stream(core.list_namespaced_pod, "flowscope", label_selector="app=agent",
                                resource_version=listed.metadata.resource_version, timeout_seconds=5):  # fmt: skip
        seen.append((event["type"], event["raw_object"]["metadata"]["name"]))
        watcher.stop()
    assert seen == [("ADDED", "agent-d")]
    assert [(r["namespace"], r["watch"]) for r in api.requests_for("pods", watch=True)] == [("flowscope", True)]

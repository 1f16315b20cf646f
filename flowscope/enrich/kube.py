"""Pods, services, nodes and workload controllers from the Kubernetes API, kept current by list + watch.

One thread per resource does what client-go's reflector does: list (in pages) to get the state and its
resourceVersion, then watch from that version with bookmarks; a watch that ends is resumed from the last
version seen; "410 Gone" (the version is too old) means list again; an unreachable API means retrying
with exponential backoff while the catalog keeps serving what it last knew. Objects are read as the
JSON the API sends (not the client's models), so a malformed object is skipped and counted, and never
stops the stream.

This module imports the `kubernetes` client; nothing else in flowscope does, so the core imports fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from flowscope.enrich.catalog import Catalog
from flowscope.enrich.model import (
    IdentityConfigError,
    MalformedObject,
    metadata_of,
    parse_controller,
    parse_node,
    parse_pod,
    parse_service,
    resource_version,
    text,
)

log = logging.getLogger(__name__)

# resource -> (API class, list function, parser)
RESOURCES: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "pods": ("CoreV1Api", "list_pod_for_all_namespaces", parse_pod),
    "services": ("CoreV1Api", "list_service_for_all_namespaces", parse_service),
    "nodes": ("CoreV1Api", "list_node", parse_node),
    "replicasets": ("AppsV1Api", "list_replica_set_for_all_namespaces", parse_controller),
    "jobs": ("BatchV1Api", "list_job_for_all_namespaces", parse_controller),
}
# resource -> its list function in one namespace (a KubernetesSource with a namespace: the relay's agent pods)
NAMESPACED: dict[str, str] = {"pods": "list_namespaced_pod"}
LIST_PAGE = 500
CONNECT_TIMEOUT = 5.0
LIST_READ_TIMEOUT = 60.0
WATCH_SECONDS = (300, 600)  # server-side watch timeout, randomised per watch as client-go does
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
MIN_CYCLE = 1.0  # seconds: at most one list-or-watch round per second without an error
HTTP_GONE = 410


class KubeconfigError(IdentityConfigError):
    """A kubeconfig (or in-cluster configuration) the client cannot use."""


class _Expired(Exception):
    """The watched resourceVersion is gone (410): list again."""


def client_configuration(kubeconfig: str | None) -> client.Configuration:
    """The client configuration from a kubeconfig file, or from the pod's service account when None."""
    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as err:
            raise KubeconfigError(f"cannot use the in-cluster Kubernetes configuration: {err}.") from None
        return configuration
    try:
        with open(kubeconfig, encoding="utf-8") as handle:
            yaml.safe_load(handle)
    except OSError as err:
        raise KubeconfigError(f"cannot read kubeconfig {kubeconfig}: {err.strerror}.") from None
    except yaml.YAMLError:
        raise KubeconfigError(f"kubeconfig {kubeconfig} is not valid YAML.") from None
    try:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration, persist_config=False)
    except (config.ConfigException, ValueError, TypeError, KeyError, AttributeError, OSError) as err:
        reason = str(err).strip().rstrip(".") or type(err).__name__
        raise KubeconfigError(f"cannot use kubeconfig {kubeconfig}: {reason}.") from None
    return configuration


def _deletion_key(resource: str, obj: Any) -> Hashable:
    """The catalog key of a deleted object, read from its metadata alone (the rest may be malformed)."""
    metadata = metadata_of(obj)
    if resource == "pods":
        return text(metadata.get("uid"), "metadata.uid")
    if resource == "nodes":
        return text(metadata.get("name"), "metadata.name")
    return (text(metadata.get("namespace"), "metadata.namespace"), text(metadata.get("name"), "metadata.name"))


class _Reflector:
    """List + watch of one resource into the catalog, on its own thread."""

    def __init__(self, source: KubernetesSource, resource: str) -> None:
        self.source = source
        self.resource = resource
        self.state = "starting"  # starting | listing | watching | backoff | stopped
        self.synced = False  # a list has completed (the catalog holds the whole resource)
        self.resource_version: str | None = None
        self.lists = 0
        self.relists_gone = 0  # lists forced by 410 Gone
        self.watches = 0
        self.events = 0
        self.bookmarks = 0
        self.skipped = 0  # malformed objects and events skipped
        self.last_skipped: str | None = None
        self.errors = 0
        self.consecutive_errors = 0
        self.last_error: str | None = None
        self.reachable = True  # whether the last failure (if any) came from the server rather than the network
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"flowscope-k8s-{resource}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        api_class, function, _ = RESOURCES[self.resource]
        if self.source.namespace is not None:
            function = NAMESPACED[self.resource]
        with client.ApiClient(self.source.configuration) as api_client:
            list_function = getattr(getattr(client, api_class)(api_client), function)
            while not self.source.stopping.is_set():
                started = time.monotonic()
                try:
                    if self.resource_version is None:
                        self.resource_version = self._list(list_function)
                    self.resource_version = self._watch(list_function, self.resource_version)
                    self.consecutive_errors = 0
                except _Expired:
                    self.relists_gone += 1
                    self.resource_version = None
                except ApiException as err:
                    if err.status != HTTP_GONE:
                        self._failed(f"HTTP {err.status} {err.reason}".strip(), reachable=True)
                        continue
                    self.relists_gone += 1
                    self.resource_version = None
                except (urllib3.exceptions.HTTPError, OSError) as err:
                    self._failed(_connection_error(err), reachable=False)
                except Exception as err:  # a bug must not end the thread: report it and retry
                    log.exception("kubernetes %s watch failed", self.resource)
                    self._failed(f"{type(err).__name__}: {err}", reachable=True)
                    continue
                # A server (or proxy) that ends every watch at once, or answers 410 to every fresh version,
                # must not turn this loop into a busy one.
                self.source.stopping.wait(max(MIN_CYCLE - (time.monotonic() - started), 0))
        self.state = "stopped"

    def _failed(self, message: str, reachable: bool) -> None:
        if self.source.stopping.is_set():
            return
        self.reachable = reachable
        self.errors += 1
        self.consecutive_errors += 1
        self.last_error = message
        self.state = "backoff"
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(self.consecutive_errors - 1, 16))
        log.debug("kubernetes %s: %s; retrying in %.1fs", self.resource, message, delay)
        self.source.stopping.wait(delay * random.uniform(0.5, 1.0))

    def _skip(self, reason: str) -> None:
        self.skipped += 1
        self.last_skipped = reason
        log.debug("kubernetes %s: skipped %s", self.resource, reason)

    def _list(self, list_function: Callable[..., Any]) -> str:
        self.state = "listing"
        parse = RESOURCES[self.resource][2]
        parsed, token, version = [], None, None
        while True:
            response = list_function(
                **self.source.selection,
                limit=LIST_PAGE,
                _continue=token,
                _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT, LIST_READ_TIMEOUT),
            )
            try:
                body = json.loads(response.data)
            except ValueError:
                raise ApiException(status=0, reason="list response is not JSON") from None
            finally:
                response.release_conn()
            if not isinstance(body, dict) or not isinstance(body.get("items"), list):
                raise ApiException(status=0, reason="list response has no items")
            metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
            for obj in body["items"]:
                try:
                    parsed.append(parse(obj))
                except MalformedObject as err:
                    self._skip(str(err))
            token = metadata.get("continue") or None
            version = metadata.get("resourceVersion") or version
            if token is None:
                break
        if not isinstance(version, str):
            raise ApiException(status=0, reason="list response has no resourceVersion")
        self.source.catalog.replace(self.resource, parsed)
        self.lists += 1
        self.synced = True
        self.consecutive_errors = 0
        return version

    def _watch(self, list_function: Callable[..., Any], version: str) -> str:
        """Applies watch events until the server ends the stream; returns the last version seen."""
        seconds = random.randint(*self.source.watch_seconds)
        response = list_function(
            **self.source.selection,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=seconds,
            _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT, seconds + LIST_READ_TIMEOUT),
        )
        self._response = response
        self.state = "watching"
        self.watches += 1
        try:
            for line in iter_resp_lines(response):
                if self.source.stopping.is_set():
                    break
                if line:
                    version = self._apply(line, version)
                    self.resource_version = version  # a watch cut short resumes from here
        finally:
            self._response = None
            response.release_conn()
        return version

    def _apply(self, line: str, version: str) -> str:
        try:
            event = json.loads(line)
        except ValueError:
            self._skip("a watch line that is not JSON")
            return version
        if not isinstance(event, dict):
            self._skip("a watch event that is not an object")
            return version
        kind, obj = event.get("type"), event.get("object")
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            if code == HTTP_GONE:
                raise _Expired
            message = obj.get("message") if isinstance(obj, dict) else None
            raise ApiException(status=code if isinstance(code, int) else 0, reason=f"watch error: {message}")
        new_version = resource_version(obj) or version
        if kind == "BOOKMARK":
            self.bookmarks += 1
            return new_version
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            self._skip(f"a watch event of unknown type {kind!r}")
            return new_version
        try:
            if kind == "DELETED":
                self.source.catalog.remove(self.resource, _deletion_key(self.resource, obj))
            else:
                self.source.catalog.put(self.resource, RESOURCES[self.resource][2](obj))
        except MalformedObject as err:
            self._skip(str(err))
            return new_version
        self.events += 1
        return new_version

    def interrupt(self) -> None:
        """Unblocks a thread waiting on the watch stream (used by close)."""
        response = self._response
        if response is not None:
            with contextlib.suppress(ValueError, RuntimeError, OSError):  # already released
                response.shutdown()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "synced": self.synced,
            "resource_version": self.resource_version,
            "lists": self.lists,
            "relists_gone": self.relists_gone,
            "watches": self.watches,
            "events": self.events,
            "bookmarks": self.bookmarks,
            "skipped": self.skipped,
            "last_skipped": self.last_skipped,
            "errors": self.errors,
            "last_error": self.last_error,
        }


def _connection_error(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    return f"API unreachable: {reason or err}"


class KubernetesSource:
    def __init__(
        self,
        catalog: Catalog,
        kubeconfig: str | None = None,
        resources: tuple[str, ...] = tuple(RESOURCES),
        watch_seconds: tuple[int, int] = WATCH_SECONDS,
        label_selector: str | None = None,
        namespace: str | None = None,
    ) -> None:
        """`label_selector` and `namespace` (for the resources of NAMESPACED) narrow what is listed and watched,
        as the API server selects: the relay's agent pods, with a Role in their namespace instead of a ClusterRole."""
        self.catalog = catalog
        self.kubeconfig = kubeconfig
        self.configuration = client_configuration(kubeconfig)
        self.watch_seconds = watch_seconds
        self.namespace = namespace
        # Only the objects with these labels (the relay's agent pods), as the API server selects them.
        self.selection: dict[str, str] = {"label_selector": label_selector} if label_selector else {}
        if namespace is not None:
            self.selection["namespace"] = namespace
        self.stopping = threading.Event()
        self.reflectors = {resource: _Reflector(self, resource) for resource in resources}

    @property
    def server(self) -> str:
        return self.configuration.host

    def start(self) -> None:
        for reflector in self.reflectors.values():
            reflector.start()

    def wait_synced(self, timeout: float) -> bool:
        """Waits until every resource has been listed once (for tests and one-shot commands)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(r.synced for r in self.reflectors.values()):
                return True
            time.sleep(0.02)
        return all(r.synced for r in self.reflectors.values())

    def close(self) -> None:
        self.stopping.set()
        for reflector in self.reflectors.values():
            reflector.interrupt()
        deadline = time.monotonic() + 5  # threads stuck in a connect are daemons: do not wait for each
        for reflector in self.reflectors.values():
            reflector.join(timeout=max(deadline - time.monotonic(), 0))

    def health(self) -> dict[str, Any]:
        resources = {name: r.health() for name, r in self.reflectors.items()}
        synced = [r.synced for r in self.reflectors.values()]
        failing = [r.consecutive_errors > 0 for r in self.reflectors.values()]
        if all(failing):
            if any(synced):
                state = "stale"  # serving what it last knew
            else:
                state = "failing" if any(r.reachable for r in self.reflectors.values()) else "unreachable"
        elif any(failing) or not all(synced):
            state = "degraded" if any(failing) else "syncing"
        else:
            state = "synced"
        return {
            "state": state,
            "server": self.server,
            "kubeconfig": self.kubeconfig or "in-cluster",
            "objects": self.catalog.counts(),
            "skipped_objects": sum(r.skipped for r in self.reflectors.values()),
            "resources": resources,
        }

"""flowscope's configuration: one typed model, read from a YAML file (`--config`), `FLOWSCOPE_*` environment
variables and command-line flags, each overriding the one before (flags win).

Every setting is defined once, here: its type, default, limits, help text and flag. The flags of every
command are built from these fields (flowscope.cli.options), and an environment variable is the flag's
name in capitals with FLOWSCOPE_ in front (`--flow-map-size` -> FLOWSCOPE_FLOW_MAP_SIZE; lists comma-
separated). The file is nested by section, with the field names as keys:

    probes:
      interfaces: [eth0, eth1]
      flow_map_size: 131072
    flowlog:
      directory: /var/lib/flowscope
      rotate_size: 64MiB

Unknown keys and unknown FLOWSCOPE_* variables are errors; every error is one sentence that names the
file and key, the variable or the flag.
"""

from __future__ import annotations

import math
import os
import re
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "FLOWSCOPE_"
MAX_MAP_SIZE = 1 << 22  # two maps of this many flow entries take ~1 GiB of kernel memory


class ConfigError(ValueError):
    """A setting that cannot be used; the message says which one, where it came from, and why."""


def option(default: Any, help: str, *, flag: str | None = None, metavar: str | None = None, **limits: Any) -> Any:
    """A field with its help text and, when it has one, its command-line flag."""
    return Field(default, description=help, json_schema_extra={"flag": flag, "metavar": metavar}, **limits)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def seconds(value: object) -> float:
    """A duration as seconds: a number, or text such as 500ms, 90s, 15m, 1h, 7d."""
    if isinstance(value, bool):
        raise ValueError("is not a duration (seconds, or text such as 90s, 15m, 1h, 7d)")
    if isinstance(value, int | float):
        number = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError("is not a duration (seconds, or text such as 90s, 15m, 1h, 7d)")
        number = float(match.group(1)) * _SECONDS[match.group(2)]
    if not math.isfinite(number) or number < 0:
        raise ValueError("a duration must be zero or more seconds")
    return number


_LABEL_KEY = r"([A-Za-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?"
_LABEL_VALUE = r"([A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?"
_REQUIREMENT = re.compile(
    rf"^\s*(!?{_LABEL_KEY}|{_LABEL_KEY}\s*(=|==|!=)\s*{_LABEL_VALUE}"
    rf"|{_LABEL_KEY}\s+(in|notin)\s+\(\s*{_LABEL_VALUE}(\s*,\s*{_LABEL_VALUE})*\s*\))\s*$"
)


def _label_selector(value: str | None) -> str | None:
    """A Kubernetes label selector (k=v, k!=v, k in (a,b), k notin (a), k, !k; comma-separated)."""
    if value is None:
        return value
    requirements = re.split(r",(?![^()]*\))", value)  # commas outside the parentheses of a set
    if not value.strip() or not all(_REQUIREMENT.match(requirement) for requirement in requirements):
        raise ValueError("is not a label selector such as app.kubernetes.io/name=flowscope,tier in (node)")
    return value


_NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # RFC 1123 label, as Kubernetes names namespaces


def _namespace_name(value: str | None) -> str | None:
    if value is not None and not _NAMESPACE.match(value):
        raise ValueError("is not a namespace's name (lower case letters, digits and '-', at most 63)")
    return value


_PORT_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")  # IANA_SVC_NAME


def _port_or_name(value: object) -> int | str:
    """A TCP port (1-65535), or the name of a container port as Kubernetes names them (grpc, flow-api)."""
    number = isinstance(value, int) and not isinstance(value, bool)
    if number or (isinstance(value, str) and value.isdigit()):
        if not 0 < int(value) < 65536:  # type: ignore[arg-type]
            raise ValueError("is not a port number 1-65535")
        return int(value)  # type: ignore[arg-type]
    if isinstance(value, str) and _PORT_NAME.match(value):
        return value
    raise ValueError("is neither a port number 1-65535 nor a container port's name such as grpc")


def _power_of_two(value: int) -> int:
    if value & (value - 1):
        raise ValueError("must be a power of two")
    return value


class ProbesConfig(Section):
    """What the live probes watch and how (capture, top and agent)."""

    interfaces: list[str] | None = option(
        None,
        "interface to watch with tc (repeatable; lo allowed); default: every interface that is up except lo",
        flag="-i/--interface",
        metavar="IFACE",
    )
    interval: float = option(1.0, "seconds per interval", flag="--interval", metavar="S", gt=0, allow_inf_nan=False)
    perf_buffer: bool = option(
        False, "send events through perf buffers even where a ring buffer exists", flag="--perf-buffer"
    )
    flow_map_size: int = option(65536, "flow map entries", flag="--flow-map-size", metavar="N", gt=0, le=MAX_MAP_SIZE)
    ring_pages: int = option(
        4096,
        "event ring buffer pages (4096: 16 MiB of kernel memory, taken when the probes load, for 131,072 events; "
        "fewer pages lose events sooner when they come in bursts)",
        flag="--ring-pages",
        metavar="N",
        gt=0,
    )
    perf_pages: int = option(64, "perf buffer pages per CPU (perf-buffer path)", flag="--perf-pages", metavar="N", gt=0)
    drop_events_rate: int = option(
        1000, "drop events sent per second per CPU (all drops are still counted)", flag="--drop-events-rate",
        metavar="N", gt=0,
    )  # fmt: skip
    drop_map_size: int = option(
        16384, "entries of the drop counts (per flow and reason)", flag="--drop-map-size", metavar="N",
        gt=0, le=MAX_MAP_SIZE,
    )  # fmt: skip
    tcp_map_size: int = option(
        16384, "entries of the TCP counters (retransmits, resets, RTT per flow)", flag="--tcp-map-size",
        metavar="N", gt=0, le=MAX_MAP_SIZE,
    )  # fmt: skip
    tcp_events_rate: int = option(
        1000, "retransmit and reset events sent per second per CPU (all are still counted)",
        flag="--tcp-events-rate", metavar="N", gt=0,
    )  # fmt: skip
    prefer_kprobes: bool = option(
        False, "run each probe family's kprobe variant where the kernel has kprobes, instead of its tracepoints",
        flag="--prefer-kprobes",
    )  # fmt: skip
    state_dir: str = option(
        "/run/flowscope", "directory of flowscope's state (the tc qdiscs it created, per network namespace)",
        flag="--state-dir", metavar="DIR",
    )  # fmt: skip
    host_root: str = option(
        "", "where a container has the node's lib/modules and usr/src (e.g. /host): kernel headers are looked for "
        "there first, symlinks resolved under it, then in the container's own /lib/modules and /usr/src; empty: "
        "only those", flag="--host-root", metavar="DIR",
    )  # fmt: skip

    _pages = field_validator("ring_pages", "perf_pages")(_power_of_two)

    @field_validator("host_root")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError("must be an absolute directory such as /host, or empty")
        return value


class IdentityConfig(Section):
    """How flows get their pod, workload, container and process."""

    kubeconfig: str | None = option(
        None,
        "watch pods, services and nodes through this kubeconfig (default: in-cluster when run in a pod)",
        flag="--kubeconfig",
        metavar="FILE",
    )
    metadata: str | None = option(
        None,
        "YAML or JSON naming pods, services and nodes by IP (hosts without Kubernetes, VMs, external peers)",
        flag="--metadata",
        metavar="FILE",
    )
    node_name: str | None = option(
        None, "this node's name (default: $NODE_NAME, the host name)", flag="--node-name", metavar="NAME"
    )
    grace: float = option(
        60.0, "keep a deleted pod's identity this long for late flows (seconds, or 90s, 5m)",
        flag="--identity-grace", metavar="DURATION",
    )  # fmt: skip

    _grace = field_validator("grace", mode="before")(seconds)


class ReplayConfig(Section):
    """A recording read instead of the probes."""

    file: str | None = option(
        None, "read a recording (capture JSON lines or Parquet) instead of running probes", flag="--replay",
        metavar="FILE",
    )  # fmt: skip
    speed: float | None = option(
        None, "replay pace (2 = twice as fast; 0 = as fast as possible)", flag="--speed", metavar="X", ge=0,
        allow_inf_nan=False,
    )  # fmt: skip
    skip_bad_records: bool = option(
        False, "count and skip records a recording cannot be read from, instead of stopping at the first",
        flag="--skip-bad-records",
    )  # fmt: skip
    exit_at_end: bool = option(
        False, "stop the agent when the recording ends (by default it keeps serving its outputs)",
        flag="--exit-at-end",
    )  # fmt: skip


class FlowLogConfig(Section):
    """The agent's embedded history: rotating Parquet files of flows and events."""

    enabled: bool = option(True, "write the Parquet flow log")
    directory: str = option(
        "/var/lib/flowscope", "the agent's data directory: the flow log's files, the ClickHouse spool",
        flag="--data-dir", metavar="DIR",
    )  # fmt: skip
    rotate_size: ByteSize = option(
        ByteSize(64 << 20), "start a new file past this size (e.g. 64MiB)", flag="--flowlog-rotate-size",
        metavar="SIZE", gt=0,
    )  # fmt: skip
    rotate_age: float = option(
        300.0, "start a new file after this long (e.g. 1h); readers see a file's records once it is complete",
        flag="--flowlog-rotate-age", metavar="DURATION",
    )  # fmt: skip
    retain_size: ByteSize = option(
        ByteSize(1 << 30), "delete the oldest files past this total size (e.g. 1GiB)", flag="--flowlog-retain-size",
        metavar="SIZE", gt=0,
    )  # fmt: skip
    retain_age: float = option(
        7 * 86400.0, "delete files older than this (e.g. 7d)", flag="--flowlog-retain-age", metavar="DURATION"
    )
    queue: int = option(64, "batches the flow log's queue holds before it counts losses", gt=0)

    _ages = field_validator("rotate_age", "retain_age", mode="before")(seconds)

    @field_validator("rotate_age")
    @classmethod
    def _positive_age(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than zero seconds")
        return value


class ClickHouseConfig(Section):
    """The ClickHouse flow store (flowscope.exporters.clickhouse)."""

    url: str | None = option(
        None, "write flows and events to ClickHouse: clickhouse://USER@HOST:9000/DB (?secure=1: TLS); the "
        "password from --clickhouse-password-file or FLOWSCOPE_CLICKHOUSE_PASSWORD (a password in the URL "
        "shows in ps)", flag="--clickhouse", metavar="URL",
    )  # fmt: skip
    password_file: str | None = option(
        None, "file whose first line is the ClickHouse password", flag="--clickhouse-password-file", metavar="FILE"
    )
    password: str | None = option(None, "the ClickHouse password (set it in the file or the environment)")
    cluster: str | None = option(
        None, "a ClickHouse cluster: ON CLUSTER DDL, replicated local tables, Distributed tables",
        flag="--clickhouse-cluster", metavar="NAME",
    )  # fmt: skip
    ttl_days: int = option(
        30, "days the raw flows and events are kept (servers 20.3 and later; 0: for ever)",
        flag="--clickhouse-ttl-days", metavar="DAYS", ge=0,
    )  # fmt: skip
    batch_rows: int = option(
        100_000, "rows an insert gathers at most", flag="--clickhouse-batch-rows", metavar="N", gt=0
    )
    batch_age: float = option(
        5.0, "the longest rows wait for an insert (e.g. 5s)", flag="--clickhouse-batch-age", metavar="DURATION"
    )
    buffer_rows: int = option(
        2_000_000, "rows held while the server is unreachable; past them the oldest are dropped and counted",
        flag="--clickhouse-buffer-rows", metavar="N", gt=0,
    )  # fmt: skip
    spool_size: ByteSize = option(
        ByteSize(0), "disk for the inserts that wait for an unreachable server (and those past the buffer), under "
        "the data dir's clickhouse-spool/; they survive a restart; past the size the oldest are dropped and counted "
        "(e.g. 1GiB; 0: memory only)", flag="--clickhouse-spool-size", metavar="SIZE", ge=0,
    )  # fmt: skip
    queue: int = option(64, "batches the ClickHouse writer's queue holds before it counts losses", gt=0)

    _age = field_validator("batch_age", mode="before")(seconds)


class StatusConfig(Section):
    """Where the agent answers `flowscope agent status` and health probes (HTTP: /healthz, /status)."""

    socket: str = option(
        "/run/flowscope/agent.sock", "unix socket of the status API (mode 0660)", flag="--status-socket",
        metavar="PATH",
    )  # fmt: skip
    address: str | None = option(
        None, "also serve the status API over TCP on HOST:PORT (e.g. 127.0.0.1:9465)", flag="--status-addr",
        metavar="HOST:PORT",
    )  # fmt: skip


class GrpcConfig(Section):
    """The gRPC flow API of the agent and the relay: flowscope's own service and Hubble's Observer, on unix
    sockets (mode 0660, root's) and, when asked, on TCP (TLS unless on loopback or forced)."""

    enabled: bool = option(True, "serve the gRPC flow API (own and Hubble-compatible)")
    socket: str = option(
        "/run/flowscope/flowscope.sock", "unix socket of the flow API (mode 0660)", flag="--grpc-socket",
        metavar="PATH",
    )  # fmt: skip
    hubble_socket: str = option(
        "/run/flowscope/hubble.sock", "unix socket for hubble clients (`hubble observe --server unix://PATH`)",
        flag="--hubble-socket", metavar="PATH",
    )  # fmt: skip
    address: str | None = option(
        None, "also serve the API on TCP HOST:PORT (TLS with --tls-cert/--tls-key; plaintext only on loopback)",
        flag="--grpc-addr", metavar="HOST:PORT",
    )  # fmt: skip
    tls_cert: str | None = option(
        None, "server certificate (PEM) for the TCP address", flag="--tls-cert", metavar="FILE"
    )
    tls_key: str | None = option(None, "server private key (PEM) for the TCP address", flag="--tls-key", metavar="FILE")
    tls_client_ca: str | None = option(
        None, "require client certificates signed by this CA (PEM): mutual TLS", flag="--tls-client-ca",
        metavar="FILE",
    )  # fmt: skip
    plaintext_anywhere: bool = option(
        False, "serve plaintext TCP on a non-loopback address: anyone who can reach it reads every flow",
        flag="--grpc-plaintext-anywhere",
    )  # fmt: skip
    ring: int = option(65536, "records the ring of recent records holds", flag="--grpc-ring", metavar="N", gt=0)
    client_queue: int = option(
        262144, "records queued per following client before it is sent lost notices instead",
        flag="--grpc-client-queue", metavar="N", gt=0,
    )  # fmt: skip
    max_clients: int = option(64, "streams served at once", flag="--grpc-max-clients", metavar="N", gt=0)
    queue: int = option(64, "batches the API's queue holds before it counts losses", gt=0)


class MetricsConfig(Section):
    """Prometheus /metrics (flowscope.exporters.prometheus): aggregated at each interval, read at scrape time."""

    address: str | None = option(
        None, "serve Prometheus /metrics on HOST:PORT (e.g. 127.0.0.1:9464; TLS with --metrics-tls-cert/-key, "
        "plaintext only on loopback)", flag="--metrics-addr", metavar="HOST:PORT",
    )  # fmt: skip
    tls_cert: str | None = option(
        None, "server certificate (PEM) for /metrics", flag="--metrics-tls-cert", metavar="FILE"
    )
    tls_key: str | None = option(
        None, "server private key (PEM) for /metrics", flag="--metrics-tls-key", metavar="FILE"
    )
    plaintext_anywhere: bool = option(
        False, "serve /metrics in plaintext on a non-loopback address: anyone who can reach it reads who talks to "
        "whom", flag="--metrics-plaintext-anywhere",
    )  # fmt: skip
    context: Literal["local", "source", "destination", "both"] = option(
        "local", "whose identity labels the per-workload series: the end on this node (labels namespace, "
        "workload), the source or destination (source_*, destination_*), or both ends",
        flag="--metrics-context", metavar="local|source|destination|both",
    )  # fmt: skip
    labels: Literal["namespace", "workload", "pod"] = option(
        "workload", "identity labels per end: namespace; namespace and workload; namespace and pod",
        flag="--metrics-labels", metavar="namespace|workload|pod",
    )  # fmt: skip
    server_port: bool = option(
        False, "label per-workload traffic with the server's port (never a port of the kernel's ephemeral range)",
        flag="--metrics-server-port",
    )  # fmt: skip
    budget: int = option(
        1000, "series per per-workload family at most: the most active keys (by bytes; TCP and drop locations by "
        "events, RTT by samples) keep their labels, the rest fold into \"other\"", flag="--metrics-budget",
        metavar="N", ge=2,
    )  # fmt: skip
    grace: float = option(
        300.0, "a workload that sends nothing for this long loses its series (e.g. 5m)", flag="--metrics-grace",
        metavar="DURATION",
    )  # fmt: skip
    queue: int = option(64, "batches the metrics' queue holds before it counts losses", gt=0)

    _grace = field_validator("grace", mode="before")(seconds)


class ClientConfig(Section):
    """How `observe`, `status`, `top --server`, the relay and read_grpc reach a flowscope server."""

    server: str = option(
        "unix:///run/flowscope/flowscope.sock", "the server: unix:///PATH or HOST:PORT", flag="--server",
        metavar="ADDR",
    )  # fmt: skip
    tls: bool = option(False, "connect with TLS (implied by --tls-ca, --tls-client-cert)", flag="--tls")
    tls_ca: str | None = option(
        None, "CA (PEM) the server's certificate is checked against", flag="--tls-ca", metavar="FILE"
    )
    tls_client_cert: str | None = option(
        None, "client certificate (PEM) for mutual TLS", flag="--tls-client-cert", metavar="FILE"
    )
    tls_client_key: str | None = option(
        None, "client private key (PEM) for mutual TLS", flag="--tls-client-key", metavar="FILE"
    )
    tls_server_name: str | None = option(
        None, "the name the server's certificate must carry (default: the host of --server)",
        flag="--tls-server-name", metavar="NAME",
    )  # fmt: skip
    timeout: float = option(
        10.0, "seconds to wait for the server to answer (connecting, unary calls)", flag="--timeout",
        metavar="DURATION",
    )  # fmt: skip

    _timeout = field_validator("timeout", mode="before")(seconds)


class RelayConfig(Section):
    """`flowscope relay`: the agents it merges."""

    peers: list[str] = option(
        [], "an agent's API, unix:///PATH or HOST:PORT (repeatable)", flag="--peer", metavar="ADDR"
    )
    discover_selector: str | None = option(
        None, "find the agents as the pods with these labels, through the Kubernetes API (e.g. "
        "app.kubernetes.io/name=flowscope; list + watch, with --kubeconfig or in-cluster)",
        flag="--discover-selector", metavar="LABELS",
    )  # fmt: skip
    discover_port: int | str = option(
        4244, "the flow API's TCP port on the discovered agents' pod IPs: a number, or the name of the agents' "
        "container port (e.g. grpc)", flag="--discover-port", metavar="PORT",
    )  # fmt: skip
    discover_namespace: str | None = option(
        None, "find the agents' pods in this namespace only (what a Role there grants: list + watch of its pods); "
        "default: in every namespace", flag="--discover-namespace", metavar="NAMESPACE",
    )  # fmt: skip
    sort_window: int = option(
        100000, "records held to merge the agents' streams in time order (past it the oldest go early)",
        flag="--sort-window", metavar="N", gt=0,
    )  # fmt: skip
    drain_timeout: float = option(
        5.0, "an agent silent this long no longer holds the others' records back", flag="--drain-timeout",
        metavar="DURATION",
    )  # fmt: skip
    backoff: float = option(
        0.5, "first wait before reconnecting to an agent (doubles, to 30 s)", flag="--backoff", metavar="DURATION"
    )
    interval: float = option(1.0, "seconds per batch the relay serves", flag="--relay-interval", metavar="S", gt=0)

    _durations = field_validator("drain_timeout", "backoff", mode="before")(seconds)
    _selector = field_validator("discover_selector")(_label_selector)
    _namespace = field_validator("discover_namespace")(_namespace_name)
    _port = field_validator("discover_port", mode="before")(_port_or_name)


class LogConfig(Section):
    format: Literal["text", "json"] = option(
        "text", "log format on stderr (json for log collectors)", flag="--log-format"
    )
    level: Literal["debug", "info", "warning", "error"] = option("info", "log level", flag="--log-level")


class Config(Section):
    probes: ProbesConfig = ProbesConfig()
    identity: IdentityConfig = IdentityConfig()
    replay: ReplayConfig = ReplayConfig()
    flowlog: FlowLogConfig = FlowLogConfig()
    clickhouse: ClickHouseConfig = ClickHouseConfig()
    status: StatusConfig = StatusConfig()
    grpc: GrpcConfig = GrpcConfig()
    metrics: MetricsConfig = MetricsConfig()
    client: ClientConfig = ClientConfig()
    relay: RelayConfig = RelayConfig()
    log: LogConfig = LogConfig()
    stop_timeout: float = option(
        10.0, "seconds the agent gives its outputs to flush and close when stopped", flag="--stop-timeout",
        metavar="DURATION",
    )  # fmt: skip

    _stop = field_validator("stop_timeout", mode="before")(seconds)


# ---- the settings, flags and variables --------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    path: tuple[str, ...]  # ("probes", "flow_map_size")
    annotation: Any
    default: Any
    help: str
    flag: str | None  # "--flow-map-size" (the long form)
    short: str | None  # "-i"
    metavar: str | None

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def env(self) -> str:
        name = self.flag.lstrip("-") if self.flag else "_".join(self.path)
        return ENV_PREFIX + name.replace("-", "_").upper()

    @property
    def is_bool(self) -> bool:
        return self.annotation is bool

    @property
    def is_list(self) -> bool:
        return "list[" in str(self.annotation)

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The values of a Literal setting (None for any other)."""
        return typing.get_args(self.annotation) if typing.get_origin(self.annotation) is Literal else None


def settings(model: type[BaseModel] = Config, prefix: tuple[str, ...] = ()) -> Iterator[Setting]:
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from settings(annotation, (*prefix, name))
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flags = str(extra.get("flag") or "").split("/")
        short = next((f for f in flags if f.startswith("-") and not f.startswith("--")), None)
        long = next((f for f in flags if f.startswith("--")), None)
        yield Setting(
            (*prefix, name), annotation, info.default, info.description or "", long, short, extra.get("metavar")
        )


SETTINGS: dict[tuple[str, ...], Setting] = {s.path: s for s in settings()}
BY_ENV = {s.env: s for s in SETTINGS.values()}


def section_settings(*sections: str) -> list[Setting]:
    """The settings of these sections (or top-level keys) that have a flag, in definition order."""
    return [s for s in SETTINGS.values() if s.flag and s.path[0] in sections]


# ---- reading them ---------------------------------------------------------------------------------------


def _nested(values: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in values.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# pydantic's error types in the words of the rest of flowscope's messages
_MESSAGES = {
    "extra_forbidden": "unknown key",
    "int_parsing": "is not a whole number",
    "int_from_float": "is not a whole number",
    "int_type": "is not a whole number",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "finite_number": "is not a finite number",
    "bool_parsing": "is not true or false",
    "bool_type": "is not true or false",
    "string_type": "is not text",
    "list_type": "is not a list",
    "model_type": "is not a section (a mapping of keys)",
    "model_attributes_type": "is not a section (a mapping of keys)",
    "greater_than": "must be more than {gt}",
    "greater_than_equal": "must be {ge} or more",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "literal_error": "must be {expected}",
    "byte_size": "is not a size (e.g. 64MiB, 1GB, 4096)",
    "byte_size_unit": "is not a size (e.g. 64MiB, 1GB, 4096)",
}


def _first_error(err: ValidationError) -> tuple[tuple[str, ...], str]:
    first = err.errors(include_url=False)[0]
    path = tuple(str(part) for part in first["loc"] if not isinstance(part, int))
    template = _MESSAGES.get(first["type"])
    if template is not None:
        message = template.format(**{k: v for k, v in (first.get("ctx") or {}).items()})
    else:
        message = first["msg"].removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
    if first["type"] == "greater_than" and first["ctx"]["gt"] == 0:
        message = "must be positive"
    return path, message


def read_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as err:
        raise ConfigError(f"cannot read the config file {path} ({err.strerror}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())  # PyYAML's reader errors span lines
        raise ConfigError(f"{path}: not valid YAML{where} ({problem}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must be a mapping of sections (probes:, flowlog:, ...).")
    return data


def read_env(environ: Mapping[str, str]) -> dict[tuple[str, ...], Any]:
    values: dict[tuple[str, ...], Any] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        setting = BY_ENV.get(name)
        if setting is None:
            raise ConfigError(f"{name} is not a flowscope setting; unset it (`flowscope agent --help` lists them).")
        values[setting.path] = _from_text(setting, text)
    return values


def _from_text(setting: Setting, text: str) -> Any:
    if setting.is_list:
        return [part.strip() for part in text.split(",") if part.strip()]
    if setting.is_bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
    return text


def load(
    file: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[tuple[str, ...], Any] | None = None,
) -> Config:
    """The effective configuration: defaults, then the file, then FLOWSCOPE_* variables, then flags."""
    file_values = read_file(file) if file else {}
    env_values = read_env(os.environ if environ is None else environ)
    flag_values = dict(flags or {})
    data: dict[str, Any] = {}
    for layer, origin in ((file_values, "file"), (_nested(env_values), "env"), (_nested(flag_values), "flags")):
        data = _merge(data, layer)
        try:
            config = Config.model_validate(data)
        except ValidationError as err:
            path, message = _first_error(err)
            raise ConfigError(_where(path, origin, file, env_values, flag_values) + message + ".") from None
    return config


def _where(
    path: tuple[str, ...],
    origin: str,
    file: str | None,
    env_values: Mapping[tuple[str, ...], Any],
    flag_values: Mapping[tuple[str, ...], Any],
) -> str:
    setting = SETTINGS.get(path)
    if origin == "flags" and path in flag_values and setting is not None and setting.flag:
        return f"{setting.flag} {flag_values[path]!r} "
    if origin == "env" and path in env_values and setting is not None:
        return f"{setting.env}={env_values[path]!r} "
    return f"{file}: {'.'.join(path)}: "


SECRETS = (("clickhouse", "password"),)
SECRET_URLS = (("clickhouse", "url"),)  # a password in them is left out


def url_without_password(url: str) -> str:
    """`url` with the password of its user part left out (scheme://user:secret@host/... -> scheme://user@host/...)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    user, at, host = rest[:end].rpartition("@")
    if not at or ":" not in user:
        return url
    return f"{scheme}://{user.partition(':')[0]}@{host}{rest[end:]}"


def as_yaml(config: Config) -> str:
    """The effective configuration as a file that `--config` reads back, secrets left out (null, and a password
    in a URL)."""
    import yaml

    data = config.model_dump(mode="json")
    for section, key in SECRETS:
        if data[section][key] is not None:
            data[section][key] = None
    for section, key in SECRET_URLS:
        if data[section][key] is not None:
            data[section][key] = url_without_password(data[section][key])
    return yaml.safe_dump(data, sort_keys=False)

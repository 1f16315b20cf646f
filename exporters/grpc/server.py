"""The gRPC server of the agent and the relay, and the agent's API sink.

One server serves flowscope's own service and Hubble's Observer on every address: the unix sockets (mode 0660,
root's; `hubble observe --server unix:///run/flowscope/hubble.sock` works unchanged) and, when asked, one TCP
address: TLS with a certificate and key (mutual with a client CA), plaintext only on loopback unless forced.
gRPC health checking (services "", "flowscope.v1.FlowScope", "hubble.server.Observer") and server reflection
are on.

    sink = GrpcSink(config.grpc)   # one more output of the pipeline (its node and probes are the pipeline's)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from flowscope.config import GrpcConfig
from flowscope.coverage import Coverage
from flowscope.exporters.grpc import hubble, own
from flowscope.exporters.grpc.ring import Api, NodeNotice, Ring
from flowscope.exporters.listen import ListenError, ListenFlags, read_pem, uses_tls
from flowscope.filters import FilterError
from flowscope.kernel.catalog import ProbeStatus
from flowscope.pipeline.status import SOCKET_MODE, claim_socket
from flowscope.proto.codec import timestamp
from flowscope.proto.flowscope.v1 import flowscope_pb2 as pb
from flowscope.proto.hubble.observer import observer_pb2 as hubble_pb
from flowscope.schema import FlowBatch

log = logging.getLogger(__name__)

HUBBLE_HEALTH = "hubble.server.Observer"  # the service `hubble status` checks
VERSION = f"flowscope {version('flowscope')}"
TCP_FLAGS = ListenFlags(
    "--grpc-addr", "--tls-cert", "--tls-key", "--grpc-plaintext-anywhere", "the flow API", "every flow"
)


class ApiError(ListenError):
    """The API cannot be served as configured; the message is one sentence that says what to do."""


@dataclass
class NodeInfo:
    """A node as GetNodes reports it (an agent: itself; a relay: each agent)."""

    name: str
    state: str = "connected"  # connected | unavailable
    address: str = ""
    version: str = VERSION
    tls: bool = False
    server_name: str = ""
    uptime_ns: int = 0
    seen: int = 0
    buffered: int = 0
    capacity: int = 0
    message: str = ""


@dataclass
class ServerState:
    """What ServerStatus reports beyond the ring's own counts."""

    node: str
    probes: list[ProbeStatus] = field(default_factory=list)
    sources: Coverage = field(default_factory=Coverage)
    nodes: list[NodeInfo] | None = None  # a relay's agents; None on an agent


class FlowServer:
    """The gRPC server over a Ring; `state()` gives what ServerStatus and GetNodes report."""

    def __init__(self, config: GrpcConfig, ring: Ring, state: Callable[[], ServerState]) -> None:
        self.config = config
        self.ring = ring
        self.state = state
        self.own = own.OwnApi()
        self.hubble = hubble.HubbleApi()
        self.health = health.HealthServicer()
        self.tcp_port: int | None = None
        self.tls = bool(config.tls_cert)
        self._sockets: list[str] = []
        workers = config.max_clients + 4
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flowscope-grpc"),
            maximum_concurrent_rpcs=workers,
            options=[("grpc.so_reuseport", 0)],  # a port in use is an error, not a second listener
        )
        self.server.add_generic_rpc_handlers((self._own_handlers(), self._hubble_handlers()))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (own.SERVICE, hubble.SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    # ---- starting and stopping -----------------------------------------------------------------------------

    def start(self) -> None:
        try:
            for path, flag in ((self.config.socket, "--grpc-socket"), (self.config.hubble_socket, "--hubble-socket")):
                self._bind_unix(path, flag)
            if self.config.address:
                self._bind_tcp(self.config.address)
        except BaseException:
            self._remove_sockets()
            raise
        self.server.start()
        for name in ("", own.SERVICE, HUBBLE_HEALTH):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.ring.close()
        self.server.stop(grace).wait(grace + 1.0)
        self._remove_sockets()

    def _bind_unix(self, path: str, flag: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        claim_socket(path, flag)
        previous = os.umask(0o117)  # created 0660: root and its group only
        try:
            self.server.add_insecure_port(f"unix:{path}")
        except RuntimeError:
            raise ApiError(f"cannot serve the flow API on {path}; choose another {flag}.") from None
        finally:
            os.umask(previous)
        os.chmod(path, SOCKET_MODE)
        self._sockets.append(path)

    def _bind_tcp(self, address: str) -> None:
        config = self.config
        _host, _port, tls = uses_tls(address, config.tls_cert, config.tls_key, config.plaintext_anywhere, TCP_FLAGS)
        try:
            if tls:
                assert config.tls_cert and config.tls_key
                key = read_pem(config.tls_key, "--tls-key", "PRIVATE KEY")
                cert = read_pem(config.tls_cert, "--tls-cert", "CERTIFICATE")
                client_ca = (
                    read_pem(config.tls_client_ca, "--tls-client-ca", "CERTIFICATE") if config.tls_client_ca else None
                )
                credentials = grpc.ssl_server_credentials(
                    [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
                )
                self.tcp_port = self.server.add_secure_port(address, credentials)
            else:
                self.tcp_port = self.server.add_insecure_port(address)
        except RuntimeError:
            raise ApiError(f"cannot serve the flow API on {address} (in use or not this host's address).") from None

    def _remove_sockets(self) -> None:
        for path in self._sockets:
            if os.path.exists(path):
                os.unlink(path)
        self._sockets = []

    # ---- the services ----------------------------------------------------------------------------------------

    def _own_handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            own.SERVICE,
            {
                "GetFlows": _stream(self._own_flows, pb.GetFlowsRequest),
                "ServerStatus": _unary(self._own_status, pb.ServerStatusRequest),
                "GetNodes": _unary(self._own_nodes, pb.GetNodesRequest),
                "GetNamespaces": _unary(self._own_namespaces, pb.GetNamespacesRequest),
            },
        )

    def _hubble_handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            hubble.SERVICE,
            {
                "GetFlows": _stream(self._hubble_flows, hubble_pb.GetFlowsRequest),
                "ServerStatus": _unary(self._hubble_status, hubble_pb.ServerStatusRequest),
                "GetNodes": _unary(self._hubble_nodes, hubble_pb.GetNodesRequest),
                "GetAgentEvents": _stream(_unimplemented("agent events"), hubble_pb.GetAgentEventsRequest),
                "GetDebugEvents": _stream(_unimplemented("debug events"), hubble_pb.GetDebugEventsRequest),
            },
        )

    def _flows(self, api: Api, query: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        return self.ring.stream(api, query, context.is_active)

    def _own_flows(self, request: pb.GetFlowsRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            query = own.query(request)
        except (ValueError, FilterError) as err:
            own.invalid(context, err)
        return self._flows(self.own, query, context)

    def _hubble_flows(self, request: hubble_pb.GetFlowsRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            query = hubble.query(request)
        except (ValueError, FilterError) as err:
            own.invalid(context, err)
        return self._flows(self.hubble, query, context)

    def _nodes(self) -> tuple[ServerState, list[NodeInfo]]:
        state = self.state()
        if state.nodes is not None:
            return state, state.nodes
        ring = self.ring.state()
        address = self.config.address or f"unix://{self.config.socket}"
        me = NodeInfo(
            state.node, address=address, tls=self.tls, uptime_ns=ring["uptime_ns"], seen=ring["seen"],
            buffered=ring["buffered"], capacity=ring["capacity"],
        )  # fmt: skip
        return state, [me]

    def _own_status(self, _request: Any, _context: grpc.ServicerContext) -> pb.ServerStatusResponse:
        state, ring = self.state(), self.ring.state()
        response = pb.ServerStatusResponse(
            node=state.node, version=VERSION, uptime_ns=ring["uptime_ns"], seen=ring["seen"],
            buffered=ring["buffered"], capacity=ring["capacity"], rate=ring["rate"], clients=ring["clients"],
            client_lost=ring["client_lost"],
            probes=[pb.Probe(name=p.name, active=p.active, hook=p.hook, reason=p.reason) for p in state.probes],
        )  # fmt: skip
        for name, count in state.sources.sources.items():
            response.sources[name].CopyFrom(
                pb.Count(produced=count.produced, delivered=count.delivered, lost=count.lost)
            )
        if state.nodes is not None:
            response.connected_nodes = sum(node.state == "connected" for node in state.nodes)
            response.unavailable_nodes.extend(node.name for node in state.nodes if node.state != "connected")
        return response

    def _own_nodes(self, _request: Any, _context: grpc.ServicerContext) -> pb.GetNodesResponse:
        _state, nodes = self._nodes()
        return pb.GetNodesResponse(
            nodes=[
                pb.Node(
                    name=n.name,
                    state=own.NODE_STATES[n.state],
                    version=n.version,
                    address=n.address,
                    tls=pb.TLS(enabled=n.tls, server_name=n.server_name),
                    uptime_ns=n.uptime_ns,
                    seen=n.seen,
                    buffered=n.buffered,
                    capacity=n.capacity,
                    message=n.message,
                )
                for n in nodes
            ]
        )

    def _own_namespaces(self, _request: Any, _context: grpc.ServicerContext) -> pb.GetNamespacesResponse:
        latest = self.ring.namespaces()
        return pb.GetNamespacesResponse(
            namespaces=[pb.Namespace(name=name, last_seen=timestamp(latest[name])) for name in sorted(latest)]
        )

    def _hubble_status(self, _request: Any, _context: grpc.ServicerContext) -> hubble_pb.ServerStatusResponse:
        state, ring = self.state(), self.ring.state()
        response = hubble_pb.ServerStatusResponse(
            num_flows=ring["buffered"], max_flows=ring["capacity"], seen_flows=ring["seen"],
            uptime_ns=ring["uptime_ns"], version=VERSION, flows_rate=ring["rate"],
        )  # fmt: skip
        if state.nodes is not None:
            response.num_connected_nodes.value = sum(node.state == "connected" for node in state.nodes)
            unavailable = [node.name for node in state.nodes if node.state != "connected"]
            response.num_unavailable_nodes.value = len(unavailable)
            response.unavailable_nodes.extend(unavailable)
        return response

    def _hubble_nodes(self, _request: Any, _context: grpc.ServicerContext) -> hubble_pb.GetNodesResponse:
        _state, nodes = self._nodes()
        return hubble.nodes_response(nodes)

    def announce(self, notice: NodeNotice) -> None:
        self.ring.announce(notice)


def _identity(data: bytes) -> bytes:
    return data


def _stream(handler: Callable, request: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(
        handler, request_deserializer=request.FromString, response_serializer=_identity
    )


def _unary(handler: Callable, request: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        handler, request_deserializer=request.FromString, response_serializer=lambda m: m.SerializeToString()
    )


def _unimplemented(what: str) -> Callable:
    def handler(_request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"flowscope has no Cilium {what}")
        yield b""  # pragma: no cover - abort raises

    return handler


class GrpcSink:
    """The pipeline's output that keeps the ring of recent records and serves the flow API from it."""

    name = "grpc"

    def __init__(self, config: GrpcConfig, node: str = "") -> None:
        self.config = config
        self.node = node
        self.probes: Callable[[], list[ProbeStatus]] = list
        self.nodes: Callable[[], list[NodeInfo]] | None = None  # a relay's agents
        self.ring = Ring(config.ring, config.client_queue)
        self.coverage = Coverage()
        self._lock = threading.Lock()
        self.server = FlowServer(config, self.ring, self._state)

    def _state(self) -> ServerState:
        with self._lock:
            sources = Coverage()
            sources.merge(self.coverage)
        return ServerState(self.node, self.probes(), sources, self.nodes() if self.nodes is not None else None)

    def bind(self, pipeline: Any) -> None:
        """The pipeline it serves: its node and probes are what ServerStatus reports."""
        self.node = self.node or pipeline.source.node
        self.probes = pipeline.probes
        if hasattr(pipeline.source, "nodes"):  # a relay: its agents, and their comings and goings in-band
            self.nodes = pipeline.source.nodes
            pipeline.source.subscribe(self.server.announce)

    def open(self) -> None:
        self.server.start()

    def write(self, batch: FlowBatch) -> None:
        with self._lock:
            self.coverage.merge(batch.coverage)
        self.ring.add(batch, self.node)

    def close(self) -> None:
        self.server.stop()

    def health(self) -> dict[str, Any]:
        return {"state": "ok", **self.ring.state()}

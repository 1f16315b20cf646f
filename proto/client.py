"""A client of flowscope's own API (an agent or a relay): `observe`, `status`, `top --server`, the relay and
`flowscope.analysis.read_grpc` use it.

    client = Client(ClientConfig(server="unix:///run/flowscope/flowscope.sock"))
    for response in client.flows(follow=True, allow=["namespace=shop"]): ...
    source = RemoteSource(client)     # a BatchSource: one FlowBatch per interval of the server
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pandas as pd
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowscope.config import ClientConfig
from flowscope.coverage import Coverage
from flowscope.kernel.catalog import ProbeStatus
from flowscope.proto import codec
from flowscope.proto.flowscope.v1 import flowscope_pb2 as pb
from flowscope.proto.flowscope.v1 import flowscope_pb2_grpc as pb_grpc
from flowscope.schema import FlowBatch

SERVICE = "flowscope.v1.FlowScope"


class ClientError(RuntimeError):
    """The server cannot be reached or refused the request; the message is one sentence that says what to do."""


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise ClientError(f"cannot read {flag} {path} ({err.strerror}); give a readable PEM file.") from None


def target(server: str) -> str:
    """The gRPC target of --server: unix:///PATH as it is, HOST:PORT for TCP."""
    if server.startswith("unix:"):
        return server
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise ClientError(f"--server {server!r} is not unix:///PATH or HOST:PORT.")
    return server


def open_channel(config: ClientConfig) -> grpc.Channel:
    address = target(config.server)
    tls = config.tls or bool(config.tls_ca or config.tls_client_cert)
    if not tls:
        return grpc.insecure_channel(address)
    if address.startswith("unix:"):
        raise ClientError("TLS is for TCP servers; a unix socket is reached without --tls.")
    if bool(config.tls_client_cert) != bool(config.tls_client_key):
        raise ClientError("mutual TLS needs both --tls-client-cert and --tls-client-key.")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(config.tls_ca, "--tls-ca") if config.tls_ca else None,
        private_key=_read(config.tls_client_key, "--tls-client-key") if config.tls_client_key else None,
        certificate_chain=_read(config.tls_client_cert, "--tls-client-cert") if config.tls_client_cert else None,
    )
    options = [("grpc.ssl_target_name_override", config.tls_server_name)] if config.tls_server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def explain(err: grpc.RpcError, server: str) -> ClientError:
    """One sentence for a failed call."""
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ClientError(f"the server refused the request: {details}.")
    if code == grpc.StatusCode.UNAVAILABLE:
        return ClientError(f"no flowscope server answers on {server} ({details}); start one or check --server and TLS.")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(f"{server} did not answer in time; raise --timeout or check the server.")
    return ClientError(f"{server} answered {code.name}: {details}.")


def timestamp_of(value: Any) -> Any:
    return codec.timestamp(pd.Timestamp(value).tz_localize("UTC").value if pd.Timestamp(value).tzinfo is None
                           else pd.Timestamp(value).value)  # fmt: skip


def request(
    number: int = 0, first: bool = False, follow: bool = False, allow: Sequence[str] = (), deny: Sequence[str] = (),
    since: Any = None, until: Any = None,
) -> pb.GetFlowsRequest:  # fmt: skip
    message = pb.GetFlowsRequest(
        number=number, first=first, follow=follow, allow=[pb.Filter(expression=text) for text in allow],
        deny=[pb.Filter(expression=text) for text in deny],
    )  # fmt: skip
    if since is not None:
        message.since.CopyFrom(timestamp_of(since))
    if until is not None:
        message.until.CopyFrom(timestamp_of(until))
    return message


class Client:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.channel = open_channel(config)
        self.stub = pb_grpc.FlowScopeStub(self.channel)
        self._calls: list[Any] = []

    def _unary(self, method: Any, message: Any) -> Any:
        try:
            return method(message, timeout=self.config.timeout, wait_for_ready=False)
        except grpc.RpcError as err:
            raise explain(err, self.config.server) from None

    def status(self) -> pb.ServerStatusResponse:
        return self._unary(self.stub.ServerStatus, pb.ServerStatusRequest())

    def nodes(self) -> pb.GetNodesResponse:
        return self._unary(self.stub.GetNodes, pb.GetNodesRequest())

    def namespaces(self) -> pb.GetNamespacesResponse:
        return self._unary(self.stub.GetNamespaces, pb.GetNamespacesRequest())

    def healthy(self, service: str = SERVICE) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        answer = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    def flows(self, message: pb.GetFlowsRequest) -> Iterator[pb.GetFlowsResponse]:
        """The server's responses to a GetFlows, one per record (packed ones unpacked); ClientError when the
        call fails (cancel() ends a follow)."""
        call = self.stub.GetFlows(message)
        self._calls.append(call)
        try:
            for response in call:
                if response.WhichOneof("response") == "records":
                    yield from response.records.items
                else:
                    yield response
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise explain(err, self.config.server) from None
        finally:
            call.cancel()  # a follow left (Ctrl-C in it, or its reader gone) ends at the server too
            self._calls.remove(call)

    def cancel(self) -> None:
        for call in list(self._calls):
            call.cancel()

    def close(self) -> None:
        self.cancel()
        self.channel.close()


def batches_of(responses: Iterator[pb.GetFlowsResponse]) -> Iterator[FlowBatch]:
    """FlowBatches from a GetFlows stream: one per progress mark (an interval of the server), lost notices in
    its coverage (source "<node>/<source>" for a relay's, "<source>" for an agent's), the rest at the end."""
    flows: list[pb.FlowRecord] = []
    events: list[pb.EventRecord] = []
    coverage = Coverage()
    start: pd.Timestamp | None = None

    def batch(end: pd.Timestamp | None) -> FlowBatch:
        flow_frame, event_frame = codec.flows_from(flows), codec.events_from(events)
        times = [t for t in (*flow_frame["time_start"].dropna(), *event_frame["time"].dropna()) if t is not None]
        first = start if start is not None else (min(times) if times else end)
        last = end if end is not None else (max(times) if times else first)
        return FlowBatch(first, last, flow_frame, event_frame, coverage)

    for response in responses:
        kind = response.WhichOneof("response")
        if kind == "flow":
            flows.append(response.flow)
        elif kind == "event":
            events.append(response.event)
        elif kind == "lost":
            coverage.add(response.lost.source, response.lost.count, 0, response.lost.count)
        elif kind == "progress":
            end = pd.Timestamp(codec.nanoseconds(response.progress.time), unit="ns", tz="UTC")
            if flows or events or coverage.sources:
                yield batch(end)
            flows, events, coverage, start = [], [], Coverage(), end
    if flows or events or coverage.sources:
        yield batch(None)


class RemoteSource:
    """A BatchSource that follows a remote agent or relay: `flowscope top --server`; with `since`, the server's
    intervals from then on come first."""

    def __init__(self, client: Client, allow: Sequence[str] = (), since: Any = None) -> None:
        self.client = client
        self.allow = allow
        self.since = since
        status = client.status()
        self.node = status.node
        self.interval = 0.0
        self._probes = [ProbeStatus(p.name, p.active, p.hook, p.reason) for p in status.probes]

    def probes(self) -> list[ProbeStatus]:
        return self._probes

    def batches(self, stop: threading.Event) -> Iterator[FlowBatch]:
        watcher = threading.Thread(target=lambda: (stop.wait(), self.client.cancel()), daemon=True)
        watcher.start()
        for batch in batches_of(self.client.flows(request(follow=True, allow=self.allow, since=self.since))):
            if batch.time_start is not None and batch.time_end is not None and self.interval == 0.0:
                self.interval = max((batch.time_end - batch.time_start).total_seconds(), 0.0)
            yield batch
            if stop.is_set():
                return

    def close(self) -> None:
        self.client.close()

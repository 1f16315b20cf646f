"""flowscope's own service (flowscope.v1.FlowScope): GetFlows streams every column of the flow and event
records (proto/codec.py), packed many to a stream message (Records), lost notices in-band and progress marks;
ServerStatus, GetNodes, GetNamespaces."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from flowscope.exporters.grpc.ring import Chunk, NodeNotice, Notice, Query, View, time_ns, view_of
from flowscope.filters import FilterError, FilterSet, parse_filter
from flowscope.proto import codec
from flowscope.proto.codec import timestamp, varint
from flowscope.proto.flowscope.v1 import flowscope_pb2 as pb

SERVICE = "flowscope.v1.FlowScope"
_RESPONSE = pb.GetFlowsResponse.DESCRIPTOR.fields_by_name
_FLOW, _EVENT = (varint(_RESPONSE[name].number << 3 | 2) for name in ("flow", "event"))
_NODE_TAG = varint(_RESPONSE["node"].number << 3 | 2)
NODE_STATES = {"connected": pb.NODE_CONNECTED, "unavailable": pb.NODE_UNAVAILABLE}
_RECORDS_TAG = varint(_RESPONSE["records"].number << 3 | 2)
_ITEM_TAG = varint(pb.Records.DESCRIPTOR.fields_by_name["items"].number << 3 | 2)
PACK_BYTES = 256 * 1024  # per stream message: far below gRPC's 4 MiB default limit


def node_suffix(node: str) -> bytes:
    data = node.encode()
    return _NODE_TAG + varint(len(data)) + data if data else b""


class OwnApi:
    name = "own"

    def view(self, chunk: Chunk) -> View:
        flows, events = chunk.batch.flows, chunk.batch.events
        suffix = node_suffix(chunk.node)
        count = len(flows)

        def encode(rows: np.ndarray) -> list[bytes]:
            flow_rows, event_rows = rows[rows < count], rows[rows >= count] - count
            encoded = dict(zip(flow_rows.tolist(), codec.encoded_flows(flows.iloc[flow_rows]), strict=True))
            for row, data in zip(event_rows.tolist(), codec.encoded_events(events.iloc[event_rows]), strict=True):
                encoded[count + row] = data
            return [
                (_FLOW if row < count else _EVENT) + varint(len(data)) + data + suffix
                for row, data in ((row, encoded[row]) for row in rows.tolist())
            ]

        return view_of(flows, events, time_ns(flows["time_end"]), time_ns(events["time"]), encode)

    def notice(self, notice: Notice, node: str) -> bytes:
        lost = pb.LostNotice(
            source=notice.source, count=notice.count, time_start=timestamp(notice.time_start),
            time_end=timestamp(notice.time_end),
        )  # fmt: skip
        return pb.GetFlowsResponse(lost=lost, node=node).SerializeToString()

    def progress(self, time_ns: int, node: str) -> bytes:
        return pb.GetFlowsResponse(progress=pb.Progress(time=timestamp(time_ns)), node=node).SerializeToString()

    def pack(self, records: list[bytes]) -> list[bytes]:
        """The records' responses as few `records` messages of at most about PACK_BYTES each."""
        messages, items, size = [], [], 0
        for record in records:
            items.append(_ITEM_TAG + varint(len(record)) + record)
            size += len(items[-1])
            if size >= PACK_BYTES:
                messages.append(_records(items))
                items, size = [], 0
        if items:
            messages.append(_records(items))
        return messages

    def node_status(self, notice: NodeNotice) -> bytes:
        status = pb.NodeStatus(state=NODE_STATES[notice.state], nodes=notice.nodes, message=notice.message)
        return pb.GetFlowsResponse(node_status=status).SerializeToString()


def _records(items: list[bytes]) -> bytes:
    body = b"".join(items)
    return _RECORDS_TAG + varint(len(body)) + body


def filter_set(request: pb.GetFlowsRequest) -> FilterSet:
    """The request's allow and deny filters; FilterError names the list, its index and the bad term."""

    def parsed(filters: Any, what: str) -> tuple:
        out = []
        for index, item in enumerate(filters):
            try:
                out.append(parse_filter(item.expression))
            except FilterError as err:
                raise FilterError(err.term, f"{err.problem} (in {what}[{index}])") from None
        return tuple(out)

    return FilterSet(parsed(request.allow, "allow"), parsed(request.deny, "deny"))


def query(request: pb.GetFlowsRequest) -> Query:
    """The Query of a request; ValueError (the message names the field) when it is not a valid one."""
    if request.first and request.follow:
        raise ValueError("first: the first records cannot be followed; drop first or follow")
    since = codec.nanoseconds(request.since) if request.HasField("since") else None
    until = codec.nanoseconds(request.until) if request.HasField("until") else None
    if since is not None and until is not None and until < since:
        raise ValueError("until: it is before since")
    return Query(filter_set(request), request.number, request.first, request.follow, since, until)


def invalid(context: grpc.ServicerContext, err: Exception) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

"""Hubble's Observer service (package observer) over the same ring: flowscope's records as Hubble Flows, and
Hubble's FlowFilters mapped onto flowscope's filter engine.

Translation (a flow row, an event row -> flow.Flow):
- A flow row becomes a FORWARDED Flow of the packets that passed and, when it counts drops, a DROPPED Flow of
  the dropped ones. A row of counters only (no packet counted) is FORWARDED: seen and not dropped, as Cilium's
  trace points report what passes them, and as the filter's verdict=forwarded selects it; flowscope emits no
  other verdict, so Hubble's others (TRACED, AUDIT, ...) match nothing. time is the row's time_end; IP,
  l4 (ports, TCP flags, ICMP type/code), source/destination (namespace, pod_name, labels "k=v", workloads),
  node_name, traffic_direction, interface, cgroup_id; Type L3_L4; event_type a trace (4) at the hook where
  tc saw it: from-network (ingress) or to-network (egress). The summary keeps what Hubble has no field for:
  packets, bytes, the interval, retransmits, resets, RTT, and for a DROPPED Flow the kernel's reason.
- A drop event: DROPPED, event_type trace at to-stack, summary "kernel drop <REASON> at <function>". Cilium's
  drop-reason numbers describe its own datapath, not the kernel's reasons: drop_reason_desc stays
  DROP_REASON_UNKNOWN and the kernel's name is in the summary. Retransmits and resets: FORWARDED at to-stack,
  summary "TCP retransmit ..." / "TCP reset ...". connect/accept/close: Type SOCK, event_type trace-sock (7),
  summary "connect by <comm> (pid)", "close from <STATE> after <lifetime>".
- Lost notices: GetFlowsResponse.lost_events with the count and the interval (first, last): losses between the
  kernel and the agent as PERF_EVENT_RING_BUFFER, a sink's full queue and the relay's late records as
  OBSERVER_EVENTS_QUEUE, a slow client's as HUBBLE_RING_BUFFER (see lost_event_source); behind a relay the
  response's node_name is the node that lost them.

FlowFilter fields map onto filter terms (see FIELD_TERMS); a field flowscope cannot answer (FQDNs, services,
L7, identities, ...) is INVALID_ARGUMENT naming it, never ignored; so is a field these subset protos do not
know (a newer client's), by its number: "whitelist[0]: unsupported FlowFilter field number 40".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from flowscope.display import duration_us
from flowscope.exporters.grpc.ring import (
    CLIENT_SOURCE,
    LATE_SOURCE,
    Chunk,
    NodeNotice,
    Notice,
    Query,
    View,
    time_ns,
    view_of,
)
from flowscope.filters import Filter, FilterError, FilterSet, Term, term
from flowscope.proto.codec import column_values, nanoseconds, timestamp, varint
from flowscope.proto.hubble.flow import flow_pb2 as flow
from flowscope.proto.hubble.observer import observer_pb2 as observer
from flowscope.proto.hubble.relay import relay_pb2 as relay

SERVICE = "observer.Observer"
TRACE, TRACE_SOCK, DROP = 4, 7, 1  # Cilium's monitor message types
FROM_NETWORK, TO_NETWORK, TO_STACK = 10, 11, 3  # trace observation points
TCP_FLAG_BITS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20, "ECE": 0x40,
                 "CWR": 0x80, "NS": 0x100}  # fmt: skip
VERDICT_COLUMN = "hubble_verdict"
_FLOW_TAG = varint(observer.GetFlowsResponse.DESCRIPTOR.fields_by_name["flow"].number << 3 | 2)


# ---- records -> Flows --------------------------------------------------------------------------------------------


def verdict_rows(flows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The flow rows (numbers) that have a forwarded part, and those that have a dropped part."""
    packets = flows["packets"].to_numpy(dtype=np.int64, na_value=0)
    drops = flows["drop_packets"].to_numpy(dtype=np.int64, na_value=0)
    return np.flatnonzero((drops == 0) | (packets > drops)), np.flatnonzero(drops > 0)


def split_verdicts(flows: pd.DataFrame) -> pd.DataFrame:
    """The flow rows as Hubble sees them: one row per verdict (forwarded packets, dropped packets), the
    forwarded parts first, each in the rows' order (verdict_rows)."""
    forwarded_rows, dropped_rows = verdict_rows(flows)
    forwarded = flows.iloc[forwarded_rows].copy()
    dropped = flows.iloc[dropped_rows].copy()
    kept = forwarded["drop_packets"].to_numpy(dtype=np.int64, na_value=0) > 0
    if kept.any():
        for counter, drop_counter in (("packets", "drop_packets"), ("bytes", "drop_bytes")):
            forwarded.loc[kept, counter] = (
                forwarded.loc[kept, counter].astype("Int64")
                - forwarded.loc[kept, drop_counter].astype("Int64").fillna(0)
            ).astype(flows[counter].dtype)
        forwarded.loc[kept, ["drop_packets", "drop_bytes"]] = 0
        forwarded.loc[kept, "drop_reason"] = pd.NA
    forwarded[VERDICT_COLUMN] = "forwarded"
    # a row split in two keeps its TCP counters on its FORWARDED half only: summed over Hubble's output, they count once
    halves = np.isin(dropped_rows, forwarded_rows)
    if halves.any():
        dropped.loc[halves, ["retransmits", "resets"]] = 0
        dropped.loc[halves, "rtt_us"] = pd.NA
    dropped["packets"], dropped["bytes"] = dropped["drop_packets"], dropped["drop_bytes"]
    dropped[VERDICT_COLUMN] = "dropped"
    return pd.concat([forwarded, dropped], ignore_index=True)


def _endpoint(values: dict[str, Any]) -> flow.Endpoint:
    endpoint = flow.Endpoint()
    if values.get("namespace") is not None:
        endpoint.namespace = values["namespace"]
    if values.get("pod") is not None:
        endpoint.pod_name = values["pod"]
    if values.get("labels"):
        endpoint.labels.extend(f"{k}={v}" for k, v in sorted(values["labels"].items()))
    if values.get("workload") is not None:
        endpoint.workloads.add(name=values["workload"], kind=values.get("workload_kind") or "")
    return endpoint


def _l4(row: dict[str, Any]) -> flow.Layer4:
    protocol, sport, dport = row.get("protocol"), row.get("src_port") or 0, row.get("dst_port") or 0
    if protocol == "TCP":
        bits = row.get("tcp_flags") or 0
        flags = flow.TCPFlags(**{name: bool(bits & bit) for name, bit in TCP_FLAG_BITS.items()})
        return flow.Layer4(TCP=flow.TCP(source_port=sport, destination_port=dport, flags=flags))
    if protocol in ("UDP", "UDPLite"):
        return flow.Layer4(UDP=flow.UDP(source_port=sport, destination_port=dport))
    if protocol == "SCTP":
        return flow.Layer4(SCTP=flow.SCTP(source_port=sport, destination_port=dport))
    icmp = {"type": row.get("icmp_type") or 0, "code": row.get("icmp_code") or 0}
    if protocol == "ICMP":
        return flow.Layer4(ICMPv4=flow.ICMPv4(**icmp))
    if protocol == "ICMPv6":
        return flow.Layer4(ICMPv6=flow.ICMPv6(**icmp))
    return flow.Layer4()


def _flags_text(bits: Any) -> str:
    return ", ".join(name for name, bit in TCP_FLAG_BITS.items() if (bits or 0) & bit)


def _base(row: dict[str, Any], when: int | None) -> flow.Flow:
    message = flow.Flow(Type=flow.L3_L4)
    if when is not None:
        message.time.CopyFrom(timestamp(when))
    if row.get("src_ip") is not None or row.get("dst_ip") is not None:
        message.IP.source = row.get("src_ip") or ""
        message.IP.destination = row.get("dst_ip") or ""
        message.IP.ipVersion = {4: flow.IPv4, 6: flow.IPv6}.get(row.get("ip_version"), flow.IP_NOT_USED)
    message.l4.CopyFrom(_l4(row))
    for side, target in (("src", message.source), ("dst", message.destination)):
        target.CopyFrom(_endpoint({k.removeprefix(f"{side}_"): v for k, v in row.items() if k.startswith(f"{side}_")}))
    if row.get("node") is not None:
        message.node_name = row["node"]
    if row.get("ifname") is not None or row.get("ifindex") is not None:
        message.interface.CopyFrom(flow.NetworkInterface(index=row.get("ifindex") or 0, name=row.get("ifname") or ""))
    if row.get("cgroup_id") is not None:
        message.cgroup_id = row["cgroup_id"]
    return message


def flow_message(row: dict[str, Any]) -> flow.Flow:
    """The Hubble Flow of one row of split_verdicts()."""
    message = _base(row, row.get("time_end"))
    verdict = row[VERDICT_COLUMN]
    message.verdict = {"forwarded": flow.FORWARDED, "dropped": flow.DROPPED}[verdict]
    ingress = row.get("direction") == "ingress"
    message.traffic_direction = flow.INGRESS if ingress else flow.EGRESS if row.get("direction") else 0
    point = FROM_NETWORK if ingress else TO_NETWORK
    message.event_type.CopyFrom(flow.CiliumEventType(type=TRACE, sub_type=point))
    message.trace_observation_point = point
    parts = []
    if row.get("protocol") == "TCP":
        parts.append(f"TCP Flags: {_flags_text(row.get('tcp_flags')) or 'none'}")
    if verdict == "dropped":
        parts.append(f"kernel drop {row.get('drop_reason') or 'reason unknown'}")
    seconds = None
    if row.get("time_start") is not None and row.get("time_end") is not None:
        seconds = (row["time_end"] - row["time_start"]) / 1e9
    packets = f"{row.get('packets') or 0} packets, {row.get('bytes') or 0} bytes"
    parts.append(packets + (f" in {seconds:.3f}s" if seconds is not None else ""))
    for counter in ("retransmits", "resets"):
        if row.get(counter):
            parts.append(f"{counter} {row[counter]}")
    if row.get("rtt_us") is not None:
        parts.append(f"RTT {duration_us(row['rtt_us'])}")
    message.Summary = "; ".join(parts)
    return message


def event_message(row: dict[str, Any]) -> flow.Flow:
    """The Hubble Flow of one event row."""
    message = _base(row, row.get("time"))
    kind = row.get("kind")
    who = f" by {row['comm']} ({row['pid']})" if row.get("comm") is not None and row.get("pid") is not None else ""
    state = f" in {row['state']}" if row.get("state") else ""
    if kind in ("connect", "accept", "close"):
        message.Type = flow.SOCK
        message.verdict = flow.FORWARDED
        message.event_type.CopyFrom(flow.CiliumEventType(type=TRACE_SOCK))
        message.traffic_direction = {"connect": flow.EGRESS, "accept": flow.INGRESS}.get(kind, 0)
        summary = f"{kind}{who}"
        if kind == "close":
            summary += f" from {row['state']}" if row.get("state") else ""
            summary += f" after {duration_us(row['duration_us'])}" if row.get("duration_us") is not None else ""
    else:
        message.event_type.CopyFrom(flow.CiliumEventType(type=TRACE, sub_type=TO_STACK))
        message.trace_observation_point = TO_STACK
        if kind == "drop":
            message.verdict = flow.DROPPED
            where = f" at {row['location']}" if row.get("location") else ""
            size = f" ({row['bytes']} bytes)" if row.get("bytes") is not None else ""
            summary = f"kernel drop {row.get('drop_reason') or 'reason unknown'}{where}{size}"
        elif kind == "reset":
            message.verdict = flow.FORWARDED
            reason = f" ({row['reset_reason']})" if row.get("reset_reason") else ""
            summary = f"TCP reset{reason}{state}"
        else:
            message.verdict = flow.FORWARDED
            summary = f"TCP {kind}{state}"
    message.Summary = summary
    return message


def _rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    names = list(frame.columns)
    columns = [column_values(frame, name) for name in names]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def response_bytes(message: flow.Flow, node: str) -> bytes:
    body = message.SerializeToString()
    tail = observer.GetFlowsResponse(node_name=message.node_name or node, time=message.time).SerializeToString()
    return _FLOW_TAG + varint(len(body)) + body + tail


class HubbleApi:
    name = "hubble"

    def view(self, chunk: Chunk) -> View:
        flows, events = split_verdicts(chunk.batch.flows), chunk.batch.events
        count, node = len(flows), chunk.node
        # each row's record of the chunk (its flow row, or its event numbered after the chunk's flow rows)
        sources = np.concatenate([*verdict_rows(chunk.batch.flows), len(chunk.batch.flows) + np.arange(len(events))])

        def encode(rows: np.ndarray) -> list[bytes]:
            flow_rows, event_rows = rows[rows < count], rows[rows >= count] - count
            encoded = {
                r: response_bytes(flow_message(row), node)
                for r, row in zip(flow_rows.tolist(), _rows(flows.iloc[flow_rows]), strict=True)
            }
            for r, row in zip(event_rows.tolist(), _rows(events.iloc[event_rows]), strict=True):
                encoded[count + r] = response_bytes(event_message(row), node)
            return [encoded[r] for r in rows.tolist()]

        return view_of(flows, events, time_ns(flows["time_end"]), time_ns(events["time"]), encode, sources)

    def notice(self, notice: Notice, node: str) -> bytes:
        origin, _, source = notice.source.rpartition("/")  # a relay's sources are "<node>/<source>"
        lost = flow.LostEvent(
            source=lost_event_source(source), num_events_lost=notice.count, first=timestamp(notice.time_start),
            last=timestamp(notice.time_end),
        )  # fmt: skip
        return observer.GetFlowsResponse(
            lost_events=lost, node_name=origin or node, time=timestamp(notice.time_end)
        ).SerializeToString()

    def progress(self, time_ns: int, node: str) -> None:
        return None

    def pack(self, records: list[bytes]) -> list[bytes]:
        return records  # one Flow per message, as Hubble's clients read them

    def node_status(self, notice: NodeNotice) -> bytes:
        state = {"connected": relay.NODE_CONNECTED, "unavailable": relay.NODE_UNAVAILABLE}[notice.state]
        status = relay.NodeStatusEvent(state_change=state, node_names=notice.nodes, message=notice.message)
        return observer.GetFlowsResponse(node_status=status).SerializeToString()


def lost_event_source(source: str) -> int:
    """Hubble's LostEventSource of a flowscope loss source: a client too slow for its queue reads too late from
    the ring (HUBBLE_RING_BUFFER); a sink's full queue and the relay's late records are user-space stages that
    did not keep up (OBSERVER_EVENTS_QUEUE); the rest is lost between the kernel and the agent (its maps, rings
    and perf buffers: PERF_EVENT_RING_BUFFER)."""
    if source == CLIENT_SOURCE:
        return flow.HUBBLE_RING_BUFFER
    if source.startswith("sink:") or source == LATE_SOURCE:
        return flow.OBSERVER_EVENTS_QUEUE
    return flow.PERF_EVENT_RING_BUFFER


def nodes_response(nodes: Sequence[Any]) -> observer.GetNodesResponse:
    states = {"connected": relay.NODE_CONNECTED, "unavailable": relay.NODE_UNAVAILABLE}
    return observer.GetNodesResponse(
        nodes=[
            observer.Node(
                name=n.name,
                version=n.version,
                address=n.address,
                state=states[n.state],
                tls=observer.TLS(enabled=n.tls, server_name=n.server_name),
                uptime_ns=n.uptime_ns,
                num_flows=n.buffered,
                max_flows=n.capacity,
                seen_flows=n.seen,
            )
            for n in nodes
        ]
    )


# ---- FlowFilter -> filter terms ----------------------------------------------------------------------------------

_SIDED = {"source": "src", "destination": "dst"}
_PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "icmp": "ICMP", "icmpv4": "ICMP", "icmpv6": "ICMPv6", "sctp": "SCTP"}
_VERDICTS = {flow.FORWARDED: "forwarded", flow.DROPPED: "dropped"}
_DIRECTIONS = {flow.INGRESS: "ingress", flow.EGRESS: "egress"}
_SOCKET_KINDS = ["connect", "accept", "close"]


class UnsupportedField(ValueError):
    """A FlowFilter field flowscope cannot answer, or a value it cannot read; the message names the field."""


def _pods(values: Sequence[str]) -> list[str]:
    """Hubble's pod filters: "ns/prefix"; "prefix" alone is of namespace "default", as Hubble reads it (the
    CLI sends `--pod name --namespace ns` as "ns/name"); "/prefix" is flowscope's: a pod of any namespace."""
    return [value.removeprefix("/") if "/" in value else f"default/{value}" for value in values]


def _workloads(values: Sequence[flow.Workload], name: str) -> list[str]:
    for workload in values:
        if workload.kind:
            raise UnsupportedField(f"{name}.kind: flowscope filters workloads by name only")
        if not workload.name:
            raise UnsupportedField(f"{name}.name: a workload filter needs a name")
    return [workload.name for workload in values]


def _protocols(values: Sequence[str], name: str) -> list[str]:
    out = []
    for value in values:
        known = _PROTOCOLS.get(value.lower())
        if known is None:
            raise UnsupportedField(f"{name}: flowscope sees L3/L4 only, not {value!r}")
        out.append(known)
    return out


def _observers(values: Sequence[str], name: str) -> list[str]:
    if any("/" in value for value in values):
        raise UnsupportedField(f"{name}: flowscope nodes have no cluster name (drop the 'cluster/' part)")
    return list(values)


def _interfaces(values: Sequence[flow.NetworkInterface], name: str) -> list[str]:
    if any(not value.name for value in values):
        raise UnsupportedField(f"{name}.index: flowscope filters interfaces by name")
    return [value.name for value in values]


def _event_types(values: Sequence[flow.EventTypeFilter]) -> list[tuple[Term, ...]]:
    """Each event type filter as the terms that select what flowscope shows as that type (alternatives)."""
    alternatives = []
    for value in values:
        sub = value.sub_type if value.match_sub_type else None
        if value.type == DROP and sub is None:
            alternatives.append((term("verdict", ["dropped"]),))
        elif value.type == TRACE and sub is None:
            alternatives.append((term("type", _SOCKET_KINDS, negated=True),))
        elif value.type == TRACE and sub in (FROM_NETWORK, TO_NETWORK):
            alternatives.append((term("direction", ["ingress" if sub == FROM_NETWORK else "egress"]),))
        elif value.type == TRACE and sub == TO_STACK:
            alternatives.append((term("type", ["drop", "retransmit", "reset"]), term("type", ["flow"], negated=True)))
        elif value.type == TRACE_SOCK and sub is None:
            alternatives.append((term("type", _SOCKET_KINDS),))
        else:
            alternatives.append((term("type", []),))  # a type flowscope never produces: matches nothing
    return alternatives


def flow_filter(message: flow.FlowFilter) -> list[Filter]:
    """The filter engine's filters (ORed) for one FlowFilter; UnsupportedField names a field it cannot map."""
    terms: list[Term] = []
    alternatives: list[tuple[Term, ...]] = [()]
    for descriptor, values in message.ListFields():
        try:
            extra = _terms(descriptor.name, values)
        except FilterError as err:
            raise UnsupportedField(f"{descriptor.name}: {err.problem} ({err.term})") from None
        if descriptor.name == "event_type":
            alternatives = extra
        else:
            terms.extend(extra)
    return [Filter(" ".join(t.text for t in (*terms, *more)), (*terms, *more)) for more in alternatives]


def _terms(name: str, values: Any) -> list:
    """The terms of one FlowFilter field (for event_type: the alternatives, each a tuple of terms)."""
    side_name, _, field = name.partition("_")
    side = _SIDED.get(side_name)
    if side is not None and field in ("ip", "label", "port"):
        return [term(field, list(values), side=side)]
    if side is not None and field == "pod":
        return [term("pod", _pods(values), side=side)]
    if side is not None and field == "workload":
        return [term("workload", _workloads(values, name), side=side)]
    if name == "verdict":
        return [term("verdict", [_VERDICTS[v] for v in values if v in _VERDICTS])]
    if name == "traffic_direction":
        if any(v not in _DIRECTIONS for v in values):
            raise UnsupportedField(f"{name}: flowscope's records are ingress or egress")
        return [term("direction", [_DIRECTIONS[v] for v in values])]
    if name == "protocol":
        return [term("protocol", _protocols(values, name))]
    if name == "node_name":
        return [term("observer", _observers(values, name))]
    if name == "ip_version":
        networks = {flow.IPv4: "0.0.0.0/0", flow.IPv6: "::/0"}
        return [term("ip", [networks[v] for v in values if v in networks])]
    if name == "interface":
        return [term("ifname", _interfaces(values, name))]
    if name == "event_type":
        return _event_types(values)
    raise UnsupportedField(f"{name}: flowscope cannot filter on it")


def unknown_field(message: Message, path: str) -> str | None:
    """What `message` (or a message inside it) carries that these subset protos do not know, e.g. a FlowFilter
    field of a newer hubble CLI: "<path>: unsupported FlowFilter field number 40"; None when all is known.
    Such a field would otherwise be dropped silently by the parser's descriptor-driven accessors."""
    numbers = sorted({field.field_number for field in UnknownFieldSet(message)})
    if numbers:
        plural = "s" if len(numbers) > 1 else ""
        listed = ", ".join(str(number) for number in numbers)
        return f"{path}: unsupported {message.DESCRIPTOR.name} field number{plural} {listed}"
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None or descriptor.message_type.GetOptions().map_entry:
            continue
        items = [(None, value)] if isinstance(value, Message) else enumerate(value)  # one message or a list
        for index, item in items:
            where = f"{path}.{descriptor.name}" + ("" if index is None else f"[{index}]")
            found = unknown_field(item, where)
            if found is not None:
                return found
    return None


def filter_set(whitelist: Sequence[flow.FlowFilter], blacklist: Sequence[flow.FlowFilter]) -> FilterSet:
    """Hubble's whitelist minus blacklist; ValueError names the list, index and field of what cannot be mapped
    (a field these protos do not know by its number)."""

    def mapped(filters: Sequence[flow.FlowFilter], what: str) -> tuple[Filter, ...]:
        out: list[Filter] = []
        for index, message in enumerate(filters):
            unknown = unknown_field(message, f"{what}[{index}]")
            if unknown is not None:
                raise ValueError(unknown)
            try:
                out.extend(flow_filter(message))
            except UnsupportedField as err:
                raise ValueError(f"{what}[{index}].{err}") from None
        return tuple(out)

    return FilterSet(mapped(whitelist, "whitelist"), mapped(blacklist, "blacklist"))


def query(request: observer.GetFlowsRequest) -> Query:
    if request.first and request.follow:
        raise ValueError("first: the first flows cannot be followed; drop first or follow")
    since = nanoseconds(request.since) if request.HasField("since") else None
    until = nanoseconds(request.until) if request.HasField("until") else None
    return Query(
        filter_set(request.whitelist, request.blacklist), request.number, request.first, request.follow, since, until
    )

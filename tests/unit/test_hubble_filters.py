"""A Hubble FlowFilter field that flowscope's subset protos do not know (a newer hubble CLI's) is refused,
naming the list, the index and the field number, never ignored: ignoring it would widen what the filter
selects (a whitelist) or narrow it (a blacklist) without telling the user."""

import pytest

from flowscope.exporters.grpc.hubble import filter_set, query
from flowscope.proto.codec import varint
from flowscope.proto.hubble.flow import flow_pb2 as flow
from flowscope.proto.hubble.observer import observer_pb2 as observer


def unknown_varint(number: int, value: int = 1) -> bytes:
    return varint(number << 3 | 0) + varint(value)


def unknown_bytes(number: int, data: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(data)) + data


def with_unknown(message, *fields: bytes):
    return type(message).FromString(message.SerializeToString() + b"".join(fields))


def test_an_unknown_flow_filter_field_is_refused_by_number():
    known = flow.FlowFilter(source_pod=["shop/checkout"])
    newer = with_unknown(known, unknown_varint(40))
    with pytest.raises(ValueError) as raised:
        filter_set([newer], [])
    assert str(raised.value) == "whitelist[0]: unsupported FlowFilter field number 40"


def test_several_unknown_fields_are_all_named_in_order():
    newer = with_unknown(flow.FlowFilter(), unknown_bytes(41, b"xy"), unknown_varint(40, 300))
    with pytest.raises(ValueError) as raised:
        filter_set([flow.FlowFilter(verdict=[flow.DROPPED])], [flow.FlowFilter(), newer])
    assert str(raised.value) == "blacklist[1]: unsupported FlowFilter field numbers 40, 41"


def test_an_unknown_field_inside_a_known_one_is_refused_with_its_path():
    event_type = with_unknown(flow.EventTypeFilter(type=4), unknown_varint(4))
    newer = flow.FlowFilter(event_type=[flow.EventTypeFilter(type=1), event_type])
    with pytest.raises(ValueError) as raised:
        filter_set([newer], [])
    assert str(raised.value) == "whitelist[0].event_type[1]: unsupported EventTypeFilter field number 4"


def test_a_request_from_the_wire_with_an_unknown_filter_field_is_refused():
    # As gRPC hands it to the server: the request parsed from bytes, the unknown field inside its FlowFilter.
    newer = unknown_bytes(6, flow.FlowFilter(source_pod=["shop/"]).SerializeToString() + unknown_varint(40))
    request = observer.GetFlowsRequest.FromString(observer.GetFlowsRequest(number=20).SerializeToString() + newer)
    assert list(request.whitelist[0].source_pod) == ["shop/"]
    with pytest.raises(ValueError) as raised:
        query(request)
    assert str(raised.value) == "whitelist[0]: unsupported FlowFilter field number 40"


def test_known_fields_alone_still_map():
    filters = filter_set([flow.FlowFilter(source_pod=["shop/"], verdict=[flow.DROPPED])], [])
    assert [f.text for f in filters.allow] == ["from-pod=shop/ verdict=dropped"]
    assert filters.deny == ()

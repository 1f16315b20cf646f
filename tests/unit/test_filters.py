"""The filter language: parsing, errors that name the bad term, and column-wise evaluation on flows and events."""

import numpy as np
import pandas as pd
import pytest

from flowscope.decode.flows import protocol_names
from flowscope.filters import MATCH_ALL, FilterError, FilterSet, parse_filter, term
from flowscope.schema import events_frame, flows_frame

CHECKOUT_LABELS = {"app": "checkout", "tier": "web"}  # one dict for rows of one pod, as the enricher shares it

# Five flows, one per row index, with identity on some rows only (as on a real node).
FLOWS = flows_frame(
    pd.DataFrame(
        {
            "node": ["node-a"] * 5,
            "ifname": ["eth0", "eth0", "veth1", "veth1", "lo"],
            "direction": ["egress", "ingress", "egress", "ingress", "egress"],
            "protocol": ["TCP", "TCP", "UDP", "TCP", "ICMPv6"],
            "src_ip": ["10.204.0.2", "10.204.1.7", "10.204.0.3", "192.0.2.9", "fd00:204::2"],
            "src_port": [43210, 443, 5353, 51000, None],
            "dst_ip": ["10.204.1.7", "10.204.0.2", "10.204.0.53", "10.204.0.2", "fd00:204::1"],
            "dst_port": [443, 43210, 53, 80, None],
            "packets": [10, 8, 2, 3, 1],
            "bytes": [1500, 9000, 200, 180, 104],
            "drop_packets": [0, 0, 2, 1, None],
            "drop_reason": [None, None, "NO_SOCKET", "NETFILTER_DROP", None],
            "retransmits": [2, 0, 0, 0, None],
            "resets": [0, 1, 0, 0, None],
            "src_namespace": ["shop", "shop", "shop", None, None],
            "src_pod": ["checkout-7d9f", "payments-0", "checkout-7d9f", None, None],
            "src_workload": ["checkout", "payments", "checkout", None, None],
            "src_node": ["node-a", "node-b", "node-a", None, None],
            "dst_namespace": ["shop", "shop", "kube-system", "shop", None],
            "dst_pod": ["payments-0", "checkout-7d9f", "coredns-55", "checkout-7d9f", None],
            "dst_workload": ["payments", "checkout", "coredns", "checkout", None],
            "dst_node": ["node-b", "node-a", "node-a", "node-a", None],
            "src_labels": [CHECKOUT_LABELS, {"app": "payments"}, CHECKOUT_LABELS, None, None],
            "dst_labels": [
                {"app": "payments"},
                {"app": "checkout", "tier": "web"},
                {"k8s-app": "kube-dns"},
                CHECKOUT_LABELS,
                None,
            ],
        }
    )
)

EVENTS = events_frame(
    pd.DataFrame(
        {
            "kind": ["connect", "drop", "close", "retransmit"],
            "protocol": ["TCP", "TCP", "TCP", "TCP"],
            "src_ip": ["10.204.0.2", "192.0.2.9", "10.204.0.2", "10.204.0.2"],
            "src_port": [43210, 51000, 43210, 43210],
            "dst_ip": ["10.204.1.7", "10.204.0.2", "10.204.1.7", "10.204.1.7"],
            "dst_port": [443, 80, 443, 443],
            "drop_reason": [None, "NETFILTER_DROP", None, None],
            "src_namespace": ["shop", None, "shop", "shop"],
            "src_pod": ["checkout-7d9f", None, "checkout-7d9f", "checkout-7d9f"],
            "dst_namespace": ["shop", "shop", "shop", "shop"],
            "dst_pod": ["payments-0", "checkout-7d9f", "payments-0", "payments-0"],
        }
    )
)


def flow_rows(text: str) -> list[int]:
    return np.flatnonzero(parse_filter(text).flows_mask(FLOWS)).tolist()


def event_rows(text: str) -> list[int]:
    return np.flatnonzero(parse_filter(text).events_mask(EVENTS)).tolist()


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        ("", [0, 1, 2, 3, 4]),
        ("port=443", [0, 1]),
        ("port=80,443", [0, 1, 3]),
        ("port=50-60", [2]),
        ("from-port=443", [1]),
        ("to-port=443", [0]),
        ("ip=10.204.1.7", [0, 1]),
        ("ip=10.204.0.0/24", [0, 1, 2, 3]),
        ("from-ip=10.204.0.0/24", [0, 2]),
        ("ip=192.0.2.0/24", [3]),
        ("ip=fd00:204::/64", [4]),
        ("ip=fd00:204::2", [4]),
        ("ip=0.0.0.0/0", [0, 1, 2, 3]),
        ("pod=shop/checkout", [0, 1, 2, 3]),
        ("from-pod=shop/checkout", [0, 2]),
        ("to-pod=checkout", [1, 3]),
        ("pod=kube-system/", [2]),
        ("pod=shop/payments-0", [0, 1]),
        ("namespace=kube-system", [2]),
        ("from-namespace=shop", [0, 1, 2]),
        ("workload=coredns", [2]),
        ("workload=shop/payments", [0, 1]),
        ("workload=kube-system/payments", []),
        ("protocol=tcp", [0, 1, 3]),
        ("protocol=6", [0, 1, 3]),
        ("protocol=udp,icmpv6", [2, 4]),
        ("direction=ingress", [1, 3]),
        ("verdict=dropped", [2, 3]),
        ("verdict=forwarded", [0, 1, 3, 4]),
        ("reason=NO_SOCKET", [2]),
        ("reason=skb_drop_reason_netfilter_drop", [3]),
        ("node=node-b", [0, 1]),
        ("node=node-a", [0, 1, 2, 3, 4]),
        ("from-node=node-b", [1]),
        ("observer=node-b", []),
        ("observer=node-a", [0, 1, 2, 3, 4]),
        ("observer=node-*,other", [0, 1, 2, 3, 4]),
        ("label=app=checkout", [0, 1, 2, 3]),
        ("from-label=app=checkout", [0, 2]),
        ("from-label=app==payments", [1]),
        ("label=tier", [0, 1, 2, 3]),
        ("to-label=app!=checkout", [0, 2]),
        ("to-label=!app", [2]),
        ("label=k8s:k8s-app=kube-dns", [2]),
        ("not label=tier", [4]),
        ("from-label=app=payments,tier", [0, 1, 2]),
        ("ifname=veth1", [2, 3]),
        ("type=flow", [0, 1, 2, 3, 4]),
        ("type=drop", [2, 3]),
        ("type=retransmit,reset", [0, 1]),
        ("type=connect", []),
        # combinations and negation
        ("protocol=tcp port=443", [0, 1]),
        ("protocol=tcp not port=443", [3]),
        ("! port=443", [2, 3, 4]),
        ("!port=443", [2, 3, 4]),
        ("port!=443", [2, 3, 4]),
        ("not not port=443", [0, 1]),
        ("not pod=shop/checkout", [4]),
        ("not from-pod=shop/checkout protocol=tcp", [1, 3]),
        ("namespace=shop not verdict=dropped", [0, 1]),
    ],
)
def test_flow_masks(text, rows):
    assert flow_rows(text) == rows


def test_terms_built_from_parts_match_as_the_text_does():
    # a whole selector per value: requirements ANDed, values ORed
    web_shop = term("label", ["app in (checkout,payments),tier=web"], side="src")
    assert np.flatnonzero(web_shop.mask(FLOWS, "flows")).tolist() == [0, 2]
    either = term("label", ["app=payments", "k8s-app in (kube-dns)"], side="dst")
    assert np.flatnonzero(either.mask(FLOWS, "flows")).tolist() == [0, 2]
    assert (
        term("port", ["443"], side="dst").mask(FLOWS, "flows").tolist()
        == parse_filter("to-port=443").flows_mask(FLOWS).tolist()
    )
    assert not term("verdict", []).mask(FLOWS, "flows").any()  # no values: matches nothing
    with pytest.raises(FilterError, match='bad filter term "from-port=x": a port is a number'):
        term("port", ["x"], side="src")


@pytest.mark.parametrize(
    ("allow", "deny", "rows"),
    [
        ([], [], [0, 1, 2, 3, 4]),
        (["pod=shop/checkout"], [], [0, 1, 2, 3]),
        (["from-pod=shop/checkout", "to-pod=shop/checkout"], [], [0, 1, 2, 3]),
        (["from-pod=shop/checkout", "protocol=icmpv6"], [], [0, 2, 4]),
        (["pod=shop/checkout"], ["verdict=dropped"], [0, 1]),
        ([], ["verdict=dropped", "protocol=icmpv6"], [0, 1]),
        (["namespace=shop"], ["from-pod=shop/payments to-port=43210"], [0, 2, 3]),
    ],
)
def test_filter_sets_pass_what_an_allow_filter_matches_and_no_deny_filter_does(allow, deny, rows):
    filters = FilterSet(tuple(map(parse_filter, allow)), tuple(map(parse_filter, deny)))
    assert np.flatnonzero(filters.flows_mask(FLOWS)).tolist() == rows


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        ("type=connect", [0]),
        ("type=connect,close", [0, 2]),
        ("type=flow", []),
        ("verdict=dropped", [1]),
        ("verdict=forwarded", [0, 2, 3]),
        ("reason=NETFILTER_DROP", [1]),
        ("to-pod=shop/checkout", [1]),
        ("pod=shop/payments port=443 not type=close", [0, 3]),
        # events have no direction column: a direction term matches no event
        ("direction=egress", []),
        ("not direction=egress", [0, 1, 2, 3]),
    ],
)
def test_event_masks(text, rows):
    assert event_rows(text) == rows


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port=http", 'bad filter term "port=http": a port is a number 0-65535 or a range like 8000-8080'),
        ("label=@x", "bad filter term \"label=@x\": '@x' is not a label key (e.g. app or app.kubernetes.io/name)"),
        ("port=70000", 'bad filter term "port=70000": a port is a number 0-65535 or a range like 8000-8080'),
        ("port=90-80", 'bad filter term "port=90-80": a port is a number 0-65535 or a range like 8000-8080'),
        (
            "protocol=tcp prot=udp",
            "bad filter term \"prot=udp\": unknown field 'prot'; fields are pod, namespace, workload, label, ip, "
            "port, node, observer, protocol, direction, verdict, reason, ifname, type",
        ),
        (
            "from-verdict=dropped",
            'bad filter term "from-verdict=dropped": verdict has no side; drop the from-/to- prefix',
        ),
        ("port=443 not", 'bad filter term "not": it must be followed by a term to negate'),
        ("port=", 'bad filter term "port=": a value is empty'),
        ("port=80,", 'bad filter term "port=80,": a value is empty'),
        ("ip=10.0.0/8", "bad filter term \"ip=10.0.0/8\": '10.0.0' is not an IPv4 or IPv6 address"),
        ("ip=10.0.0.0/40", 'bad filter term "ip=10.0.0.0/40": the prefix length must be 0-32'),
        ("ip=fd00::/129", 'bad filter term "ip=fd00::/129": the prefix length must be 0-128'),
        ("checkout", 'bad filter term "checkout": expected field=value, e.g. port=443 or pod=shop/checkout'),
        ("verdict=lost", 'bad filter term "verdict=lost": verdict is one of forwarded, dropped'),
        ("direction=in", 'bad filter term "direction=in": direction is one of ingress, egress'),
        (
            "type=packet",
            'bad filter term "type=packet": type is one of flow, connect, accept, close, drop, retransmit, reset',
        ),
        ("reason=no-socket", 'bad filter term "reason=no-socket": a drop reason is a kernel name like NO_SOCKET'),
        ("pod=/checkout", "bad filter term \"pod=/checkout\": the namespace before '/' is empty"),
        ("workload=shop/", "bad filter term \"workload=shop/\": the workload name after '/' is empty"),
        (
            "protocol=gre",
            'bad filter term "protocol=gre": protocol is one of ICMP, TCP, UDP, ICMPv6, SCTP, UDPLite or an IP '
            "protocol number 0-255",
        ),
    ],
)
def test_bad_filters_name_the_term(text, message):
    with pytest.raises(FilterError) as caught:
        parse_filter(text)
    assert str(caught.value) == message


def test_protocols_match_by_name_or_number_as_flow_rows_name_them():
    # The protocol column as the kernel reader writes it: a known protocol by name, any other by number.
    frame = flows_frame(pd.DataFrame({"protocol": protocol_names(np.array([136, 6, 200, 132]))}))
    assert frame["protocol"].tolist() == ["UDPLite", "TCP", "200", "SCTP"]
    for text, rows in (("protocol=136", [0]), ("protocol=udplite", [0]), ("protocol=200", [2]), ("protocol=132", [3])):
        assert np.flatnonzero(parse_filter(text).flows_mask(frame)).tolist() == rows, text


def test_words_from_a_command_line_parse_like_text():
    assert parse_filter(["protocol=tcp", "not", "port=443"]) == parse_filter("protocol=tcp not port=443")


def test_empty_filter_matches_all_and_is_false():
    assert not MATCH_ALL
    assert not parse_filter("   ")
    assert parse_filter("port=1")
    assert MATCH_ALL.flows(FLOWS) is FLOWS


def test_filter_selects_rows_of_a_frame():
    selected = parse_filter("reason=NO_SOCKET,NETFILTER_DROP").flows(FLOWS)
    assert selected["drop_reason"].tolist() == ["NO_SOCKET", "NETFILTER_DROP"]
    assert parse_filter("type=drop").events(EVENTS)["src_ip"].tolist() == ["192.0.2.9"]


def test_frame_without_the_columns_matches_nothing_and_negation_everything():
    narrow = pd.DataFrame({"bytes": [1, 2]})
    assert parse_filter("pod=shop/checkout").flows_mask(narrow).tolist() == [False, False]
    assert parse_filter("not ip=10.0.0.0/8").flows_mask(narrow).tolist() == [True, True]


def test_unparsable_addresses_in_data_never_match():
    frame = flows_frame(pd.DataFrame({"src_ip": ["not-an-ip", "10.204.0.1", None], "dst_ip": [None, None, None]}))
    assert parse_filter("ip=0.0.0.0/0").flows_mask(frame).tolist() == [False, True, False]


def test_large_frame_with_few_distinct_values():
    rows = 200_000
    frame = flows_frame(
        pd.DataFrame(
            {
                "src_ip": np.resize(np.array(["10.204.0.1", "10.204.9.9", "fd00:204::5"], dtype=object), rows),
                "dst_ip": ["192.0.2.1"] * rows,
                "src_pod": np.resize(np.array(["web-1", "api-2", None], dtype=object), rows),
                "src_namespace": ["shop"] * rows,
            }
        )
    )
    mask = parse_filter("from-ip=10.204.0.0/24,fd00:204::/64 pod=shop/web").flows_mask(frame)
    assert mask.dtype == bool
    assert int(mask.sum()) == len(range(0, rows, 3))
    assert mask[:6].tolist() == [True, False, False, True, False, False]

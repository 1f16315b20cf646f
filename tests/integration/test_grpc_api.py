"""flowscope's own gRPC API, served by a real agent subprocess replaying the shop recording (tests/ui/scenario):
number / first / since / until / follow, allow and deny filters, errors that name the field, the status calls,
and `flowscope observe` / `flowscope status` / `read_grpc` as a user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import threading

import grpc
import pandas as pd
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from flowscope.proto import codec
from flowscope.proto.client import ClientError, request
from flowscope.proto.flowscope.v1 import flowscope_pb2 as pb
from flowscope.schema import as_read
from tests.integration.grpc_agents import (
    ENVIRONMENT,
    FLOWSCOPE,
    Agent,
    interval_batches,
    recording,
    run_flowscope,
)
from tests.ui.scenario import shop_batches, write_replay
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

BATCHES = shop_batches()
FLOWS = pd.concat([b.flows for b in BATCHES], ignore_index=True)
EVENTS = pd.concat([b.events for b in BATCHES], ignore_index=True)


def keyed(frame: pd.DataFrame, kind: str) -> list[tuple]:
    """(time, kind, 5-tuple, packets or event kind) per row: what tells the records of the recording apart."""
    time_column = "time_end" if kind == "flow" else "time"
    tail = "packets" if kind == "flow" else "kind"
    columns = [time_column, "src_ip", "src_port", "dst_ip", "dst_port", tail]
    return [(row[0].value, kind, *row[1:]) for row in frame[columns].astype(object).itertuples(index=False)]


def expected(flows: pd.DataFrame = FLOWS, events: pd.DataFrame = EVENTS) -> list[tuple]:
    """The recording's records in time order (flows by time_end, events by time; a flow first on a tie, the
    order of the recording otherwise)."""
    return sorted(keyed(flows, "flow") + keyed(events, "event"), key=lambda r: (r[0], r[1] == "event"))


def received(responses) -> list[tuple]:
    out = []
    for response in responses:
        kind = response.WhichOneof("response")
        if kind == "flow":
            out += keyed(codec.flows_from([response.flow]), "flow")
        elif kind == "event":
            out += keyed(codec.events_from([response.event]), "event")
    return out


@pytest.fixture(scope="module")
def shop_agent(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shop")
    with Agent.start(directory, write_replay(directory / "shop.jsonl", BATCHES), "--speed", "0") as agent:
        client = agent.client()
        total = len(FLOWS) + len(EVENTS)
        wait_for(lambda: client.status().seen == total, 60, "the agent serving the whole recording")
        yield agent
        client.close()


def test_number_first_since_until_select_exactly_those_records(shop_agent):
    client = shop_agent.client()
    everything = expected()
    assert len(everything) == 33
    assert received(client.flows(request())) == everything  # 0: every record of the ring
    assert received(client.flows(request(number=5))) == everything[-5:]
    assert received(client.flows(request(number=5, first=True))) == everything[:5]
    since, until = pd.Timestamp(everything[10][0], tz="UTC"), pd.Timestamp(everything[20][0], tz="UTC")
    window = [r for r in everything if since.value <= r[0] <= until.value]
    assert received(client.flows(request(since=since, until=until))) == window
    assert received(client.flows(request(since=since, until=until, number=3))) == window[-3:]


def no_checkout(frame: pd.DataFrame) -> pd.Series:
    """Neither side is a shop/checkout* pod, and it is not UDP."""
    checkout = [
        (frame[f"{side}_namespace"] == "shop").fillna(False)
        & frame[f"{side}_pod"].str.startswith("checkout").fillna(False)
        for side in ("src", "dst")
    ]
    return ~checkout[0] & ~checkout[1] & (frame["protocol"] != "UDP")


def is_(column: pd.Series, value: str) -> pd.Series:
    """column == value, False where the column is null (as the filter language treats missing values)."""
    return (column == value).fillna(False).astype(bool)


def test_allow_and_deny_filters_select_exact_records_on_identity_and_drop_reasons(shop_agent):
    client = shop_agent.client()
    cases = [
        (["namespace=kube-system"], [], FLOWS["dst_namespace"] == "kube-system", pd.Series(False, EVENTS.index)),
        (
            ["reason=TCP_INVALID_SEQUENCE", "from-pod=shop/checkout type=connect"], [],
            FLOWS["drop_reason"] == "TCP_INVALID_SEQUENCE",
            is_(EVENTS["drop_reason"], "TCP_INVALID_SEQUENCE") | (is_(EVENTS["kind"], "connect") & is_(EVENTS["src_pod"], "checkout-7d9f")),  # noqa: E501
        ),
        (
            ["verdict=dropped"], ["reason=NETFILTER_DROP"],
            (FLOWS["drop_packets"] > 0) & ~is_(FLOWS["drop_reason"], "NETFILTER_DROP"),
            is_(EVENTS["kind"], "drop") & ~is_(EVENTS["drop_reason"], "NETFILTER_DROP"),
        ),
        ([], ["pod=shop/checkout", "protocol=udp"], no_checkout(FLOWS), no_checkout(EVENTS)),
    ]  # fmt: skip
    for allow, deny, flows, events in cases:
        want = expected(FLOWS[flows.fillna(False).astype(bool)], EVENTS[events.fillna(False).astype(bool)])
        assert want, (allow, deny)
        assert received(client.flows(request(allow=allow, deny=deny))) == want, (allow, deny)


@pytest.mark.parametrize(
    ("message", "details"),
    [
        (request(allow=["namespace=shop", "prot=tcp"]), 'bad filter term "prot=tcp": unknown field'),
        (request(deny=["port=99999"]), 'bad filter term "port=99999": a port is a number 0-65535 or a range like 8000-8080 (in deny[0])'),  # noqa: E501
        (request(number=3, first=True, follow=True), "first: the first records cannot be followed"),
    ],
)  # fmt: skip
def test_bad_requests_are_invalid_argument_naming_the_field(shop_agent, message, details):
    with pytest.raises(grpc.RpcError) as raised:
        list(shop_agent.client().stub.GetFlows(message))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details in raised.value.details()


def test_status_nodes_and_namespaces_report_the_ring(shop_agent):
    client = shop_agent.client()
    status = client.status()
    assert (status.node, status.seen, status.buffered, status.capacity) == ("agent", 33, 33, 65536)
    assert status.version.startswith("flowscope ")
    # the recording's own accounting (the event ring lost 2 events in interval 3), as the agent received it
    assert status.sources["event_ring"] == pb.Count(produced=13, delivered=11, lost=2)
    assert [(p.name, p.active) for p in status.probes] == [("replay", True)]
    nodes = client.nodes().nodes
    assert [(n.name, n.state, n.seen) for n in nodes] == [("agent", pb.NODE_CONNECTED, 33)]
    assert [n.name for n in client.namespaces().namespaces] == ["kube-system", "shop"]
    assert client.healthy() == "SERVING"


def test_lost_notices_come_in_band_with_the_interval_they_belong_to(shop_agent):
    responses = list(shop_agent.client().flows(request()))
    lost = [(r.lost.source, r.lost.count, r.lost.time_start, r.lost.time_end) for r in responses if r.HasField("lost")]
    third = BATCHES[3]
    assert lost == [("event_ring", 2, codec.timestamp(third.time_start.value), codec.timestamp(third.time_end.value))]


def test_follow_sends_the_ring_then_what_comes_until_cancelled(tmp_path):
    start = pd.Timestamp("2025-03-01T12:00:00Z")
    batches = interval_batches(start, 20, 0.1, 10, "agent")
    with Agent.start(tmp_path, recording(tmp_path / "paced.jsonl", batches), "--speed", "1") as agent:
        client = agent.client()
        got: list = []
        done = threading.Event()

        def follow() -> None:
            for response in client.flows(request(follow=True, since=pd.Timestamp(0, tz="UTC"))):
                if response.HasField("flow"):
                    got.append(response)
                if len(got) == 200:
                    done.set()

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        assert done.wait(60), f"{len(got)} of 200 records followed"
        client.cancel()
        thread.join(10)
        assert not thread.is_alive()
    assert received(got) == expected(pd.concat([b.flows for b in batches], ignore_index=True), EVENTS.iloc[:0])


def test_observe_and_status_as_a_user_runs_them(shop_agent):
    server = ["--server", f"unix://{shop_agent.socket}"]
    lines = run_flowscope("observe", *server, "--last", "3", "-o", "jsonl")
    assert lines.returncode == 0, lines.stderr
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [(r["type"], r["src_port"], r["dst_port"]) for r in records] == [(e[1], e[3], e[5]) for e in expected()[-3:]]
    assert all(
        set(r) >= {"time_start", "src_namespace", "dst_labels", "drop_reason"} for r in records if r["type"] == "flow"
    )

    compact = run_flowscope("observe", *server, "--all", "-n", "kube-system", "-o", "compact")
    assert compact.returncode == 0, compact.stderr
    want = FLOWS[FLOWS["dst_namespace"] == "kube-system"]
    assert len(compact.stdout.splitlines()) == len(want) == 3
    assert compact.stdout.splitlines()[0] == (
        "Mar 01 12:00:02.000 [node-a]: shop/checkout-7d9f:40001 -> kube-system/coredns-55:53 flow FORWARDED "
        "(UDP egress veth-checkout; 2 packets 180 bytes)"
    )
    negated = run_flowscope(
        "observe", *server, "--all", "--not", "--verdict", "dropped", "--type", "flow", "-o", "jsonl"
    )
    kept = [json.loads(line) for line in negated.stdout.splitlines()]
    assert [r["drop_packets"] for r in kept if r["type"] == "flow"] == [0] * int((FLOWS["drop_packets"] == 0).sum())
    assert [(r["type"], r["source"], r["count"]) for r in kept if r["type"] != "flow"] == [("lost", "event_ring", 2)]

    bad = run_flowscope("observe", *server, "--port", "http")
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == (
        'flowscope observe: bad filter term "port=http": a port is a number 0-65535 or a range like 8000-8080; '
        "see `flowscope top --help` for the filter language.\n"
    )
    status = run_flowscope("status", *server)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[2].startswith("records       33 buffered of 65,536 (0.1%), 33 seen")
    gone = run_flowscope("status", "--server", f"unix://{shop_agent.socket}.absent")
    assert gone.returncode == 1 and gone.stderr.startswith(
        f"flowscope status: no flowscope server answers on unix://{shop_agent.socket}.absent"
    )


def test_status_shows_a_fresh_agents_replay_as_a_table_and_as_the_apis_json(tmp_path):
    shop = write_replay(tmp_path / "shop.jsonl", BATCHES)
    with Agent.start(tmp_path, shop) as agent:  # its own: no other test's followers in its counts
        client = agent.client()
        try:
            wait_for(lambda: client.status().seen == 33, 60, "the agent serving the whole recording")
        finally:
            client.close()
        server = ("--server", f"unix://{agent.socket}")
        table, shown = run_flowscope("status", *server), run_flowscope("status", *server, "-o", "json")
    assert (table.returncode, table.stderr, shown.returncode, shown.stderr) == (0, "", 0, "")
    lines = table.stdout.splitlines()
    assert re.fullmatch(r"node          agent \(flowscope \S+\), up \d+ s", lines.pop(1)), lines
    assert re.fullmatch(r"records       33 buffered of 65,536 \(0\.1%\), 33 seen, [\d,]+\.\d/s", lines.pop(1)), lines
    # the output's count settles into the interval after the one it wrote, and the replay has ended: some
    sink = re.fullmatch(r"  sink:grpc +(\d+) +(\d+) +0", lines.pop(-2))
    assert sink and sink[1] == sink[2] and int(sink[1]) <= 33, lines
    assert lines == [
        f"health        SERVING (via unix://{agent.socket})",
        "clients       0 following; 0 records lost to slow clients",
        "probes        replay",
        "sources       produced / delivered / lost",
        "  event_ring                       13           11          2",
        "  tc_flows                         22           22          0",
    ]
    status = json.loads(shown.stdout)
    # the API's JSON mapping (as `hubble status -o json`): 64-bit integers as strings, zeros left out
    assert {name: status[name] for name in ("health", "node", "seen", "buffered", "capacity", "probes")} == {
        "health": "SERVING", "node": "agent", "seen": "33", "buffered": "33", "capacity": "65536",
        "probes": [{"name": "replay", "active": True, "hook": f"file {shop}"}],
    }  # fmt: skip
    assert "clients" not in status and int(status["uptime_ns"]) > 0
    assert {name: status["sources"][name] for name in ("event_ring", "tc_flows")} == {
        "event_ring": {"produced": "13", "delivered": "11", "lost": "2"},
        "tc_flows": {"produced": "22", "delivered": "22"},
    }


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_observe_follow_ends_at_sigint_with_status_130(shop_agent, tmp_path, sigint):
    """Ctrl-C ends `observe -f` (as it ends `hubble observe -f`), also one started with SIGINT ignored, as a
    background job of a non-interactive shell is (Python would leave it ignored and the follow would never end)."""
    ignore = 'trap "" INT; ' if sigint == "ignored" else ""
    server = f"unix://{shop_agent.socket}"
    argv = ["sh", "-c", f'{ignore}exec "$0" "$@"', FLOWSCOPE, "observe", "--server", server, "--last", "3", "-f",
            "-o", "jsonl"]  # fmt: skip
    with open(tmp_path / "observe.err", "w") as errors:
        observe = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True, env=ENVIRONMENT)
    try:
        records = [json.loads(observe.stdout.readline()) for _ in range(3)]  # then it follows: nothing more comes
        observe.send_signal(signal.SIGINT)
        observe.wait(timeout=60)
    finally:
        observe.kill()
        observe.wait()
    assert [(r["type"], r["src_port"], r["dst_port"]) for r in records] == [(e[1], e[3], e[5]) for e in expected()[-3:]]
    assert (observe.returncode, observe.stdout.read(), (tmp_path / "observe.err").read_text()) == (130, "", "")


def test_read_grpc_gives_the_typed_frame_of_the_recording(shop_agent):
    from flowscope.analysis import read_grpc

    flows = read_grpc(f"unix://{shop_agent.socket}", filter="protocol=tcp")
    want = FLOWS[FLOWS["protocol"] == "TCP"].sort_values("time_end", kind="stable")
    pd.testing.assert_frame_equal(flows, as_read(want, "flows"))
    events = read_grpc(f"unix://{shop_agent.socket}", records="events", since=BATCHES[2].time_start)
    pd.testing.assert_frame_equal(events, as_read(EVENTS[EVENTS["time"] >= BATCHES[2].time_start], "events"))
    with pytest.raises(ClientError, match='bad filter term "prot=tcp"'):
        read_grpc(f"unix://{shop_agent.socket}", filter="prot=tcp")


def test_the_sockets_are_0660_and_reflection_names_every_service(shop_agent):
    for path in (shop_agent.socket, shop_agent.hubble_socket):
        mode = os.stat(path)
        assert (stat.S_ISSOCK(mode.st_mode), stat.S_IMODE(mode.st_mode), mode.st_uid) == (True, 0o660, os.getuid())
    channel = grpc.insecure_channel(f"unix://{shop_agent.socket}")
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = sorted(service.name for service in answer.list_services_response.service)
    assert names == ["flowscope.v1.FlowScope", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                     "observer.Observer"]  # fmt: skip
    request_file = reflection_pb2.ServerReflectionRequest(file_containing_symbol="observer.Observer")
    (described,) = stub.ServerReflectionInfo(iter([request_file]))
    assert described.file_descriptor_response.file_descriptor_proto  # a client can build the Observer's messages
    channel.close()

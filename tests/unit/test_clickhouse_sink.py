"""The ClickHouse sink without a server: a fake client (it records every statement and can be down or refuse)
and the sink's injectable clock. Inserts are cut by rows and by age, the retries back off 1 s doubling to 60 s
and back to 1 s once the server answers, an insert of unknown outcome sends only the rows not stored, and the
URL's TLS options reach clickhouse-driver's Client as its arguments."""

from __future__ import annotations

from typing import ClassVar

import pandas as pd
import pytest
from clickhouse_driver import errors

from flowscope.config import ClickHouseConfig
from flowscope.exporters import clickhouse as sink_module
from flowscope.exporters.clickhouse import REFUSALS_MAX, ClickHouseError, ClickHouseSink, Insert
from flowscope.formats import clickhouse as formats
from flowscope.formats.clickhouse import ConnectionSettingsError, connection
from flowscope.schema import FlowBatch
from tests.ui.scenario import shop_batches

SHOP = shop_batches()  # (flows, events) per interval: (4, 2), (5, 3), (4, 1), (4, 2), (5, 3)
SECOND = [int(b.time_end.timestamp()) for b in SHOP]  # each interval's records are at its end, to the second


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeServer:
    """What the sink's clients talk to: `down` (every statement is a network error), `refusing` (inserts are
    refused as into a missing table), `stored` (the lookup's answer: second -> rows under the block id)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.down = False
        self.refusing = False
        self.stored: dict[int, int] = {}
        self.connects: list[float] = []  # when a client was made and asked for the version
        self.inserts: list[tuple[float, str, int]] = []  # (when, table, rows)
        self.insert_attempts: list[float] = []
        self.lookups: list[dict] = []

    def client(self, target, **_options) -> FakeClient:
        return FakeClient(self)


class FakeClient:
    def __init__(self, server: FakeServer) -> None:
        self.server = server

    def execute(self, sql: str, params=None, columnar: bool = False):
        server = self.server
        if sql == "SELECT version()":
            server.connects.append(server.clock.now)
        if server.down:
            raise errors.NetworkError("Code: 210. Connection refused (127.0.0.1:9000)")
        if sql == "SELECT version()":
            return [("18.16.1",)]
        if sql.startswith("SELECT version FROM"):
            return []
        if sql.startswith("SELECT toUInt32(time)"):
            server.lookups.append(params)
            return list(server.stored.items())
        if sql.startswith("INSERT INTO `db`.`schema_versions`"):
            return None
        if sql.startswith("INSERT INTO"):
            server.insert_attempts.append(server.clock.now)
            if server.refusing:
                raise errors.ServerException("DB::Exception: Table db.events doesn't exist.", code=60)
            table = sql.split("`")[3]
            server.inserts.append((server.clock.now, table, len(params[0])))
            return None
        return []

    def disconnect(self) -> None:
        pass


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock, monkeypatch) -> FakeServer:
    fake = FakeServer(clock)
    monkeypatch.setattr(sink_module, "client", fake.client)
    return fake


def make_sink(clock: Clock, **values) -> ClickHouseSink:
    config = ClickHouseConfig(url="clickhouse://flowscope@127.0.0.1:9000/db", **values)
    sink = ClickHouseSink(config, clock=clock)
    sink.open()
    return sink


def empty(at: int = 4) -> FlowBatch:
    return FlowBatch.empty(SHOP[at].time_start, SHOP[at].time_end)


# ---- batching by rows and by age -------------------------------------------------------------------------


def test_rows_wait_until_an_insert_has_batch_rows_then_are_cut_into_inserts_of_at_most_batch_rows(clock, server):
    sink = make_sink(clock, batch_rows=10, batch_age=1000)
    sink.write(SHOP[0])  # 6 records gathered: fewer than 10
    assert server.inserts == [] and sink.health()["rows_buffered"] == 6
    sink.write(SHOP[1])  # 14: cut, one insert per table
    assert server.inserts == [(0.0, "flows", 9), (0.0, "events", 5)]
    assert sink.settled() == (14, 0)

    server.inserts.clear()
    small = make_sink(clock, batch_rows=3, batch_age=1000)
    small.write(SHOP[1])  # 5 flows and 3 events: at most 3 rows an insert
    assert server.inserts == [(0.0, "flows", 3), (0.0, "flows", 2), (0.0, "events", 3)]
    assert small.settled() == (8, 0)


def test_rows_wait_at_most_batch_age_seconds_from_the_first_gathered(clock, server):
    sink = make_sink(clock, batch_rows=1000, batch_age=5)
    sink.write(empty(0))  # nothing gathered: the age does not start
    clock.now = 2.0
    sink.write(SHOP[0])  # gathered since 2
    clock.now = 6.9
    sink.write(SHOP[1])
    assert server.inserts == [] and sink.health()["rows_buffered"] == 14
    clock.now = 7.0
    sink.write(empty())
    assert server.inserts == [(7.0, "flows", 9), (7.0, "events", 5)]
    clock.now = 8.0
    sink.write(SHOP[2])  # gathered since 8
    clock.now = 12.9
    sink.write(empty())
    assert len(server.inserts) == 2
    clock.now = 13.0
    sink.write(empty())
    assert server.inserts[2:] == [(13.0, "flows", 4), (13.0, "events", 1)]
    sink.close()
    assert sink.settled() == (19, 0)


def test_close_sends_what_is_still_gathered(clock, server):
    sink = make_sink(clock, batch_rows=1000, batch_age=1000)
    sink.write(SHOP[0])
    sink.close()
    assert server.inserts == [(0.0, "flows", 4), (0.0, "events", 2)] and sink.settled() == (6, 0)


def test_without_new_batches_idle_sends_rows_of_batch_age_and_retries(clock, server):
    """The runner calls idle() when no batch comes (a replay that ended): rows still go out at their age, and a
    server that was down is retried at its backoff."""
    sink = make_sink(clock, batch_rows=1000, batch_age=5)
    sink.write(SHOP[0])
    clock.now = 4.9
    sink.idle()
    assert server.inserts == []
    clock.now = 5.0
    sink.idle()
    assert server.inserts == [(5.0, "flows", 4), (5.0, "events", 2)] and sink.settled() == (6, 0)
    server.down = True
    sink.write(SHOP[1])
    clock.now = 10.0
    sink.idle()  # cut at its age, sent: the server is down (retry at 11)
    server.down = False
    clock.now = 10.9
    sink.idle()
    assert len(server.inserts) == 2
    clock.now = 11.0
    sink.idle()
    assert server.inserts[2:] == [(11.0, "flows", 5), (11.0, "events", 3)] and sink.settled() == (8, 0)


# ---- retries and their backoff ---------------------------------------------------------------------------


def run_until(sink: ClickHouseSink, clock: Clock, end: float, step: float = 0.5) -> None:
    while clock.now < end:
        clock.now += step
        sink.write(empty())


def test_an_unreachable_server_is_retried_after_1_s_doubling_to_60_s_then_after_1_s_again(clock, server):
    server.down = True
    sink = make_sink(clock, batch_age=0)  # open: the first attempt, an outage
    assert server.connects == [0.0] and sink.health()["state"] == "degraded"
    sink.write(SHOP[0])  # waits for the next attempt
    run_until(sink, clock, 200)
    assert server.connects == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0, 123.0, 183.0]
    server.down = False
    run_until(sink, clock, 250)
    assert server.connects[9:] == [243.0] and server.inserts == [(243.0, "flows", 4), (243.0, "events", 2)]
    assert sink.settled() == (6, 0) and sink.health()["state"] == "ok"
    server.down = True  # down again: the backoff starts at 1 s again
    sink.write(SHOP[1])  # the insert fails at 250 (outcome unknown)
    run_until(sink, clock, 260)
    assert server.connects[10:] == [251.0, 253.0, 257.0]
    server.down = False
    run_until(sink, clock, 270)
    assert server.connects[13:] == [265.0] and len(server.lookups) == 1  # the flows insert's outcome was unknown
    assert server.inserts[2:] == [(265.0, "flows", 5), (265.0, "events", 3)] and sink.settled() == (8, 0)


def test_a_refused_insert_is_retried_after_1_2_4_8_s_and_dropped_at_the_fifth_refusal(clock, server):
    sink = make_sink(clock, batch_age=0)
    server.refusing = True
    clock.now = 10.0
    sink.write(SHOP[0])  # its flows insert is refused at 10
    run_until(sink, clock, 40)
    # refused five times: dropped and counted; the events insert behind it is tried at once, refused, and waits
    # the backoff reached (16 s)
    assert REFUSALS_MAX == 5 and server.insert_attempts == [10.0, 11.0, 13.0, 17.0, 25.0, 25.0]
    assert sink.settled() == (0, 4) and sink.health()["state"] == "degraded"
    server.refusing = False
    run_until(sink, clock, 60)
    assert server.inserts == [(41.0, "events", 2)] and sink.settled() == (2, 0)
    assert sink.health()["state"] == "ok"


# ---- an insert of unknown outcome ------------------------------------------------------------------------


def two_seconds() -> Insert:
    """9 flow records: 4 at SECOND[0], 5 at SECOND[1]; sent once, its outcome unknown."""
    frame = pd.concat([SHOP[0].flows, SHOP[1].flows], ignore_index=True)
    return Insert("flows", frame, maybe_written=True)


@pytest.mark.parametrize(
    ("stored", "sent", "settled"),
    [
        ({}, [9], (9, 0)),  # nothing arrived: all of it again
        ({SECOND[0]: 4}, [5], (9, 0)),  # one second's part arrived: the other's rows only
        ({SECOND[0]: 4, SECOND[1]: 5}, [], (9, 0)),  # all of it: nothing again
        ({SECOND[0]: 4, SECOND[1]: 2}, [], (6, 3)),  # a second in part: its 3 missing rows cannot be told apart
    ],
)
def test_an_insert_of_unknown_outcome_sends_only_the_rows_not_stored(clock, server, stored, sent, settled):
    sink = make_sink(clock, batch_age=0)
    server.stored = stored
    insert = two_seconds()
    sink._inserts.append(insert)
    sink.write(empty())
    assert server.lookups == [{"first": SECOND[0], "last": SECOND[1], "id": insert.block_id}]
    assert [rows for _, _, rows in server.inserts] == sent
    assert sink.settled() == settled and sink.health()["rows_buffered"] == 0


def test_on_a_cluster_an_insert_of_unknown_outcome_is_sent_again_whole(clock, server):
    sink = make_sink(clock, batch_age=0, cluster="fs")
    server.stored = {SECOND[0]: 4}
    sink._inserts.append(two_seconds())
    sink.write(empty())
    assert server.lookups == [] and [rows for _, _, rows in server.inserts] == [9] and sink.settled() == (9, 0)


# ---- TLS and the URL's options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("clickhouse://w@db/flows", ("db", 9000, "w", "flows", False, {})),
        ("clickhouses://w@db/flows", ("db", 9440, "w", "flows", True, {})),
        ("clickhouse://w@db/flows?secure=1", ("db", 9440, "w", "flows", True, {})),
        ("clickhouse://w@db:9441/flows?secure=true", ("db", 9441, "w", "flows", True, {})),
        ("clickhouse://w@db/flows?secure", ("db", 9440, "w", "flows", True, {})),
        ("clickhouse://w@db:9000/flows?secure=0", ("db", 9000, "w", "flows", False, {})),
        (
            "clickhouses://w@db/flows?verify=0&ca_certs=%2Fetc%2Fssl%2Fch.pem",
            ("db", 9440, "w", "flows", True, {"verify": "0", "ca_certs": "/etc/ssl/ch.pem"}),
        ),
        ("clickhouse://db", ("db", 9000, "default", "flowscope", False, {})),
    ],
)
def test_the_url_gives_the_connection(url, expected):
    target = connection(ClickHouseConfig(url=url, password="pw"))
    assert (target.host, target.port, target.user, target.database, target.secure, target.options) == expected
    assert target.password == "pw"
    assert target.shown == f"clickhouse{'s' if expected[4] else ''}://{expected[2]}@db:{expected[1]}/{expected[3]}"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "clickhouse://w:pw@db/flows?secuer=1",
            "--clickhouse 'clickhouse://w@db/flows?secuer=1': unknown option 'secuer' (known: ca_certs, secure, "
            "verify).",
        ),
        (
            "clickhouse://w@db/flows?secure=on",
            "--clickhouse 'clickhouse://w@db/flows?secure=on': secure=on is not 1 or 0.",
        ),
        (
            "clickhouse://w@db/flows?ca_certs=/ca.pem",
            "--clickhouse 'clickhouse://w@db/flows?ca_certs=/ca.pem': verify and ca_certs are for TLS; use "
            "clickhouses:// or add secure=1.",
        ),
    ],
)
def test_a_url_option_flowscope_does_not_know_is_one_sentence(url, message):
    with pytest.raises(ConnectionSettingsError) as raised:
        connection(ClickHouseConfig(url=url))
    assert str(raised.value) == message


class RecordingClient:
    made: ClassVar[list[tuple[tuple, dict]]] = []

    def __init__(self, *args, **kwargs) -> None:
        RecordingClient.made.append((args, kwargs))


@pytest.mark.parametrize(
    ("url", "tls"),
    [
        ("clickhouse://w@db:9000/flows", {}),
        ("clickhouses://w@db/flows", {"secure": True, "verify": True}),
        ("clickhouse://w@db/flows?secure=1&verify=0", {"secure": True, "verify": False}),
        (
            "clickhouses://w@db/flows?ca_certs=/etc/ssl/ch.pem",
            {"secure": True, "verify": True, "ca_certs": "/etc/ssl/ch.pem"},
        ),
    ],
)
def test_the_connection_gives_the_client_its_arguments(monkeypatch, url, tls):
    import clickhouse_driver

    monkeypatch.setattr(clickhouse_driver, "Client", RecordingClient)
    RecordingClient.made = []
    formats.client(connection(ClickHouseConfig(url=url, password="pw")), timeout=7.0)
    ((args, kwargs),) = RecordingClient.made
    port = 9000 if url.startswith("clickhouse://w@db:9000") else 9440
    assert args == ("db",)
    assert kwargs == {
        "port": port, "user": "w", "password": "pw", "database": "default", "connect_timeout": 7.0,
        "send_receive_timeout": 30.0, "settings": {"insert_distributed_sync": 1}, "client_name": "flowscope", **tls,
    }  # fmt: skip


def test_a_bad_url_is_an_error_before_the_sink_starts():
    with pytest.raises(ClickHouseError, match=r"^--clickhouse 'clickhouse://w@db/x\?tls=1': unknown option 'tls'"):
        ClickHouseSink(ClickHouseConfig(url="clickhouse://w:pw@db/x?tls=1"))

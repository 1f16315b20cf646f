"""The ClickHouse flow store against Debian's real clickhouse-server (18.16): the rows captured or replayed
arrive exactly, rollups equal the raw rows' sums, outages lose nothing within the buffer and write nothing
twice, an overflowing buffer is counted exactly, and the filter language reads as SQL what it selects in
pandas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from flowscope.analysis.clickhouse import ClickHouseReadError, read_clickhouse
from flowscope.analysis.flowlog import read_capture, read_flowlog
from flowscope.config import ClickHouseConfig
from flowscope.coverage import Coverage
from flowscope.exporters.clickhouse import ClickHouseError, ClickHouseSink, Insert
from flowscope.exporters.clickhouse_spool import SPOOL_DIRECTORY, Spool
from flowscope.filters import parse_filter
from flowscope.pipeline.sink import records
from flowscope.schema import FlowBatch, as_read
from tests.integration.replay_agent import answering, status
from tests.integration.servers import ClickHouse, User, free_port
from tests.ui.scenario import shop_batches, write_replay
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
WRITER = User("flowscope", "s3cret-word")
SHOP = shop_batches()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ClickHouse:
    clickhouse = ClickHouse(tmp_path_factory.mktemp("clickhouse"), users=[User("default"), WRITER]).start()
    yield clickhouse
    clickhouse.stop()


@pytest.fixture
def database() -> str:
    return f"fs_{uuid.uuid4().hex[:12]}"


def settings(server: ClickHouse, database: str, **values) -> ClickHouseConfig:
    url = server.url(WRITER, database=database, password=False)
    return ClickHouseConfig(url=url, password=WRITER.password, batch_age=0, **values)


def everything(batches: list[FlowBatch], kind: str) -> pd.DataFrame:
    return pd.concat([getattr(b, kind) for b in batches], ignore_index=True)


def in_order(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The records in one order, typed as the readers give them (the recording's batches are typed as the stream)."""
    keys = ["time_end", "src_ip", "src_port", "dst_ip", "dst_port", "ifname"] if kind == "flows" else ["time", "kind"]
    return as_read(frame.sort_values(keys, kind="stable", na_position="first"), kind)


def read(server: ClickHouse, database: str, filter: str = "", table: str = "flows") -> pd.DataFrame:
    url = server.url(WRITER, database=database, password=False)
    return read_clickhouse(url, filter=filter, table=table, password=WRITER.password)


# ClickHouse and the gRPC API (on the test's own sockets: another agent may hold /run/flowscope's) are the outputs
AGENT_ENVIRONMENT = {**os.environ, "FLOWSCOPE_FLOWLOG_ENABLED": "0"}


def agent_argv(
    server: ClickHouse, database: str, tmp_path: Path, *extra: str, password: str = WRITER.password,
    batches: list[FlowBatch] = SHOP, name: str = "shop",
) -> list[str]:  # fmt: skip
    """`flowscope agent` replaying `batches` (as tmp_path/<name>.jsonl, status socket <name>.sock) into ClickHouse."""
    recording = write_replay(tmp_path / f"{name}.jsonl", batches)
    secret = tmp_path / "password"
    secret.write_text(password + "\n")
    return [
        FLOWSCOPE, "agent", "--replay", str(recording), "--status-socket", str(tmp_path / f"{name}.sock"),
        "--grpc-socket", str(tmp_path / f"{name}-api.sock"), "--hubble-socket", str(tmp_path / f"{name}-hubble.sock"),
        "--clickhouse", server.url(WRITER, database=database, password=False),
        "--clickhouse-password-file", str(secret), "--clickhouse-batch-age", "0", *extra,
    ]  # fmt: skip


def run_agent(server: ClickHouse, database: str, tmp_path: Path, *extra: str, **choices):
    argv = agent_argv(server, database, tmp_path, "--exit-at-end", *extra, **choices)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=AGENT_ENVIRONMENT)


def assert_stored(server: ClickHouse, database: str, batches: list[FlowBatch]) -> None:
    """The server holds exactly the records of `batches`, each once, with every column as replayed."""
    for kind in ("flows", "events"):
        stored = in_order(read(server, database, table=kind), kind)
        expected = in_order(everything(batches, kind), kind)
        pd.testing.assert_frame_equal(stored, expected, check_dtype=True, obj=kind)


def test_the_agent_writes_exactly_the_replayed_records(server, database, tmp_path):
    result = run_agent(server, database, tmp_path)
    assert result.returncode == 0, result.stderr
    assert_stored(server, database, SHOP)
    assert len(read(server, database)) == 22 and len(read(server, database, table="events")) == 11


def test_the_rollups_equal_the_raw_rows_sums(server, database, tmp_path):
    assert run_agent(server, database, tmp_path).returncode == 0
    q = f"`{database}`"
    by_pair = server.query(
        f"SELECT src_workload, dst_workload, sum(flows), sum(packets), sum(bytes), sum(drop_packets) FROM {q}.flows_1m "
        "GROUP BY src_workload, dst_workload ORDER BY src_workload, dst_workload"
    )
    raw = server.query(
        f"SELECT ifNull(src_workload, ''), ifNull(dst_workload, ''), count(), sum(packets), sum(bytes), "
        f"sum(ifNull(drop_packets, 0)) FROM {q}.flows GROUP BY src_workload, dst_workload "
        "ORDER BY ifNull(src_workload, ''), ifNull(dst_workload, '')"
    )
    assert by_pair == raw and by_pair.count("\n") == 6  # six workload pairs in the recording
    drops = server.query(
        f"SELECT drop_reason, sum(drop_packets), sum(drop_bytes) FROM {q}.drops_1m "
        "GROUP BY drop_reason ORDER BY drop_reason"
    )
    flows = everything(SHOP, "flows")
    dropped = flows[flows["drop_packets"] > 0].groupby("drop_reason")[["drop_packets", "drop_bytes"]].sum()
    assert drops == "".join(f"{reason}\t{p}\t{b}\n" for reason, (p, b) in dropped.iterrows())
    assert drops == "NETFILTER_DROP\t12\t720\nNO_SOCKET\t1\t74\nTCP_INVALID_SEQUENCE\t2\t2000\n"


def test_a_second_start_finds_the_schema_versions_and_does_not_run_version_1_again(server, database):
    first = ClickHouseSink(settings(server, database))
    first.open()
    first.close()
    q = f"`{database}`"
    applied = server.query(f"SELECT version, applied FROM {q}.schema_versions")
    assert applied.startswith("1\t") and applied.count("\n") == 1
    # a table of version 1 gone: running version 1 again would create it again (CREATE TABLE IF NOT EXISTS)
    server.query(f"DROP TABLE {q}.drops_1m_mv")
    server.query(f"DROP TABLE {q}.drops_1m")
    again = ClickHouseSink(settings(server, database))
    again.open()
    again.write(SHOP[0])
    again.close()
    assert again.settled() == (records(SHOP[0]), 0)
    assert server.query(f"SELECT version, applied FROM {q}.schema_versions") == applied
    assert server.query(f"EXISTS TABLE {q}.drops_1m") == "0\n" and server.query(f"EXISTS TABLE {q}.flows") == "1\n"


def test_a_wrong_password_is_one_sentence_and_a_non_zero_exit(server, database, tmp_path):
    result = run_agent(server, database, tmp_path, password="wrong-hunter2")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"flowscope agent: ClickHouse at clickhouse://flowscope@127.0.0.1:{server.tcp_port}/{database} refused user "
        "'flowscope': Wrong password for user flowscope; check the user and --clickhouse-password-file."
    )
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def server_logs(server: ClickHouse) -> str:
    return "".join((server.root / name).read_text(errors="replace") for name in ("log", "err", "stdout"))


def test_the_password_shows_nowhere_the_agent_writes_or_ps_reads(server, database, tmp_path):
    """The right password, given in its file: the agent's command line and environment (what ps shows), its
    stderr, its status and the server's logs never hold it (the server's logs are read before and after)."""
    logged_before = server_logs(server)
    assert WRITER.password not in logged_before
    with open(tmp_path / "agent.log", "w") as log:
        agent = subprocess.Popen(
            agent_argv(server, database, tmp_path), stdout=subprocess.DEVNULL, stderr=log, env=AGENT_ENVIRONMENT
        )
    try:
        sock = tmp_path / "shop.sock"
        written = lambda: status(sock)["sinks"]["clickhouse"]["health"]["rows_written"]  # noqa: E731
        wait_for(lambda: answering(sock) and written() == 33, what="every record written")
        shown = Path(f"/proc/{agent.pid}/cmdline").read_bytes() + Path(f"/proc/{agent.pid}/environ").read_bytes()
        answer = json.dumps(status(sock))
    finally:
        agent.terminate()
        agent.wait(60)
    assert agent.returncode == 0, (tmp_path / "agent.log").read_text()
    stderr = (tmp_path / "agent.log").read_text()
    assert stderr.splitlines()[-1] == stopped_line(SHOP)
    assert str(tmp_path / "password") in shown.decode()  # the file's name: that is what ps shows
    for where, text in (
        ("ps", shown.decode()),
        ("stderr", stderr),
        ("status", answer),
        ("server", server_logs(server)),
    ):
        assert WRITER.password not in text, where
    assert_stored(server, database, SHOP)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "http://localhost:8123/db",
            "--clickhouse 'http://localhost:8123/db' is not a URL like clickhouse://USER@HOST:9000/DATABASE.",
        ),
        ("clickhouse://u:hunter2@db:x/flows", "--clickhouse 'clickhouse://u@db:x/flows': the port is not a number."),
    ],
)
def test_a_bad_url_is_one_sentence(tmp_path, url, message):
    result = subprocess.run(
        [FLOWSCOPE, "agent", "--clickhouse", url, "--status-socket", str(tmp_path / "a.sock"), "--grpc-socket",
         str(tmp_path / "api.sock"), "--hubble-socket", str(tmp_path / "hubble.sock")],
        capture_output=True, text=True, timeout=60, env=AGENT_ENVIRONMENT,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (1, f"flowscope agent: {message}\n")


def write_all(sink: ClickHouseSink, batches: list[FlowBatch]) -> None:
    for batch in batches:
        sink.write(batch)


def test_an_outage_loses_nothing_within_the_buffer_and_writes_nothing_twice(server, database):
    sink = ClickHouseSink(settings(server, database))
    sink.open()
    write_all(sink, SHOP[:2])
    server.kill()
    try:
        write_all(sink, SHOP[2:4])  # buffered: the server is gone
        assert sink.health()["state"] == "degraded" and sink.health()["rows_buffered"] == sum(
            records(b) for b in SHOP[2:4]
        )
    finally:
        server.start_again()
    sink._next_attempt = 0.0  # the backoff has passed (the test does not wait for it)
    write_all(sink, SHOP[4:])
    sink.close()
    written, lost = sink.settled()
    assert (written, lost) == (sum(records(b) for b in SHOP), 0)
    assert len(read(server, database)) == 22 and len(read(server, database, table="events")) == 11


def test_an_insert_of_unknown_outcome_is_looked_up_not_sent_twice(server, database):
    sink = ClickHouseSink(settings(server, database))
    sink.open()
    sink.write(SHOP[0])
    assert len(read(server, database)) == 4
    # the same insert once more, as if the connection had broken after it was sent
    again = Insert("flows", SHOP[0].flows, block_id=read_block_id(server, database), maybe_written=True)
    sink._inserts.append(again)
    sink.write(FlowBatch.empty(SHOP[1].time_start, SHOP[1].time_end))
    sink.close()
    assert len(read(server, database)) == 4
    assert sink.settled()[0] == records(SHOP[0]) + len(SHOP[0].flows)  # settled as written: it was


def test_an_insert_of_unknown_outcome_half_written_sends_the_rest_once(server, database):
    """An insert spanning two days is two parts (a partition per day): the connection may break with one of them
    written. The lookup finds 4 of its 9 rows, sends the other 5 once and settles all 9 as written."""
    sink = ClickHouseSink(settings(server, database))
    sink.open()
    next_day = SHOP[1].flows.assign(
        time_start=SHOP[1].flows["time_start"] + pd.Timedelta(days=1),
        time_end=SHOP[1].flows["time_end"] + pd.Timedelta(days=1),
    )
    both = pd.concat([SHOP[0].flows, next_day], ignore_index=True)
    assert len(both) == 9 and both["time_end"].dt.day.nunique() == 2
    whole = Insert("flows", both)
    first_day = ClickHouseSink(settings(server, database))  # writes the first day's part under the same id
    first_day.open()
    first_day._inserts.append(Insert("flows", SHOP[0].flows, block_id=whole.block_id))
    first_day.close()
    assert first_day.settled() == (4, 0) and len(read(server, database)) == 4
    whole.maybe_written = True
    sink._inserts.append(whole)
    sink.write(FlowBatch.empty(SHOP[2].time_start, SHOP[2].time_end))
    sink.close()
    assert sink.settled() == (9, 0)
    assert server.query(f"SELECT count(), uniqExact(block_id) FROM `{database}`.flows") == "9\t1\n"
    pd.testing.assert_frame_equal(in_order(read(server, database), "flows"), in_order(both, "flows"), check_dtype=True)


def test_an_insert_of_unknown_outcome_half_written_then_refused_settles_what_was_stored(server, database):
    """The lookup finds 4 of the insert's 9 rows stored; the other 5 are refused until the insert is dropped: 4
    written, 5 lost (not all 9 lost: the 4 are in the table)."""
    from flowscope.exporters.clickhouse import REFUSALS_MAX

    sink = ClickHouseSink(settings(server, database))
    sink.open()
    next_day = SHOP[1].flows.assign(
        time_start=SHOP[1].flows["time_start"] + pd.Timedelta(days=1),
        time_end=SHOP[1].flows["time_end"] + pd.Timedelta(days=1),
    )
    whole = Insert("flows", pd.concat([SHOP[0].flows, next_day], ignore_index=True), maybe_written=True)
    first_day = ClickHouseSink(settings(server, database))
    first_day.open()
    first_day._inserts.append(Insert("flows", SHOP[0].flows, block_id=whole.block_id))
    first_day.close()
    # reads still answer, inserts are refused: the table behind a view, which takes no insert
    server.query(f"RENAME TABLE `{database}`.flows TO `{database}`.flows_stored")
    server.query(f"CREATE VIEW `{database}`.flows AS SELECT * FROM `{database}`.flows_stored")
    sink._inserts.append(whole)
    for _attempt in range(REFUSALS_MAX):
        sink._next_attempt = 0.0
        sink.write(FlowBatch.empty(SHOP[2].time_start, SHOP[2].time_end))
    assert sink.settled() == (4, 5) and (sink.rows_written, sink.rows_dropped) == (4, 5)
    sink.close()
    assert server.query(f"SELECT count() FROM `{database}`.flows_stored") == "4\n"


def read_block_id(server: ClickHouse, database: str) -> str:
    return server.query(f"SELECT any(block_id) FROM `{database}`.flows").strip()


def test_an_overflowing_buffer_counts_its_loss_exactly(server, database):
    """Inserts of (flows, events) rows per interval: (4, 2), (5, 3), (4, 1), (4, 2), (5, 3). Past 10 rows the oldest
    go: what stays is the newest that fit, the last interval's two inserts and the events of the one before."""
    sink = ClickHouseSink(settings(server, database, buffer_rows=10))
    sink.open()
    server.kill()
    try:
        write_all(sink, SHOP)  # 22 flow rows and 11 event rows while the server is gone; the buffer holds 10
        assert sink.health()["rows_buffered"] == 10 == len(SHOP[3].events) + records(SHOP[4])
        assert sink.settled() == (0, 23) and sink.rows_dropped == 23
    finally:
        server.start_again()
    sink._next_attempt = 0.0
    sink.close()
    assert sink.settled() == (10, 0)  # produced 33 = delivered 10 + lost 23
    assert (sink.rows_written, sink.rows_dropped) == (10, 23)
    assert_stored(server, database, [replace(SHOP[3], flows=SHOP[3].flows.iloc[:0]), SHOP[4]])


def test_a_refused_insert_is_retried_then_dropped_and_counted(server, database):
    from flowscope.exporters.clickhouse import REFUSALS_MAX

    sink = ClickHouseSink(settings(server, database))
    sink.open()
    ddl = server.query(f"SHOW CREATE TABLE `{database}`.events").replace("\\n", "\n").replace("\\'", "'")
    server.query(f"DROP TABLE `{database}`.events")  # the server refuses inserts into it from now on
    sink.write(SHOP[1])  # its flows are written; its events are refused and held
    assert sink.health()["state"] == "degraded" and "doesn't exist" in sink.health()["detail"]
    assert sink.settled() == (len(SHOP[1].flows), 0)
    server.query(ddl)  # back: the held events go in at the next attempt
    sink._next_attempt = 0.0
    sink.write(FlowBatch.empty(SHOP[2].time_start, SHOP[2].time_end))
    assert sink.settled() == (len(SHOP[1].events), 0) and sink.health()["state"] == "ok"
    server.query(f"DROP TABLE `{database}`.events")
    sink.write(SHOP[3])
    for _attempt in range(REFUSALS_MAX - 1):
        sink._next_attempt = 0.0
        sink.write(FlowBatch.empty(SHOP[4].time_start, SHOP[4].time_end))
    assert sink.settled() == (4, 2) == (len(SHOP[3].flows), len(SHOP[3].events))  # refused 5 times: dropped
    sink.close()


def test_the_filter_language_selects_in_sql_what_it_selects_in_pandas(server, database, tmp_path):
    assert run_agent(server, database, tmp_path).returncode == 0
    flows, events = everything(SHOP, "flows"), everything(SHOP, "events")
    filters = [
        "", "pod=shop/checkout", "from-pod=shop/payments", "to-pod=kube-system/", "pod=coredns", "namespace=shop",
        "not namespace=shop", "workload=shop/payments", "ip=10.204.0.0/24", "ip=fd00:204::/64", "ip=10.204.0.53",
        "from-ip=192.0.2.0/24", "port=8443", "port=50000-60000", "to-port=53", "protocol=UDP", "protocol=tcp,udp",
        "direction=ingress", "verdict=dropped", "verdict=forwarded", "reason=NO_SOCKET,NETFILTER_DROP",
        "not reason=NETFILTER_DROP", "ifname=veth-checkout", "type=drop", "type=retransmit", "type=reset",
        "node=node-a", "not node=node-a", "namespace=shop port=8443 not verdict=dropped", "!ip=10.204.0.0/16",
        # the edges of ranges and networks: one value either side of what the recording holds
        "port=8444-9998", "port=54-8442", "port=53-53", "ip=10.204.0.10/32", "ip=10.204.0.12/30",
        "ip=10.204.0.8/31", "ip=fd00:204::10/128", "ip=fd00:204::12/127", "ip=192.0.2.81/32",
    ]  # fmt: skip
    for text in filters:
        chosen = parse_filter(text)
        for kind, frame in (("flows", flows), ("events", events)):
            expected = in_order(frame[chosen.flows_mask(frame) if kind == "flows" else chosen.events_mask(frame)], kind)
            stored = in_order(read(server, database, filter=text, table=kind), kind)
            assert len(stored) == len(expected), (text, kind)
            pd.testing.assert_frame_equal(stored, expected, obj=f"{kind} for {text!r}")


@pytest.mark.parametrize(
    ("since", "until", "flows", "events"),
    [
        ("2025-03-01T12:00:04Z", "2025-03-01T12:00:06Z", 13, 1),  # intervals 02-04, 04-06 and 06-08 meet it
        ("2025-03-01T12:00:04.5Z", None, 13, 5),  # 02-04 ends before it; the event at 04.3 is before it
        (None, "2025-03-01T12:00:01.9Z", 4, 2),
        ("2025-03-01T12:00:10.000000001Z", None, 0, 0),  # a nanosecond after the last interval's end
    ],
)
def test_since_and_until_select_what_the_flow_log_selects(server, database, tmp_path, since, until, flows, events):
    """A flow whose interval [time_start, time_end] meets [since, until], an event whose time lies in it: to the
    nanosecond, as read_flowlog takes them."""
    assert run_agent(server, database, tmp_path).returncode == 0
    url = server.url(WRITER, database=database, password=False)
    low = pd.Timestamp(since) if since else pd.Timestamp.min.tz_localize("UTC")
    high = pd.Timestamp(until) if until else pd.Timestamp.max.tz_localize("UTC")
    for kind, count in (("flows", flows), ("events", events)):
        frame = everything(SHOP, kind)
        starts, ends = (frame["time_start"], frame["time_end"]) if kind == "flows" else (frame["time"], frame["time"])
        chosen = (ends >= low) & (starts <= high)
        stored = read_clickhouse(url, since=since, until=until, table=kind, password=WRITER.password)
        assert len(stored) == int(chosen.sum()) == count, kind
        pd.testing.assert_frame_equal(in_order(stored, kind), in_order(frame[chosen], kind), obj=kind)
        logged = read_capture(tmp_path / "shop.jsonl", since, until, records=kind)
        pd.testing.assert_frame_equal(in_order(stored, kind), in_order(logged, kind), obj=f"{kind} of the file")


def test_reading_an_unreachable_server_is_one_sentence(server, database):
    url = f"clickhouse://flowscope@127.0.0.1:1/{database}"
    with pytest.raises(ClickHouseReadError, match=r"^cannot reach ClickHouse at clickhouse://flowscope@127.0.0.1:1/"):
        read_clickhouse(url)


def test_a_refusing_server_at_open_is_an_error(server, database):
    sink = ClickHouseSink(ClickHouseConfig(url=server.url(WRITER, database=database, password=False), password="no"))
    with pytest.raises(ClickHouseError, match="refused user 'flowscope': Wrong password"):
        sink.open()


QUESTIONS = [
    ("drops", "--by", "workload"),
    ("talkers", "--by", "pod", "-n", "5"),
    ("talkers", "--by", "namespace", "--filter", "protocol=TCP"),
    ("peers", "shop/checkout-7d9f"),
    ("timeseries", "--every", "4s"),
    ("flows", "--since", "2025-03-01T12:00:04Z", "--until", "2025-03-01T12:00:06Z"),
]


def test_query_answers_from_clickhouse_what_it_answers_from_the_recording(server, database, tmp_path):
    assert run_agent(server, database, tmp_path).returncode == 0
    secret = tmp_path / "reader-password"
    secret.write_text(WRITER.password + "\n")
    url = server.url(WRITER, database=database, password=False)
    for question in QUESTIONS:
        answers = {}
        for source in (
            ["--clickhouse", url, "--clickhouse-password-file", str(secret)],
            ["--file", str(tmp_path / "shop.jsonl")],
        ):
            result = subprocess.run(
                [FLOWSCOPE, "query", *question, "-o", "csv", *source], capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, (question, result.stderr)
            answers[source[0]] = result.stdout
        lines = {source: text.splitlines() for source, text in answers.items()}
        if question[0] == "flows":  # rows of one time come in the order each store keeps: compare them as a set
            lines = {source: sorted(rows) for source, rows in lines.items()}
        assert lines["--clickhouse"] == lines["--file"], question
        assert len(lines["--file"]) > 1, question  # a header and at least one row
        if question[0] == "drops":
            assert lines["--file"][:3] == [
                "drop_reason,workload,drop_packets,drop_bytes",
                "NETFILTER_DROP,192.0.2.80,12,720",
                "NETFILTER_DROP,shop/checkout,12,720",
            ]


# ---- the disk spool (--clickhouse-spool-size) -----------------------------------------------------------


def records_of(batches: list[FlowBatch]) -> int:
    return sum(records(b) for b in batches)


def spool_files(data: Path) -> list[str]:
    return sorted(p.name for p in (data / SPOOL_DIRECTORY).iterdir())


def stopped_line(batches: list[FlowBatch], clickhouse_lost: int = 0) -> str:
    """The agent's last line: its intervals, and the losses the recording carries plus ClickHouse's."""
    recorded = Coverage()
    for batch in batches:
        recorded.merge(batch.coverage)
    lost = {name: count.lost for name, count in recorded.sources.items() if count.lost}
    if clickhouse_lost:
        lost["sink:clickhouse"] = clickhouse_lost
    return f"flowscope: agent stopped after {len(batches)} intervals; lost {lost or 'nothing'}"


def test_a_server_down_at_start_is_waited_for_and_the_same_run_writes_every_row_once(tmp_path):
    """The agent replays with its ClickHouse server not yet started and the flow log on: the flow log has every
    record while ClickHouse waits; the server then starts and, with no batch coming any more (the replay ended),
    the same run writes every row exactly once, and the flow log and the agent's losses never notice."""
    later = ClickHouse(tmp_path / "clickhouse", users=[User("default"), WRITER], tcp_port=free_port())
    (tmp_path / "clickhouse").mkdir()
    database = f"fs_{uuid.uuid4().hex[:12]}"
    data = tmp_path / "data"
    environment = {**os.environ, "FLOWSCOPE_FLOWLOG_ENABLED": "1"}
    sock = tmp_path / "shop.sock"
    with open(tmp_path / "agent.log", "w") as log:
        agent = subprocess.Popen(
            agent_argv(later, database, tmp_path, "--data-dir", str(data), "--flowlog-rotate-size", "1"),
            stdout=subprocess.DEVNULL, stderr=log, env=environment,
        )  # fmt: skip
    try:
        sinks = lambda: status(sock)["sinks"]  # noqa: E731
        wait_for(lambda: answering(sock) and status(sock)["source_ended"], what="the replay to end")
        agent.send_signal(signal.SIGHUP)  # the flow log completes the file it writes: its records settle
        counts = lambda name: tuple(sinks()[name][c] for c in ("produced", "delivered", "lost", "pending"))  # noqa: E731
        wait_for(lambda: counts("flowlog") == (33, 33, 0, 0), what="the flow log to have every record")
        assert counts("grpc") == (33, 33, 0, 0) and counts("clickhouse") == (0, 0, 0, 33)
        health = sinks()["clickhouse"]["health"]
        assert (health["state"], health["rows_buffered"], health["rows_dropped"]) == ("degraded", 33, 0)
        later.start()
        try:
            written = lambda: sinks()["clickhouse"]["health"]["rows_written"]  # noqa: E731
            wait_for(lambda: written() == 33, 150, "the waiting rows written (the retry backoff reaches 31 s)")
            assert sinks()["clickhouse"]["health"]["state"] == "ok" and counts("clickhouse")[1:] == (33, 0, 0)
            agent.terminate()
            assert agent.wait(60) == 0, (tmp_path / "agent.log").read_text()
            stderr = (tmp_path / "agent.log").read_text()
            assert "is unreachable" in stderr and "is back after" in stderr
            assert stderr.splitlines()[-1] == stopped_line(SHOP)  # no sink lost anything
            assert_stored(later, database, SHOP)
        finally:
            later.stop()
    finally:
        agent.kill()
        agent.wait()
    for kind in ("flows", "events"):
        logged = in_order(read_flowlog(data, records=kind), kind)
        pd.testing.assert_frame_equal(logged, in_order(everything(SHOP, kind), kind), obj=kind)


def test_a_stopped_server_spools_then_every_row_arrives_once(server, database, tmp_path):
    sink = ClickHouseSink(settings(server, database, spool_size=1 << 30), data_dir=str(tmp_path))
    sink.open()
    write_all(sink, SHOP[:2])
    server.stop()
    try:
        write_all(sink, SHOP[2:4])  # the server is gone: every insert waits on disk, none in memory
        health = sink.health()
        assert (health["state"], health["rows_buffered"], health["spool"]["rows"]) == ("degraded", 0, 11)
        assert len(spool_files(tmp_path)) == 4 and records_of(SHOP[2:4]) == 11
        assert sink.settled() == (records_of(SHOP[:2]), 0)
    finally:
        server.start_again()
    sink._next_attempt = 0.0  # the backoff has passed (the test does not wait for it)
    write_all(sink, SHOP[4:])
    assert spool_files(tmp_path) == [] and sink.health()["spool"]["rows"] == 0
    sink.close()
    assert sink.settled() == (records_of(SHOP[2:]), 0)
    assert_stored(server, database, SHOP)


def test_a_spool_file_already_written_is_not_written_again(server, database, tmp_path):
    """A kill between an insert and the removal of its file: the next start finds its block_id stored."""
    first = ClickHouseSink(settings(server, database))
    first.open()
    first.write(SHOP[0])
    first.close()
    spool = Spool(tmp_path / SPOOL_DIRECTORY, 1 << 30)
    spool.open()
    spool.add("flows", SHOP[0].flows, read_block_id(server, database))
    again = ClickHouseSink(settings(server, database, spool_size=1 << 30), data_dir=str(tmp_path))
    again.open()
    assert again.adopted() == len(SHOP[0].flows) == 4
    again.write(SHOP[1])
    again.close()
    assert again.settled() == (4 + records_of(SHOP[1:2]), 0) and spool_files(tmp_path) == []
    assert_stored(server, database, SHOP[:2])


def test_a_spool_that_a_killed_agent_left_is_written_at_the_next_start(server, database, tmp_path):
    data = tmp_path / "data"
    spooling = ["--data-dir", str(data), "--clickhouse-spool-size", "64MiB"]
    sock = tmp_path / "first.sock"
    server.kill()
    try:
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(
                agent_argv(server, database, tmp_path, *spooling, batches=SHOP[:4], name="first"),
                stdout=subprocess.DEVNULL, stderr=log, env=AGENT_ENVIRONMENT,
            )  # fmt: skip
        try:
            spooled = lambda: status(sock)["sinks"]["clickhouse"]["health"]["spool"]["rows"]  # noqa: E731
            wait_for(lambda: answering(sock) and spooled() == records_of(SHOP[:4]) == 25, what="four intervals spooled")
            first.kill()
        finally:
            first.kill()
            first.wait()
    finally:
        server.start_again()
    assert len(spool_files(data)) == 8  # a flows and an events insert per interval
    result = run_agent(server, database, tmp_path, *spooling, batches=SHOP[4:], name="second")
    assert result.returncode == 0, result.stderr
    assert "25 rows in 8 file(s) that an earlier run left in" in result.stderr
    assert result.stderr.splitlines()[-1] == stopped_line(SHOP[4:])
    assert spool_files(data) == []
    assert_stored(server, database, SHOP)


def test_an_overflowing_spool_counts_its_loss_exactly(server, database, tmp_path):
    # The spool holds the last interval's two inserts and no more: their files' sizes, as the disk has them.
    reference = Spool(tmp_path / "reference", 1 << 30)
    reference.open()
    for kind in ("flows", "events"):
        reference.add(kind, getattr(SHOP[4], kind), uuid.uuid4().hex)
    limit = sum(path.stat().st_size for path in (tmp_path / "reference").iterdir())
    sink = ClickHouseSink(settings(server, database, spool_size=limit), data_dir=str(tmp_path))
    sink.open()
    server.kill()
    try:
        write_all(sink, SHOP)  # 33 records in 10 inserts while the server is gone; the spool keeps the last two
        assert sink.health()["spool"]["rows"] == records_of(SHOP[4:]) == 8
        assert sink.settled() == (0, 33 - 8)
    finally:
        server.start_again()
    sink._next_attempt = 0.0
    sink.write(FlowBatch.empty(SHOP[4].time_end, SHOP[4].time_end))
    sink.close()
    assert sink.settled() == (8, 0) and sink.rows_dropped == 25
    assert_stored(server, database, SHOP[4:])


def test_a_corrupt_spool_file_is_one_sentence_and_counted(server, database, tmp_path):
    data = tmp_path / "data"
    spool = Spool(data / SPOOL_DIRECTORY, 1 << 30)
    spool.open()
    spool.add("flows", SHOP[0].flows, uuid.uuid4().hex)
    spool.add("events", SHOP[0].events, uuid.uuid4().hex)
    broken = spool.entries[0].path
    broken.write_bytes(broken.read_bytes()[:200])  # a disk that lost its tail
    result = run_agent(server, database, tmp_path, "--data-dir", str(data), "--clickhouse-spool-size", "64MiB",
                       batches=SHOP[1:])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    (sentence,) = [line for line in result.stderr.splitlines() if broken.name in line]
    assert sentence.startswith(
        f"flowscope: ClickHouse: 4 flows rows dropped: the spool file {broken} cannot be read (not a readable "
        "Parquet file ("
    ), sentence
    assert result.stderr.splitlines()[-1] == stopped_line(SHOP[1:], clickhouse_lost=4)
    assert spool_files(data) == []
    assert_stored(server, database, [replace(SHOP[0], flows=SHOP[0].flows.iloc[:0]), *SHOP[1:]])

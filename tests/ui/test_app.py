"""The Textual app driven by Pilot over replay data: grouping, sorting, filtering, drops, detail, pause, quit."""

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path

from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

from flowscope.ui.app import DetailScreen, HelpScreen, TopApp
from tests.ui.scenario import (
    QueueSource,
    press_and_settle,
    put_and_settle,
    replay_app,
    replay_finished,
    settle,
    shop_batches,
    until,
    write_replay,
)

SIZE = (150, 34)


def cells(app: TopApp, table_id: str = "#rows", columns: int = 2) -> list[list[str]]:
    table = app.screen.query_one(table_id, DataTable)
    return [[str(cell) for cell in table.get_row_at(i)[:columns]] for i in range(table.row_count)]


def header(app: TopApp) -> str:
    return str(app.query_one("#header", Static).render())


def runs(test):
    """Runs an async test (with its fixtures) in an event loop of its own, for 120 s at most."""

    @functools.wraps(test)
    def run(*args, **kwargs) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=120))

    return run


@contextlib.asynccontextmanager
async def finished_replay(path: Path) -> AsyncIterator[tuple[TopApp, Pilot]]:
    """The app on a replay that has been read to its end, with its last snapshot shown."""
    app = replay_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await replay_finished(app, pilot)
        yield app, pilot


@runs
async def test_rows_and_header_after_a_replay(shop_replay):
    async with finished_replay(shop_replay) as (app, _pilot):
        assert cells(app, columns=4) == [
            ["TCP shop/checkout-7d9f:43210 → shop/payments-0:8443", "70.0 kB/s", "70/s", "0"],
            ["TCP shop/payments-0:8443 → shop/checkout-7d9f:43210", "56.0 kB/s", "40/s", "0"],
            ["TCP shop/checkout-7d9f:50000 → shop/payments-0:443", "12.0 kB/s", "10/s", "0"],
            ["TCP 192.0.2.80:51000 → shop/checkout-7d9f:8080", "180 B/s", "3/s", "6"],
            ["UDP shop/checkout-7d9f:40001 → kube-system/coredns-55:53", "90 B/s", "1/s", "0"],
        ]
        assert header(app).splitlines() == [
            "flowscope top  node node-a  interval 2s  12:00:10 UTC  intervals 5  finished",
            "flows 5 (2.50/s)  138 kB/s  124 pkts/s  coverage 94.3% (lost 2 of 35)",
            "probes replay",
            "group flow  sort BYTES/S ▼  rates over 2s  5 of 5 rows  ",
        ]


@runs
async def test_grouping_cycles_with_g_and_back_with_shift_g(shop_replay):
    async with finished_replay(shop_replay) as (app, pilot):
        await press_and_settle(app, pilot, "g")
        assert cells(app) == [
            ["shop/checkout-7d9f", "138 kB/s"],
            ["shop/payments-0", "138 kB/s"],
            ["192.0.2.80", "180 B/s"],
            ["kube-system/coredns-55", "90 B/s"],
        ]
        assert str(app.query_one("#rows", DataTable).columns["label"].label) == "POD"
        await press_and_settle(app, pilot, "g", "g")
        assert cells(app) == [["shop", "276 kB/s"], ["kube-system", "90 B/s"]]
        await press_and_settle(app, pilot, "g", "g", "g")
        assert cells(app)[0] == ["TCP shop/checkout-7d9f:43210 → shop/payments-0:8443", "70.0 kB/s"]
        await press_and_settle(app, pilot, "G")
        assert cells(app) == [["node-a", "276 kB/s"], ["node-b", "90 B/s"]]


@runs
async def test_sorting_by_keys_and_by_clicking_a_heading(shop_replay):
    async with finished_replay(shop_replay) as (app, pilot):
        await press_and_settle(app, pilot, "s")  # bytes/s -> packets/s
        assert app.last_snapshot.rows.sort == "packets_per_s"
        assert [row[0] for row in cells(app)][:2] == [
            "TCP shop/checkout-7d9f:43210 → shop/payments-0:8443",
            "TCP shop/payments-0:8443 → shop/checkout-7d9f:43210",
        ]
        await press_and_settle(app, pilot, "r")
        assert cells(app, columns=3)[0] == ["UDP shop/checkout-7d9f:40001 → kube-system/coredns-55:53", "90 B/s", "1/s"]
        assert str(app.query_one("#rows", DataTable).columns["packets_per_s"].label) == "PKTS/S ▲"
        table = app.query_one("#rows", DataTable)
        x = sum(column.get_render_width(table) for key, column in table.columns.items() if key.value == "label")
        x += sum(
            column.get_render_width(table)
            for key, column in table.columns.items()
            if key.value in ("bytes_per_s", "packets_per_s")
        )
        before = app.feed.published
        await pilot.click("#rows", offset=(x + 2, 0))  # the DROPS heading
        await settle(app, pilot, after=before)
        assert app.last_snapshot.rows.sort == "drops"
        assert cells(app, columns=4)[0] == ["TCP 192.0.2.80:51000 → shop/checkout-7d9f:8080", "180 B/s", "3/s", "6"]
        assert str(table.columns["drops"].label) == "DROPS ▼"


@runs
async def test_shift_s_sorts_by_the_previous_column(shop_replay):
    async with finished_replay(shop_replay) as (app, pilot):
        table = app.query_one("#rows", DataTable)
        await press_and_settle(app, pilot, "S")  # bytes/s -> the column before it: the flow's key
        # Descending by (protocol, source address, ...) as text: UDP after TCP, "fd00:" after "192." after "10."
        assert [row[0] for row in cells(app, columns=1)] == [
            "UDP shop/checkout-7d9f:40001 → kube-system/coredns-55:53",
            "TCP shop/checkout-7d9f:50000 → shop/payments-0:443",
            "TCP 192.0.2.80:51000 → shop/checkout-7d9f:8080",
            "TCP shop/payments-0:8443 → shop/checkout-7d9f:43210",
            "TCP shop/checkout-7d9f:43210 → shop/payments-0:8443",
        ]
        assert header(app).splitlines()[3] == "group flow  sort KEY ▼  rates over 2s  5 of 5 rows  "
        assert str(table.columns["label"].label) == "FLOW ▼"
        await press_and_settle(app, pilot, "S")  # from the first column round to the last: closes
        # The last interval closes the TCP 8443 connection at both ends: one close, on the row of the first
        # close event's direction; ties go by bytes/s.
        assert [(row[0], row[8]) for row in cells(app, columns=9)] == [
            ("TCP shop/checkout-7d9f:43210 → shop/payments-0:8443", "1"),
            ("TCP shop/payments-0:8443 → shop/checkout-7d9f:43210", "0"),
            ("TCP shop/checkout-7d9f:50000 → shop/payments-0:443", "0"),
            ("TCP 192.0.2.80:51000 → shop/checkout-7d9f:8080", "0"),
            ("UDP shop/checkout-7d9f:40001 → kube-system/coredns-55:53", "0"),
        ]
        assert str(table.columns["closes"].label) == "CLOSE ▼"
        assert str(table.columns["label"].label) == "FLOW"


@runs
async def test_good_and_bad_filters(shop_replay):
    async with finished_replay(shop_replay) as (app, pilot):
        await pilot.press("slash")
        assert app.query_one("#filter", Input).has_focus
        await pilot.press(*"port=http")
        await pilot.press("enter")
        message = app.query_one("#message", Static)
        await until(pilot, lambda: message.has_class("shown"), "the bad filter is reported")
        assert (
            str(message.render()) == 'bad filter term "port=http": a port is a number 0-65535 or a range like 8000-8080'
        )
        assert len(cells(app)) == 5  # still running, still showing everything
        field = app.query_one("#filter", Input)
        field.value = "to-port=8443,53 not protocol=udp"
        before = app.feed.published
        await pilot.press("enter")
        await settle(app, pilot, after=before)
        assert cells(app) == [["TCP shop/checkout-7d9f:43210 → shop/payments-0:8443", "70.0 kB/s"]]
        assert str(app.query_one("#message", Static).render()) == ""
        assert header(app).splitlines()[3] == (
            "group flow  sort BYTES/S ▼  rates over 2s  1 of 1 rows  filter to-port=8443,53 not protocol=udp "
            "(1 of 5 flows)"
        )
        assert app.query_one("#rows", DataTable).has_focus
        await pilot.press("slash")
        app.query_one("#filter", Input).value = ""
        before = app.feed.published
        await pilot.press("enter")
        await settle(app, pilot, after=before)
        assert len(cells(app)) == 5


@runs
async def test_escape_closes_the_filter_without_applying_it(shop_replay):
    async with finished_replay(shop_replay) as (app, pilot):
        await pilot.press("slash", *"port=53", "escape")
        assert not app.query_one("#filter", Input).has_class("open")
        # View changes apply in key order: a filter applied by escape would show in the snapshot of "r".
        await press_and_settle(app, pilot, "r")
        assert app.last_snapshot.filter_text == ""
        assert len(cells(app)) == 5


@runs
async def test_drops_view_and_drilling_into_a_reason(shop_replay):
    async with finished_replay(shop_replay) as (app, pilot):
        await press_and_settle(app, pilot, "g", "d")
        assert cells(app, "#drops", columns=6) == [
            ["NETFILTER_DROP", "12", "24", "1.44 kB", "80.0%", "192.0.2.80 (12), shop/checkout-7d9f (12)"],
            ["TCP_INVALID_SEQUENCE", "0", "4", "4.00 kB", "13.3%", "shop/checkout-7d9f (2), shop/payments-0 (2)"],
            ["NO_SOCKET", "0", "2", "148 B", "6.7%", "10.204.0.1 (1), shop/payments-0 (1)"],
        ]
        await press_and_settle(app, pilot, "enter")  # on NETFILTER_DROP: filter by it, back to the rows
        assert app.last_snapshot.filter_text == "reason=NETFILTER_DROP"
        assert app.query_one("#views").current == "rows"
        assert cells(app) == [["192.0.2.80", "180 B/s"], ["shop/checkout-7d9f", "180 B/s"]]


@runs
async def test_detail_screen_and_back(shop_replay):
    async with finished_replay(shop_replay) as (app, pilot):
        await press_and_settle(app, pilot, "g", "enter")
        assert isinstance(app.screen, DetailScreen)
        assert str(app.screen.query_one("#detail-title", Static).render()) == "shop/checkout-7d9f"
        assert cells(app, "#peers", columns=5) == [
            ["shop/payments-0", "→", "720 kB", "700", "2"],
            ["shop/payments-0", "←", "560 kB", "400", "0"],
            ["192.0.2.80", "←", "720 B", "12", "12"],
            ["kube-system/coredns-55", "→", "540 B", "6", "0"],
        ]
        assert cells(app, "#reasons", columns=3) == [
            ["NETFILTER_DROP", "12", "720 B"],
            ["TCP_INVALID_SEQUENCE", "2", "2.00 kB"],
        ]
        assert [row[1] for row in cells(app, "#events")] == [
            "close", "close", "drop", "drop", "drop", "retransmit", "accept", "connect",
        ]  # fmt: skip
        assert str(app.screen.query_one("#detail-stats", Static).render()) == (
            "over 5 intervals  ·  now 138 kB/s  ·  124 pkts/s  ·  drops 14  ·  retransmits 3  ·  resets 0  ·  "
            "RTT 800µs .. 933µs"
        )
        await pilot.press("g")  # main-table keys do nothing over the detail
        await press_and_settle(app, pilot, "escape")  # its snapshot comes after any change "g" made
        assert app.last_snapshot.rows.grouping == "pod"
        assert not isinstance(app.screen, DetailScreen)
        assert app.feed.detail_key is None


@runs
async def test_help_screen(shop_replay):
    async with finished_replay(shop_replay) as (app, pilot):
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen opens")
        assert "pause the display" in str(app.screen.query_one("#help", Static).render())
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen), "the help screen closes")


@runs
async def test_pause_freezes_rows_while_intervals_keep_arriving():
    source = QueueSource()
    batches = shop_batches()
    app = TopApp(source)
    async with app.run_test(size=SIZE) as pilot:
        await put_and_settle(app, pilot, source, *batches[:3])
        frozen = cells(app, columns=3)
        assert frozen[0] == ["TCP shop/checkout-7d9f:43210 → shop/payments-0:8443", "60.0 kB/s", "60/s"]
        await press_and_settle(app, pilot, "space")
        await put_and_settle(app, pilot, source, *batches[3:])
        assert cells(app, columns=3) == frozen
        lines = header(app).splitlines()
        assert lines[0].endswith("intervals 5  PAUSED (2 intervals waiting)")
        assert lines[1].endswith("coverage 94.3% (lost 2 of 35)")  # loss accounting does not pause
        assert lines[2] == "probes tc_flows  unavailable tcp_rtt (kprobes are off)"
        await press_and_settle(app, pilot, "space")
        assert cells(app, columns=3)[0] == ["TCP shop/checkout-7d9f:43210 → shop/payments-0:8443", "70.0 kB/s", "70/s"]
        assert "PAUSED" not in header(app)
    source.close()


@runs
async def test_rows_update_in_place_and_the_cursor_follows_its_row():
    source = QueueSource()
    batches = shop_batches()
    app = TopApp(source)
    async with app.run_test(size=SIZE) as pilot:
        await put_and_settle(app, pilot, source, batches[0])
        table = app.query_one("#rows", DataTable)
        # interval 0: the reply (56 kB/s) leads; put the cursor on the request (50 kB/s), second
        assert [row[0] for row in cells(app)][:2] == [
            "TCP shop/payments-0:8443 → shop/checkout-7d9f:43210",
            "TCP shop/checkout-7d9f:43210 → shop/payments-0:8443",
        ]
        await pilot.press("down")
        keys_before = {row.key.value: row.key for row in table.ordered_rows}
        # the request grows to 55 kB/s; DNS goes quiet; curl's flows appear
        await put_and_settle(app, pilot, source, batches[1])
        keys_after = {row.key.value: row.key for row in table.ordered_rows}
        assert set(keys_before) - set(keys_after) == {"UDP shop/checkout-7d9f:40001 → kube-system/coredns-55:53"}
        assert set(keys_after) - set(keys_before) == {
            "TCP 10.204.0.1:39000 → shop/payments-0:9999",
            "TCP shop/payments-0:9999 → 10.204.0.1:39000",
        }
        staying = set(keys_before) & set(keys_after)
        assert all(keys_after[key] is keys_before[key] for key in staying)  # updated, not re-added
        assert cells(app)[1] == ["TCP shop/checkout-7d9f:43210 → shop/payments-0:8443", "55.0 kB/s"]
        selected = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        assert selected == "TCP shop/checkout-7d9f:43210 → shop/payments-0:8443"
    source.close()


@runs
async def test_quit_stops_the_reader_and_returns():
    source = QueueSource()
    app = TopApp(source)
    async with app.run_test(size=SIZE) as pilot:
        source.put(shop_batches()[0])
        await settle(app, pilot, after=0)
        await pilot.press("q")
    assert app.return_code == 0
    source.close()  # the owner closes the source (the CLI does this after the app returns)
    app.feed._reader.join(timeout=20)
    assert not app.feed._reader.is_alive()


@runs
async def test_a_replay_that_breaks_off_shows_why_and_keeps_what_it_had(tmp_path):
    path = write_replay(tmp_path / "broken.jsonl", shop_batches()[:2])
    with open(path, "a", encoding="utf-8") as out:
        out.write('{"type": "flow", "src_ip": \n')
    async with finished_replay(path) as (app, _pilot):
        first = header(app).splitlines()[0]
        line = len(path.read_text().splitlines())  # the broken one is the last
        assert first.endswith(
            f"intervals 2  source failed: {path}:{line}: not JSON (Expecting value); fix or remove it, or replay with "
            "--skip-bad-records."
        )
        assert len(cells(app)) == 5  # the flows of interval 1, the last complete one


@runs
async def test_w_cycles_the_rate_window_and_rows_average_over_it(shop_replay):
    async with finished_replay(shop_replay) as (app, pilot):
        await press_and_settle(app, pilot, "w")  # 2 s -> 10 s: the five 2-s intervals of the recording
        # The whole recording's seven flows: two of them were active in earlier intervals only.
        assert header(app).splitlines()[3] == "group flow  sort BYTES/S ▼  rates over 10s  7 of 7 rows  "
        # checkout -> payments sent 100, 110, 120, 130 and 140 kB in its intervals: 600 kB over 10 s.
        assert cells(app, columns=2)[0] == ["TCP shop/checkout-7d9f:43210 → shop/payments-0:8443", "60.0 kB/s"]
        await press_and_settle(app, pilot, "w")
        assert "rates over 40s" in header(app).splitlines()[3]
        await press_and_settle(app, pilot, "w")
        assert "rates over 2s" in header(app).splitlines()[3]

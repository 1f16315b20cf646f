"""The Textual app of `flowscope top`: header, ranked rows or drop reasons, filter bar, detail and help.

The app only displays: a TopFeed computes snapshots off the UI thread and posts them here; key presses
become view changes that the feed applies in order on its own worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import pandas as pd
from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import ContentSwitcher, DataTable, Footer, Input, Sparkline, Static

from flowscope import display as fmt
from flowscope.analysis.top import (
    GROUPINGS,
    METRICS,
    RATE_WINDOWS,
    SORT_KEYS,
    TREND_WIDTH,
    Detail,
    DropsTable,
    TopModel,
    TopRows,
)
from flowscope.enrich import Enricher
from flowscope.filters import FilterError, parse_filter
from flowscope.pipeline.source import BatchSource
from flowscope.ui.feed import Snapshot, TopFeed

# Widths of the metric columns: enough for the widest formatted value and the heading with its sort mark.
METRIC_WIDTHS = {
    "bytes_per_s": 9,
    "packets_per_s": 8,
    "drops": 7,
    "retransmits": 6,
    "resets": 6,
    "rtt_us": 7,
    "connections": 6,
    "closes": 7,
}
CELL_PADDING = 2

HELP = """\
[b]Keys[/b]
  [b]g[/b] / [b]G[/b]       next / previous grouping: flow, pod, workload, namespace, process, node
  [b]s[/b] / [b]S[/b]       sort by the next / previous column (or click a column heading)
  [b]r[/b]           reverse the sort order
  [b]w[/b]           rates over the last 2, 10 or 40 s (an idle row fades out instead of vanishing)
  [b]d[/b]           drop reasons and their top victims (Enter on a reason filters by it)
  [b]/[/b]           filter; Enter applies, Esc cancels, an empty filter shows everything
  [b]Enter[/b]       detail of the selected row (Esc goes back)
  [b]Space[/b]       pause the display (data keeps arriving and is shown on resume)
  [b]?[/b]           this help
  [b]q[/b]           quit (probes are detached)

[b]Filter[/b] (the same as `flowscope top --filter`)
  port=80,443 protocol=tcp     terms are ANDed, commas OR values
  not namespace=kube-system    not or ! negates a term, so does field!=value
  from-pod=shop/checkout       from- / to- pin a side; without them either side matches
  fields: pod namespace workload label (key=value) ip (address or CIDR) port (or range) node
          observer protocol direction verdict (forwarded|dropped) reason (NO_SOCKET ...) ifname type
"""


class SnapshotReady(Message):
    """A new snapshot is waiting in the app's slot (posted from the feed's threads)."""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar = [
        Binding("escape,q,question_mark", "dismiss", "Close"),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    #help { width: auto; height: auto; padding: 1 2; border: round $accent; background: $surface; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")


class DetailScreen(Screen[None]):
    BINDINGS: ClassVar = [
        Binding("escape,q,enter", "dismiss", "Back"),
    ]
    DEFAULT_CSS = """
    DetailScreen #detail-title { height: auto; padding: 0 1; background: $boost; text-style: bold; }
    DetailScreen #detail-stats { height: auto; padding: 0 1; }
    DetailScreen #charts { height: 5; }
    DetailScreen .chart { width: 1fr; padding: 0 1; }
    DetailScreen .chart Sparkline { height: 3; }
    DetailScreen #tables { height: 1fr; }
    DetailScreen #peers, DetailScreen #reasons { width: 1fr; }
    DetailScreen #events { height: 1fr; }
    """

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self._ready = False
        self._pending: Detail | None = None  # a detail that arrived before the screen was mounted
        self._shown: Detail | None = None

    def compose(self) -> ComposeResult:
        yield Static(self.label, id="detail-title")
        yield Static("waiting for data", id="detail-stats")
        with Horizontal(id="charts"):
            for name in ("bytes", "packets", "rtt"):
                with Vertical(classes="chart"):
                    yield Static(name, id=f"{name}-caption")
                    yield Sparkline([], id=f"{name}-chart")
        with Horizontal(id="tables"):
            yield DataTable(id="peers", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="reasons", cursor_type="none")
        yield DataTable(id="events", cursor_type="none", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        # Fixed widths: the tables are refilled on every interval and must not change shape while read.
        peers = self.query_one("#peers", DataTable)
        _add_columns(peers, ("PEER", 40), ("", 1), ("BYTES", 8), ("PKTS", 7), ("DROPS", 6))
        _add_columns(self.query_one("#reasons", DataTable), ("DROP REASON", 26), ("PKTS", 7), ("BYTES", 8))
        _add_columns(self.query_one("#events", DataTable), ("TIME", 12), ("EVENT", 10), ("FLOW", 56), ("REASON", 26))
        self._ready = True
        if self._pending is not None:
            self.show(self._pending)

    def show(self, detail: Detail) -> None:
        if not self._ready:
            self._pending = detail
            return
        if self._shown is not None and _same_detail(self._shown, detail):
            return
        self._shown = detail
        series = detail.series
        last = series.iloc[-1] if len(series) else None
        rtt = series["rtt_us"].dropna() if len(series) else pd.Series(dtype=float)
        stats = [
            f"over {len(series)} intervals",
            f"now {fmt.bytes_rate(last['bytes_per_s'] if last is not None else None)}",
            f"{fmt.count(last['packets_per_s'] if last is not None else None)} pkts/s",
            f"drops {fmt.count(series['drops'].sum() if len(series) else 0)}",
            f"retransmits {fmt.count(series['retransmits'].sum() if len(series) else 0)}",
            f"resets {fmt.count(series['resets'].sum() if len(series) else 0)}",
            "RTT " + ("-" if rtt.empty else f"{fmt.duration_us(rtt.min())} .. {fmt.duration_us(rtt.max())}"),
        ]
        self.query_one("#detail-stats", Static).update("  ·  ".join(stats))
        for name, column, formatter in (
            ("bytes", "bytes_per_s", fmt.bytes_rate),
            ("packets", "packets_per_s", fmt.rate),
            ("rtt", "rtt_us", fmt.duration_us),
        ):
            values = series[column].astype(float).fillna(0.0).tolist() if len(series) else []
            self.query_one(f"#{name}-chart", Sparkline).data = values
            caption = {"bytes": "bytes/s", "packets": "packets/s", "rtt": "RTT"}[name]
            now = formatter(series[column].iloc[-1]) if len(series) else "-"
            self.query_one(f"#{name}-caption", Static).update(f"{caption}  {now}")
        peers = self.query_one("#peers", DataTable)
        peers.clear()
        for record in detail.peers.to_dict("records"):
            peers.add_row(
                Text(record["peer"]),
                record["direction"],
                _right(fmt.byte_count(record["bytes"])),
                _right(fmt.count(record["packets"])),
                _count_cell(record["drop_packets"], "red"),
            )
        reasons = self.query_one("#reasons", DataTable)
        reasons.clear()
        for record in detail.drops.to_dict("records"):
            packets, size = fmt.count(record["packets"]), fmt.byte_count(record["bytes"])
            reasons.add_row(record["reason"], _right(packets), _right(size))
        events = self.query_one("#events", DataTable)
        events.clear()
        for record in detail.events.to_dict("records"):
            time = pd.Timestamp(record["time"]).tz_convert("UTC").strftime("%H:%M:%S.%f")[:-3]
            events.add_row(time, record["kind"], Text(record["flow"]), record["reason"])


def _add_columns(table: DataTable, *columns: tuple[str, int]) -> None:
    for title, width in columns:
        table.add_column(title, width=width)


def _same_detail(one: Detail, other: Detail) -> bool:
    return one.key == other.key and all(
        getattr(one, name).equals(getattr(other, name)) for name in ("series", "peers", "drops", "events")
    )


def _right(text: str, style: str = "") -> Text:
    return Text(text, style=style, justify="right")


def _count_cell(value: object, alert: str) -> Text:
    hot = not fmt.missing(value) and float(value) > 0  # type: ignore[arg-type]
    return _right(fmt.count(value), f"bold {alert}" if hot else "")


CELL_ALERTS = {"drops": "red", "retransmits": "yellow", "resets": "magenta"}


def row_cells(record: dict[str, Any], with_trend: bool) -> list[Text | str]:
    cells: list[Text | str] = [Text(record["label"])]
    for metric in METRICS:
        value = record[metric.name]
        if metric.name in CELL_ALERTS:
            cells.append(_count_cell(value, CELL_ALERTS[metric.name]))
        else:
            cells.append(_right(fmt.FORMATTERS[metric.unit](value)))
    if with_trend:
        cells.append(Text(record["trend"], style="green"))
    return cells


class TopApp(App[int]):
    TITLE = "flowscope top"
    AUTO_FOCUS = "#rows"
    CSS = """
    #header { height: auto; padding: 0 1; background: $boost; }
    #views { height: 1fr; }
    #rows, #drops { height: 1fr; }
    #filter { display: none; }
    #filter.open { display: block; }
    #message { height: auto; padding: 0 1; color: $error; display: none; }
    #message.shown { display: block; }
    """
    BINDINGS: ClassVar = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("space", "pause", "Pause"),
        Binding("g", "group(1)", "Group"),
        Binding("G", "group(-1)", "Group back", show=False),
        Binding("s", "sort(1)", "Sort"),
        Binding("S", "sort(-1)", "Sort back", show=False),
        Binding("r", "reverse", "Reverse"),
        Binding("w", "window", "Window", show=False),
        Binding("d", "drops", "Drops"),
        Binding("slash", "open_filter", "Filter"),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(
        self,
        source: BatchSource,
        model: TopModel | None = None,
        rows: int | None = None,
        handle_signals: bool = False,
        enricher: Enricher | None = None,
    ) -> None:
        super().__init__()
        self.model = model or TopModel()
        self.fixed_rows = rows
        self.handle_signals = handle_signals
        self.feed = TopFeed(source, self.model, self._receive, limit=rows or 50, enricher=enricher)
        self._changes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowscope-top-view")
        self._slot: Snapshot | None = None
        self._slot_lock = threading.Lock()
        self._keys: dict[str, tuple] = {}
        self._with_trend = False
        self._shown_grouping = self.model.grouping
        self._detail: DetailScreen | None = None
        self._drops_shown: pd.DataFrame | None = None
        self.last_snapshot: Snapshot | None = None
        self._previous_handlers: dict[int, Any] = {}
        # The view as last requested: key presses run ahead of the snapshots that show them.
        self._view: dict[str, Any] = {
            "grouping": self.model.grouping,
            "sort": self.model.sort,
            "descending": self.model.descending,
            "rate_window": self.model.rate_window,
            "filter_text": str(self.model.filter),
        }

    # --- layout --------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static("flowscope top: waiting for the first interval", id="header")
        with ContentSwitcher(initial="rows", id="views"):
            yield DataTable(id="rows", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="drops", cursor_type="row", zebra_stripes=True)
        yield Static("", id="message")
        yield Input(placeholder="filter, e.g. port=443 not namespace=kube-system", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self._build_row_columns(with_trend=False)
        drops = self.query_one("#drops", DataTable)
        for title, width in (("DROP REASON", 26), ("LAST", 7), ("WINDOW", 7), ("BYTES", 8), ("SHARE", 6)):
            drops.add_column(_right(title) if width < 10 else title, width=width)
        drops.add_column("TOP VICTIMS", width=90)
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for number in (signal.SIGTERM, signal.SIGHUP):
                self._previous_handlers[number] = signal.getsignal(number)
                loop.add_signal_handler(number, self.exit)
        self.feed.limit = self._row_limit()
        self.feed.start()

    def on_unmount(self) -> None:
        self.feed.stop(timeout=max(2.0, 2 * (self.feed.source.interval or 1.0) + 1))
        self._changes.shutdown(wait=True, cancel_futures=True)
        if self._previous_handlers:
            loop = asyncio.get_running_loop()
            for number, handler in self._previous_handlers.items():
                loop.remove_signal_handler(number)
                signal.signal(number, handler)

    def _build_row_columns(self, with_trend: bool) -> None:
        table = self.query_one("#rows", DataTable)
        table.clear(columns=True)
        self._with_trend = with_trend
        table.add_column(self._view["grouping"].upper(), key="label")
        for metric in METRICS:
            table.add_column(_right(metric.title), key=metric.name, width=METRIC_WIDTHS[metric.name])
        if with_trend:
            table.add_column("TREND", key="trend", width=TREND_WIDTH)

    def _trend_fits(self, labels: list[str]) -> bool:
        """A trend column is shown where the terminal is wide enough for it next to the other columns."""
        numbers = sum(width + CELL_PADDING for width in METRIC_WIDTHS.values())
        label = max((len(label) for label in labels), default=0) + CELL_PADDING
        return self.size.width - 2 - numbers - label >= TREND_WIDTH + CELL_PADDING

    def _row_limit(self) -> int:
        if self.fixed_rows:
            return self.fixed_rows
        height = self.query_one("#rows", DataTable).size.height
        return max(height - 1, 1) if height > 1 else max(self.size.height - 8, 10)

    def on_resize(self) -> None:
        self._change(limit=self._row_limit())

    # --- snapshots from the feed ---------------------------------------------------------------------

    def _receive(self, snapshot: Snapshot) -> None:
        """Called on the feed's threads: keeps only the newest snapshot and wakes the UI once for it."""
        with self._slot_lock:
            posted = self._slot is not None
            if self._slot is None or snapshot.sequence > self._slot.sequence:
                self._slot = snapshot
        if not posted:
            self.post_message(SnapshotReady())

    def on_snapshot_ready(self, _message: SnapshotReady) -> None:
        with self._slot_lock:
            snapshot, self._slot = self._slot, None
        shown = self.last_snapshot.sequence if self.last_snapshot is not None else 0
        if snapshot is None or snapshot.sequence <= shown:
            return
        self.last_snapshot = snapshot
        self._show_header(snapshot)
        self._show_rows(snapshot.rows)
        if snapshot.drops is not None:
            self._show_drops(snapshot.drops)
        if snapshot.detail is not None and self._detail is not None and snapshot.detail.key == self.feed.detail_key:
            self._detail.show(snapshot.detail)

    def _show_header(self, snapshot: Snapshot) -> None:
        totals = snapshot.totals
        line1 = Text.assemble(
            ("flowscope top", "bold"),
            f"  node {snapshot.node}  interval {fmt.seconds(totals.seconds)}  {fmt.clock(totals.time_end)} UTC",
            f"  intervals {totals.intervals}",
        )
        if snapshot.state:
            line1.append(f"  {snapshot.state}", "bold red" if "failed" in snapshot.state else "bold")
        if snapshot.paused:
            waiting = f" ({snapshot.waiting} intervals waiting)" if snapshot.waiting else ""
            line1.append(f"  PAUSED{waiting}", "bold reverse yellow")
        coverage_style = "bold red" if totals.coverage.lost else "green"
        line2 = Text.assemble(
            f"flows {totals.flows} ({fmt.rate(totals.flows_per_s)})  ",
            f"{fmt.bytes_rate(totals.bytes_per_s)}  {fmt.count(totals.packets_per_s)} pkts/s  ",
            (fmt.coverage_text(totals.coverage), coverage_style),
        )
        active = [p.name for p in snapshot.probes if p.active]
        missing = [p for p in snapshot.probes if p.missed]
        line3 = Text.assemble("probes ", (" ".join(active) or "none", "green"))
        if missing:
            line3.append("  unavailable ")
            line3.append(", ".join(f"{p.name} ({p.reason})" if p.reason else p.name for p in missing), "yellow")
        rows = snapshot.rows
        arrow = "▼" if rows.descending else "▲"
        line4 = Text.assemble(
            f"group {rows.grouping}  sort {_sort_title(rows.sort)} {arrow}  rates over {rows.rate_window:g}s  ",
            f"{len(rows.frame)} of {rows.groups} rows  ",
        )
        if snapshot.filter_text:
            line4.append(f"filter {snapshot.filter_text} ", "bold cyan")
            line4.append(f"({totals.filtered_flows} of {totals.flows} flows)")
        self.query_one("#header", Static).update(Text("\n").join([line1, line2, line3, line4]))

    def _show_rows(self, rows: TopRows) -> None:
        table = self.query_one("#rows", DataTable)
        records = rows.frame.to_dict("records")
        wanted = [record["label"] for record in records]
        with_trend = self._trend_fits(wanted)
        if with_trend != self._with_trend or self._shown_grouping != rows.grouping:
            self._shown_grouping = rows.grouping
            self._build_row_columns(with_trend)
        self._set_sort_marks(table, rows)
        self._keys = {record["label"]: record["key"] for record in records}
        selected = _cursor_key(table)
        for key in [k.value for k in table.rows if k.value not in self._keys]:
            table.remove_row(key)
        for record in records:
            cells = row_cells(record, self._with_trend)
            label = record["label"]
            if label in table.rows:
                for column, cell in zip(table.columns, cells, strict=True):
                    table.update_cell(label, column, cell)
            else:
                table.add_row(*cells, key=label)
        rank = {label: position for position, label in enumerate(wanted)}
        if [row.key.value for row in table.ordered_rows] != wanted:
            table.sort("label", key=lambda label: rank[str(label)])
        if selected in rank:
            table.move_cursor(row=rank[selected], scroll=False)

    def _set_sort_marks(self, table: DataTable, rows: TopRows) -> None:
        arrow = " ▼" if rows.descending else " ▲"
        for key, column in table.columns.items():
            name = key.value
            title = rows.grouping.upper() if name == "label" else "TREND" if name == "trend" else _sort_title(name)
            sorted_here = rows.sort == name or (rows.sort == "key" and name == "label")
            label = title + (arrow if sorted_here else "")
            column.label = Text(label, justify="left" if name in ("label", "trend") else "right")
        table.refresh()

    def _show_drops(self, drops: DropsTable) -> None:
        if self._drops_shown is not None and self._drops_shown.equals(drops.frame):
            return
        self._drops_shown = drops.frame
        table = self.query_one("#drops", DataTable)
        selected = _cursor_key(table)
        table.clear()
        for record in drops.frame.to_dict("records"):
            victims = Text(", ".join(f"{label} ({fmt.count(packets)})" for label, packets in record["victims"]))
            table.add_row(
                Text(record["reason"], style="bold red"),
                _count_cell(record["last"], "red"),
                _right(fmt.count(record["window"])),
                _right(fmt.byte_count(record["window_bytes"])),
                _right(f"{100 * record['share']:.1f}%"),
                victims,
                key=record["reason"],
            )
        if selected is not None and selected in table.rows:
            table.move_cursor(row=table.get_row_index(selected), scroll=False)

    # --- actions -------------------------------------------------------------------------------------

    MAIN_VIEW_ACTIONS = frozenset({"group", "sort", "reverse", "drops", "open_filter"})

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Keys that change the main table do nothing over the detail or help screens."""
        return not (action in self.MAIN_VIEW_ACTIONS and len(self.screen_stack) > 1)

    def _change(self, **changes: Any) -> None:
        """Applies a view change on the feed's worker thread, in the order the keys were pressed."""
        with contextlib.suppress(RuntimeError):  # raised only while shutting down
            self._changes.submit(self.feed.change, **changes)

    def action_pause(self) -> None:
        self._change(paused=not self.feed.paused)

    def action_group(self, step: int) -> None:
        grouping = GROUPINGS[(GROUPINGS.index(self._view["grouping"]) + step) % len(GROUPINGS)]
        self._view["grouping"] = grouping
        self._change(grouping=grouping)

    def action_sort(self, step: int) -> None:
        sort = SORT_KEYS[(SORT_KEYS.index(self._view["sort"]) + step) % len(SORT_KEYS)]
        self._view["sort"] = sort
        self._change(sort=sort)

    def action_window(self) -> None:
        windows = (
            RATE_WINDOWS if self._view["rate_window"] in RATE_WINDOWS else (self._view["rate_window"], *RATE_WINDOWS)
        )
        window = windows[(windows.index(self._view["rate_window"]) + 1) % len(windows)]
        self._view["rate_window"] = window
        self._change(rate_window=window)

    def action_reverse(self) -> None:
        descending = not self._view["descending"]
        self._view["descending"] = descending
        self._change(descending=descending)

    @on(DataTable.HeaderSelected, "#rows")
    def sort_by_heading(self, event: DataTable.HeaderSelected) -> None:
        name = event.column_key.value
        sort = "key" if name == "label" else name
        if sort not in SORT_KEYS:
            return
        if self._view["sort"] == sort:
            self.action_reverse()
            return
        self._view.update(sort=sort, descending=sort != "key")
        self._change(sort=sort, descending=sort != "key")

    def action_drops(self) -> None:
        switcher = self.query_one("#views", ContentSwitcher)
        show = switcher.current != "drops"
        switcher.current = "drops" if show else "rows"
        self.query_one(f"#{switcher.current}", DataTable).focus()
        self._change(show_drops=show)

    def action_open_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.value = self._view["filter_text"]
        field.add_class("open")
        field.focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    @on(Input.Submitted, "#filter")
    def apply_filter(self, event: Input.Submitted) -> None:
        try:
            parsed = parse_filter(event.value)
        except FilterError as err:
            self._say(str(err))
            return
        self._say("")
        self._view["filter_text"] = parsed.text
        self._close_filter()
        self._change(filter=parsed)

    def on_key(self, event: Any) -> None:
        field = self.query_one("#filter", Input)
        if event.key == "escape" and field.has_class("open"):
            self._say("")
            self._close_filter()
            event.stop()

    def _close_filter(self) -> None:
        self.query_one("#filter", Input).remove_class("open")
        self.query_one(f"#{self.query_one('#views', ContentSwitcher).current}", DataTable).focus()

    def _say(self, message: str) -> None:
        widget = self.query_one("#message", Static)
        widget.update(message)
        widget.set_class(bool(message), "shown")

    @on(DataTable.RowSelected, "#rows")
    def open_detail(self, event: DataTable.RowSelected) -> None:
        label = event.row_key.value
        if label not in self._keys:
            return
        key = self._keys[label]
        self._detail = DetailScreen(label)
        self.push_screen(self._detail, callback=self._detail_closed)
        self._change(detail_key=key)

    def _detail_closed(self, _result: None) -> None:
        self._detail = None
        self._change(detail_key=None)

    @on(DataTable.RowSelected, "#drops")
    def filter_by_reason(self, event: DataTable.RowSelected) -> None:
        reason = event.row_key.value
        current = self._view["filter_text"]
        parsed = parse_filter(f"{current} reason={reason}".strip())
        self._view["filter_text"] = parsed.text
        self.action_drops()
        self._change(filter=parsed)


def _sort_title(name: str) -> str:
    return "KEY" if name == "key" else next(m.title for m in METRICS if m.name == name)


def _cursor_key(table: DataTable) -> str | None:
    if table.row_count == 0:
        return None
    try:
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except Exception:  # the cursor is outside the rows
        return None


def run_app(source: BatchSource, model: TopModel, rows: int | None, enricher: Enricher | None = None) -> int:
    """Runs the TUI until the user quits (or SIGTERM/SIGHUP arrive); its pipeline closes the source."""
    return TopApp(source, model, rows, handle_signals=True, enricher=enricher).run() or 0

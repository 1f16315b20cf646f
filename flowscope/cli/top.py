"""`flowscope top`: its flags and how it runs (the TUI, or plain rows for scripts with -o table|jsonl).

Textual is imported only when the TUI starts, so `-o table` runs where textual is not installed.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

import pandas as pd

from flowscope.analysis.top import GROUPINGS, METRICS, TopModel
from flowscope.cli.capture import stop_on_signals
from flowscope.cli.options import (
    UsageError,
    add_config_file,
    add_settings,
    config_from,
    open_source,
    positive_float,
    positive_int,
)
from flowscope.enrich import enricher_for
from flowscope.filters import FilterError, parse_filter
from flowscope.pipeline.pipeline import Pipeline

# --sort accepts the column titles people see, in lower case, and a few short names.
SORT_NAMES = {m.title.lower(): m.name for m in METRICS} | {
    "key": "key",
    "bytes": "bytes_per_s",
    "packets": "packets_per_s",
    "rtt": "rtt_us",
    "retransmits": "retransmits",
    "resets": "resets",
    "connections": "connections",
    "closes": "closes",
}

EPILOG = """\
examples:
  flowscope top                            live, every interface, grouped by flow
  flowscope top --group pod --filter 'namespace=shop not port=53'
  flowscope top --replay capture.jsonl --speed 4
  flowscope top -o table 1 5               five plain tables, one per second (like tcptop 1 5)

filter language (also `/` in the TUI): terms field=value are ANDed, commas OR values (port=80,443),
not or ! negates a term, from-/to- pin a side (from-pod=shop/checkout). Fields: pod (ns/name prefix or
name), namespace, workload, label (key=value, key!=value, key), ip (address or CIDR), port (or range
8000-8080), node, observer (the node that saw it; * wildcards), protocol, direction, verdict
(forwarded|dropped), reason (kernel drop reason, e.g. NO_SOCKET), ifname, type.
"""


def _sort(text: str) -> str:
    name = SORT_NAMES.get(text.lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"sort {text!r} is not a column; columns are {', '.join(sorted(SORT_NAMES))}")
    return name


def register(commands: Any) -> None:
    top = commands.add_parser("top", help="live top talkers, drops and TCP health (Textual UI; -o table for scripts)")
    add_config_file(top)
    add_settings(top, "probes")
    add_settings(top, "identity")
    add_settings(top, "replay", skip=("replay.exit_at_end",))
    add_settings(top, "client", title="a remote agent or relay (--server): TLS", skip=("client.server",))
    add_top_arguments(top)
    top.set_defaults(run=run_top)


def add_top_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `top` beyond the settings it shares with capture and agent."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "-o", "--output", choices=("tui", "table", "jsonl"), default="tui",
        help="tui (default), or plain top rows per interval for scripts: table (fixed columns) or jsonl",
    )  # fmt: skip
    parser.add_argument("--group", choices=GROUPINGS, default="flow", help="what a row is (g cycles it in the TUI)")
    parser.add_argument(
        "--sort", type=_sort, default="bytes", metavar="COLUMN", help="bytes, packets, drops, rtt, ... or key"
    )
    parser.add_argument("--filter", default="", metavar="TEXT", help="only flows and events matching TEXT")
    parser.add_argument(
        "--rows", type=positive_int, metavar="N", help="rows to show (default: what fits the screen; 20 with -o table)"
    )
    parser.add_argument(
        "--history", type=positive_int, default=60, metavar="N", help="intervals kept for trends, drops and details"
    )
    parser.add_argument(
        "--window", type=positive_float, default=2.0, metavar="S",
        help="seconds the rows' rates average over (default 2; w cycles 2, 10, 40 in the TUI): an idle row fades out",
    )  # fmt: skip
    parser.add_argument(
        "interval_seconds", nargs="?", type=positive_float, metavar="interval",
        help="seconds per interval (overrides --interval; a replay keeps its recorded intervals)",
    )  # fmt: skip
    parser.add_argument("count", nargs="?", type=positive_int, help="print COUNT intervals, then exit (-o table|jsonl)")
    parser.add_argument(
        "--server", metavar="ADDR", help="show a remote agent or relay (unix:///PATH or HOST:PORT) instead of probes"
    )


def run_top(args: argparse.Namespace) -> int:
    try:
        view_filter = parse_filter(args.filter)
    except FilterError as err:
        raise UsageError(f"{err}; see `flowscope top --help` for the filter language.") from None
    if args.output == "tui" and args.count is not None:
        raise UsageError("a count needs -o table or -o jsonl (the TUI runs until you press q).")
    if args.output == "tui" and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("the TUI needs a terminal; use -o table or -o jsonl for plain output.")
    config = config_from(args)
    if args.server:
        return _top_remote(args, config, view_filter)
    if args.interval_seconds is not None:
        config = config.model_copy(
            update={"probes": config.probes.model_copy(update={"interval": args.interval_seconds})}
        )
    model = TopModel(history=args.history, fallback_seconds=config.probes.interval, rate_window=args.window)
    model.set_view(grouping=args.group, filter=view_filter, sort=args.sort)
    enricher = enricher_for(config)
    try:
        source = open_source(config, default_speed=1.0)
    except BaseException:
        if enricher is not None:
            enricher.close()
        raise
    if args.output == "tui":
        from flowscope.ui.app import run_app

        return run_app(source, model, args.rows, enricher=enricher)  # its pipeline closes source and enricher
    from flowscope.exporters.stream import whole_writes
    from flowscope.exporters.table import TopRowsSink

    sink = TopRowsSink(model, source, whole_writes(sys.stdout), rows=args.rows or 20, output=args.output)
    pipeline = Pipeline(source, [sink], enricher=enricher)
    stop = threading.Event()
    stop_on_signals(stop)
    try:
        pipeline.start()
        pipeline.run(stop, count=args.count)
    finally:
        pipeline.close(timeout=config.stop_timeout)
    return 0


def _top_remote(args: argparse.Namespace, config: Any, view_filter: Any) -> int:
    """top over a remote agent or relay: its followed records are the source, from the recent ones the server holds
    (as many intervals back as top keeps) on."""
    from flowscope.proto.client import Client, ClientError, RemoteSource

    since = pd.Timestamp.now(tz="UTC") - pd.Timedelta(seconds=args.history * config.probes.interval)
    try:
        source = RemoteSource(Client(config.client.model_copy(update={"server": args.server})), since=since)
    except ClientError as err:
        raise UsageError(str(err)) from None
    model = TopModel(history=args.history, fallback_seconds=config.probes.interval, rate_window=args.window)
    model.set_view(grouping=args.group, filter=view_filter, sort=args.sort)
    if args.output == "tui":
        from flowscope.ui.app import run_app

        return run_app(source, model, args.rows)
    from flowscope.exporters.stream import whole_writes
    from flowscope.exporters.table import TopRowsSink

    sink = TopRowsSink(model, source, whole_writes(sys.stdout), rows=args.rows or 20, output=args.output)
    pipeline = Pipeline(source, [sink])
    stop = threading.Event()
    stop_on_signals(stop)
    try:
        pipeline.start()
        pipeline.run(stop, count=args.count)
    finally:
        pipeline.close(timeout=config.stop_timeout)
    return 0

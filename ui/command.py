"""`flowscope top`: its flags and how it runs (the TUI, or plain rows for scripts with -o table|jsonl).

Textual is imported only when the TUI starts, so `-o table` runs where textual is not installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from flowscope.filters import FilterError, parse_filter
from flowscope.pipeline.source import BatchSource, ProbeStatus
from flowscope.schema import FlowBatch
from flowscope.ui.model import GROUPINGS, METRICS, TopModel
from flowscope.ui.text import print_top

if TYPE_CHECKING:
    from flowscope.enrich import Enricher

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
name), namespace, workload, ip (address or CIDR), port (or range 8000-8080), node, protocol, direction,
verdict (forwarded|dropped), reason (kernel drop reason, e.g. NO_SOCKET), ifname, type.
"""


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"interval {text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"interval {text!r} must be positive")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"count {text!r} must be a positive whole number")
    return int(text)


def _sort(text: str) -> str:
    name = SORT_NAMES.get(text.lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"sort {text!r} is not a column; columns are {', '.join(sorted(SORT_NAMES))}")
    return name


def add_top_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `top` beyond the probe flags that the CLI adds for every live command."""
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
        "--rows", type=_count, metavar="N", help="rows to show (default: what fits the screen; 20 with -o table)"
    )
    parser.add_argument(
        "--history", type=_count, default=60, metavar="N", help="intervals kept for trends, drops and details"
    )
    parser.add_argument(
        "interval_seconds", nargs="?", type=_interval, metavar="interval",
        help="seconds per interval (overrides --interval; a replay keeps its recorded intervals)",
    )  # fmt: skip
    parser.add_argument("count", nargs="?", type=_count, help="print COUNT intervals, then exit (-o table|jsonl)")


def run_top(args: argparse.Namespace) -> int:
    from flowscope.cli import UsageError, open_source
    from flowscope.enrich import enricher_for

    try:
        view_filter = parse_filter(args.filter)
    except FilterError as err:
        raise UsageError(f"{err}; see `flowscope top --help` for the filter language.") from None
    if args.output == "tui" and args.count is not None:
        raise UsageError("a count needs -o table or -o jsonl (the TUI runs until you press q).")
    if args.output == "tui" and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("the TUI needs a terminal; use -o table or -o jsonl for plain output.")
    if args.interval_seconds is not None:
        args.interval = args.interval_seconds
    model = TopModel(history=args.history, fallback_seconds=args.interval)
    model.set_view(grouping=args.group, filter=view_filter, sort=args.sort)
    enricher = enricher_for(args)
    try:
        source: BatchSource = open_source(args, default_speed=1.0)
        if enricher is not None:
            source = EnrichedSource(source, enricher)
        try:
            if args.output == "tui":
                from flowscope.ui.app import run_app

                return run_app(source, model, args.rows)
            rows = args.rows or 20
            print_top(source, model, source.node, sys.stdout, rows=rows, count=args.count, output=args.output)
            return 0
        finally:
            source.close()
    finally:
        if enricher is not None:
            enricher.close()


class EnrichedSource:
    """A BatchSource whose batches get identity (pod, workload, process, ...) before anyone sees them."""

    def __init__(self, source: BatchSource, enricher: Enricher) -> None:
        self.source = source
        self.enricher = enricher
        self.node = source.node
        self.interval = source.interval

    def probes(self) -> list[ProbeStatus]:
        return self.source.probes()

    def __iter__(self) -> Iterator[FlowBatch]:
        for batch in self.source:
            yield self.enricher.enrich(batch)

    def close(self) -> None:
        self.source.close()

"""`flowscope capture`: the record stream of every interval — flows and events — as JSON lines or a table,
to stdout or a file, then a summary of the run's coverage and probes."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from flowscope.cli.doctor import probes_summary
from flowscope.cli.options import UsageError, add_config_file, add_settings, config_from, open_source, positive_float
from flowscope.enrich import enricher_for
from flowscope.formats.jsonl import format_time, write_summary
from flowscope.pipeline.pipeline import Pipeline


def register(commands: Any) -> None:
    capture = commands.add_parser("capture", help="run the probes and print flows and events per interval")
    add_config_file(capture)
    add_settings(capture, "probes")
    add_settings(capture, "identity")
    add_settings(capture, "replay", skip=("replay.exit_at_end",))
    capture.add_argument("--duration", type=positive_float, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    capture.add_argument("-o", "--output", choices=("jsonl", "table"), default="table")
    capture.add_argument(
        "--file", metavar="PATH", help="write to PATH instead of stdout (a name ending in .parquet: a Parquet file)"
    )
    capture.set_defaults(run=run_capture)


def stop_on_signals(stop: threading.Event) -> None:
    """The first SIGINT or SIGTERM sets `stop`; a second one interrupts at once (KeyboardInterrupt)."""

    def handler(signum: int, _frame: Any) -> None:
        stop.set()
        signal.signal(signum, signal.default_int_handler)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def run_capture(args: argparse.Namespace) -> int:
    from flowscope.exporters.jsonl import JsonlSink
    from flowscope.exporters.stream import TextOutput
    from flowscope.exporters.table import FlowTableSink

    config = config_from(args)
    to_parquet = bool(args.file) and args.file.endswith(".parquet")
    try:
        output = TextOutput(None if to_parquet else args.file, sys.stdout if not to_parquet else sys.stderr)
    except OSError as err:
        raise UsageError(f"cannot write {args.file} ({err.strerror}); choose another --file.") from None
    if to_parquet:
        from flowscope.exporters.flowlog import ParquetFileSink

        sink: Any = ParquetFileSink(args.file)
    else:
        sink = JsonlSink(output.stream) if args.output == "jsonl" else FlowTableSink(output.stream)
    enricher = enricher_for(config)
    try:
        source = open_source(config)
    except BaseException:
        if enricher is not None:
            enricher.close()
        raise
    pipeline = Pipeline(source, [sink], enricher=enricher)
    stop = threading.Event()
    stop_on_signals(stop)
    interrupted = False
    try:
        pipeline.start()
        pipeline.run(stop, duration=args.duration)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        interrupted = interrupted or stop.is_set()
        probes = source.probes()
        transport = getattr(source, "events_transport", None)
        identity = enricher.health() if enricher is not None else None  # a replay's identity is the recording's
        total = pipeline.close(timeout=config.stop_timeout)
    summary = {
        "time_start": format_time(pipeline.time_start),
        "time_end": format_time(pipeline.time_end),
        "intervals": pipeline.intervals,
        "interrupted": interrupted,
        "node": source.node,
        "events_transport": transport,
        "coverage": total.to_dict(),
        "unbalanced_sources": total.unbalanced(),
        "probes": probes_summary(probes),
        "identity": identity,
    }
    if args.output == "jsonl" and not to_parquet:
        write_summary(output.stream, summary)
    else:
        from flowscope.enrich.report import identity_summary

        counts = f"lost {total.lost} of {total.produced} produced"
        named = identity_summary(identity) if identity is not None else "identity: as recorded"
        output.stream.write(f"=== {pipeline.intervals} intervals; {counts}; {named}\n")
    output.close()
    return 0

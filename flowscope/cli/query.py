"""`flowscope query`: the common questions answered from recorded flows — the agent's flow log (default), a
capture file, the ClickHouse store or a running agent — on the command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pandas as pd

from flowscope.cli.options import (
    DEST_PREFIX,
    UsageError,
    add_config_file,
    add_settings,
    add_time_range,
    config_from,
    positive_int,
)
from flowscope.filters import FilterError, parse_filter

EPILOG = """\
questions:
  talkers            who sends and receives the most bytes (--by flow|pod|workload|namespace|process|node)
  drops              dropped packets and bytes by the kernel's drop reason (and --by, if given)
  peers POD          whom POD (namespace/name) talks to, sent and received
  timeseries         counters per time bucket (--every 10s)
  flows              the flow records themselves

examples:
  flowscope query talkers --since 1h
  flowscope query drops --by workload --filter 'namespace=shop' -o csv
  flowscope query peers shop/checkout-7d9f --file capture.parquet
  flowscope query talkers --clickhouse clickhouse://reader@db:9000/flowscope --clickhouse-password-file pw
  flowscope query flows --server unix:///run/flowscope/flowscope.sock --since 5m -o json
"""
QUESTIONS = ("talkers", "drops", "peers", "timeseries", "flows")


def register(commands: Any) -> None:
    query = commands.add_parser(
        "query", help="answer common questions from the flow log, a capture, ClickHouse or an agent",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    query.add_argument("question", choices=QUESTIONS, metavar="QUESTION", help=", ".join(QUESTIONS))
    query.add_argument("pod", nargs="?", metavar="POD", help="the pod of `peers` (namespace/name)")
    add_config_file(query)
    where = query.add_argument_group("where the flows are (default: the agent's flow log)")
    where.add_argument("--file", metavar="PATH", help="a capture file (JSON lines or Parquet)")
    add_settings(query, "flowlog", title="flow log", skip=_all_but("flowlog", "flowlog.directory"))
    add_settings(
        query,
        "clickhouse",
        title="ClickHouse",
        skip=_all_but("clickhouse", "clickhouse.url", "clickhouse.password_file"),
    )
    add_settings(query, "client", title="a running agent or relay (--server)")
    which = query.add_argument_group("which flows and how")
    add_time_range(which)
    which.add_argument(
        "--filter", default="", metavar="TERMS", help="filter language terms (see `flowscope top --help`)"
    )
    which.add_argument("--by", metavar="GROUPING", help="talkers: flow|pod|workload (default)|namespace|process|node")
    which.add_argument("-n", "--top", type=positive_int, default=10, metavar="N", help="talkers: rows (default 10)")
    which.add_argument("--every", default="10s", metavar="DURATION", help="timeseries: bucket width (default 10s)")
    query.add_argument("-o", "--output", choices=("table", "json", "csv"), default="table")
    query.set_defaults(run=run_query)


def _all_but(section: str, *kept: str) -> tuple[str, ...]:
    from flowscope.cli.options import section_settings

    return tuple(s.key for s in section_settings(section) if s.key not in kept)


def run_query(args: argparse.Namespace) -> int:
    from flowscope.analysis import summaries
    from flowscope.cli.observe import parse_time

    since = parse_time(args.since, "--since") if args.since else None
    until = parse_time(args.until, "--until") if args.until else None
    try:
        parse_filter(args.filter)
    except FilterError as err:
        raise UsageError(f"{err}; see `flowscope top --help` for the filter language.") from None
    if (args.question == "peers") != (args.pod is not None):
        raise UsageError("give a POD (namespace/name) with `peers`, and only with it.")
    by = args.by or ("pod" if args.question == "peers" else "workload")
    if by not in summaries.GROUP_NAMES:
        raise UsageError(f"--by {by!r} is not one of {', '.join(summaries.GROUP_NAMES)}.")
    try:
        every = pd.Timedelta(args.every)
    except ValueError:
        raise UsageError(f"--every {args.every!r} is not a duration like 10s or 5min.") from None
    flows = _read(args, since, until)
    if args.question == "talkers":
        answer = summaries.top_talkers(flows, by=by, n=args.top)
    elif args.question == "drops":
        answer = summaries.drops_by_reason(flows, by=args.by)
    elif args.question == "peers":
        answer = summaries.peers(flows, args.pod, by=by)
    elif args.question == "timeseries":
        answer = summaries.timeseries(flows, freq=every).reset_index()
    else:
        answer = flows
    _print(answer, args.output)
    return 0


def _read(args: argparse.Namespace, since: pd.Timestamp | None, until: pd.Timestamp | None) -> pd.DataFrame:
    config = config_from(args)
    chosen = [name for name, given in (
        ("--file", args.file), ("--clickhouse", config.clickhouse.url),
        ("--server", hasattr(args, f"{DEST_PREFIX}client.server")),
    ) if given]  # fmt: skip
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} name two places to read; give one.")
    if config.clickhouse.url:
        from flowscope.analysis.clickhouse import ClickHouseReadError, read_clickhouse

        try:
            return read_clickhouse(
                config.clickhouse.url, since, until, args.filter, password=config.clickhouse.password,
                password_file=config.clickhouse.password_file,
            )  # fmt: skip
        except ClickHouseReadError as err:
            raise UsageError(str(err)) from None
    if chosen == ["--server"]:
        from flowscope.analysis.remote import read_grpc
        from flowscope.proto.client import ClientError

        client = config.client.model_dump()
        try:
            return read_grpc(client.pop("server"), since, until, args.filter, **client)
        except ClientError as err:
            raise UsageError(str(err)) from None
    from flowscope.analysis.flowlog import read_capture, read_flowlog

    if args.file:
        return read_capture(args.file, since, until, args.filter)
    return read_flowlog(config.flowlog.directory, since, until, args.filter)


def _print(answer: pd.DataFrame, output: str) -> None:
    if output == "json":
        if answer.empty:  # no line at all (pandas writes an empty one)
            return
        text = answer.to_json(orient="records", lines=True, date_format="iso", date_unit="ns")
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    elif output == "csv":
        answer.to_csv(sys.stdout, index=False)
    elif answer.empty:
        sys.stdout.write("(no flows)\n")
    else:
        sys.stdout.write(answer.to_string(index=False, na_rep="-") + "\n")

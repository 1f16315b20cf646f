"""`flowscope observe`: the records of an agent or a relay, with hubble-observe habits (`--last`, `--follow`,
`--since`, `--pod`, `--not`, ...) and the filter language of `top`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import IO, Any

import pandas as pd

from flowscope.cli.options import (
    UsageError,
    add_config_file,
    add_settings,
    add_time_range,
    config_from,
    positive_int,
)
from flowscope.display import MISSING, missing, named_endpoint
from flowscope.filters import FilterError, parse_filter
from flowscope.formats.jsonl import format_time, record_lines
from flowscope.schema import FlowBatch

EPILOG = """\
examples:
  flowscope observe                                   the last 20 records of the local agent
  flowscope observe -f --namespace shop --verdict dropped
  flowscope observe --since 5m --from-pod shop/checkout --not --port 53 -o jsonl
  flowscope observe --server 10.0.0.5:4244 --tls --tls-ca ca.pem 'label=app=web reason=NO_SOCKET'
  flowscope status

Repeating a filter flag ORs its values, different flags are ANDed, --not negates the next one; a trailing
FILTER is the filter language of `flowscope top --help` (ANDed with the flags).
"""

# flag -> (filter field, side)
FILTER_FLAGS = {
    "--pod": ("pod", None), "--from-pod": ("pod", "from-"), "--to-pod": ("pod", "to-"),
    "--namespace": ("namespace", None), "--from-namespace": ("namespace", "from-"),
    "--to-namespace": ("namespace", "to-"),
    "--workload": ("workload", None), "--from-workload": ("workload", "from-"), "--to-workload": ("workload", "to-"),
    "--label": ("label", None), "--from-label": ("label", "from-"), "--to-label": ("label", "to-"),
    "--ip": ("ip", None), "--from-ip": ("ip", "from-"), "--to-ip": ("ip", "to-"),
    "--port": ("port", None), "--from-port": ("port", "from-"), "--to-port": ("port", "to-"),
    "--node-name": ("observer", None), "--protocol": ("protocol", None), "--verdict": ("verdict", None),
    "--drop-reason": ("reason", None), "--type": ("type", None), "--interface": ("ifname", None),
    "--traffic-direction": ("direction", None),
}  # fmt: skip
SHORT = {"--namespace": "-n", "--label": "-l", "--type": "-t"}
# Go's durations, as hubble's --since takes them (ns, us/µs, ms, s, m, h), and days
_DURATION = r"(\d+(\.\d+)?)(ns|us|µs|ms|s|m|h|d)"
_RELATIVE = re.compile(rf"^({_DURATION})+$")
_UNITS = {"ns": "ns", "us": "us", "µs": "us", "ms": "ms", "s": "s", "m": "min", "h": "h", "d": "D"}


class _FilterFlag(argparse.Action):
    def __call__(self, parser: Any, namespace: argparse.Namespace, value: Any, option: str | None = None) -> None:
        field, side = FILTER_FLAGS[self.dest.replace("filter:", "")]
        negated = getattr(namespace, "negate_next", False)
        namespace.negate_next = False
        namespace.terms = [*getattr(namespace, "terms", []), (negated, f"{side or ''}{field}", value)]


class _Not(argparse.Action):
    def __call__(self, parser: Any, namespace: argparse.Namespace, value: Any, option: str | None = None) -> None:
        namespace.negate_next = True


def register(commands: Any) -> None:
    observe = commands.add_parser(
        "observe", help="records of an agent or relay (hubble observe's habits, top's filter language)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )  # fmt: skip
    add_config_file(observe)
    add_settings(observe, "client", title="server")
    which = observe.add_argument_group("which records")
    which.add_argument("-f", "--follow", action="store_true", help="keep sending new records")
    which.add_argument("--last", type=positive_int, metavar="N", help="the last N (default 20 without --follow)")
    which.add_argument("--first", type=positive_int, metavar="N", help="the first N the server holds")
    which.add_argument("--all", action="store_true", help="every record the server holds")
    add_time_range(which)
    filters = observe.add_argument_group("filters")
    for flag, (field, side) in FILTER_FLAGS.items():
        names = [SHORT[flag], flag] if flag in SHORT else [flag]
        filters.add_argument(
            *names, dest=f"filter:{flag}", action=_FilterFlag, metavar="VALUE", default=argparse.SUPPRESS,
            help=f"{side or ''}{field}=VALUE",
        )  # fmt: skip
    filters.add_argument("--not", nargs=0, action=_Not, help="negate the next filter flag")
    filters.add_argument(
        "filter", nargs="*", metavar="FILTER", help="filter language terms (see `flowscope top --help`)"
    )
    observe.add_argument("-o", "--output", choices=("compact", "table", "json", "jsonl"), default="compact")
    observe.set_defaults(run=run_observe)


def parse_time(text: str, flag: str) -> pd.Timestamp:
    """5m, 1h30m (ago) or an absolute time (RFC 3339; without a zone, UTC)."""
    if _RELATIVE.match(text):
        ago = sum((pd.Timedelta(float(n), unit=_UNITS[u]) for n, _, u in re.findall(_DURATION, text)), pd.Timedelta(0))
        return pd.Timestamp.now(tz="UTC") - ago
    try:
        stamp = pd.Timestamp(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a time: give 5m, 1h30m or 2025-03-01T12:00:00Z.") from None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp


def filter_text(args: argparse.Namespace) -> str:
    """The flags' terms (a flag repeated ORs its values) and the FILTER words, as one filter."""
    if getattr(args, "negate_next", False):  # a --not last, or before FILTER words: it would negate nothing
        raise UsageError("--not negates the filter flag after it; give one (or write `not TERM` in the FILTER).")
    grouped: dict[tuple[bool, str], list[str]] = {}
    for negated, name, value in getattr(args, "terms", []):
        grouped.setdefault((negated, name), []).append(value)
    terms = [f"{'not ' if negated else ''}{name}={','.join(values)}" for (negated, name), values in grouped.items()]
    text = " ".join([*terms, *args.filter])
    try:
        parse_filter(text)
    except FilterError as err:
        raise UsageError(f"{err}; see `flowscope top --help` for the filter language.") from None
    return text


def _request(args: argparse.Namespace) -> Any:
    from flowscope.proto.client import request

    if sum(x is not None and x is not False for x in (args.last, args.first, args.all or None)) > 1:
        raise UsageError("choose one of --last, --first and --all.")
    if args.first and args.follow:
        raise UsageError("--first cannot be followed; use --last with --follow.")
    since = parse_time(args.since, "--since") if args.since else None
    until = parse_time(args.until, "--until") if args.until else None
    number = args.last or args.first or 0
    if not (args.all or number or args.follow or since or until):
        number = 20
    text = filter_text(args)
    return request(number, bool(args.first), args.follow, [text] if text else [], (), since, until)


def run_observe(args: argparse.Namespace) -> int:
    from flowscope.proto.client import Client, ClientError

    config = config_from(args)
    message = _request(args)
    printer = Printer(args.output, sys.stdout, sys.stderr)
    try:
        client = Client(config.client)
        try:
            printer.stream(client.flows(message))
        finally:
            client.close()
    except ClientError as err:
        raise UsageError(str(err)) from None
    return 0


class Printer:
    """Prints a GetFlows stream: records grouped between the server's marks, notices on stderr."""

    FLUSH = 10_000

    def __init__(self, output: str, out: IO[str], err: IO[str]) -> None:
        self.output = output
        self.out = out
        self.err = err
        self.header = output == "table"

    def stream(self, responses: Any) -> None:
        from google.protobuf.json_format import MessageToDict

        pending: list[Any] = []
        for response in responses:
            kind = response.WhichOneof("response")
            if self.output == "json":
                if kind != "progress":
                    print(json.dumps(MessageToDict(response, preserving_proto_field_name=True)), file=self.out)
                    self.out.flush()
                continue
            if kind in ("flow", "event"):
                pending.append(response)
                if len(pending) >= self.FLUSH:
                    self._records(pending)
                    pending = []
                continue
            self._records(pending)
            pending = []
            if kind == "lost":
                self._lost(response)
            elif kind == "node_status":
                status = response.node_status
                state = {1: "connected", 2: "unavailable"}.get(status.state, "unknown")
                print(f"nodes {state}: {', '.join(status.nodes)} {status.message}".rstrip(), file=self.err)
        self._records(pending)

    def _lost(self, response: Any) -> None:
        from flowscope.proto.codec import nanoseconds

        lost = response.lost
        start, end = (
            format_time(pd.Timestamp(nanoseconds(t), unit="ns", tz="UTC")) for t in (lost.time_start, lost.time_end)
        )
        if self.output == "jsonl":
            line = {"type": "lost", "node": response.node or None, "source": lost.source, "count": lost.count,
                    "time_start": start, "time_end": end}  # fmt: skip
            print(json.dumps(line, separators=(",", ":")), file=self.out)
            self.out.flush()
        else:
            print(f"LOST {lost.count} records at {lost.source} between {start} and {end}", file=self.err)

    def _records(self, responses: list[Any]) -> None:
        if not responses:
            return
        from flowscope.proto import codec

        flows = codec.flows_from(r.flow for r in responses if r.WhichOneof("response") == "flow")
        events = codec.events_from(r.event for r in responses if r.WhichOneof("response") == "event")
        if self.output == "jsonl":
            batch = FlowBatch(pd.NaT, pd.NaT, flows, events)
            self.out.write("".join(line + "\n" for line in record_lines(batch)))
        else:
            lines = [(row["time_end"], flow_line(row)) for row in flows.to_dict("records")]
            lines += [(row["time"], event_line(row)) for row in events.to_dict("records")]
            lines.sort(key=lambda item: item[0])
            if self.header:
                print(
                    f"{'TIME':<24} {'NODE':<12} {'SOURCE':<32} {'DESTINATION':<32} {'TYPE':<10} {'VERDICT':<9} SUMMARY",
                    file=self.out,
                )
                self.header = False
            for when, (node, src, dst, kind, verdict, summary) in lines:
                stamp = _clock(when)
                if self.output == "table":
                    print(
                        f"{stamp:<24} {node:<12} {src:<32} {dst:<32} {kind:<10} {verdict:<9} {summary}", file=self.out
                    )
                else:
                    print(f"{stamp} [{node}]: {src} -> {dst} {kind} {verdict} ({summary})", file=self.out)
        self.out.flush()


def _clock(when: Any) -> str:
    return MISSING if missing(when) else pd.Timestamp(when).strftime("%b %d %H:%M:%S.%f")[:-3]


def _side(row: dict[str, Any], side: str) -> str:
    return named_endpoint(row.get(f"{side}_ip"), row.get(f"{side}_port"), row.get(f"{side}_namespace"),
                          row.get(f"{side}_pod"))  # fmt: skip


def _text(value: Any) -> str:
    return MISSING if missing(value) else str(value)


def flow_line(row: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    drops = 0 if missing(row.get("drop_packets")) else int(row["drop_packets"])
    packets = 0 if missing(row.get("packets")) else int(row["packets"])
    verdict = "DROPPED" if drops and drops >= packets else "MIXED" if drops else "FORWARDED"
    parts = [f"{_text(row.get('protocol'))} {_text(row.get('direction'))} {_text(row.get('ifname'))}",
             f"{packets} packets {_text(row.get('bytes'))} bytes"]  # fmt: skip
    if drops:
        parts.append(f"{drops} dropped {_text(row.get('drop_reason'))}")
    for counter in ("retransmits", "resets"):
        if not missing(row.get(counter)) and row[counter]:
            parts.append(f"{counter} {int(row[counter])}")
    if not missing(row.get("rtt_us")):
        parts.append(f"rtt {int(row['rtt_us'])}us")
    return _text(row.get("node")), _side(row, "src"), _side(row, "dst"), "flow", verdict, "; ".join(parts)


def event_line(row: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    kind = _text(row.get("kind"))
    parts = [_text(row.get("protocol"))]
    for name in ("drop_reason", "location", "state", "reset_reason"):
        if not missing(row.get(name)):
            parts.append(f"{name} {row[name]}")
    if not missing(row.get("comm")):
        parts.append(f"{row['comm']} ({_text(row.get('pid'))})")
    verdict = "DROPPED" if kind == "drop" else "FORWARDED"
    return _text(row.get("node")), _side(row, "src"), _side(row, "dst"), kind, verdict, "; ".join(parts)

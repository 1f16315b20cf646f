"""flowscope's command line: doctor, capture (and the commands other modules register)."""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any, NoReturn

import pandas as pd

from flowscope.coverage import Coverage
from flowscope.enrich import IdentityConfigError, add_identity_arguments, enricher_for, node_name
from flowscope.records import ReplayError, format_time, write_batch, write_summary
from flowscope.schema import FlowBatch
from flowscope.source import BatchSource, ProbeStatus, ReplaySource

log = logging.getLogger("flowscope")


class UsageError(Exception):
    """A problem with what the user asked for; its message is one sentence saying what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags in one sentence and exits 2, without the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; see `{self.prog} --help`.\n")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


MAX_FLOW_MAP_SIZE = 1 << 22  # two maps of this many entries take ~1 GiB of kernel memory


def flow_map_size(text: str) -> int:
    value = positive_int(text)
    if value > MAX_FLOW_MAP_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is more than {MAX_FLOW_MAP_SIZE}")
    return value


def power_of_two(text: str) -> int:
    value = positive_int(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"{text!r} must be a power of two")
    return value


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose what the live probes watch and how (shared by capture, top and agent)."""
    group = parser.add_argument_group("probes")
    group.add_argument(
        "-i", "--interface", action="append", dest="interfaces", metavar="IFACE",
        help="interface to watch with tc (repeatable; lo allowed); default: every interface that is up except lo",
    )  # fmt: skip
    group.add_argument("--interval", type=positive_float, default=1.0, metavar="S", help="seconds per interval")
    group.add_argument(
        "--perf-buffer", action="store_true", help="send events through perf buffers even where a ring buffer exists"
    )
    group.add_argument("--flow-map-size", type=flow_map_size, default=65536, metavar="N", help="flow map entries")
    group.add_argument(
        "--ring-pages", type=power_of_two, default=4096, metavar="N",
        help="event ring buffer pages (4096: 16 MiB of kernel memory, taken when the probes load, for 131,072 "
        "events; fewer pages lose events sooner when they come in bursts)",
    )  # fmt: skip
    group.add_argument(
        "--perf-pages", type=power_of_two, default=64, metavar="N", help="perf buffer pages per CPU (perf-buffer path)"
    )
    group.add_argument(
        "--drop-events-rate", type=positive_int, default=1000, metavar="N",
        help="drop events sent per second per CPU (all drops are still counted)",
    )  # fmt: skip
    group.add_argument(
        "--drop-map-size", type=flow_map_size, default=16384, metavar="N",
        help="entries of the drop counts (per flow and reason)",
    )  # fmt: skip
    group.add_argument(
        "--tcp-map-size", type=flow_map_size, default=16384, metavar="N",
        help="entries of the TCP counters (retransmits, resets, RTT per flow)",
    )  # fmt: skip
    group.add_argument(
        "--tcp-events-rate", type=positive_int, default=1000, metavar="N",
        help="retransmit and reset events sent per second per CPU (all are still counted)",
    )  # fmt: skip
    group.add_argument(
        "--prefer-kprobes", action="store_true",
        help="run each probe family's kprobe variant where the kernel has kprobes, instead of its tracepoints",
    )  # fmt: skip
    group.add_argument("--replay", metavar="FILE", help="read capture JSON lines instead of running probes")
    group.add_argument(
        "--speed", type=positive_float, default=None, metavar="X", help="replay pace (2 = twice as fast)"
    )


def open_source(args: argparse.Namespace, default_speed: float = 0.0) -> BatchSource:
    """The BatchSource the flags ask for: a replay file or the live probes."""
    if args.replay:
        speed = args.speed if args.speed is not None else default_speed
        return ReplaySource(args.replay, speed=speed, node=node_name(args))
    from flowscope.live import LiveSource
    from flowscope.loader import LoadOptions

    options = LoadOptions(
        interfaces=args.interfaces,
        flow_map_size=args.flow_map_size,
        perf_events=args.perf_buffer,
        ring_pages=args.ring_pages,
        perf_pages=args.perf_pages,
        drop_events_per_second=args.drop_events_rate,
        drop_map_size=args.drop_map_size,
        tcp_map_size=args.tcp_map_size,
        tcp_events_per_second=args.tcp_events_rate,
        prefer_kprobes=args.prefer_kprobes,
    )
    return LiveSource(options, interval=args.interval, node=node_name(args))


def _terminate_on_sigterm() -> None:
    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


# ---- capture -------------------------------------------------------------------------------------------


def _table(batch: FlowBatch, out: IO[str]) -> None:
    out.write(f"--- {format_time(batch.time_start)} .. {format_time(batch.time_end)}\n")
    flows = batch.flows.sort_values("bytes", ascending=False, na_position="last")
    header = f"{'IFACE':<12} {'DIR':<7} {'PROTO':<6} {'SOURCE':<40} {'DESTINATION':<40} {'PKTS':>8} {'BYTES':>10}"
    out.write(header + f" {'DROPS':>6} {'REASON':<18} {'RETX':>5} {'RST':>4} {'RTT_US':>7}\n")
    for row in flows.itertuples(index=False):
        src = _endpoint(row.src_ip, row.src_port)
        dst = _endpoint(row.dst_ip, row.dst_port)
        out.write(
            f"{_text(row.ifname):<12} {_text(row.direction):<7} {_text(row.protocol):<6} {src:<40} {dst:<40} "
            f"{_text(row.packets):>8} {_text(row.bytes):>10} {_text(row.drop_packets):>6} "
            f"{_text(row.drop_reason):<18} {_text(row.retransmits):>5} {_text(row.resets):>4} {_text(row.rtt_us):>7}\n"
        )
    for row in batch.events.itertuples(index=False):
        src = _endpoint(row.src_ip, row.src_port)
        dst = _endpoint(row.dst_ip, row.dst_port)
        detail = " ".join(
            f"{name}={_text(getattr(row, name))}"
            for name in ("drop_reason", "location", "state", "duration_us", "pid", "comm")
            if not pd.isna(getattr(row, name))
        )
        out.write(f"  event {_text(row.kind):<10} {src} -> {dst} {detail}\n")
    out.flush()


def _text(value: object) -> str:
    return "-" if value is None or (not isinstance(value, dict) and pd.isna(value)) else str(value)


def _endpoint(ip: object, port: object) -> str:
    if ip is None or pd.isna(ip):
        return "-"
    address = f"[{ip}]" if ":" in str(ip) else str(ip)
    return address if port is None or pd.isna(port) else f"{address}:{port}"


def _intervals(
    source: BatchSource, duration: float | None, interval: float, stop: threading.Event
) -> Iterator[FlowBatch]:
    """Batches until `duration` seconds have passed (the last interval is cut short to fit) or `stop` is set;
    a live source then cuts the interval under way short, and drains once more after the stop, so that
    what it counted up to then is reported (a stop can come while a drain is under way)."""
    next_batch: Callable[..., FlowBatch] | None = getattr(source, "next_batch", None)
    if next_batch is None:
        for batch in source:
            yield batch
            if stop.is_set():
                return
        return
    remaining = math.inf if duration is None else duration
    while remaining > 1e-6:
        if stop.is_set():
            yield next_batch(0.0, stop)
            return
        step = min(interval, remaining)
        yield next_batch(step, stop)
        remaining -= step


def _stop_on_signals(stop: threading.Event) -> None:
    """The first SIGINT or SIGTERM sets `stop`; a second one interrupts at once (KeyboardInterrupt)."""

    def handler(signum: int, _frame: Any) -> None:
        stop.set()
        signal.signal(signum, signal.default_int_handler)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def probes_summary(probes: list[ProbeStatus]) -> list[dict[str, object]]:
    return [
        {"name": p.name, "active": p.active, "hook": p.hook, "reason": p.reason or None, "remedy": p.remedy or None}
        for p in probes
    ]


class _WholeWrites(io.TextIOBase):
    """Text out through os.write, looping until every byte is written. A signal that interrupts a write
    blocked on a full pipe makes it return short, and CPython's buffered writer (3.11) then loses part of
    the data; capture expects exactly such signals (Ctrl-C while `| less` waits)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(self.fd, data) :]
        return len(text)


def run_capture(args: argparse.Namespace) -> int:
    try:
        handle = open(args.file, "w", encoding="utf-8") if args.file else None  # noqa: SIM115
    except OSError as err:
        raise UsageError(f"cannot write {args.file} ({err.strerror}); choose another --file.") from None
    sys.stdout.flush()
    out = _WholeWrites(handle.fileno() if handle is not None else sys.stdout.fileno())
    total = Coverage()
    intervals = 0
    first: pd.Timestamp | None = None
    last: pd.Timestamp | None = None
    enricher = enricher_for(args)
    try:
        source = open_source(args)
    except BaseException:
        if enricher is not None:
            enricher.close()
        raise
    stop = threading.Event()
    _stop_on_signals(stop)
    interrupted = False
    try:
        for batch in _intervals(source, args.duration, args.interval, stop):
            if enricher is not None:
                batch = enricher.enrich(batch)
            intervals += 1
            total.merge(batch.coverage)
            first = batch.time_start if first is None else first
            last = batch.time_end
            if args.output == "jsonl":
                write_batch(batch, out)
            else:
                _table(batch, out)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        interrupted = interrupted or stop.is_set()
        probes = source.probes()
        transport = getattr(source, "events_transport", None)
        source.close()
        identity = enricher.health() if enricher is not None else None  # a replay's identity is the recording's
        if enricher is not None:
            enricher.close()
    summary = {
        "time_start": format_time(first),
        "time_end": format_time(last),
        "intervals": intervals,
        "interrupted": interrupted,
        "node": source.node,
        "events_transport": transport,
        "coverage": total.to_dict(),
        "unbalanced_sources": total.unbalanced(),
        "probes": probes_summary(probes),
        "identity": identity,
    }
    if args.output == "jsonl":
        write_summary(out, summary)
    else:
        from flowscope.enrich.report import identity_summary

        counts = f"lost {total.lost} of {total.produced} produced"
        out.write(f"=== {intervals} intervals; {counts}; {identity_summary(identity)}\n")
    if handle is not None:
        handle.close()
    return 0


# ---- doctor --------------------------------------------------------------------------------------------


def doctor_report() -> dict[str, Any]:
    import platform

    from flowscope.features import probe_features
    from flowscope.kernel_headers import HeadersError, find_headers
    from flowscope.kernel_offsets import drop_reasons_note
    from flowscope.loader import LoaderError, LoadOptions, import_bcc, plan_families, probe_statuses

    root = os.geteuid() == 0
    features = probe_features(with_program_types=root)
    report: dict[str, Any] = {"kernel": platform.release(), "root": root, "features": features.to_dict()}
    try:
        headers = find_headers()
        report["headers"] = {"path": str(headers.path), "exact": headers.exact, "description": headers.description}
    except HeadersError as err:
        report["headers"] = {"error": str(err)}
    try:
        bcc = import_bcc()
        report["bcc"] = getattr(bcc, "__version__", "installed")
    except LoaderError as err:
        report["bcc"] = None
        report["bcc_error"] = str(err)
    options = LoadOptions()
    statuses = plan_families(features, options)
    report["events_transport"] = "ring buffer" if features.ringbuf else "perf buffer"
    report["drop_reasons"] = drop_reasons_note(features.btf)
    report["probes"] = probes_summary(probe_statuses(statuses))
    report["families"] = [
        {"name": s.family.name, "uses": hook_kind(s.family), "events": report["events_transport"]}
        for s in statuses
        if s.active
    ]
    if root and report.get("bcc") and "error" not in report["headers"]:
        report["load_check"], report["verifier"] = _load_check(options)
    elif not root:
        report["load_check"] = "skipped: not root (run `sudo flowscope doctor` to compile and load the probes)"
    return report


HOOK_KINDS = {"raw_tracepoint": "raw tracepoint", "tracepoint": "tracepoint", "kprobe": "kprobe", "tc": "tc clsact"}


def hook_kind(family: Any) -> str:
    """What a probe family attaches with (the first of its requirements that is a hook)."""
    return next((HOOK_KINDS[r.kind] for r in family.requires if r.kind in HOOK_KINDS), "")


def _load_check(options: Any) -> tuple[str, dict[str, Any] | None]:
    """Compiles (or takes from the compiled-object cache) and loads the runnable probes, without attaching
    tc, to prove they work here; the same compile step in a process of its own as `capture` runs. Returns
    the verdict and the verifier's report of each program."""
    from flowscope.loader import LoaderError, load

    try:
        loaded = load(options)
    except LoaderError as err:
        return f"failed: {err}", None
    loaded.close()
    verifier = {
        "object_cache": loaded.object_cache,
        "compile_seconds": loaded.compile_seconds,
        "compiler_warnings": loaded.compiler_warnings,
        "programs": loaded.verifier,
    }
    return "ok: the runnable probes compile and load", verifier


def run_doctor(args: argparse.Namespace) -> int:
    from flowscope.enrich.report import identity_lines, identity_report

    report = doctor_report()
    report["identity"] = identity_report(args)
    if args.output == "json":
        print(json.dumps(report, indent=2))
        return 0
    features = report["features"]
    lines = [
        f"kernel        {report['kernel']}",
        f"root          {'yes' if report['root'] else 'no'}",
        f"BTF           {features['btf'] or features['btf_error']}",
        f"tracefs       {features['tracefs'] or features['tracefs_note']}",
        f"bpffs         {'mounted' if features['bpffs'] else features['bpffs_note']}",
        f"headers       {report['headers'].get('description') or report['headers'].get('error')}",
        f"BCC           {report['bcc'] or report.get('bcc_error')}",
        f"events        {report['events_transport']}; batch map ops: {'yes' if features['batch_map_ops'] else 'no'}",
        f"kprobes       {'yes' if features['kprobes'] else 'no: ' + (features['kprobes_reason'] or '')}",
    ]
    if features["program_types"]:
        missing = sorted(name for name, ok in features["program_types"].items() if not ok)
        lines.append(f"prog types    unavailable: {', '.join(missing) or 'none'}")
    lines.append("probes")
    for probe in report["probes"]:
        state = "active" if probe["active"] else "unavailable"
        line = f"  {probe['name']:<22} {state:<12} {probe['hook']}"
        if not probe["active"]:
            line += f"\n  {'':<22} why: {probe['reason']}" + (f"; remedy: {probe['remedy']}" if probe["remedy"] else "")
        lines.append(line)
    lines.append(f"drop reasons  {report['drop_reasons']}")
    lines.append(f"load check    {report.get('load_check')}")
    lines += verifier_lines(report.get("verifier"), args.verbose)
    lines += identity_lines(report["identity"])
    print("\n".join(lines))
    return 0


def verifier_lines(verifier: dict[str, Any] | None, verbose: bool) -> list[str]:
    if not verifier:
        return []
    lines = [
        f"verifier      {len(verifier['programs'])} programs, compile step {verifier['compile_seconds']:.1f} s, "
        f"object cache {verifier['object_cache']}"
    ]
    for program in verifier["programs"]:
        verified = program["verified_instructions"]
        lines.append(
            f"  {program['name']:<36} {program['attach']:<36} {program['instructions']:>6} insns, "
            f"{verified if verified is not None else '?':>7} verified, {program['load_ms']:>7.1f} ms"
        )
    if verbose and verifier["object_cache"] == "hit":
        lines.append("compiler      not run: the compiled-object cache had these probes")
    elif verbose:
        lines.append(f"compiler      {verifier['compiler_warnings']} warnings (in the debug log above)")
    return lines


# ---- entry point ---------------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="flowscope", description="eBPF network visibility for Linux nodes and clusters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more on stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True

    doctor = commands.add_parser("doctor", help="what this kernel supports and which probes run (and why not)")
    doctor.add_argument("-o", "--output", choices=("table", "json"), default="table")
    add_identity_arguments(doctor)
    doctor.set_defaults(run=run_doctor)

    capture = commands.add_parser("capture", help="run the probes and print flows and events per interval")
    add_probe_arguments(capture)
    add_identity_arguments(capture)
    capture.add_argument("--duration", type=positive_float, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    capture.add_argument("-o", "--output", choices=("jsonl", "table"), default="table")
    capture.add_argument("--file", metavar="PATH", help="write to PATH instead of stdout")
    capture.set_defaults(run=run_capture)

    from flowscope.ui.command import add_top_arguments, run_top

    top = commands.add_parser("top", help="live top talkers, drops and TCP health (Textual UI; -o table for scripts)")
    add_probe_arguments(top)
    add_identity_arguments(top)
    add_top_arguments(top)
    top.set_defaults(run=run_top)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="flowscope: %(message)s", stream=sys.stderr
    )
    _terminate_on_sigterm()
    from flowscope.loader import LoaderError
    from flowscope.tc import TcError

    try:
        return args.run(args)
    except (UsageError, LoaderError, TcError, ReplayError, IdentityConfigError) as err:
        print(f"flowscope {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

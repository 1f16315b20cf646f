"""`flowscope agent`: the long-running process of a node. One pipeline — the probes (or a recording) ->
identity -> every enabled output — until SIGTERM or SIGINT; SIGHUP reopens the outputs' files (log rotation).
`flowscope agent status` asks a running agent how it is."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from typing import Any

from flowscope.cli.options import UsageError, add_config_file, add_settings, config_from, open_source
from flowscope.config import Config, as_yaml
from flowscope.enrich import enricher_for
from flowscope.kernel.catalog import ProbeStatus
from flowscope.pipeline.pipeline import DEFAULT_QUEUE, Pipeline
from flowscope.pipeline.sink import Sink
from flowscope.pipeline.status import StatusError, StatusServer, fetch

log = logging.getLogger("flowscope")

EPILOG = """\
examples:
  flowscope agent                                  probes on every interface -> the flow log in /var/lib/flowscope
  flowscope agent --config /etc/flowscope/agent.yaml
  flowscope agent --replay flows.jsonl --exit-at-end
  flowscope agent --print-config                   the effective settings, as a --config file
  flowscope agent status                           ask the running agent (its unix socket)

Every setting is also read from FLOWSCOPE_<FLAG> (e.g. FLOWSCOPE_FLOW_MAP_SIZE=131072); flags win over
variables, variables over the --config file.
"""


def register(commands: Any) -> None:
    agent = commands.add_parser(
        "agent", help="run the node agent: probes -> identity -> flow log and the other outputs, until stopped",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )  # fmt: skip
    agent.add_argument("action", nargs="?", choices=("run", "status"), default="run", help="run (default) or status")
    add_config_file(agent)
    agent.add_argument("--print-config", action="store_true", help="print the effective settings and exit")
    agent.add_argument("-o", "--output", choices=("table", "json"), default="table", help="for status")
    add_settings(agent, "probes")
    add_settings(agent, "identity")
    add_settings(agent, "replay")
    add_settings(agent, "flowlog", title="flow log")
    add_settings(agent, "clickhouse", title="ClickHouse")
    add_settings(agent, "grpc", title="flow API (gRPC, own and Hubble-compatible)")
    add_settings(agent, "metrics", title="Prometheus /metrics")
    add_settings(agent, "status", "log", "stop_timeout", title="agent")
    agent.set_defaults(run=run_agent)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(config: Config, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log.format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("flowscope: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.DEBUG if verbose else getattr(logging, config.log.level.upper()))


def build_sinks(config: Config) -> tuple[list[Sink], dict[str, int]]:
    """The outputs the settings enable, and how many batches each one's queue holds."""
    sinks: list[Sink] = []
    if config.flowlog.enabled:
        from flowscope.exporters.flowlog import FlowLogSink

        sinks.append(FlowLogSink(config.flowlog))
    if config.clickhouse.url:
        from flowscope.exporters.clickhouse import ClickHouseSink

        sinks.append(ClickHouseSink(config.clickhouse, data_dir=config.flowlog.directory))
    if config.grpc.enabled:
        from flowscope.exporters.grpc.server import GrpcSink

        sinks.append(GrpcSink(config.grpc))
    if config.metrics.address:
        from flowscope.exporters.prometheus import PrometheusSink

        sinks.append(PrometheusSink(config.metrics))
    queues = {
        "flowlog": config.flowlog.queue,
        "clickhouse": config.clickhouse.queue,
        "grpc": config.grpc.queue,
        "prometheus": config.metrics.queue,
    }
    return sinks, {sink.name: queues.get(sink.name, DEFAULT_QUEUE) for sink in sinks}


def run_agent(args: argparse.Namespace) -> int:
    config = config_from(args)
    if args.action == "status":
        return show_status(config, args.output)
    if args.print_config:
        sys.stdout.write(as_yaml(config))
        return 0
    configure_logging(config, args.verbose)
    sinks, queues = build_sinks(config)
    if not sinks:
        raise UsageError(
            "no output is enabled; enable the flow log (flowlog.enabled) or another output (--clickhouse)."
        )
    enricher = enricher_for(config)
    try:
        source = open_source(config)
    except BaseException:
        if enricher is not None:
            enricher.close()
        raise
    pipeline = Pipeline(source, sinks, enricher=enricher, queue_batches=queues)
    stop = threading.Event()
    _handle_signals(stop, pipeline)
    try:
        pipeline.start()
    except BaseException:
        pipeline.close(timeout=config.stop_timeout)
        raise
    server = None
    try:
        server = StatusServer(pipeline.status, config.status.socket, config.status.address)
        log.info(
            "agent running on %s: %s -> %s", source.node, ", ".join(p.name for p in source.probes() if p.active),
            ", ".join(s.name for s in sinks),
        )  # fmt: skip
        log.info("status API on %s", " and ".join(server.addresses))
        pipeline.run(stop)
        if pipeline.source_ended and not config.replay.exit_at_end:
            log.info("the recording ended; the outputs stay up until the agent is stopped")
            # with a timeout: a signal another thread took (its handler runs on this thread only when this thread
            # runs Python) is acted on within a second; an endless wait() could miss SIGHUP and SIGTERM for ever
            while not stop.wait(1.0):
                pass
    except StatusError as err:
        raise UsageError(str(err)) from None
    finally:
        if server is not None:
            server.close()
        coverage = pipeline.close(timeout=config.stop_timeout)
        lost = {name: c["lost"] for name, c in coverage.to_dict().items() if c["lost"]}
        log.info("agent stopped after %d intervals; lost %s", pipeline.intervals, lost or "nothing")
    return 0


def _handle_signals(stop: threading.Event, pipeline: Pipeline) -> None:
    def on_stop(_signum: int, _frame: Any) -> None:
        stop.set()

    def on_hangup(_signum: int, _frame: Any) -> None:
        log.info("SIGHUP: the outputs reopen their files")
        pipeline.reopen()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hangup)


def show_status(config: Config, output: str) -> int:
    try:
        code, body = fetch(config.status.socket, "/status")
    except StatusError as err:
        raise UsageError(str(err)) from None
    if code != 200:
        raise UsageError(f"the agent answered {code}: {body.decode(errors='replace').strip()}")
    status = json.loads(body)
    if output == "json":
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
        return 0
    sys.stdout.write("\n".join(status_lines(status)) + "\n")
    return 0


def status_lines(status: dict[str, Any]) -> list[str]:
    lines = [
        f"node          {status['node']}",
        f"uptime        {status['uptime_seconds']:.0f} s, {status['intervals']} intervals"
        + (" (the recording ended)" if status["source_ended"] else ""),
        "probes        " + ", ".join(p["name"] for p in status["probes"] if p["active"]),
    ]
    missing = [p for p in status["probes"] if ProbeStatus(p["name"], p["active"], "", p["reason"] or "").missed]
    for probe in missing:
        lines.append(f"  missing     {probe['name']}: {probe['reason']}")
    lines.append("sources       produced / delivered / lost")
    for name, counts in status["coverage"].items():
        lines.append(f"  {name:<22} {counts['produced']:>12,} {counts['delivered']:>12,} {counts['lost']:>10,}")
    lines.append("sinks         produced / delivered / lost, queue")
    for name, sink in status["sinks"].items():
        health = sink["health"]
        # why it is not ok: its last write's exception, else what it says itself (the flow log's error,
        # ClickHouse's detail: a sink that catches its own failures raises nothing)
        why = sink["error"] or health.get("error") or health.get("detail")
        lines.append(
            f"  {name:<22} {sink['produced']:>12,} {sink['delivered']:>12,} {sink['lost']:>10,}  "
            f"{sink['queued']}/{sink['capacity']}  {health.get('state', '?')}"
            + (f", {sink['pending']:,} pending" if sink["pending"] else "")
            + (f": {why}" if why else "")
        )
    return lines

"""`flowscope status`: how a flowscope agent or relay is (its gRPC health, ring, clients, probes, sources)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flowscope.cli.options import UsageError, add_config_file, add_settings, config_from


def register(commands: Any) -> None:
    status = commands.add_parser("status", help="how a flowscope agent or relay is (health, ring, clients, probes)")
    add_config_file(status)
    add_settings(status, "client", title="server")
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.set_defaults(run=run_status)


def run_status(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from flowscope.proto.client import Client, ClientError

    config = config_from(args)
    try:
        client = Client(config.client)
        try:
            health = client.healthy()
            status = client.status()
        finally:
            client.close()
    except ClientError as err:
        raise UsageError(str(err)) from None
    if args.output == "json":
        data = {"health": health, **MessageToDict(status, preserving_proto_field_name=True)}
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    share = 100.0 * status.buffered / status.capacity if status.capacity else 0.0
    lines = [
        f"health        {health} (via {config.client.server})",
        f"node          {status.node} ({status.version}), up {status.uptime_ns / 1e9:.0f} s",
        f"records       {status.buffered:,} buffered of {status.capacity:,} ({share:.1f}%), {status.seen:,} seen, "
        f"{status.rate:,.1f}/s",
        f"clients       {status.clients} following; {status.client_lost:,} records lost to slow clients",
        "probes        " + ", ".join(p.name for p in status.probes if p.active),
    ]
    if status.connected_nodes or status.unavailable_nodes:
        unavailable = ", ".join(status.unavailable_nodes) or "none"
        lines.append(f"nodes         {status.connected_nodes} connected; unavailable: {unavailable}")
    lines.append("sources       produced / delivered / lost")
    for name in sorted(status.sources):
        count = status.sources[name]
        lines.append(f"  {name:<22} {count.produced:>12,} {count.delivered:>12,} {count.lost:>10,}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0

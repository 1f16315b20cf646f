"""`flowscope relay`: one API for many agents. It follows every agent's flow API, merges their streams in time
order (records tagged with their node) and serves flowscope's own API and Hubble's (`hubble observe`,
`hubble list nodes`) from a ring of its own, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Any

from flowscope.cli.agent import configure_logging
from flowscope.cli.capture import stop_on_signals
from flowscope.cli.options import UsageError, add_config_file, add_settings, config_from

log = logging.getLogger("flowscope")

EPILOG = """\
examples:
  flowscope relay --peer 10.0.0.5:4244 --peer 10.0.0.6:4244 --tls-ca ca.pem --grpc-addr 0.0.0.0:4245 \\
      --tls-cert relay.pem --tls-key relay-key.pem
  hubble observe --server unix:///run/flowscope/hubble.sock --last 5   (the last 5 of all agents merged)
  hubble list nodes --server unix:///run/flowscope/hubble.sock
  flowscope relay --discover-selector app.kubernetes.io/name=flowscope --discover-port 4244 --tls-ca ca.pem \\
      --discover-namespace flowscope
      (in a pod: the agents' pods through the Kubernetes API; --kubeconfig FILE outside the cluster)
"""


def register(commands: Any) -> None:
    relay = commands.add_parser(
        "relay", help="merge many agents' flow APIs into one (own and Hubble-compatible), in time order",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )  # fmt: skip
    add_config_file(relay)
    add_settings(relay, "relay", title="agents")
    add_settings(relay, "identity", title="the relay's node and the Kubernetes API (agent discovery)",
                 skip=("identity.metadata", "identity.grace"))  # fmt: skip
    add_settings(relay, "client", title="reaching the agents (TLS)", skip=("client.server",))
    add_settings(relay, "grpc", title="the relay's own API")
    add_settings(relay, "log", "stop_timeout", title="relay")
    relay.set_defaults(run=run_relay)


def run_relay(args: argparse.Namespace) -> int:
    from flowscope.enrich import node_name
    from flowscope.enrich.model import IdentityConfigError
    from flowscope.exporters.grpc.relay import RelaySource
    from flowscope.exporters.grpc.server import GrpcSink
    from flowscope.pipeline.pipeline import Pipeline
    from flowscope.pipeline.status import StatusError

    config = config_from(args)
    if not config.relay.peers and not config.relay.discover_selector:
        raise UsageError("no agent to relay: give --peer ADDR (repeatable) or --discover-selector LABELS.")
    configure_logging(config, args.verbose)
    try:
        source = RelaySource(config.relay, config.client, node_name(config.identity), config.identity.kubeconfig)
    except IdentityConfigError as err:
        raise UsageError(str(err)) from None
    pipeline = Pipeline(source, [GrpcSink(config.grpc)], queue_batches=config.grpc.queue)
    stop = threading.Event()
    stop_on_signals(stop)
    try:
        pipeline.start()
        agents = config.relay.peers or [f"the pods {config.relay.discover_selector}"]
        log.info("relay serving %s from %s", config.grpc.socket, ", ".join(agents))
        pipeline.run(stop)
    except StatusError as err:
        raise UsageError(str(err)) from None
    finally:
        pipeline.close(timeout=config.stop_timeout)
    return 0

"""flowscope's command line: one module per command, each with `register(commands)` adding its parser."""

from __future__ import annotations

import importlib
import logging
import signal
import sys
from typing import Any

from flowscope.cli.options import ArgumentParser, UsageError

COMMANDS = ("doctor", "capture", "top", "agent", "observe", "status", "query", "relay")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="flowscope", description="eBPF network visibility for Linux nodes and clusters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more on stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True
    for name in COMMANDS:
        importlib.import_module(f"flowscope.cli.{name}").register(commands)
    return parser


def _terminate_on_sigterm() -> None:
    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="flowscope: %(message)s", stream=sys.stderr
    )
    _terminate_on_sigterm()
    from flowscope.config import ConfigError
    from flowscope.enrich import IdentityConfigError
    from flowscope.formats.jsonl import ReplayError
    from flowscope.kernel.loader import LoaderError
    from flowscope.kernel.tc import TcError
    from flowscope.pipeline.sink import SinkError

    try:
        return args.run(args)
    except (UsageError, LoaderError, TcError, ReplayError, IdentityConfigError, ConfigError, SinkError) as err:
        print(f"flowscope {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0

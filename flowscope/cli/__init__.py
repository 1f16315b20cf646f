"""flowscope's command line: one module per command, each with `register(commands)` adding its parser."""

from __future__ import annotations

import importlib
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

from flowscope.pipeline.memory import return_freed_memory

if TYPE_CHECKING:
    from flowscope.cli.options import ArgumentParser

COMMANDS = ("doctor", "capture", "top", "agent", "observe", "status", "query", "relay")


def build_parser() -> ArgumentParser:
    from flowscope.cli.options import ArgumentParser  # heavy (pandas): imported once Ctrl-C is handled

    parser = ArgumentParser(prog="flowscope", description="eBPF network visibility for Linux nodes and clusters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more on stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True
    for name in COMMANDS:
        importlib.import_module(f"flowscope.cli.{name}").register(commands)
    return parser


def _interrupt_on_sigint_and_sigterm() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt (exit status 130) in every command, also one started with SIGINT
    ignored (a background job of a non-interactive shell, which Python would leave ignored): `observe -f` and
    `top` stop on them as `capture` and the agent do, and as `hubble observe` does."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while the commands' modules are still being imported
        return 130


def _main(argv: list[str] | None) -> int:
    _interrupt_on_sigint_and_sigterm()
    return_freed_memory()
    from flowscope.cli.options import UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="flowscope: %(message)s", stream=sys.stderr
    )
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
    except BrokenPipeError:
        return 0

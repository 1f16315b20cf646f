"""Settings as a command's flags give them: parsed by the real parser, validated by flowscope.config."""

from __future__ import annotations

from flowscope.cli import build_parser
from flowscope.cli.options import config_from
from flowscope.config import Config, IdentityConfig


def command_config(command: str, *argv: str) -> Config:
    return config_from(build_parser().parse_args([command, *argv]))


def identity_settings(*argv: str) -> IdentityConfig:
    """The identity settings of `capture` with these flags (--metadata, --kubeconfig, --node-name, ...)."""
    return command_config("capture", *argv).identity

"""What every command shares: the parser that reports bad flags in one sentence, the flags built from the
settings of flowscope.config (one definition per option), and the source and identity those settings ask for."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, NoReturn

from flowscope.config import SETTINGS, Config, ConfigError, Setting, load, section_settings
from flowscope.pipeline.source import BatchSource, ReplaySource

DEST_PREFIX = "setting:"


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
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(text)


# ---- flags from the settings ----------------------------------------------------------------------------


def _checked(setting: Setting):
    """argparse's type for a setting: the text, validated as the config file's value would be."""

    def check(text: str) -> str:
        value = [part for part in text.split(",") if part] if setting.is_list else text
        try:
            load(environ={}, flags={setting.path: value})
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{setting.flag} ").rstrip(".")) from None
        return text

    return check


def add_settings(
    parser: argparse.ArgumentParser, *sections: str, title: str | None = None, skip: tuple[str, ...] = ()
) -> None:
    """The flags of the settings of `sections` (see flowscope.config), but `skip`'s keys, in a help group."""
    group = parser.add_argument_group(title or sections[0])
    for setting in section_settings(*sections):
        if setting.key in skip:
            continue
        names = [n for n in (setting.short, setting.flag) if n]
        dest = DEST_PREFIX + setting.key
        help = setting.help + ("" if setting.is_bool or setting.default is None else f" (default {_shown(setting)})")
        if setting.is_bool:
            group.add_argument(*names, dest=dest, action="store_true", default=argparse.SUPPRESS, help=help)
        elif setting.is_list:
            group.add_argument(
                *names, dest=dest, action="append", default=argparse.SUPPRESS, metavar=setting.metavar,
                type=_checked(setting), help=help,
            )  # fmt: skip
        else:
            # A Literal's values show as argparse's {a,b}; no metavar at all would show the dest.
            metavar = setting.metavar or ("{" + ",".join(setting.choices) + "}" if setting.choices else setting.key)
            group.add_argument(
                *names, dest=dest, default=argparse.SUPPRESS, metavar=metavar, type=_checked(setting), help=help,
            )  # fmt: skip


def _shown(setting: Setting) -> str:
    value = setting.default
    if setting.path[-1].endswith(("_age", "grace", "timeout")) and isinstance(value, float):
        return f"{value:g} s"
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_time_range(group: argparse._ArgumentGroup) -> None:
    """--since and --until, as observe and query take them (hubble's forms)."""
    group.add_argument("--since", metavar="TIME", help="from TIME: 5m, 1h30m ago, or RFC 3339 (2025-03-01T12:00:00Z)")
    group.add_argument("--until", metavar="TIME", help="up to TIME (same forms as --since)")


def add_config_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="YAML settings (flags and FLOWSCOPE_* variables override them)"
    )


def flag_values(args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    values = {}
    for dest, value in vars(args).items():
        if dest.startswith(DEST_PREFIX):
            setting = SETTINGS[tuple(dest.removeprefix(DEST_PREFIX).split("."))]
            if setting.is_list and isinstance(value, list):
                value = [part for item in value for part in item.split(",") if part]
            values[setting.path] = value
    return values


def config_from(args: argparse.Namespace) -> Config:
    """The effective settings of a command: its --config file, then FLOWSCOPE_* variables, then its flags."""
    return load(getattr(args, "config", None), os.environ, flag_values(args))


# ---- what the settings ask for --------------------------------------------------------------------------


def load_options(config: Config) -> Any:
    from flowscope.kernel.loader import LoadOptions

    probes = config.probes
    return LoadOptions(
        interfaces=probes.interfaces,
        flow_map_size=probes.flow_map_size,
        perf_events=probes.perf_buffer,
        ring_pages=probes.ring_pages,
        perf_pages=probes.perf_pages,
        drop_events_per_second=probes.drop_events_rate,
        drop_map_size=probes.drop_map_size,
        tcp_map_size=probes.tcp_map_size,
        tcp_events_per_second=probes.tcp_events_rate,
        prefer_kprobes=probes.prefer_kprobes,
        host_root=probes.host_root,
    )


def open_source(config: Config, default_speed: float = 0.0) -> BatchSource:
    """The BatchSource the settings ask for: a recording or the live probes."""
    from flowscope.enrich import node_name

    replay = config.replay
    if replay.file:
        speed = replay.speed if replay.speed is not None else default_speed
        return ReplaySource(
            replay.file,
            speed=speed,
            node=config.identity.node_name,
            skip_bad_records=replay.skip_bad_records,
            until_named=node_name(config.identity),
        )
    from flowscope.pipeline.live import LiveSource

    probes = config.probes
    return LiveSource(
        load_options(config),
        interval=probes.interval,
        node=node_name(config.identity),
        state_dir=Path(probes.state_dir),
    )

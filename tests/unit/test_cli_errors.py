"""What `flowscope capture` says when it cannot run: one sentence on stderr, a non-zero exit, no traceback.

Run as subprocesses (what users run); none of these gets as far as loading a probe, so no root is needed.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowscope.cli import COMMANDS, main

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
NO_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]


def run(*argv: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120)


def assert_one_sentence(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert "Traceback" not in result.stderr
    assert result.stderr == message + "\n"
    assert result.returncode == code
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--interval", "0"],
            "flowscope capture: argument --interval: '0' must be positive; see `flowscope capture --help`.",
        ),
        (
            ["--duration", "soon"],
            "flowscope capture: argument --duration: 'soon' is not a number; see `flowscope capture --help`.",
        ),
        (
            ["-o", "xml"],
            "flowscope capture: argument -o/--output: invalid choice: 'xml' (choose from 'jsonl', 'table'); "
            "see `flowscope capture --help`.",
        ),
        (
            ["--flow-map-size", "many"],
            "flowscope capture: argument --flow-map-size: 'many' is not a whole number; "
            "see `flowscope capture --help`.",
        ),
        (
            ["--flow-map-size", "1000000000"],
            "flowscope capture: argument --flow-map-size: '1000000000' must be at most 4194304; "
            "see `flowscope capture --help`.",
        ),
        (
            ["--ring-pages", "3"],
            "flowscope capture: argument --ring-pages: '3' must be a power of two; see `flowscope capture --help`.",
        ),
        (
            ["--perf-pages", "0"],
            "flowscope capture: argument --perf-pages: '0' must be positive; see `flowscope capture --help`.",
        ),
        (["--bogus"], "flowscope: unrecognized arguments: --bogus; see `flowscope --help`."),
    ],
)
def test_bad_flags(flags: list[str], message: str) -> None:
    assert_one_sentence(run(FLOWSCOPE, "capture", *flags), 2, message)


def test_a_missing_interface() -> None:
    result = run(FLOWSCOPE, "capture", "-i", "lo", "-i", "fstc-nosuch0", "--duration", "1")
    assert_one_sentence(
        result,
        1,
        "flowscope capture: interface fstc-nosuch0 does not exist in this network namespace; `ip link` lists them.",
    )


def test_missing_privileges() -> None:
    # Root without capabilities (as in an unprivileged container) is as unprivileged as any user.
    prefix = tuple(NO_CAPABILITIES) if os.geteuid() == 0 else ()
    result = run(FLOWSCOPE, "capture", "-i", "lo", "--duration", "1", prefix=prefix)
    assert_one_sentence(
        result,
        1,
        "flowscope capture: flowscope needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) to load probes and lacks "
        "CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON; run it with sudo, or add the capability to its container or unit.",
    )


def test_missing_bcc() -> None:
    # `None` in sys.modules makes `import bcc` fail exactly as it does where python3-bpfcc is not installed.
    code = (
        "import sys; sys.modules['bcc'] = None; from flowscope.cli import main; "
        "sys.exit(main(['capture', '-i', 'lo', '--duration', '1']))"
    )
    result = run(sys.executable, "-c", code)
    assert_one_sentence(
        result,
        1,
        "flowscope capture: the BCC Python module is missing; install python3-bpfcc (make setup does) and run "
        "flowscope from the .venv that make setup creates.",
    )


def test_an_unwritable_output_file() -> None:
    result = run(FLOWSCOPE, "capture", "-i", "lo", "--duration", "1", "--file", "/dev/null/flows.jsonl")
    assert_one_sentence(
        result, 1, "flowscope capture: cannot write /dev/null/flows.jsonl (Not a directory); choose another --file."
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_no_help_shows_a_settings_internal_name(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = capsys.readouterr().out
    assert "SETTING:" not in shown and "setting:" not in shown
    if command == "agent":
        assert "--log-format {text,json}" in shown and "--log-level {debug,info,warning,error}" in shown


@pytest.mark.parametrize(
    ("value", "shown"), [(2.0, "2s"), (1.02401, "1s"), (0.5, "0.5s"), (1.46, "1.5s"), (60.0, "60s")]
)
def test_durations_read_rounded(value: float, shown: str) -> None:
    from flowscope.display import seconds

    assert seconds(value) == shown


def test_relay_help_says_last_n_is_of_all_agents(capsys) -> None:
    # The relay answers `--last N` from its own ring of the merged streams (Ring._history): N overall.
    with pytest.raises(SystemExit):
        main(["relay", "--help"])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("hubble observe")]
    assert lines == [
        "hubble observe --server unix:///run/flowscope/hubble.sock --last 5   (the last 5 of all agents merged)"
    ]

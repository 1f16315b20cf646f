"""`flowscope top` from the command line: plain output for scripts, errors, and the TUI in a real terminal."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flowscope.cli import main
from tests.ui.terminal import Terminal, restored

FLOWSCOPE = [sys.executable, "-m", "flowscope"]


def test_table_output_for_scripts(shop_replay, capsys):
    code = main(["top", "--replay", str(shop_replay), "--speed", "1000", "--node-name", "node-a", "-o", "table",
                 "--group", "pod", "--rows", "3", "1", "2"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "2025-03-01T12:00:02.000000000Z node node-a interval 2s flows 4 bytes/s 118090 packets/s 101 lost 0 of 6",
        "     BYTES/S     PKTS/S    DROPS   RETX    RST   RTT_US   CONN  CLOSE  POD",
        "      118090        101        0      0      0      800      1      0  shop/checkout-7d9f",
        "      118000        100        0      0      0      800      1      0  shop/payments-0",
        "          90          1        0      0      0        -      0      0  kube-system/coredns-55",
        "",
        "2025-03-01T12:00:04.000000000Z node node-a interval 2s flows 5 bytes/s 123064 packets/s 106 lost 0 of 14",
        "     BYTES/S     PKTS/S    DROPS   RETX    RST   RTT_US   CONN  CLOSE  POD",
        "      123064        106        1      0      1      833      1      0  shop/payments-0",
        "      123000        105        0      0      0      833      0      0  shop/checkout-7d9f",
        "          64          1        1      0      1        -      1      0  10.204.0.1",
        "",
    ]


def test_jsonl_output_with_a_filter(shop_replay, capsys):
    code = main(["top", "--replay", str(shop_replay), "--speed", "1000", "--node-name", "node-a", "-o", "jsonl",
                 "--filter", "verdict=dropped", "--sort", "drops"])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["time_end"][11:19], r["key"], r["drops"]) for r in rows] == [
        ("12:00:04", "TCP 10.204.0.1:39000 -> 10.204.0.11:9999", 1),
        ("12:00:08", "TCP 192.0.2.80:51000 -> 10.204.0.10:8080", 6),
        ("12:00:08", "TCP 10.204.0.10:43210 -> 10.204.0.11:8443", 2),
        ("12:00:10", "TCP 192.0.2.80:51000 -> 10.204.0.10:8080", 6),
    ]
    assert rows[0] == {
        "time_end": "2025-03-01T12:00:04.000000000Z",
        "seconds": 2.0,
        "node": "node-a",
        "group": "flow",
        "key": "TCP 10.204.0.1:39000 -> 10.204.0.11:9999",
        "bytes": 74,
        "packets": 1,
        "bytes_per_s": 37,
        "packets_per_s": 0,
        "drops": 1,
        "retransmits": 0,
        "resets": 0,
        "rtt_us": None,
        "connections": 0,  # the connect event is not a dropped one, so the filter leaves it out
        "closes": 0,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--filter", "prot=tcp"],
            "flowscope top: bad filter term \"prot=tcp\": unknown field 'prot'; fields are pod, namespace, workload, "
            "label, ip, port, node, observer, protocol, direction, verdict, reason, ifname, type; see `flowscope top "
            "--help` for the filter language.",
        ),
        (
            ["-o", "tui", "1", "3"],
            "flowscope top: a count needs -o table or -o jsonl (the TUI runs until you press q).",
        ),
        ([], "flowscope top: the TUI needs a terminal; use -o table or -o jsonl for plain output."),
    ],
)
def test_usage_errors_are_one_sentence(shop_replay, capsys, args, message):
    assert main(["top", "--replay", str(shop_replay), *args]) == 1
    assert capsys.readouterr().err.strip() == message


def test_unreadable_replay(tmp_path, capsys):
    assert main(["top", "--replay", str(tmp_path / "missing.jsonl"), "-o", "table"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"flowscope top: cannot read replay file {tmp_path / 'missing.jsonl'}: No such file or directory."


@pytest.fixture
def terminal(shop_replay):
    opened: list[Terminal] = []

    def start(*extra: str) -> Terminal:
        replay = ["--replay", str(shop_replay), "--speed", "1000", "--node-name", "node-a"]
        opened.append(Terminal([*FLOWSCOPE, "top", *replay, *extra]))
        return opened[-1]

    yield start
    for term in opened:
        term.close()


def test_q_quits_and_restores_the_terminal(terminal):
    term = terminal()
    term.read_until(b"finished")
    os.write(term.master, b"q")
    assert term.wait() == 0
    restored(term)


def test_sigterm_quits_and_restores_the_terminal(terminal):
    term = terminal()
    term.read_until(b"finished")
    term.process.send_signal(signal.SIGTERM)
    assert term.wait() == 0
    restored(term)


def test_the_installed_entry_point_runs(shop_replay):
    script = Path(sys.executable).parent / "flowscope"
    result = subprocess.run(
        [str(script), "top", "--replay", str(shop_replay), "--speed", "1000", "-o", "table", "--rows", "1", "1", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].endswith("TCP 10.204.0.11:8443 -> 10.204.0.10:43210")


def test_the_help_texts_name_every_filter_field():
    import re

    from flowscope.cli.top import EPILOG
    from flowscope.filters import FIELDS
    from flowscope.ui.app import HELP

    for text in (HELP, EPILOG):
        assert [field for field in FIELDS if not re.search(rf"\b{field}\b", text)] == []

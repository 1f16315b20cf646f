"""`flowscope top` from the command line: plain output for scripts, errors, and the TUI in a real terminal."""

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flowscope.cli import main
from tests.ui.terminal import Terminal, restored
from tests.waiting import wait_for

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
        ("12:00:04", "TCP 10.204.0.1:39000 -> shop/payments-0:9999", 1),
        ("12:00:08", "TCP 192.0.2.80:51000 -> shop/checkout-7d9f:8080", 6),
        ("12:00:08", "TCP shop/checkout-7d9f:43210 -> shop/payments-0:8443", 2),
        ("12:00:10", "TCP 192.0.2.80:51000 -> shop/checkout-7d9f:8080", 6),
    ]
    assert rows[0] == {
        "time_end": "2025-03-01T12:00:04.000000000Z",
        "seconds": 2.0,
        "node": "node-a",
        "group": "flow",
        "key": "TCP 10.204.0.1:39000 -> shop/payments-0:9999",
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


def test_jsonl_output_grouped_by_workload(shop_replay, capsys):
    code = main(["top", "--replay", str(shop_replay), "--speed", "1000", "--node-name", "node-a", "-o", "jsonl",
                 "--group", "workload", "2", "1"])  # fmt: skip
    assert code == 0
    # Interval 0: checkout's four flows (100 x 1000 B, 80 x 1400 B, 20 x 1200 B, 2 x 90 B), payments the TCP
    # three of them, coredns the UDP one; RTT the mean of 1200, 900 and 300 µs; the connect/accept pair is one
    # connection at each end.
    common = {"time_end": "2025-03-01T12:00:02.000000000Z", "seconds": 2.0, "node": "node-a", "group": "workload",
              "drops": 0, "retransmits": 0, "resets": 0, "closes": 0}  # fmt: skip
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        {**common, "key": "shop/checkout", "bytes": 236180, "packets": 202, "bytes_per_s": 118090,
         "packets_per_s": 101, "rtt_us": 800, "connections": 1},
        {**common, "key": "shop/payments", "bytes": 236000, "packets": 200, "bytes_per_s": 118000,
         "packets_per_s": 100, "rtt_us": 800, "connections": 1},
        {**common, "key": "kube-system/coredns", "bytes": 180, "packets": 2, "bytes_per_s": 90, "packets_per_s": 1,
         "rtt_us": None, "connections": 0},
    ]  # fmt: skip


def paced_recording(path: Path) -> Path:
    """Three intervals of 1, 2 and 4 s, one 1000-byte UDP flow each, written by hand."""
    ends = ["2025-03-01T12:00:00.000000000Z", "2025-03-01T12:00:01.000000000Z", "2025-03-01T12:00:03.000000000Z",
            "2025-03-01T12:00:07.000000000Z"]  # fmt: skip
    lines = []
    for start, end in itertools.pairwise(ends):
        lines.append({"type": "flow", "time_start": start, "time_end": end, "protocol": "UDP", "ip_version": 4,
                      "src_ip": "10.9.0.1", "src_port": 1000, "dst_ip": "10.9.0.2", "dst_port": 2000,
                      "packets": 1, "bytes": 1000})  # fmt: skip
        lines.append({"type": "interval", "time_start": start, "time_end": end, "coverage": {}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize(("speed", "sleeps"), [(["--speed", "4"], [0.5, 1.0]), ([], [2.0, 4.0])])
def test_a_replay_is_paced_by_its_recorded_gaps_over_the_speed(tmp_path, capsys, monkeypatch, speed, sleeps):
    import sys

    from flowscope.pipeline.source import ReplaySource

    requested: list[tuple[float, int]] = []  # each wait, with the rows printed before it

    def pause(stop, seconds: float) -> bool:
        # The rows are printed by the sink's thread: while the source waits here, the interval before must
        # reach stdout (it was handed over before the wait), and no later one can.
        rows_before = len(requested) + 1
        wait_for(lambda: sys.stdout.getvalue().count("\n") >= rows_before, what=f"row {rows_before} printed")
        requested.append((seconds, sys.stdout.getvalue().count("\n")))
        return False

    monkeypatch.setattr(ReplaySource, "pause", staticmethod(pause))
    replay = paced_recording(tmp_path / "paced.jsonl")
    assert main(["top", "--replay", str(replay), *speed, "--node-name", "n", "-o", "jsonl"]) == 0
    # No wait before the first interval; before each later one, the gap between interval ends over the speed
    # (2 s and 4 s; top's speed is 1 unless given), after the rows of the one before.
    assert requested == [(sleeps[0], 1), (sleeps[1], 2)]
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["time_end"][11:19], r["seconds"], r["bytes_per_s"]) for r in rows] == [
        ("12:00:01", 1.0, 1000), ("12:00:03", 2.0, 500), ("12:00:07", 4.0, 250),
    ]  # fmt: skip


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


# The whole screen of `top` on the shop replay once it is read: the last interval's figures as in test_app
# (70.0 kB/s = 140 packets of 1000 B in 2 s, ...), RTT the interval's 1600 µs, one close for the connection
# (on the first close event's row), trends of each row's bytes/s over the 5 intervals scaled to its own peak
# in 8 levels rounded up (50..70 kB/s: levels 5 6 6 7 7; present in 3 of 5: full and lowest bars).
FINISHED_SCREEN = [
    " flowscope top  node node-a  interval 2s  12:00:10 UTC  intervals 5  finished",
    " flows 5 (2.50/s)  138 kB/s  124 pkts/s  coverage 94.3% (lost 2 of 35)",
    " probes replay",
    " group flow  sort BYTES/S ▼  rates over 2s  5 of 5 rows",
    " FLOW                                                      BYTES/S ▼    PKTS/S    DROPS    RETX     RST      RTT    CONN    CLOSE  TREND",  # noqa: E501
    " TCP shop/checkout-7d9f:43210 → shop/payments-0:8443       70.0 kB/s      70/s        0       0       0    1.6ms       0        1  ▆▇▇██",  # noqa: E501
    " TCP shop/payments-0:8443 → shop/checkout-7d9f:43210       56.0 kB/s      40/s        0       0       0    900µs       0        0  █████",  # noqa: E501
    " TCP shop/checkout-7d9f:50000 → shop/payments-0:443        12.0 kB/s      10/s        0       0       0    300µs       0        0  █████",  # noqa: E501
    " TCP 192.0.2.80:51000 → shop/checkout-7d9f:8080              180 B/s       3/s        6       0       0        -       0        0  ▁▁▁██",  # noqa: E501
    " UDP shop/checkout-7d9f:40001 → kube-system/coredns-55:53     90 B/s       1/s        0       0       0        -       0        0  █▁█▁█",  # noqa: E501
    *[""] * 25,
    f"{' q Quit  space Pause  g Group  s Sort  r Reverse  d Drops  / Filter  ? Help':<138}▏^p palette",
]  # fmt: skip


def test_q_quits_and_restores_the_terminal(terminal):
    term = terminal()
    term.read_until_screen(FINISHED_SCREEN)
    os.write(term.master, b"q")
    assert term.wait() == 0
    restored(term)


def test_sigterm_quits_and_restores_the_terminal(terminal):
    term = terminal()
    term.read_until_screen(FINISHED_SCREEN)
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
    assert result.stdout.splitlines()[2].endswith("TCP shop/payments-0:8443 -> shop/checkout-7d9f:43210")


# The filter fields as the README lists them, in its order.
README_FIELDS = ["pod", "namespace", "workload", "label", "ip", "port", "node", "observer", "protocol", "direction",
                 "verdict", "reason", "ifname", "type"]  # fmt: skip


def test_the_help_texts_name_every_filter_field():
    import re

    from flowscope.cli.top import EPILOG
    from flowscope.filters import FIELDS
    from flowscope.ui.app import HELP

    def without_notes(text: str) -> str:
        return re.sub(r"\([^)]*\)", "", text)

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    readme_list = readme[readme.index("Fields: `pod`") : readme.index("A bad term is reported")]
    assert re.findall(r"`([a-z]+)`", without_notes(readme_list)) == README_FIELDS
    assert sorted(FIELDS) == sorted(README_FIELDS)  # the language has the fields the README lists
    help_list = without_notes(HELP[HELP.index("fields: ") + len("fields: ") :])
    assert help_list.split() == README_FIELDS
    epilog_list = without_notes(EPILOG[EPILOG.index("Fields: ") + len("Fields: ") :]).strip().removesuffix(".")
    assert [field.strip() for field in epilog_list.split(",")] == README_FIELDS

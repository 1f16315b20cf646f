"""`flowscope query` on the committed shop log: exact answers per output format, and one sentence for bad use."""

import json

import pytest

from flowscope.cli import main

LOG = "tests/data/shop.parquet"


def test_json_lines_of_the_top_talkers(capsys):
    assert main(["query", "talkers", "--file", LOG, "--by", "namespace", "-o", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        {"namespace": "shop", "packets": 2220, "bytes": 2561388, "flows": 37},
        {"namespace": "kube-system", "packets": 6, "bytes": 540, "flows": 3},
    ]  # namespaces have no address fallback: the ends outside the cluster are left out


@pytest.mark.parametrize(("output", "printed"), [("json", ""), ("csv", "drop_reason,drop_packets,drop_bytes\n"),
                                                ("table", "(no flows)\n")])  # fmt: skip
def test_an_empty_answer(capsys, output, printed):
    # JSON lines: no line at all (an empty line is not a JSON document)
    assert main(["query", "drops", "--file", LOG, "--filter", "reason=NO_SUCH_REASON", "-o", output]) == 0
    assert capsys.readouterr().out == printed


def test_the_flow_log_directory_is_the_default_source(tmp_path, capsys):
    import shutil

    shutil.copy(LOG, tmp_path / "flows_20250301T120000.000000000Z_20250301T120010.000000000Z.parquet")
    assert main(["query", "drops", "--data-dir", str(tmp_path), "--filter", "reason=NO_SOCKET", "-o", "csv"]) == 0
    assert capsys.readouterr().out == "drop_reason,drop_packets,drop_bytes\nNO_SOCKET,1,74\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["peers", "--file", LOG], "give a POD (namespace/name) with `peers`, and only with it."),
        (
            ["talkers", "--by", "color", "--file", LOG],
            "--by 'color' is not one of flow, pod, workload, namespace, process, node.",
        ),
        (["talkers", "--data-dir", "/nonexistent/log"], "/nonexistent/log: no such flow log file or directory."),
        (
            ["talkers", "--file", LOG, "--server", "unix:///x.sock"],
            "--file and --server name two places to read; give one.",
        ),
        (
            ["talkers", "--file", LOG, "--since", "yesterday"],
            "--since 'yesterday' is not a time: give 5m, 1h30m or 2025-03-01T12:00:00Z.",
        ),
        (["talkers", "--file", LOG, "--filter", "prot=tcp"], 'bad filter term "prot=tcp"'),
    ],
)
def test_bad_use_is_one_sentence(capsys, argv, message):
    assert main(["query", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"flowscope query: {message}") and err.count("\n") == 1

"""The node's name: one flag (--node-name, else $NODE_NAME, else the host name) for the flow rows' `node`
and for identity, on every command that has it."""

import socket

import pytest

from flowscope.cli import build_parser, open_source
from flowscope.enrich import node_name


@pytest.mark.parametrize("command", ["capture", "top"])
@pytest.mark.parametrize(
    ("flags", "environment", "expected"),
    [
        (["--node-name", "node-flag"], "node-env", "node-flag"),
        ([], "node-env", "node-env"),
        ([], None, socket.gethostname()),
    ],
)
def test_the_source_and_identity_name_the_same_node(monkeypatch, tmp_path, command, flags, environment, expected):
    if environment is None:
        monkeypatch.delenv("NODE_NAME", raising=False)
    else:
        monkeypatch.setenv("NODE_NAME", environment)
    args = build_parser().parse_args([command, "--replay", str(tmp_path / "flows.jsonl"), *flags])
    source = open_source(args)
    try:
        assert (source.node, node_name(args)) == (expected, expected)
    finally:
        source.close()


def test_identity_flags_parse_beside_the_probe_flags():
    args = build_parser().parse_args(["capture", "--node-name", "n1", "--kubeconfig", "k", "--metadata", "m"])
    assert (args.node_name, args.kubeconfig, args.metadata, args.identity_grace) == ("n1", "k", "m", 60.0)

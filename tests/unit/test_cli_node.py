"""The node's name: one flag (--node-name, else $NODE_NAME, else the host name) for the flow rows' `node`
and for identity, on every command that has it."""

import socket

import pytest

from flowscope.cli.options import open_source
from flowscope.enrich import node_name
from tests.settings import command_config


@pytest.mark.parametrize("command", ["capture", "top", "agent"])
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
    config = command_config(command, "--replay", str(tmp_path / "flows.jsonl"), *flags)
    source = open_source(config)
    try:
        assert (source.node, node_name(config.identity)) == (expected, expected)
    finally:
        source.close()


def test_identity_flags_parse_beside_the_probe_flags():
    identity = command_config("capture", "--node-name", "n1", "--kubeconfig", "k", "--metadata", "m").identity
    assert (identity.node_name, identity.kubeconfig, identity.metadata, identity.grace) == ("n1", "k", "m", 60.0)

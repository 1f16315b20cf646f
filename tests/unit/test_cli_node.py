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


@pytest.mark.parametrize(("flags", "expected"), [([], "node-a"), (["--node-name", "mine"], "mine")])
def test_a_replay_names_the_recordings_node_unless_told_otherwise(monkeypatch, tmp_path, flags, expected):
    import threading

    from tests.ui.scenario import shop_batches, write_replay

    monkeypatch.setenv("NODE_NAME", "this-machine")
    recording = write_replay(tmp_path / "flows.jsonl", shop_batches())  # recorded on node-a
    source = open_source(command_config("top", "--replay", str(recording), *flags))
    try:
        assert source.node == (expected if flags else "this-machine")  # before a row is read
        next(source.batches(threading.Event()))
        assert source.node == expected
    finally:
        source.close()

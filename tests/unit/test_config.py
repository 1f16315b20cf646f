"""Settings: a YAML file, FLOWSCOPE_* variables and flags, each overriding the one before; every error one
sentence that names where the bad value came from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowscope.config import SETTINGS, Config, ConfigError, as_yaml, load, seconds
from tests.settings import command_config

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults_are_the_documented_ones():
    config = load(environ={})
    assert (config.probes.interval, config.probes.flow_map_size, config.probes.interfaces) == (1.0, 65536, None)
    assert (config.flowlog.directory, int(config.flowlog.rotate_size), config.flowlog.retain_age) == (
        "/var/lib/flowscope",
        64 << 20,
        7 * 86400.0,
    )
    assert config.status.socket == "/run/flowscope/agent.sock" and config.log.format == "text"


def test_flags_win_over_variables_which_win_over_the_file(tmp_path, monkeypatch):
    file = write(tmp_path / "agent.yaml", "probes:\n  flow_map_size: 1024\n  interval: 5\n  ring_pages: 64\n")
    monkeypatch.setenv("FLOWSCOPE_FLOW_MAP_SIZE", "2048")
    monkeypatch.setenv("FLOWSCOPE_INTERVAL", "3")
    config = command_config("agent", "--config", file, "--flow-map-size", "4096")
    assert (config.probes.flow_map_size, config.probes.interval, config.probes.ring_pages) == (4096, 3.0, 64)


def test_lists_sizes_durations_and_switches_from_each_origin(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSCOPE_INTERFACE", "eth0, eth1")
    monkeypatch.setenv("FLOWSCOPE_PERF_BUFFER", "yes")
    file = write(tmp_path / "a.yaml", "flowlog:\n  rotate_size: 16MiB\n  retain_age: 2d\n  rotate_age: 90s\n")
    config = command_config("agent", "--config", file, "--flowlog-retain-size", "2GB", "-i", "lo")
    assert config.probes.interfaces == ["lo"]  # the flag replaces the variable's list
    assert config.probes.perf_buffer is True
    assert (int(config.flowlog.rotate_size), int(config.flowlog.retain_size)) == (16 << 20, 2_000_000_000)
    assert (config.flowlog.retain_age, config.flowlog.rotate_age) == (172800.0, 90.0)
    assert command_config("capture", "-i", "a,b", "-i", "c").probes.interfaces == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("text", "expected"), [(5, 5.0), ("2.5", 2.5), ("500ms", 0.5), ("15m", 900.0), ("1h", 3600.0), ("7d", 604800.0)]
)
def test_durations(text, expected):
    assert seconds(text) == expected


@pytest.mark.parametrize("text", ["soon", "-1", "1w", "", True, "1e400"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match=r"^is not a duration|^a duration must"):
        seconds(text)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("probes:\n  flow_map_size: 0\n", "{file}: probes.flow_map_size: must be positive."),
        ("probes:\n  flow_map: 1\n", "{file}: probes.flow_map: unknown key."),
        ("probez: {}\n", "{file}: probez: unknown key."),
        ("probes: 3\n", "{file}: probes: is not a section (a mapping of keys)."),
        ("probes:\n  ring_pages: 3\n", "{file}: probes.ring_pages: must be a power of two."),
        ("log:\n  format: xml\n", "{file}: log.format: must be 'text' or 'json'."),
        ("flowlog:\n  rotate_size: lots\n", "{file}: flowlog.rotate_size: is not a size (e.g. 64MiB, 1GB, 4096)."),
        ("flowlog:\n  rotate_age: 0\n", "{file}: flowlog.rotate_age: must be more than zero seconds."),
        ("probes:\n  interfaces: eth0\n", "{file}: probes.interfaces: is not a list."),
        ("- a\n- b\n", "{file}: the config file must be a mapping of sections (probes:, flowlog:, ...)."),
        ("probes: [\n", "{file}: not valid YAML at line 2 (expected the node content, but found '<stream end>')."),
    ],
)
def test_a_bad_file_names_the_file_and_the_key(tmp_path, content, message):
    file = write(tmp_path / "agent.yaml", content)
    with pytest.raises(ConfigError) as raised:
        load(file, environ={})
    assert str(raised.value) == message.format(file=file)


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load(str(tmp_path / "none.yaml"), environ={})
    assert str(raised.value) == f"cannot read the config file {tmp_path / 'none.yaml'} (No such file or directory)."
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"probes:\n  interval: \xff\n")
    with pytest.raises(ConfigError) as raised:
        load(str(binary), environ={})
    assert str(raised.value) == f"{binary}: the config file is not UTF-8 text."


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"FLOWSCOPE_FLOW_MAP_SIZE": "0"}, "FLOWSCOPE_FLOW_MAP_SIZE='0' must be positive."),
        ({"FLOWSCOPE_INTERVAL": "fast"}, "FLOWSCOPE_INTERVAL='fast' is not a number."),
        ({"FLOWSCOPE_PERF_BUFFER": "maybe"}, "FLOWSCOPE_PERF_BUFFER='maybe' is not true or false."),
        (
            {"FLOWSCOPE_DISCOVER_NAMESPACE": "Flow_Scope"},
            "FLOWSCOPE_DISCOVER_NAMESPACE='Flow_Scope' is not a namespace's name (lower case letters, digits and '-', "
            "at most 63).",
        ),
        (
            {"FLOWSCOPE_HOST_ROOT": "host"},
            "FLOWSCOPE_HOST_ROOT='host' must be an absolute directory such as /host, or empty.",
        ),
        (
            {"FLOWSCOPE_FLOWMAPSIZE": "1"},
            "FLOWSCOPE_FLOWMAPSIZE is not a flowscope setting; unset it (`flowscope agent --help` lists them).",
        ),
    ],
)
def test_a_bad_variable_is_named(environ, message):
    with pytest.raises(ConfigError) as raised:
        load(environ=environ)
    assert str(raised.value) == message


def test_every_setting_with_a_flag_has_a_variable_of_the_flags_name():
    flagged = {s.flag: s.env for s in SETTINGS.values() if s.flag}
    assert flagged["--flow-map-size"] == "FLOWSCOPE_FLOW_MAP_SIZE"
    assert flagged["--data-dir"] == "FLOWSCOPE_DATA_DIR"
    assert all(env == "FLOWSCOPE_" + flag[2:].replace("-", "_").upper() for flag, env in flagged.items())
    assert len(set(flagged.values())) == len(flagged)


def test_the_printed_config_reads_back_as_the_same_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSCOPE_RING_PAGES", "256")
    config = command_config("agent", "--flow-map-size", "8192", "--data-dir", str(tmp_path), "--identity-grace", "5m")
    again = load(write(tmp_path / "printed.yaml", as_yaml(config)), environ={})
    assert again == config and again.identity.grace == 300.0 and again.probes.ring_pages == 256


def test_agent_print_config_is_the_effective_config(tmp_path):
    file = write(tmp_path / "a.yaml", "probes:\n  interval: 2\nflowlog:\n  directory: /srv/flows\n")
    result = subprocess.run(
        [FLOWSCOPE, "agent", "--config", file, "--print-config", "--interval", "0.5"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "FLOWSCOPE_TCP_MAP_SIZE": "4096"},
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = load(write(tmp_path / "p.yaml", result.stdout), environ={})
    assert (printed.probes.interval, printed.flowlog.directory, printed.probes.tcp_map_size) == (
        0.5,
        "/srv/flows",
        4096,
    )
    assert printed == Config.model_validate(
        {"probes": {"interval": 0.5, "tcp_map_size": 4096}, "flowlog": {"directory": "/srv/flows"}}
    )


def test_a_bad_flag_is_one_sentence_from_the_parser():
    result = subprocess.run([FLOWSCOPE, "agent", "--flowlog-rotate-size", "huge"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "flowscope agent: argument --flowlog-rotate-size: 'huge' is not a size (e.g. 64MiB, 1GB, 4096); "
        "see `flowscope agent --help`.\n"
    )


@pytest.mark.parametrize(
    ("url", "printed"),
    [
        ("clickhouse://writer:hunter2@db:9000/flows", "clickhouse://writer@db:9000/flows"),
        ("clickhouses://writer:p%40ss:w@rd@db/flows?secure=1", "clickhouses://writer@db/flows?secure=1"),
        ("clickhouse://writer@db:9000/flows", "clickhouse://writer@db:9000/flows"),
        ("clickhouse://db/a:b@c", "clickhouse://db/a:b@c"),  # an @ in the path is no user part
    ],
)
def test_the_printed_config_leaves_out_a_password_in_the_clickhouse_url(url, printed):
    config = Config.model_validate({"clickhouse": {"url": url, "password": "hunter3"}})
    text = as_yaml(config)
    assert "hunter" not in text and "p%40ss" not in text
    assert load_yaml(text)["clickhouse"]["url"] == printed and load_yaml(text)["clickhouse"]["password"] is None


def load_yaml(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_agent_print_config_leaves_out_a_password_in_the_clickhouse_url():
    result = subprocess.run(
        [FLOWSCOPE, "agent", "--clickhouse", "clickhouse://writer:hunter2@db:9000/flows", "--print-config"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert load_yaml(result.stdout)["clickhouse"]["url"] == "clickhouse://writer@db:9000/flows"

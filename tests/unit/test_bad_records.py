"""Recordings with records that cannot be read: one sentence naming the file, line and field, or (with
--skip-bad-records) counted exactly and left out; and fuzzers of every reader of outside input (JSON lines,
Parquet, the config file and variables): nothing but the one clear error ever escapes."""

from __future__ import annotations

import io
import json
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowscope.cli import main
from flowscope.config import ConfigError, load
from flowscope.formats import parquet
from flowscope.formats.jsonl import BAD_RECORDS, ReplayError, read_batches, write_batch
from tests.ui.scenario import shop_batches

SHOP = shop_batches()
FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)  # the same examples every run, and no state left behind


def good_lines() -> list[bytes]:
    out = io.StringIO()
    for batch in SHOP[:2]:
        write_batch(batch, out)
    return [line.encode() for line in out.getvalue().splitlines()]


def with_flow_field(name: str, value) -> list[bytes]:
    lines = good_lines()
    record = json.loads(lines[0])
    record[name] = value
    lines[0] = json.dumps(record).encode()
    return lines


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (lambda: [b'{"type":"flow","src_pod":"a\xffb"}'], "r.jsonl:1: not UTF-8 text (byte 0xff at column 28)"),
        (lambda: [b"{not json"], "r.jsonl:1: not JSON (Expecting property name enclosed in double quotes)"),
        (
            lambda: with_flow_field("packets", "ten"),
            "r.jsonl:1: field 'packets' is \"ten\", not a non-negative integer",
        ),
        (
            lambda: with_flow_field("bytes", -5),
            "r.jsonl:1: field 'bytes' is -5, not a non-negative integer up to 18446744073709551615",
        ),
        (
            lambda: with_flow_field("src_port", 70000),
            "r.jsonl:1: field 'src_port' is 70000, not a non-negative integer up to 65535",
        ),
        (
            lambda: with_flow_field("time_start", "yesterday"),
            "r.jsonl:1: field 'time_start' is \"yesterday\", not an RFC 3339 time",
        ),
        (lambda: with_flow_field("src_pod", ["a"]), "r.jsonl:1: field 'src_pod' is [\"a\"], not text"),
        (
            lambda: with_flow_field("src_labels", {"app": 1}),
            "r.jsonl:1: field 'src_labels' is {\"app\": 1}, not an object of text labels",
        ),
        (lambda: with_flow_field("packets", True), "r.jsonl:1: field 'packets' is true, not a non-negative integer"),
        (
            lambda: [b'{"type":"interval","time_start":3}'],
            "r.jsonl:1: the interval's 'time_start' is 3, not flowscope's",
        ),
        (
            lambda: [b'{"type":"interval","time_start":null,"time_end":null,"coverage":{"x":{"lost":-1}}}'],
            "r.jsonl:1: the interval's 'coverage' is {\"x\": {\"lost\": -1}}, not flowscope's",
        ),
    ],
)
def test_a_bad_record_is_one_sentence_naming_file_line_and_field(lines, message):
    with pytest.raises(ReplayError) as raised:
        list(read_batches(lines(), source="r.jsonl"))
    assert str(raised.value) == f"{message}; fix or remove it, or replay with --skip-bad-records."


def test_skipping_counts_each_bad_record_and_keeps_the_rest():
    lines = good_lines()
    first_interval = next(n for n, line in enumerate(lines) if b'"type":"interval"' in line)
    lines[0] = lines[0].replace(b'"packets":', b'"packets":"x","was":', 1)  # flow 1 of interval 1
    lines.insert(1, b"\xff\xfe")  # a line that is not text
    lines.insert(2, b'{"type":"flow","bytes":-1}')
    batches = list(read_batches(lines, source="r.jsonl", skip_bad=True))
    assert len(batches) == 2
    first, second = batches
    records = first_interval  # the first interval's flow and event lines in the good recording
    assert first.coverage.sources[BAD_RECORDS].__dict__ == {
        "produced": records + 2,
        "delivered": records - 1,
        "lost": 3,
    }
    assert len(first.flows) == len(SHOP[0].flows) - 1 and len(first.events) == len(SHOP[0].events)
    assert second.coverage.sources[BAD_RECORDS].lost == 0 and len(second.flows) == len(SHOP[1].flows)


def test_the_commands_stop_with_one_sentence_and_exit_1(tmp_path, capsys):
    recording = tmp_path / "bad.jsonl"
    recording.write_bytes(b"\n".join(with_flow_field("packets", -1)) + b"\n")
    expected = f"{recording}:1: field 'packets' is -1, not a non-negative integer up to 18446744073709551615"
    for command in (["capture", "-o", "jsonl"], ["top", "-o", "jsonl"]):
        assert main([*command, "--replay", str(recording)]) == 1
        err = capsys.readouterr().err
        assert err == f"flowscope {command[0]}: {expected}; fix or remove it, or replay with --skip-bad-records.\n"
    assert main(["capture", "-o", "table", "--replay", str(recording), "--skip-bad-records"]) == 0
    assert "lost 1 of" in capsys.readouterr().out


# ---- fuzzers --------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
FIELDS = st.sampled_from(["packets", "bytes", "src_port", "time_start", "time_end", "time", "src_pod", "protocol",
                          "src_labels", "coverage", "pid", "kind", "ip_version"])  # fmt: skip


def decoded(line: bytes) -> dict:
    """A line's record, or a new one when an earlier mutation left no JSON object."""
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


@st.composite
def mutated_lines(draw) -> list[bytes]:
    lines = good_lines()
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["field", "bytes", "cut", "type"]))
        if how == "field":
            record = decoded(lines[at])
            record[draw(FIELDS)] = draw(JSON_VALUES)
            lines[at] = json.dumps(record).encode()
        elif how == "bytes":
            lines[at] = draw(st.binary(max_size=40))
        elif how == "cut":
            lines[at] = lines[at][: draw(st.integers(0, len(lines[at])))]
        else:
            record = decoded(lines[at])
            record["type"] = draw(JSON_VALUES)
            lines[at] = json.dumps(record).encode()
    return lines


@FUZZ
@given(mutated_lines(), st.booleans())
def test_fuzzed_json_lines_raise_only_the_one_error(lines, skip):
    try:
        batches = list(read_batches(lines, source="f.jsonl", skip_bad=skip))
    except ReplayError as err:
        assert not skip and str(err).startswith("f.jsonl:") and "\n" not in str(err)
        return
    for batch in batches:
        assert batch.coverage.unbalanced() == []


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 4000))
def test_fuzzed_parquet_files_raise_only_the_one_error(tmp_path_factory, noise, cut):
    path = tmp_path_factory.mktemp("pq") / "f.parquet"
    good = tmp_path_factory.mktemp("pq") / "good.parquet"
    with parquet.open_writer(str(good)) as writer:
        parquet.write_batch(writer, SHOP[0])
    data = good.read_bytes()
    path.write_bytes(data[:cut] + noise + data[cut + len(noise) :])
    try:
        list(parquet.read_batches(str(path)))
    except ReplayError as err:
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err)


def test_a_parquet_file_of_another_schema_is_one_sentence(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"record": ["flow"], "time_start": ["x"], "time_end": [1], "coverage": [None]}), path)
    with pytest.raises(ReplayError) as raised:
        list(parquet.read_batches(str(path)))
    assert str(raised.value).startswith(f"{path}: row group 0: ")


YAML_TEXT = st.text(alphabet=string.printable, max_size=120)
SECTIONS = st.sampled_from(["probes", "identity", "flowlog", "clickhouse", "grpc", "log", "nothing"])


@st.composite
def config_files(draw) -> str:
    if draw(st.booleans()):
        return draw(YAML_TEXT)
    document = {
        draw(SECTIONS): draw(
            st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=14), JSON_VALUES, max_size=3)
        )
    }
    return json.dumps(document)  # JSON is YAML


@FUZZ
@given(
    config_files(),
    st.dictionaries(
        st.sampled_from(
            [
                "FLOWSCOPE_FLOW_MAP_SIZE",
                "FLOWSCOPE_INTERVAL",
                "FLOWSCOPE_LOG_FORMAT",
                "FLOWSCOPE_NOPE",
                "FLOWSCOPE_DATA_DIR",
            ]
        ),
        st.text(max_size=10),
        max_size=2,
    ),
)
def test_fuzzed_config_raises_only_the_one_error(tmp_path_factory, text, environment):
    path = tmp_path_factory.mktemp("cfg") / "agent.yaml"
    path.write_text(text)
    try:
        load(str(path), environment, {})
    except ConfigError as err:
        assert "\n" not in str(err).strip() and str(err).endswith(".")

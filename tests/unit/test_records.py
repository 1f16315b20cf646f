import io

import pandas as pd
import pytest

from flowscope.coverage import Coverage
from flowscope.formats.jsonl import ReplayError, read_batches, write_batch, write_summary
from flowscope.schema import EVENT_COLUMNS, FLOW_COLUMNS, FlowBatch, events_frame, flows_frame


def sample_batch() -> FlowBatch:
    flows = flows_frame(
        pd.DataFrame(
            {
                "time_start": [pd.Timestamp("2026-11-26T10:00:00.000000001Z"), pd.Timestamp("2026-11-26T10:00:00.5Z")],
                "time_end": [pd.Timestamp("2026-11-26T10:00:00.9Z"), pd.Timestamp("2026-11-26T10:00:00.6Z")],
                "ifname": ["eth0", "eth0"],
                "direction": ["egress", "ingress"],
                "ip_version": [6, 4],
                "protocol": ["TCP", "47"],
                "src_ip": ["fd00::1", "10.0.0.2"],
                "src_port": [40000, None],
                "dst_ip": ["fd00::2", "10.0.0.1"],
                "dst_port": [443, None],
                "packets": [10, 1],
                "bytes": [1500, 90],
                "drop_packets": [2, 0],
                "drop_reason": ["NO_SOCKET", None],
                "src_labels": [{"app": "shop"}, None],
            }
        )
    )
    events = events_frame(
        pd.DataFrame(
            {
                "time": [pd.Timestamp("2026-11-26T10:00:00.7Z")],
                "kind": ["drop"],
                "src_ip": ["fd00::1"],
                "drop_reason": ["NO_SOCKET"],
                "pid": [1234],
            }
        )
    )
    coverage = Coverage()
    coverage.add("flow_map", produced=11, delivered=11)
    return FlowBatch(
        pd.Timestamp("2026-11-26T10:00:00Z"), pd.Timestamp("2026-11-26T10:00:01Z"), flows, events, coverage
    )


def test_round_trip_keeps_values_types_and_nulls() -> None:
    out = io.StringIO()
    batch = sample_batch()
    write_batch(batch, out)
    write_summary(out, {"intervals": 1})
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        '{"type":"flow"', '{"type":"flow"', '{"type":"event"', '{"type":"interval"', '{"type":"summary"',
    ]  # fmt: skip
    assert '"time_start":"2026-11-26T10:00:00.000000001Z"' in lines[0]
    assert '"protocol":47' in lines[1]  # an unnamed protocol is a JSON number

    (again,) = list(read_batches(lines))
    assert list(again.flows.columns) == list(FLOW_COLUMNS)
    assert list(again.events.columns) == list(EVENT_COLUMNS)
    pd.testing.assert_frame_equal(again.flows, batch.flows)
    pd.testing.assert_frame_equal(again.events, batch.events)
    assert again.coverage.to_dict() == {"flow_map": {"produced": 11, "delivered": 11, "lost": 0}}
    assert again.time_start == batch.time_start and again.time_end == batch.time_end


def test_records_after_the_last_interval_form_a_batch() -> None:
    out = io.StringIO()
    write_batch(sample_batch(), out)
    flow_line = out.getvalue().splitlines()[0]
    batches = list(read_batches([*out.getvalue().splitlines(), flow_line]))
    assert len(batches) == 2 and len(batches[1].flows) == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "replay:1: not JSON"),
        ("[1, 2]", 'replay:1: not a flowscope record \\(no "type" field\\)'),
        ('{"type": "packet"}', 'replay:1: unknown record type "packet"'),
    ],
)
def test_bad_lines_name_the_line(line: str, message: str) -> None:
    with pytest.raises(ReplayError, match=message):
        list(read_batches([line]))


def test_columns_of_nulls_share_buffers_but_are_written_alone() -> None:
    # conform fills the absent columns from one array of nulls per dtype; writing one of them leaves the rest
    frame = flows_frame(pd.DataFrame({"src_ip": ["10.0.0.1", "10.0.0.2"], "packets": [1, 2]}))
    frame.loc[1, "src_pod"] = "web-1"
    frame.loc[0, "src_pid"] = 7
    assert frame["src_pod"].fillna("-").tolist() == ["-", "web-1"]
    assert frame["dst_pod"].isna().tolist() == [True, True]
    assert frame["src_namespace"].isna().tolist() == [True, True]
    assert frame["src_pid"].fillna(-1).tolist() == [7, -1]
    assert frame["dst_pid"].isna().tolist() == [True, True]

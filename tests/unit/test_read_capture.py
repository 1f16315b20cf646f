"""flowscope.analysis.read_capture over `capture -o jsonl` lines: the rows as recorded, typed as
flowscope.schema (UTC datetimes, nullable integers, missing values null), a flow in when its interval meets
[since, until] and an event when its time lies in it (both ends included, to the nanosecond; a naive time is
UTC), the filter language, and the same answers as read_flowlog over the same recording as Parquet."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from flowscope.analysis import read_capture, read_flowlog
from flowscope.schema import READ_EVENT_COLUMNS, READ_FLOW_COLUMNS
from tests.ui.scenario import shop_batches, write_replay
from tests.unit.test_cli_replay import T0, T1, small_recording

COMMITTED = Path(__file__).parents[1] / "data" / "shop.parquet"  # the shop recording, as Parquet

FLOW_FIELDS = ("time_start", "time_end", "ifname", "direction", "ip_version", "protocol", "src_ip", "src_port",
               "dst_ip", "dst_port", "packets", "bytes", "drop_packets", "drop_bytes", "drop_reason", "retransmits",
               "resets", "rtt_us", "node", "src_pid")  # fmt: skip
START, END = pd.Timestamp(T0), pd.Timestamp(T1)
# The small recording's three flows as written (a counter it does not have is None, never a made-up 0).
TCP_OUT = (START, END, "eth0", "egress", 4, "TCP", "10.1.0.1", 40000, "10.1.0.2", 443, 10, 6000, 0, 0, None, 1, 0,
           250, None, None)  # fmt: skip
TCP_IN = (START, END, "eth0", "ingress", 4, "TCP", "10.1.0.2", 443, "10.1.0.1", 40000, 8, 8000, 0, 0, None, 0, 0,
          None, None, None)  # fmt: skip
UDP_DROPPED = (START, END, "eth0", "ingress", 6, "UDP", "fd00::9", 5353, "fd00::1", 53, 1, 90, 1, 90, "NO_SOCKET",
               None, None, None, None, None)  # fmt: skip
EVENT_FIELDS = ("time", "kind", "protocol", "src_ip", "src_port", "dst_ip", "dst_port", "drop_reason", "location",
                "pid", "comm")  # fmt: skip
CONNECT = (pd.Timestamp("2025-03-01T12:00:00.25Z"), "connect", "TCP", "10.1.0.1", 40000, "10.1.0.2", 443, None, None,
           123, "curl")  # fmt: skip
DROP = (pd.Timestamp("2025-03-01T12:00:01.5Z"), "drop", "UDP", "fd00::9", 5353, "fd00::1", 53, "NO_SOCKET",
        "udp_queue_rcv_skb", None, None)  # fmt: skip


def rows(frame: pd.DataFrame, fields: tuple[str, ...]) -> list[tuple]:
    """The rows' values of `fields`, a null as None."""
    return [tuple(None if pd.isna(v) else v for v in row) for row in frame[list(fields)].itertuples(index=False)]


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return small_recording(tmp_path / "small.jsonl")


def test_the_rows_are_the_recordings_typed_as_the_readers_give_them(small):
    flows, events = read_capture(small), read_capture(small, records="events")
    assert rows(flows, FLOW_FIELDS) == [TCP_OUT, TCP_IN, UDP_DROPPED]
    assert rows(events, EVENT_FIELDS) == [CONNECT, DROP]
    assert kinds(flows) == READ_FLOW_COLUMNS
    assert kinds(events) == READ_EVENT_COLUMNS
    assert {name: str(flows[name].dtype) for name in FLOW_FIELDS} == {
        "time_start": "datetime64[ns, UTC]", "time_end": "datetime64[ns, UTC]", "ifname": "category",
        "direction": "category", "ip_version": "UInt8", "protocol": "category", "src_ip": "string",
        "src_port": "UInt16", "dst_ip": "string", "dst_port": "UInt16", "packets": "UInt64", "bytes": "UInt64",
        "drop_packets": "UInt64", "drop_bytes": "UInt64", "drop_reason": "category", "retransmits": "UInt64",
        "resets": "UInt64", "rtt_us": "UInt32", "node": "category", "src_pid": "Int64",
    }  # fmt: skip
    # identity text's categories are the values present, sorted
    assert flows["protocol"].cat.categories.tolist() == ["TCP", "UDP"]
    assert (str(events["time"].dtype), str(events["pid"].dtype)) == ("datetime64[ns, UTC]", "Int64")
    assert flows["rtt_us"].isna().tolist() == [False, True, True]  # null where the recording has none


ALL = [TCP_OUT, TCP_IN, UDP_DROPPED]


@pytest.mark.parametrize(
    ("since", "until", "flows", "events"),
    [
        (None, None, ALL, [CONNECT, DROP]),
        ("2025-03-01T12:00:01Z", None, ALL, [DROP]),  # the flows end at `since`: in
        ("2025-03-01T12:00:01.000000001Z", None, [], [DROP]),
        (None, "2025-03-01T12:00:00.25Z", ALL, [CONNECT]),
        (None, "2025-03-01T11:59:59.999999999Z", [], []),
        ("2025-03-01T12:00:00.3Z", "2025-03-01T12:00:01.4Z", ALL, []),
        (pd.Timestamp("2025-03-01 12:00:01.5"), None, [], [DROP]),  # naive: UTC
        ("2025-03-01T13:00:01.5+01:00", None, [], [DROP]),
        ("2025-03-01T13:00:01.6+01:00", None, [], []),
        (dt.datetime(2025, 3, 1, 12, 0, 0, 250000, tzinfo=dt.UTC), dt.datetime(2025, 3, 1, 12, 0, 1), ALL, [CONNECT]),
    ],
)
def test_since_and_until_take_the_flows_whose_interval_meets_the_range_and_the_events_in_it(
    small: Path, since: Any, until: Any, flows: list[tuple], events: list[tuple]
):
    assert rows(read_capture(small, since, until), FLOW_FIELDS) == flows
    assert rows(read_capture(small, since, until, records="events"), EVENT_FIELDS) == events


def test_an_empty_answer_has_the_schemas_columns_and_types(small, tmp_path):
    none = read_capture(small, since="2025-03-02T00:00:00Z")
    assert len(none) == 0 and kinds(none) == READ_FLOW_COLUMNS
    only_an_interval = tmp_path / "quiet.jsonl"
    only_an_interval.write_text(small.read_text().splitlines()[-1] + "\n")  # the second interval: no flows
    quiet = read_capture(only_an_interval)
    assert len(quiet) == 0 and kinds(quiet) == READ_FLOW_COLUMNS


def kinds(frame: pd.DataFrame) -> dict[str, str]:
    """Each column's dtype by name, as the schema's read maps write them (a categorical's categories aside)."""
    return {name: "category" if str(dtype) == "category" else str(dtype) for name, dtype in frame.dtypes.items()}


def test_the_filter_selects_as_top_does(small):
    assert rows(read_capture(small, filter="verdict=dropped"), FLOW_FIELDS) == [UDP_DROPPED]
    assert rows(read_capture(small, filter="port=443 direction=egress"), FLOW_FIELDS) == [TCP_OUT]
    assert rows(read_capture(small, filter="protocol=TCP", records="events"), EVENT_FIELDS) == [CONNECT]


def test_json_lines_answer_as_the_parquet_recording_of_the_same_shop(tmp_path):
    recording = write_replay(tmp_path / "shop.jsonl", shop_batches())
    for kind in ("flows", "events"):
        pd.testing.assert_frame_equal(read_capture(recording, records=kind), read_flowlog(COMMITTED, records=kind))
    since, until = "2025-03-01T12:00:04Z", "2025-03-01T12:00:08Z"
    dropped = read_capture(recording, since, until, filter="verdict=dropped")
    pd.testing.assert_frame_equal(dropped, read_flowlog(COMMITTED, since, until, filter="verdict=dropped"))
    assert rows(dropped, ("time_start", "src_ip", "dst_port", "drop_packets", "drop_reason")) == [
        (pd.Timestamp("2025-03-01T12:00:02Z"), "10.204.0.1", 9999, 1, "NO_SOCKET"),
        (pd.Timestamp("2025-03-01T12:00:06Z"), "10.204.0.10", 8443, 2, "TCP_INVALID_SEQUENCE"),
        (pd.Timestamp("2025-03-01T12:00:06Z"), "192.0.2.80", 8080, 6, "NETFILTER_DROP"),
        (pd.Timestamp("2025-03-01T12:00:08Z"), "192.0.2.80", 8080, 6, "NETFILTER_DROP"),
    ]

"""Plain tables for scripts and terminals: `capture -o table` (every flow and event of each interval) and
`top -o table|jsonl` (the top rows of each interval, bcc tcptop's habit).

top's table has fixed-width numeric columns first and the group's key last (it may hold spaces), raw
numbers (bytes and packets per second rounded to integers, RTT in microseconds) and "-" for a value no
probe measured. jsonl prints one object per row with the same figures, null where unmeasured, plus the
interval's length and its exact byte and packet counts.
"""

from __future__ import annotations

import json
from typing import IO, Any

from flowscope.analysis.top import METRICS, TopModel, TopRows, Totals
from flowscope.display import missing, named_endpoint
from flowscope.formats.jsonl import format_time
from flowscope.schema import FlowBatch

COLUMN_WIDTHS = {
    "bytes_per_s": 12,
    "packets_per_s": 10,
    "drops": 8,
    "retransmits": 6,
    "resets": 6,
    "rtt_us": 8,
    "connections": 6,
    "closes": 6,
}
TITLES = {m.name: ("RTT_US" if m.name == "rtt_us" else m.title) for m in METRICS}


def _number(value: object) -> int | None:
    return None if missing(value) else round(float(value))


def table_lines(node: str, totals: Totals, rows: TopRows) -> list[str]:
    lost = totals.coverage.lost
    header = (
        f"{format_time(totals.time_end) or '-'} node {node} interval {totals.seconds:g}s "
        f"flows {totals.flows} bytes/s {round(totals.bytes_per_s)} packets/s {round(totals.packets_per_s)} "
        f"lost {lost} of {totals.coverage.produced}"
    )
    titles = " ".join(f"{TITLES[name]:>{width}}" for name, width in COLUMN_WIDTHS.items())
    lines = [header, f"{titles}  {rows.grouping.upper()}"]
    for record in rows.frame.to_dict("records"):
        cells = " ".join(
            f"{(str(v) if (v := _number(record[name])) is not None else '-'):>{width}}"
            for name, width in COLUMN_WIDTHS.items()
        )
        lines.append(f"{cells}  {record['label']}")
    return lines


def json_rows(node: str, totals: Totals, rows: TopRows) -> list[str]:
    time_end = format_time(totals.time_end)
    out = []
    for record in rows.frame.to_dict("records"):
        values = {name: _number(record[name]) for name in ("bytes", "packets", *COLUMN_WIDTHS)}
        line = {
            "time_end": time_end,
            "seconds": totals.seconds,
            "node": node,
            "group": rows.grouping,
            "key": record["label"],
            **values,
        }
        out.append(json.dumps(line, separators=(",", ":")))
    return out


class TopRowsSink:
    """Prints the top `rows` after each interval (`top -o table|jsonl`)."""

    name = "top"

    def __init__(self, model: TopModel, source: Any, out: IO[str], *, rows: int, output: str) -> None:
        self.model = model
        self.source = source  # its node is read at each interval: a replay learns it from the recording
        self.out = out
        self.rows = rows
        self.output = output
        self.printed = 0

    def open(self) -> None:
        return None

    def write(self, batch: FlowBatch) -> None:
        self.model.add(batch)
        totals, top = self.model.totals(), self.model.rows(self.rows, trend_width=0, arrow="->")
        if self.output == "table":
            self.out.write("\n".join(table_lines(self.source.node, totals, top)) + "\n\n")
        else:
            self.out.write("".join(line + "\n" for line in json_rows(self.source.node, totals, top)))
        self.out.flush()
        self.printed += 1

    def close(self) -> None:
        self.out.flush()

    def health(self) -> dict[str, Any]:
        return {"state": "ok", "printed": self.printed}


# ---- capture -o table -----------------------------------------------------------------------------------

EVENT_DETAILS = ("drop_reason", "location", "state", "duration_us", "pid", "comm")


def _cell(value: object) -> str:
    return "-" if missing(value) else str(value)


class FlowTableSink:
    """Every flow of each interval, busiest first, then its events (`capture -o table`)."""

    name = "table"

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def open(self) -> None:
        return None

    def write(self, batch: FlowBatch) -> None:
        out = self.out
        out.write(f"--- {format_time(batch.time_start)} .. {format_time(batch.time_end)}\n")
        flows = batch.flows.sort_values("bytes", ascending=False, na_position="last")
        header = f"{'IFACE':<12} {'DIR':<7} {'PROTO':<6} {'SOURCE':<40} {'DESTINATION':<40} {'PKTS':>8} {'BYTES':>10}"
        out.write(header + f" {'DROPS':>6} {'REASON':<18} {'RETX':>5} {'RST':>4} {'RTT_US':>7}\n")
        for row in flows.itertuples(index=False):
            src = named_endpoint(row.src_ip, row.src_port, row.src_namespace, row.src_pod)
            dst = named_endpoint(row.dst_ip, row.dst_port, row.dst_namespace, row.dst_pod)
            out.write(
                f"{_cell(row.ifname):<12} {_cell(row.direction):<7} {_cell(row.protocol):<6} {src:<40} {dst:<40} "
                f"{_cell(row.packets):>8} {_cell(row.bytes):>10} {_cell(row.drop_packets):>6} "
                f"{_cell(row.drop_reason):<18} {_cell(row.retransmits):>5} {_cell(row.resets):>4} "
                f"{_cell(row.rtt_us):>7}\n"
            )
        for row in batch.events.itertuples(index=False):
            src = named_endpoint(row.src_ip, row.src_port, row.src_namespace, row.src_pod)
            dst = named_endpoint(row.dst_ip, row.dst_port, row.dst_namespace, row.dst_pod)
            detail = " ".join(
                f"{name}={_cell(getattr(row, name))}" for name in EVENT_DETAILS if not missing(getattr(row, name))
            )
            out.write(f"  event {_cell(row.kind):<10} {src} -> {dst} {detail}\n")
        out.flush()

    def close(self) -> None:
        self.out.flush()

    def health(self) -> dict[str, Any]:
        return {"state": "ok"}

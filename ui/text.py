"""`flowscope top -o table|jsonl`: the top rows printed each interval, for scripts (bcc tcptop's habit).

The table has fixed-width numeric columns first and the group's key last (it may hold spaces), raw
numbers (bytes and packets per second rounded to integers, RTT in microseconds) and "-" for a value no
probe measured. jsonl prints one object per row with the same figures, null where unmeasured, plus the
interval's length and its exact byte and packet counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import IO

from flowscope.formats.jsonl import format_time
from flowscope.schema import FlowBatch
from flowscope.ui.format import missing
from flowscope.ui.model import METRICS, TopModel, TopRows, Totals

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


def print_top(
    batches: Iterable[FlowBatch],
    model: TopModel,
    node: str,
    out: IO[str],
    *,
    rows: int,
    count: int | None,
    output: str,
) -> int:
    """Prints the top `rows` after each interval, `count` times (or until the source ends); returns the count."""
    printed = 0
    for batch in batches:
        model.add(batch)
        totals, top = model.totals(), model.rows(rows, trend_width=0, arrow="->")
        if output == "table":
            out.write("\n".join(table_lines(node, totals, top)) + "\n\n")
        else:
            lines = json_rows(node, totals, top)
            out.write("".join(line + "\n" for line in lines))
        out.flush()
        printed += 1
        if count is not None and printed >= count:
            break
    return printed

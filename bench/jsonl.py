"""The JSON-lines writer of `capture -o jsonl`: rows per second for 100,000 flows (one interval at 100k active
flows), side by side with the two obvious ways to write the same records from Python — json.dumps of each
row's dict (flowscope's writer before; the same bytes) and pandas' DataFrame.to_json(lines=True) (a C
writer, but it rounds times to microseconds and escapes '/'). CPU seconds of each, the best of three."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd

from bench import lab
from bench.flowlog import template

ROWS = 100_000


def frame() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    flows = pd.concat([template(rng)] * (ROWS // 10_000), ignore_index=True)
    flows["time_start"] = pd.Timestamp("2026-12-03T00:00:00.123456789Z") + pd.to_timedelta(rng.integers(0, 10**9, ROWS))
    flows["time_end"] = pd.Timestamp("2026-12-03T00:00:01Z")
    flows["packets"] = pd.array(rng.integers(1, 1000, ROWS), dtype="UInt64")
    flows["bytes"] = pd.array(flows["packets"].to_numpy(dtype=np.int64) * 800, dtype="UInt64")
    labels = [{"app": f"app-{i}", "app.kubernetes.io/part-of": "shop"} for i in range(60)]  # one dict per workload
    flows["src_labels"] = [labels[i % 60] for i in range(ROWS)]
    return flows


def per_row_dumps(flows: pd.DataFrame) -> list[str]:
    """Each row as a dict with plain values, then json.dumps: what the writer did before."""
    from flowscope.schema import FLOW_COLUMNS, UTC_TIME

    data = {}
    for name in flows.columns:
        series = flows[name]
        if FLOW_COLUMNS.get(name) == UTC_TIME:
            text = np.datetime_as_string(series.dt.tz_convert(None).to_numpy("datetime64[ns]"), unit="ns")
            data[name] = [t + "Z" for t in text]
        elif series.dtype == object:
            data[name] = list(series)
        else:
            data[name] = series.astype(object).where(series.notna(), None).tolist()
    names = list(data)
    return [
        json.dumps({"type": "flow", **dict(zip(names, row, strict=True))}, separators=(",", ":"))
        for row in zip(*(data[n] for n in names), strict=True)
    ]


def cpu(function, *args) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(3):
        began = time.process_time()
        result = function(*args)
        best = min(best, time.process_time() - began)
    return best, result


def main() -> None:
    from flowscope.formats.jsonl import record_lines
    from flowscope.schema import FlowBatch, flows_frame

    flows = flows_frame(frame())
    batch = FlowBatch.empty(flows["time_start"].min(), flows["time_end"].max())
    batch.flows = flows
    ours, lines = cpu(record_lines, batch)
    before, reference = cpu(per_row_dumps, flows)
    pandas, _ = cpu(lambda f: f.to_json(orient="records", lines=True, date_format="iso", date_unit="ns"), flows)
    same = lines == reference
    result = {
        "rows": ROWS,
        "flowscope_s": round(ours, 3), "flowscope_rows_per_s": round(ROWS / ours),
        "json_dumps_per_row_s": round(before, 3), "json_dumps_rows_per_s": round(ROWS / before),
        "pandas_to_json_s": round(pandas, 3), "pandas_to_json_rows_per_s": round(ROWS / pandas),
        "same_bytes_as_json_dumps": same, "speedup_over_json_dumps": round(before / ours, 2),
    }  # fmt: skip
    lab.log(
        f"JSON lines of {ROWS:,} flows: flowscope {ours:.2f} s CPU ({result['flowscope_rows_per_s']:,} rows/s), "
        f"json.dumps per row {before:.2f} s, pandas to_json {pandas:.2f} s; same bytes as json.dumps: {same}"
    )
    lab.save("jsonl", result)


if __name__ == "__main__":
    main()

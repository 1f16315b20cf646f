"""The common questions over a DataFrame of flows (from read_flowlog, read_capture, read_clickhouse or
read_grpc), answered with the grouping code `top` uses (flowscope.analysis.grouping): who talks most, what the
kernel dropped and why, how traffic moved over time, and whom a pod talks to."""

from __future__ import annotations

import numpy as np
import pandas as pd

from flowscope.analysis.grouping import GROUPING_BY_NAME, GROUPINGS, UNKNOWN, Grouping, pod_names, text_column
from flowscope.filters import parse_filter

COUNTERS = ("packets", "bytes", "drop_packets", "drop_bytes", "retransmits", "resets")


def grouping(by: str) -> Grouping:
    if by not in GROUP_NAMES:
        raise ValueError(f"by is one of {', '.join(GROUP_NAMES)}, not {by!r}")
    return GROUP_NAMES[by]


GROUP_NAMES = {name: GROUPING_BY_NAME[name] for name in GROUPINGS}


def _grouped(flows: pd.DataFrame, by: str, values: tuple[str, ...]) -> pd.DataFrame:
    """One row per key of `by` (a flow counted for both of its ends, as in `top`), `values` summed, and the
    number of flow records; the key's readable name in column `by`."""
    chosen = grouping(by)
    keyed = chosen.keyed(flows, list(values))
    names = list(chosen.key_names)
    if keyed.empty:
        return pd.DataFrame({by: pd.Series(dtype="string"), **{v: pd.Series(dtype="UInt64") for v in values},
                             "flows": pd.Series(dtype="UInt64")})  # fmt: skip
    sums = keyed.groupby(names, sort=False, dropna=False)[list(values)].sum(min_count=1)
    counts = keyed.groupby(names, sort=False, dropna=False).size()
    pods = pod_names(flows) if by == "flow" else None  # a flow's ends by pod where known, as in `top`
    labels = [chosen.label(key if isinstance(key, tuple) else (key,), pods=pods) for key in sums.index]
    out = pd.DataFrame({by: pd.array(labels, dtype="string")})
    for value in values:
        out[value] = pd.array(sums[value].to_numpy(), dtype="Float64").round().astype("UInt64")
    out["flows"] = pd.array(counts.to_numpy(), dtype="UInt64")
    # Keys that read the same (an IP fallback beside a named end) are one row.
    return out.groupby(by, sort=False, as_index=False).sum(min_count=1)


def top_talkers(flows: pd.DataFrame, by: str = "workload", n: int | None = 10) -> pd.DataFrame:
    """The `n` keys of `by` (flow, pod, workload, namespace, process, node) with the most bytes, sent plus
    received, with their packets and flow records; ties in name order."""
    out = _grouped(flows, by, ("packets", "bytes"))
    out = out.sort_values(["bytes", by], ascending=[False, True], kind="stable", na_position="last")
    return (out.head(n) if n else out).reset_index(drop=True)


def drops_by_reason(flows: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Dropped packets and bytes per kernel drop reason (and per key of `by`, each end of a dropped flow
    counted), most packets first."""
    dropped = flows[flows["drop_packets"].fillna(0).to_numpy(dtype=np.int64) > 0]
    reasons = text_column(dropped, "drop_reason")
    reasons[reasons == ""] = UNKNOWN
    if by is None:
        table = pd.DataFrame({"drop_reason": reasons, "drop_packets": dropped["drop_packets"].to_numpy(dtype=np.int64),
                              "drop_bytes": dropped["drop_bytes"].fillna(0).to_numpy(dtype=np.int64)})  # fmt: skip
        out = table.groupby("drop_reason", as_index=False).sum()
        keys = ["drop_reason"]
    else:
        parts = []
        for reason in sorted(set(reasons)):
            part = _grouped(dropped[reasons == reason], by, ("drop_packets", "drop_bytes"))
            part.insert(0, "drop_reason", reason)
            parts.append(part.drop(columns="flows"))
        out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["drop_reason", by])
        keys = ["drop_reason", by]
    out = out.astype({"drop_reason": "string", "drop_packets": "UInt64", "drop_bytes": "UInt64"})
    order = out.sort_values(["drop_packets", *keys], ascending=[False] + [True] * len(keys), kind="stable")
    return order.reset_index(drop=True)


def timeseries(flows: pd.DataFrame, freq: str = "10s", filter: str = "") -> pd.DataFrame:
    """Counters summed per time bucket of `freq` (by each flow record's interval end), the buckets in order
    and empty ones included (zeros), indexed by the bucket's start (UTC)."""
    chosen = parse_filter(filter).flows(flows)
    frame = pd.DataFrame({name: chosen[name].fillna(0).astype("int64") for name in COUNTERS})
    frame.index = pd.DatetimeIndex(chosen["time_end"], name="time")
    if frame.empty:
        return frame.astype("UInt64")
    out = frame.resample(freq, label="left", closed="left").sum()
    return out.astype("UInt64")


def peers(flows: pd.DataFrame, pod: str, by: str = "pod") -> pd.DataFrame:
    """Whom `pod` (namespace/name) talks to: per peer (a key of `by`), what the pod sent to it and received
    from it, most bytes first."""
    namespace, _, name = pod.rpartition("/")
    parts = []
    for side, way in (("src", "sent"), ("dst", "received")):
        mine = text_column(flows, f"{side}_pod") == name
        if namespace:
            mine &= text_column(flows, f"{side}_namespace") == namespace
        theirs = flows[mine]
        # Only the other end keys the row: blank this pod's side so the grouping counts the peer alone.
        peer = theirs.copy()
        for column in [c for c in peer.columns if c.startswith(f"{side}_")]:
            peer[column] = pd.NA
        grouped = _grouped(peer, by, ("packets", "bytes"))
        grouped = grouped[grouped[by] != UNKNOWN]
        grouped.insert(1, "direction", way)
        parts.append(grouped.rename(columns={by: "peer"}))
    out = pd.concat(parts, ignore_index=True).astype({"direction": "string"})
    return out.sort_values(["bytes", "peer", "direction"], ascending=[False, True, True], kind="stable").reset_index(
        drop=True
    )

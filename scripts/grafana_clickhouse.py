#!/usr/bin/env python3
"""Writes the Grafana dashboards over the ClickHouse flow store (deploy/grafana/clickhouse/*.json) for the
official ClickHouse datasource (grafana-clickhouse-datasource). The JSON is committed; a test checks it is
what this script writes and runs every query in it against a real clickhouse-server and chDB.

    python3 scripts/grafana_clickhouse.py        # rewrite the JSON after changing a query here

The SQL works on every server flowscope supports (Debian's 18.16 included): time buckets are computed from
Grafana's $__interval_s rather than the plugin's $__timeInterval (toStartOfInterval is 19.x and later), and
the node, namespace and workload variables are regular expressions (All is `.*`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when a test loads it by path
import grafana

DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": "${datasource}"}
BUCKET = "toDateTime(intDiv(toUInt32({column}), $__interval_s) * $__interval_s)"


def matches(column: str, variable: str) -> str:
    return f"match(ifNull({column}, ''), '^${{{variable}:regex}}$')"


def either_side(field: str, variable: str) -> str:
    return f"({matches('src_' + field, variable)} OR {matches('dst_' + field, variable)})"


SELECTION = " AND ".join(
    [matches("node", "node"), either_side("namespace", "namespace"), either_side("workload", "workload")]
)
PAIR = "concat(src_namespace, '/', src_workload, ' -> ', dst_namespace, '/', dst_workload)"
END = "if({side}_workload = '', 'unknown', concat({side}_namespace, '/', {side}_workload))"


def variables() -> list[dict]:
    rollup = "${database}.flows_1m"
    return [
        grafana.datasource_variable("grafana-clickhouse-datasource", "ClickHouse"),
        {
            "name": "database",
            "label": "database",
            "type": "textbox",
            "query": "flowscope",
            "current": {"text": "flowscope", "value": "flowscope"},
        },
        grafana.query_variable(
            "node", f"SELECT DISTINCT node FROM {rollup} WHERE $__timeFilter(minute) ORDER BY node", DATASOURCE
        ),
        grafana.query_variable(
            "namespace",
            f"SELECT DISTINCT ns FROM (SELECT src_namespace AS ns FROM {rollup} WHERE $__timeFilter(minute) "
            f"UNION ALL SELECT dst_namespace AS ns FROM {rollup} WHERE $__timeFilter(minute)) WHERE ns != '' "
            "ORDER BY ns",
            DATASOURCE,
        ),
        grafana.query_variable(
            "workload",
            f"SELECT DISTINCT w FROM (SELECT src_workload AS w FROM {rollup} WHERE $__timeFilter(minute) "
            f"UNION ALL SELECT dst_workload AS w FROM {rollup} WHERE $__timeFilter(minute)) WHERE w != '' "
            "ORDER BY w",
            DATASOURCE,
        ),
    ]


def target(sql: str, kind: str = "timeseries", ref: str = "A") -> dict:
    return {
        "refId": ref, "datasource": DATASOURCE, "editorType": "sql", "rawSql": " ".join(sql.split()),
        "queryType": kind, "format": 0 if kind == "timeseries" else 1,
    }  # fmt: skip


def panel(title: str, kind: str, targets: list[dict], grid: tuple[int, int, int, int], **extra: object) -> dict:
    return grafana.panel(title, kind, targets, grid, DATASOURCE, **extra)


def dashboard(uid: str, title: str, description: str, panels: list[dict]) -> dict:
    return grafana.dashboard(uid, title, description, "clickhouse", variables(), panels)


def flows() -> dict:
    rollup, raw = "${database}.flows_1m", "${database}.flows"
    return dashboard(
        "flowscope-ch-flows",
        "flowscope / ClickHouse / flow explorer",
        "Flows from the ClickHouse store: throughput per workload pair (per-minute rollup) and the raw flows.",
        [
            panel("Throughput by workload pair", "timeseries", [target(f"""
                SELECT {BUCKET.format(column="minute")} AS time, {PAIR} AS pair,
                  sum(bytes) / $__interval_s AS bytes_per_s
                FROM {rollup} WHERE $__timeFilter(minute) AND {SELECTION}
                GROUP BY time, pair ORDER BY time""")], (0, 0, 16, 8),
                fieldConfig={"defaults": {"unit": "Bps"}, "overrides": []}),
            panel("Totals", "stat", [target(f"""
                SELECT sum(flows) AS flows, sum(packets) AS packets, sum(bytes) AS bytes, sum(drop_packets) AS drops
                FROM {rollup} WHERE $__timeFilter(minute) AND {SELECTION}""", "table")], (16, 0, 8, 8)),
            panel("Flows (busiest first)", "table", [target(f"""
                SELECT time, node, direction, protocol,
                  concat(ifNull(src_namespace, ''), '/', ifNull(src_pod, '')) AS source, src_ip, src_port,
                  concat(ifNull(dst_namespace, ''), '/', ifNull(dst_pod, '')) AS destination, dst_ip, dst_port,
                  packets, bytes, drop_packets, drop_reason, retransmits, resets, rtt_us
                FROM {raw} WHERE $__timeFilter(time) AND {SELECTION}
                ORDER BY bytes DESC LIMIT 500""", "table")], (0, 8, 24, 12)),
        ],
    )  # fmt: skip


def drops() -> dict:
    rollup, events = "${database}.drops_1m", "${database}.events"
    return dashboard(
        "flowscope-ch-drops",
        "flowscope / ClickHouse / drops",
        "Packets the kernel dropped, by its own reason names: over time, their victims, and where in the kernel.",
        [
            panel("Drops by reason", "timeseries", [target(f"""
                SELECT {BUCKET.format(column="minute")} AS time, drop_reason,
                  sum(drop_packets) / $__interval_s AS drops_per_s
                FROM {rollup} WHERE $__timeFilter(minute) AND {SELECTION}
                GROUP BY time, drop_reason ORDER BY time""")], (0, 0, 24, 8),
                fieldConfig={"defaults": {"unit": "pps"}, "overrides": []}),
            panel("Top victims", "table", [target(f"""
                SELECT dst_namespace AS namespace, dst_workload AS workload, drop_reason, sum(drop_packets) AS packets,
                  sum(drop_bytes) AS bytes
                FROM {rollup} WHERE $__timeFilter(minute) AND {SELECTION}
                GROUP BY namespace, workload, drop_reason ORDER BY packets DESC LIMIT 20""", "table")], (0, 8, 12, 10)),
            panel("Kernel locations", "table", [target(f"""
                SELECT drop_reason, location, count() AS events
                FROM {events} WHERE $__timeFilter(time) AND kind = 'drop' AND {SELECTION}
                GROUP BY drop_reason, location ORDER BY events DESC LIMIT 20""", "table")], (12, 8, 12, 10)),
        ],
    )  # fmt: skip


def service_map() -> dict:
    rollup = "${database}.flows_1m"
    ends = " UNION ALL ".join(
        f"SELECT {END.format(side=side)} AS id, bytes FROM {rollup} WHERE $__timeFilter(minute) AND {SELECTION}"
        for side in ("src", "dst")
    )
    return dashboard(
        "flowscope-ch-service-map",
        "flowscope / ClickHouse / service map",
        "Who talks to whom, by workload (per-minute rollup): nodes are workloads, edges their traffic.",
        [
            panel("Workload pairs", "nodeGraph", [
                target(f"SELECT id, id AS title, sum(bytes) AS mainstat FROM ({ends}) GROUP BY id", "table", "nodes"),
                target(f"""
                    SELECT concat({END.format(side="src")}, ' -> ', {END.format(side="dst")}) AS id,
                      {END.format(side="src")} AS source, {END.format(side="dst")} AS target, sum(bytes) AS mainstat
                    FROM {rollup} WHERE $__timeFilter(minute) AND {SELECTION}
                    GROUP BY src_namespace, src_workload, dst_namespace, dst_workload""", "table", "edges"),
            ], (0, 0, 24, 16)),
        ],
    )  # fmt: skip


def dashboards() -> dict[str, dict]:
    return {"flows.json": flows(), "drops.json": drops(), "service-map.json": service_map()}


def main() -> None:
    grafana.write("clickhouse", dashboards())


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the Grafana dashboards over flowscope's Prometheus metrics (deploy/grafana/prometheus/*.json) and the
Prometheus rules they read (deploy/prometheus/flowscope-rules.yml: recording rules for the dashboards' heavy
queries, and alerts with a summary and a runbook line each). Both are committed; tests check they are what
this script writes, lint them with promtool, and run every expression in them against a real Prometheus
scraping an agent.

    python3 scripts/grafana_prometheus.py        # rewrite the JSON and the rules after changing them here

The dashboards assume the default label context (metrics.context: local, metrics.labels: workload): the
per-workload series carry `namespace` and `workload`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when a test loads it by path
import grafana

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "flowscope-rules.yml"
NODE = 'node=~"$node"'
SELECTION = 'node=~"$node", namespace=~"$namespace", workload=~"$workload"'

# Recording rules: name -> expression (1-minute rates, summed to the labels the dashboards group by).
BYTES_RATE = "node_namespace_workload_direction:flowscope_workload_bytes:rate1m"
PACKETS_RATE = "node_namespace_workload_direction:flowscope_workload_packets:rate1m"
DROPS_RATE = "node_namespace_workload_reason:flowscope_workload_drops:rate1m"
RTT_RATE = "node_namespace_workload_le:flowscope_workload_tcp_rtt_seconds_bucket:rate1m"
RECORDING = {
    BYTES_RATE: "sum by (node, namespace, workload, direction) (rate(flowscope_workload_bytes_total[1m]))",
    PACKETS_RATE: "sum by (node, namespace, workload, direction) (rate(flowscope_workload_packets_total[1m]))",
    DROPS_RATE: "sum by (node, namespace, workload, reason) (rate(flowscope_workload_drops_total[1m]))",
    RTT_RATE: "sum by (node, namespace, workload, le) (rate(flowscope_workload_tcp_rtt_seconds_bucket[1m]))",
}
WORKLOAD = "node, namespace, workload"


def alerts() -> list[dict]:
    def alert(name: str, expr: str, wait: str, severity: str, summary: str, runbook: str) -> dict:
        return {
            "alert": name, "expr": " ".join(expr.split()), "for": wait, "labels": {"severity": severity},
            "annotations": {"summary": summary, "runbook": runbook},
        }  # fmt: skip

    return [
        alert("FlowscopeDropRateHigh", f"""
            sum by ({WORKLOAD}, reason) (rate(flowscope_workload_drops_total[5m])) > 1""", "5m", "warning",
            "{{ $labels.namespace }}/{{ $labels.workload }} on {{ $labels.node }} loses {{ $value | humanize }} "
            "packets/s to the kernel ({{ $labels.reason }}).",
            "Open the flowscope drops dashboard for this workload; the reason names the kernel's check (e.g. "
            "NETFILTER_DROP: a firewall rule, NO_SOCKET: nothing listens); `flowscope observe --verdict dropped "
            "from-workload=...` shows the flows."),
        alert("FlowscopeTcpRetransmitRatioHigh", f"""
            sum by ({WORKLOAD}) (rate(flowscope_workload_tcp_retransmits_total[5m]))
              / sum by ({WORKLOAD}) (rate(flowscope_workload_packets_total{{direction="egress"}}[5m])) > 0.05
            and sum by ({WORKLOAD}) (rate(flowscope_workload_packets_total{{direction="egress"}}[5m])) > 10""",
            "10m", "warning",
            "{{ $labels.namespace }}/{{ $labels.workload }} on {{ $labels.node }} retransmits "
            "{{ $value | humanizePercentage }} of what it sends.",
            "Look for a lossy path or an overloaded peer: the overview's retransmits and RTT panels for this "
            "workload, drops on its node, and `flowscope top --group workload --sort retransmits`."),
        alert("FlowscopeTcpRttP95High", f"""
            histogram_quantile(0.95,
              sum by ({WORKLOAD}, le) (rate(flowscope_workload_tcp_rtt_seconds_bucket[5m]))) > 0.2""",
            "10m", "warning",
            "TCP RTT p95 of {{ $labels.namespace }}/{{ $labels.workload }} on {{ $labels.node }} is "
            "{{ $value | humanizeDuration }}.",
            "Compare with the workload's peers on the overview's RTT panel: one slow peer points at it, all "
            "peers slow at this node's network (queueing, CPU throttling, a saturated link)."),
        alert("FlowscopeConnectionFailuresHigh", f"""
            sum by ({WORKLOAD}) (rate(flowscope_workload_tcp_connections_failed_total[5m]))
              / (sum by ({WORKLOAD}) (rate(flowscope_workload_tcp_connections_opened_total[5m]))
                 + sum by ({WORKLOAD}) (rate(flowscope_workload_tcp_connections_failed_total[5m]))) > 0.1
            and sum by ({WORKLOAD}) (rate(flowscope_workload_tcp_connections_failed_total[5m])) > 0.1""",
            "5m", "warning",
            "{{ $value | humanizePercentage }} of the connections {{ $labels.namespace }}/{{ $labels.workload }} "
            "starts on {{ $labels.node }} fail.",
            "A refused or unanswered connect: check that the service it calls has ready endpoints and that no "
            "network policy drops the SYN (the drops dashboard, reason NETFILTER_DROP or NO_SOCKET)."),
        # The event sampling stages (drop_event_sampling, tcp_event_sampling) leave events out by design, within
        # their rate: the flows still count every drop and retransmit, so that loss is no alert.
        alert("FlowscopeRecordsLost", """
            sum by (instance, node, source) (increase(flowscope_records_lost_total{source!~".*_sampling"}[5m])) > 0""",
            "0m", "warning",
            "flowscope on {{ $labels.node }} lost {{ $value | humanize }} records at {{ $labels.source }}.",
            "`flowscope agent status` shows which stage loses: a full kernel map wants a larger --flow-map-size, "
            "a ring that overflows more --ring-pages."),
        alert("FlowscopeSinkRecordsLost", """
            sum by (instance, node, sink) (increase(flowscope_sink_records_lost_total[5m])) > 0""", "0m", "warning",
            "flowscope's {{ $labels.sink }} output on {{ $labels.node }} lost {{ $value | humanize }} records.",
            "The output is slower than the flows or its server is down: `flowscope agent status` shows its error "
            "and queue; raise its queue setting or fix the server it writes to."),
        alert("FlowscopeProbeInactive", "flowscope_probe_active == 0", "5m", "critical",
            "flowscope's probe {{ $labels.probe }} does not run on {{ $labels.node }}.",
            "`flowscope doctor` on the node says why (a missing kernel feature or privilege) and what to do."),
    ]  # fmt: skip


def rules() -> dict:
    return {
        "groups": [
            {
                "name": "flowscope.recording",
                "rules": [{"record": name, "expr": expr} for name, expr in RECORDING.items()],
            },
            {"name": "flowscope.alerts", "rules": alerts()},
        ]
    }


# ---- the dashboards -------------------------------------------------------------------------------------


def variables() -> list[dict]:
    return [
        grafana.datasource_variable("prometheus", "Prometheus"),
        grafana.query_variable("node", "label_values(flowscope_build_info, node)", DATASOURCE),
        grafana.query_variable(
            "namespace", 'label_values(flowscope_workload_bytes_total{node=~"$node"}, namespace)', DATASOURCE
        ),
        grafana.query_variable(
            "workload",
            'label_values(flowscope_workload_bytes_total{node=~"$node", namespace=~"$namespace"}, workload)',
            DATASOURCE,
        ),
    ]


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict:
    return {
        "refId": ref, "datasource": DATASOURCE, "expr": " ".join(expr.split()), "legendFormat": legend,
        "instant": instant, "range": not instant, "format": "table" if instant else "time_series",
    }  # fmt: skip


def panel(title: str, kind: str, targets: list[dict], grid: tuple[int, int, int, int], unit: str = "") -> dict:
    extra: dict = {"fieldConfig": {"defaults": {"unit": unit}, "overrides": []}} if unit else {}
    return grafana.panel(title, kind, targets, grid, DATASOURCE, **extra)


def dashboard(uid: str, title: str, description: str, panels: list[dict]) -> dict:
    return grafana.dashboard(uid, title, description, "prometheus", variables(), panels)


def rtt(quantile: str) -> dict:
    return target(
        f"histogram_quantile({quantile}, sum by (le) ({RTT_RATE}{{{SELECTION}}}))", f"p{quantile[2:]}", f"p{quantile}"
    )


def overview() -> dict:
    return dashboard(
        "flowscope-prom-overview",
        "flowscope / overview",
        "Who talks how much and how well on each node: throughput, top talkers, drops, TCP health, and whether "
        "flowscope itself sees everything.",
        [
            panel("Throughput by namespace", "timeseries", [target(
                f"sum by (namespace, direction) ({BYTES_RATE}{{{SELECTION}}})", "{{namespace}} {{direction}}")],
                (0, 0, 12, 8), "Bps"),
            panel("Throughput by workload", "timeseries", [target(
                f"sum by (namespace, workload) ({BYTES_RATE}{{{SELECTION}}})", "{{namespace}}/{{workload}}")],
                (12, 0, 12, 8), "Bps"),
            panel("Top talkers", "table", [target(
                f"topk(10, sum by (namespace, workload) (increase(flowscope_workload_bytes_total{{{SELECTION}}}"
                "[$__range])))", instant=True)], (0, 8, 8, 8), "bytes"),
            panel("Drops by reason", "timeseries", [target(
                f"sum by (reason) ({DROPS_RATE}{{{SELECTION}}})", "{{reason}}")], (8, 8, 16, 8), "pps"),
            panel("TCP retransmits", "timeseries", [target(
                f"sum by (namespace, workload) (rate(flowscope_workload_tcp_retransmits_total{{{SELECTION}}}"
                "[$__rate_interval]))", "{{namespace}}/{{workload}}")], (0, 16, 8, 8), "short"),
            panel("TCP resets", "timeseries", [target(
                f"sum by (namespace, workload) (rate(flowscope_workload_tcp_resets_total{{{SELECTION}}}"
                "[$__rate_interval]))", "{{namespace}}/{{workload}}")], (8, 16, 8, 8), "short"),
            panel("TCP RTT percentiles", "timeseries", [rtt("0.5"), rtt("0.95"), rtt("0.99")], (16, 16, 8, 8), "s"),
            panel("Connections opened and failed", "timeseries", [
                target(f"sum by (namespace, workload) (rate(flowscope_workload_tcp_connections_opened_total"
                       f"{{{SELECTION}}}[$__rate_interval]))", "opened {{namespace}}/{{workload}}", "opened"),
                target(f"sum by (namespace, workload) (rate(flowscope_workload_tcp_connections_failed_total"
                       f"{{{SELECTION}}}[$__rate_interval]))", "failed {{namespace}}/{{workload}}", "failed"),
            ], (0, 24, 12, 8), "short"),
            panel("Coverage: records lost by stage", "timeseries", [
                target(f"sum by (source) (rate(flowscope_records_lost_total{{{NODE}}}[$__rate_interval]))",
                       "{{source}}", "sources"),
                target(f"sum by (sink) (rate(flowscope_sink_records_lost_total{{{NODE}}}[$__rate_interval]))",
                       "output {{sink}}", "sinks"),
            ], (12, 24, 12, 8), "short"),
            panel("Agent health", "table", [
                target(f"max by (node, probe) (flowscope_probe_active{{{NODE}}})", ref="probes", instant=True),
                target(f"max by (node, sink) (flowscope_sink_queue_fill_ratio{{{NODE}}})", ref="queues",
                       instant=True),
                target(f"max by (node, map) (flowscope_map_fill_ratio{{{NODE}}})", ref="maps", instant=True),
                target(f"max by (node, family) (flowscope_metrics_folded_keys{{{NODE}}})", ref="folded",
                       instant=True),
                target(f"sum by (node) (rate(flowscope_identity_unresolved_total{{{NODE}}}[$__rate_interval]))",
                       ref="identity", instant=True),
                target(f"sum by (node) (rate(process_cpu_seconds_total[$__rate_interval]) * on (instance) "
                       f"group_left (node) flowscope_build_info{{{NODE}}})", ref="cpu", instant=True),
            ], (0, 32, 24, 8)),
        ],
    )  # fmt: skip


def drops() -> dict:
    return dashboard(
        "flowscope-prom-drops",
        "flowscope / drops",
        "Packets the kernel dropped, by its own reason names: over time, their victims, and where in the kernel.",
        [
            panel("Drops by reason", "timeseries", [target(
                f"sum by (reason) (rate(flowscope_drops_total{{{NODE}}}[$__rate_interval]))", "{{reason}}")],
                (0, 0, 12, 8), "pps"),
            panel("Dropped bytes by reason", "timeseries", [target(
                f"sum by (reason) (rate(flowscope_drop_bytes_total{{{NODE}}}[$__rate_interval]))", "{{reason}}")],
                (12, 0, 12, 8), "Bps"),
            panel("Drops by workload", "timeseries", [target(
                f"sum by (namespace, workload) ({DROPS_RATE}{{{SELECTION}}})", "{{namespace}}/{{workload}}")],
                (0, 8, 24, 8), "pps"),
            panel("Top victims", "table", [target(
                f"topk(20, sum by (namespace, workload, reason) (increase(flowscope_workload_drops_total"
                f"{{{SELECTION}}}[$__range])))", instant=True)], (0, 16, 12, 10)),
            panel("Kernel locations (sampled drop events)", "table", [target(
                f"sum by (reason, location) (increase(flowscope_drop_events_total{{{NODE}}}[$__range]))",
                instant=True)], (12, 16, 12, 10)),
        ],
    )  # fmt: skip


def dashboards() -> dict[str, dict]:
    return {"overview.json": overview(), "drops.json": drops()}


def rules_text() -> str:
    header = "# Written by scripts/grafana_prometheus.py (the dashboards read the recorded series); edit it there.\n"
    return header + yaml.safe_dump(rules(), sort_keys=False, width=120)


def main() -> None:
    grafana.write("prometheus", dashboards())
    RULES.write_text(rules_text())
    print(f"wrote {RULES}")


if __name__ == "__main__":
    main()

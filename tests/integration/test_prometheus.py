"""The Prometheus output against Debian's real Prometheus and promtool: /metrics passes `promtool check metrics`
(text and OpenMetrics), the rules pass `promtool check rules` and their unit tests, a Prometheus scraping an
agent that replays a recording holds exactly the recording's packets, bytes, drops and TCP counts, every
expression of the dashboards and rules returns data from it, and the cardinality budget holds with counters
that never go down.

Scrapes are waited for, never slept for: a test waits until Prometheus holds a sample of
flowscope_intervals_total that counts the agent's last interval."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import itertools
import json
import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError
from urllib.request import Request, urlopen

import pandas as pd
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from flowscope.config import MetricsConfig
from flowscope.exporters.prometheus import PrometheusSink
from flowscope.schema import FlowBatch, flows_frame
from tests.integration.servers import Prometheus, free_port
from tests.ui.scenario import shop_batches, write_replay
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "flowscope-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "flowscope-rules.test.yml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "prometheus"
FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
SHOP = shop_batches()
# What a recording cannot feed: the kernel maps' fill and identity lookups (tests/kernel/test_prometheus_live.py).
LIVE_ONLY = ("flowscope_map_fill_ratio", "flowscope_identity_unresolved_total")
# Grafana's variables as a dashboard sends them with every selection at All.
GRAFANA = {"$node": ".*", "$namespace": ".*", "$workload": ".*", "$__rate_interval": "1m", "$__range": "1h"}


def generator():
    spec = importlib.util.spec_from_file_location("grafana_prometheus", ROOT / "scripts" / "grafana_prometheus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard target and variable and every rule, as Prometheus would run it: the
    variables expanded, label_values() as the query it stands for, an alert without its thresholds (its series
    must exist, whether or not they fire)."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                metric, label = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]).groups()
                found.append((f"{path.name} variable {variable['name']}", f"count by ({label}) ({metric})"))
        for panel in board["panels"]:
            for target in panel["targets"]:
                found.append((f"{path.name} {panel['title']} {target['refId']}", target["expr"]))
    import yaml

    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                found.append((f"rule {rule['record']}", rule["expr"]))
            else:
                found.append((f"alert {rule['alert']}", re.sub(r" (>|==) [0-9.]+", "", rule["expr"])))
    expanded = []
    for where, expr in found:
        for name, value in GRAFANA.items():
            expr = expr.replace(name, value)
        expanded.append((where, expr))
    return expanded


def test_the_committed_dashboards_and_rules_are_what_the_script_writes() -> None:
    module = generator()
    for name, content in module.dashboards().items():
        assert json.loads((DASHBOARDS / name).read_text()) == content, name
    assert {p.name for p in DASHBOARDS.glob("*.json")} == set(module.dashboards())
    assert RULES.read_text() == module.rules_text()


def test_promtool_checks_the_rules_and_every_alert_fires_only_where_it_should() -> None:
    checked = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 11 rules found" in checked.stdout
    tested = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {r["alert"] for g in yaml_groups() for r in g["rules"] if "alert" in r}
    assert alerts == set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text())), "an alert without a unit test"


def yaml_groups() -> list[dict]:
    import yaml

    return yaml.safe_load(RULES.read_text())["groups"]


def scrape(address: str, accept: str | None = None) -> tuple[str, str]:
    request = Request(f"http://{address}/metrics", headers={"Accept": accept} if accept else {})
    with urlopen(request, timeout=10) as answer:
        return answer.headers["Content-Type"], answer.read().decode()


def serving(address: str) -> bool:
    try:
        scrape(address)
    except (URLError, OSError):
        return False
    return True


@contextlib.contextmanager
def agent(tmp_path: Path, batches: list[FlowBatch], *extra: str) -> Iterator[str]:
    """`flowscope agent` replaying `batches` as fast as it can and serving /metrics: yields its address."""
    recording = write_replay(tmp_path / "recording.jsonl", batches)
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [FLOWSCOPE, "agent", "--replay", str(recording), "--speed", "0", "--status-socket", str(tmp_path / "a.sock"),
         "--metrics-addr", address, *extra],
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "FLOWSCOPE_FLOWLOG_ENABLED": "0", "FLOWSCOPE_GRPC_ENABLED": "0"},
    )  # fmt: skip
    try:
        wait_for(lambda: process.poll() is not None or serving(address), 60, "the agent serving /metrics")
        assert process.poll() is None, process.communicate()[1]
        yield address
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=60)
        assert process.returncode == 0, errors


def intervals_in(text: str) -> float | None:
    found = re.search(r"^flowscope_intervals_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_metrics_pass_promtool_in_text_and_openmetrics(tmp_path: Path) -> None:
    with agent(tmp_path, SHOP) as address:
        wait_for(lambda: intervals_in(scrape(address)[1]) == len(SHOP), 60, "every interval summed")
        kind, text = scrape(address)
        kind_om, text_om = scrape(address, "application/openmetrics-text; version=1.0.0")
    assert kind.startswith("text/plain; version=0.0.4")
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stdout + checked.stderr
    assert kind_om.startswith("application/openmetrics-text") and text_om.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(text_om)}
    flows = pd.concat([b.flows for b in SHOP])
    assert sum(s.value for s in families["flowscope_bytes"].samples) == int(flows["bytes"].sum())
    assert families["flowscope_tcp_rtt_seconds"].type == "histogram"


def connections(batches: list[FlowBatch]) -> int:
    """TCP connections opened in the recording: its connect and accept events, one per pair of ends."""
    events = pd.concat([b.events for b in batches])
    opened = events[events["kind"].isin(["connect", "accept"])]
    ends = {frozenset({(r.src_ip, r.src_port), (r.dst_ip, r.dst_port)}) for r in opened.itertuples()}
    return len(ends)


def test_prometheus_holds_exactly_the_replayed_counts_and_every_expression_returns_data(tmp_path: Path) -> None:
    flows = pd.concat([b.flows for b in SHOP], ignore_index=True)
    with agent(tmp_path, SHOP) as address:
        prometheus = Prometheus(tmp_path / "prometheus", [address], rule_files=[RULES]).start()
        try:
            wait_for(lambda: prometheus.value("flowscope_intervals_total") == len(SHOP), 60, "the last interval")
            for direction, part in flows.groupby("direction"):
                for counter in ("packets", "bytes"):
                    expected = int(part[counter].sum())
                    assert prometheus.value(f'flowscope_{counter}_total{{direction="{direction}"}}') == expected
                    # folding and the label context keep every record: the per-workload series add up to the same
                    query = f'sum(flowscope_workload_{counter}_total{{direction="{direction}"}})'
                    assert prometheus.value(query) == expected, query
            dropped = flows[flows["drop_packets"].fillna(0) > 0]
            for reason, part in dropped.groupby("drop_reason"):
                assert prometheus.value(f'flowscope_drops_total{{reason="{reason}"}}') == part["drop_packets"].sum()
                assert prometheus.value(f'flowscope_drop_bytes_total{{reason="{reason}"}}') == part["drop_bytes"].sum()
                assert prometheus.value(f'sum(flowscope_workload_drops_total{{reason="{reason}"}})') == (
                    part["drop_packets"].sum()
                )
            # the host's curl hits a closed port on payments: its NO_SOCKET drop is payments' (the scenario)
            no_socket = prometheus.query('flowscope_workload_drops_total{reason="NO_SOCKET"}')
            assert [(s["metric"]["namespace"], s["metric"]["workload"]) for s in no_socket] == [("shop", "payments")]
            assert prometheus.value("flowscope_tcp_retransmits_total") == flows["retransmits"].sum()
            assert prometheus.value("flowscope_tcp_resets_total") == flows["resets"].sum()
            assert prometheus.value("flowscope_tcp_rtt_seconds_count") == flows["rtt_us"].notna().sum()
            assert prometheus.value("flowscope_tcp_connections_opened_total") == connections(SHOP)
            lost = {
                s["metric"]["source"]: float(s["value"][1]) for s in prometheus.query("flowscope_records_lost_total")
            }
            recorded = {}
            for batch in SHOP:
                for source, count in batch.coverage.sources.items():
                    recorded[source] = recorded.get(source, 0) + count.lost
            assert lost == recorded
            assert recorded["event_ring"] == 2  # the scenario's ring loses 2 events: the alert's series is there
            for where, expr in expressions():
                if any(name in expr for name in LIVE_ONLY):
                    continue
                wait_for(lambda expr=expr: prometheus.query(expr), 60, f"{where}: {expr} returning data")
        finally:
            prometheus.stop()


# ---- the budget ------------------------------------------------------------------------------------------

WORKLOADS, BUDGET, INTERVALS = 12, 5, 8


def load_batch(interval: int) -> FlowBatch:
    """12 workloads of namespace "load" sending at 1,000 to 12,000 bytes; the ranking turns by 3 each
    interval, so keys move in and out of the top 4 (the budget of 5 less "other")."""
    start = pd.Timestamp("2025-03-01T12:00:00Z") + pd.Timedelta(seconds=interval)
    rows = [
        {"time_start": start, "time_end": start + pd.Timedelta(seconds=1), "direction": "egress", "protocol": "UDP",
         "src_ip": f"10.9.0.{w}", "src_port": 40000, "dst_ip": "10.9.1.1", "dst_port": 53, "packets": 1 + w,
         "bytes": ((w + 3 * interval) % WORKLOADS + 1) * 1000, "src_namespace": "load", "src_workload": f"w{w}"}
        for w in range(WORKLOADS)
    ]  # fmt: skip
    flows = flows_frame(pd.DataFrame(rows))
    return FlowBatch(start, start + pd.Timedelta(seconds=1), flows, FlowBatch.empty(start, start).events)


def test_the_budget_caps_the_series_folds_the_rest_and_no_counter_goes_down(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    sink = PrometheusSink(MetricsConfig(address=address, budget=BUDGET), node="node-b")
    sink.open()
    prometheus = Prometheus(tmp_path / "prometheus", [address], scrape_interval="200ms").start()
    try:
        other, total = [], 0
        for interval in range(INTERVALS):
            batch = load_batch(interval)
            total += int(batch.flows["bytes"].sum())
            sink.write(batch)
            wait_for(lambda n=interval + 1: prometheus.value("flowscope_intervals_total") == n, 60, "the scrape")
            assert prometheus.value("count(flowscope_workload_bytes_total)") == BUDGET
            assert prometheus.value('flowscope_metrics_folded_keys{family="flowscope_workload_packets"}') == (
                WORKLOADS - (BUDGET - 1)
            )
            other.append(prometheus.value('flowscope_workload_bytes_total{workload="other"}'))
            assert prometheus.value("sum(flowscope_workload_bytes_total)") <= total
        assert all(later > earlier for earlier, later in itertools.pairwise(other)), other
        assert prometheus.value("flowscope_bytes_total") == total
        # keys moved in and out of the top: more label sets over the run than the budget, none ever reset
        assert prometheus.value("count(count_over_time(flowscope_workload_bytes_total[10m]))") > BUDGET
        assert prometheus.value("sum(resets(flowscope_workload_bytes_total[10m]))") == 0
        assert prometheus.value("sum(resets(flowscope_workload_packets_total[10m]))") == 0
    finally:
        prometheus.stop()
        sink.close()


# ---- where /metrics listens ------------------------------------------------------------------------------


def run_agent(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLOWSCOPE, "agent", "--replay", "/dev/null", "--exit-at-end", "--status-socket", str(tmp_path / "s.sock"),
         *extra],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "FLOWSCOPE_FLOWLOG_ENABLED": "0", "FLOWSCOPE_GRPC_ENABLED": "0"},
    )  # fmt: skip


def test_metrics_off_loopback_need_tls_or_the_force_flag(tmp_path: Path) -> None:
    port = free_port()
    refused = run_agent(tmp_path, "--metrics-addr", f"0.0.0.0:{port}")
    assert (refused.returncode, refused.stderr.splitlines()[-1]) == (
        1,
        f"flowscope agent: --metrics-addr 0.0.0.0:{port} is not loopback: give --metrics-tls-cert and "
        "--metrics-tls-key (or force plaintext with --metrics-plaintext-anywhere).",
    )
    half = run_agent(tmp_path, "--metrics-addr", f"127.0.0.1:{port}", "--metrics-tls-cert", "/dev/null")
    assert half.stderr.splitlines()[-1] == "flowscope agent: TLS needs both --metrics-tls-cert and --metrics-tls-key."
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        in_use = run_agent(tmp_path, "--metrics-addr", busy)
    assert (in_use.returncode, in_use.stderr.splitlines()[-1]) == (
        1,
        f"flowscope agent: cannot serve /metrics on {busy} (Address already in use); choose another --metrics-addr.",
    )
    forced = run_agent(tmp_path, "--metrics-addr", f"0.0.0.0:{port}", "--metrics-plaintext-anywhere")
    assert forced.returncode == 0, forced.stderr
    assert f"/metrics serves plaintext on 0.0.0.0:{port}: anyone who can reach it reads who talks to whom" in (
        forced.stderr
    )


def test_metrics_over_tls_are_read_with_the_ca_and_refused_in_plaintext(tmp_path: Path) -> None:
    from tests.integration.test_grpc_tls import issue

    ca = issue(tmp_path, "ca")
    issue(tmp_path, "server", ca, server=True)
    address = f"127.0.0.1:{free_port()}"
    sink = PrometheusSink(
        MetricsConfig(address=address, tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server-key.pem")),
        node="node-t",
    )
    sink.open()
    try:
        sink.write(SHOP[0])
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with urlopen(f"https://{address}/metrics", context=context, timeout=10) as answer:
            assert intervals_in(answer.read().decode()) == 1
        with pytest.raises((URLError, OSError, http.client.HTTPException)):
            scrape(address)
    finally:
        sink.close()

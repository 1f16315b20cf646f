"""The Prometheus output against Debian's real Prometheus and promtool: /metrics passes `promtool check metrics`
(text and OpenMetrics), the rules pass `promtool check rules` and their unit tests, a Prometheus scraping an
agent that replays a recording holds exactly the recording's packets, bytes, drops, TCP counts and RTT
buckets, every expression of the dashboards and rules gives numbers from a Prometheus that saw the counters move
(not the NaN of a rate of nothing), and the cardinality budget holds with a folded counter that rises and
counters that never go down.

Scrapes are waited for, never slept for: a test waits until Prometheus holds a sample of
flowscope_intervals_total that counts the agent's last interval."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import itertools
import json
import math
import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from urllib.error import URLError
from urllib.request import Request, urlopen

import pandas as pd
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from flowscope.config import MetricsConfig
from flowscope.exporters.prometheus import RTT_BUCKETS, PrometheusSink
from flowscope.pipeline.pipeline import Pipeline
from flowscope.schema import FlowBatch, flows_frame
from tests.integration.servers import Prometheus, free_port
from tests.ui.scenario import QueueSource, shop_batches, write_replay
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
RECORDED = "node_namespace_workload_direction:flowscope_workload_bytes:rate1m"  # a recording rule's series


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


def test_prometheus_holds_exactly_the_replayed_counts(tmp_path: Path) -> None:
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
            seconds = flows["rtt_us"].dropna() / 1e6
            assert prometheus.value("flowscope_tcp_rtt_seconds_sum") == pytest.approx(seconds.sum(), rel=1e-12)
            buckets = prometheus.query("flowscope_tcp_rtt_seconds_bucket")
            assert {float(b["metric"]["le"]): int(b["value"][1]) for b in buckets} == {
                bound: int((seconds <= bound).sum()) for bound in (*RTT_BUCKETS, math.inf)
            }
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
            for part in ("produced", "delivered"):
                stage = {}
                for batch in SHOP:
                    for source, count in batch.coverage.sources.items():
                        stage[source] = stage.get(source, 0) + getattr(count, part)
                got = {
                    s["metric"]["source"]: float(s["value"][1])
                    for s in prometheus.query(f"flowscope_records_{part}_total")
                }
                assert got == stage, part
            # the output's own count: every flow and event row of the recording, none lost (read once a scrape
            # after the last interval has it: the sink counts a batch once its write has returned)
            rows = sum(len(b.flows) + len(b.events) for b in SHOP)
            delivered = 'flowscope_sink_records_delivered_total{sink="prometheus"}'
            wait_for(lambda: prometheus.value(delivered) == rows, 60, f"{rows} rows delivered to the output")
            assert prometheus.value('flowscope_sink_records_produced_total{sink="prometheus"}') == rows
            assert prometheus.value('flowscope_sink_records_lost_total{sink="prometheus"}') == 0
            assert prometheus.value("flowscope_flows_active") == len(SHOP[-1].flows)
            build = prometheus.query("flowscope_build_info")
            assert [(b["metric"]["version"], b["value"][1]) for b in build] == [(version("flowscope"), "1")]
        finally:
            prometheus.stop()


def expressions_give_numbers(prometheus: Prometheus, skip: tuple[str, ...] = ()) -> None:
    """Every dashboard and rule expression, evaluated at one instant just after the recording rules ran on the
    latest scrape, gives at least one sample, and a dashboard's at least one that is a number: a 0/0 rate ratio or
    a quantile of no samples is NaN, which Grafana draws as no data. An alert's ratio may be NaN where nothing
    happened (no connection failed: 0/0); its series must be there."""
    scraped = prometheus.value("timestamp(flowscope_intervals_total)")
    evaluated = f"max(timestamp({RECORDED}))"
    wait_for(lambda: (prometheus.value(evaluated) or 0) > scraped, 60, "the rules evaluated after the last scrape")
    at = prometheus.value(evaluated)
    empty, nan = [], []
    for where, expr in expressions():
        if any(name in expr for name in skip):
            continue
        values = [float(sample["value"][1]) for sample in prometheus.query(expr, time=at)]
        if not values:
            empty.append(f"{where}: {expr}")
        elif not where.startswith("alert") and not any(math.isfinite(v) for v in values):
            nan.append(f"{where}: {expr}")
    assert (empty, nan) == ([], []), "\n".join(["no data:", *empty, "only NaN:", *nan])


def test_every_dashboard_and_rule_expression_gives_numbers_while_the_counters_move(tmp_path: Path) -> None:
    """The pipeline replays the recording one interval per scrape (each published only once Prometheus holds the
    previous one), so every counter moves between scrapes and the rates are of real increments."""
    address = f"127.0.0.1:{free_port()}"
    pipeline = Pipeline(QueueSource(), [PrometheusSink(MetricsConfig(address=address))])
    prometheus = Prometheus(tmp_path / "prometheus", [address], rule_files=[RULES]).start()
    pipeline.start()
    try:
        wait_for(lambda: prometheus.value("flowscope_intervals_total") == 0, 60, "a scrape before the first interval")
        for count, batch in enumerate(SHOP, 1):
            pipeline.publish(batch)
            wait_for(lambda n=count: prometheus.value("flowscope_intervals_total") == n, 60, f"the scrape of {count}")
        expressions_give_numbers(prometheus, LIVE_ONLY)
    finally:
        prometheus.stop()
        pipeline.close()


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
        other, folds, total = [], [], 0
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
            folds.append(prometheus.value('flowscope_metrics_folds_total{family="flowscope_workload_bytes"}'))
            assert prometheus.value("sum(flowscope_workload_bytes_total)") <= total
        assert all(later > earlier for earlier, later in itertools.pairwise(other)), other
        # the folded counter: the 8 keys beyond the budget at first, then every key that falls out of the top
        assert folds[0] == WORKLOADS - (BUDGET - 1) and folds[-1] > folds[0], folds
        assert all(later >= earlier for earlier, later in itertools.pairwise(folds)), folds
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

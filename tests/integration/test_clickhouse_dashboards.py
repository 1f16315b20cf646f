"""The ClickHouse dashboards: the committed JSON is what scripts/grafana_clickhouse.py writes, and every query
in them (panels and variables) runs and returns rows — against Debian's clickhouse-server 18.16 holding an
agent's replay, and against a current ClickHouse (chDB, in-process) with the modern DDL."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flowscope.formats.clickhouse import Layout, bootstrap, insert_columns, migrations
from tests.integration.servers import ClickHouse
from tests.ui.scenario import shop_batches, write_replay

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana" / "clickhouse"
FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
SHOP = shop_batches()
# The recording's span, as Grafana would ask for it
FROM, TO = pd.Timestamp("2025-03-01T11:59:00Z"), pd.Timestamp("2025-03-01T12:05:00Z")


def generator():
    spec = importlib.util.spec_from_file_location("grafana_clickhouse", ROOT / "scripts" / "grafana_clickhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def queries() -> list[tuple[str, str]]:
    """(where, SQL) of every panel target and query variable of the committed dashboards."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                found.append((f"{path.name} variable {variable['name']}", variable["query"]))
        for panel in board["panels"]:
            for target in panel["targets"]:
                found.append((f"{path.name} {panel['title']} {target['refId']}", target["rawSql"]))
    return found


def as_grafana_sends(sql: str, database: str, selected: dict[str, str]) -> str:
    """The SQL with the macros and variables expanded as Grafana and the ClickHouse plugin expand them."""
    sql = re.sub(
        r"\$__timeFilter\((\w+)\)",
        lambda m: (
            f"{m.group(1)} >= toDateTime({int(FROM.timestamp())}) AND {m.group(1)} <= toDateTime({int(TO.timestamp())})"
        ),
        sql,
    )
    sql = sql.replace("$__interval_s", "60").replace("${database}", database)
    for name in ("node", "namespace", "workload"):
        sql = sql.replace(f"${{{name}:regex}}", selected.get(name, ".*"))
    assert not re.search(r"\$(__|\{)", sql), sql  # every macro and variable expanded
    return sql


def test_the_committed_dashboards_are_what_the_script_writes():
    written = {path.name: json.loads(path.read_text()) for path in DASHBOARDS.glob("*.json")}
    assert written == generator().dashboards()


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> ClickHouse:
    """A clickhouse-server holding the shop recording, written by the agent."""
    root = tmp_path_factory.mktemp("dashboards")
    server = ClickHouse(root).start()
    recording = write_replay(root / "shop.jsonl", SHOP)
    result = subprocess.run(
        [FLOWSCOPE, "agent", "--replay", str(recording), "--exit-at-end", "--status-socket", str(root / "a.sock"),
         "--grpc-socket", str(root / "api.sock"), "--hubble-socket", str(root / "hubble.sock"),
         "--clickhouse", server.url(database="flowscope"), "--clickhouse-batch-age", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "FLOWSCOPE_FLOWLOG_ENABLED": "0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    yield server
    server.stop()


SELECTIONS = [{}, {"namespace": "(shop)", "workload": "(payments|checkout)", "node": "(node-a)"}]


@pytest.mark.parametrize("selected", SELECTIONS, ids=["all", "shop"])
def test_every_query_returns_rows_on_the_old_server(stored, selected):
    for where, sql in queries():
        rows = stored.query(as_grafana_sends(sql, "flowscope", selected))
        assert rows.strip(), f"{where} returned no rows"


def test_the_totals_panel_agrees_with_the_recording(stored):
    (totals,) = [sql for where, sql in queries() if where.startswith("flows.json Totals")]
    flows = pd.concat([b.flows for b in SHOP])
    expected = [len(flows), flows["packets"].sum(), flows["bytes"].sum(), flows["drop_packets"].sum()]
    assert stored.query(as_grafana_sends(totals, "flowscope", {})) == "\t".join(map(str, expected)) + "\n"
    assert expected == [22, 1120, 1281388, 15]


def sql_literal(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"unhex('{value.hex()}')"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def test_every_query_returns_rows_on_a_current_clickhouse(tmp_path):
    from chdb import session

    current = session.Session(str(tmp_path / "chdb"))
    with_ttl = Layout("flowscope_ttl", (26, 9))  # the modern DDL as the agent sends it: accepted
    for statement in bootstrap(with_ttl) + [s for _v, statements in migrations(with_ttl) for s in statements]:
        current.query(statement)
    ttl = current.query("SHOW CREATE TABLE flowscope_ttl.flows", "TSVRaw").bytes().decode()
    assert "LowCardinality(Nullable(String))" in ttl and "TTL time + toIntervalDay(30)" in ttl
    layout = Layout("flowscope", (26, 9), ttl_days=0)  # the recording is from 2025: a TTL would expire it
    for statement in bootstrap(layout) + [s for _v, statements in migrations(layout) for s in statements]:
        current.query(statement)
    for batch in SHOP:
        for table, frame in (("flows", batch.flows), ("events", batch.events)):
            if len(frame):
                names, columns = insert_columns(table, frame, f"block-{table}-{batch.time_end.value}")
                values = ", ".join(
                    "(" + ", ".join(sql_literal(column[row]) for column in columns) + ")" for row in range(len(frame))
                )
                current.query(f"INSERT INTO flowscope.{table} ({', '.join(names)}) VALUES {values}")
    modern = current.query("SHOW CREATE TABLE flowscope.flows", "TSVRaw").bytes().decode()
    assert "LowCardinality(Nullable(String))" in modern and "CODEC(Delta(4), ZSTD(1))" in modern
    for selected in SELECTIONS:
        for where, sql in queries():
            rows = current.query(as_grafana_sends(sql, "flowscope", selected), "TSV").bytes().decode()
            assert rows.strip(), f"{where} returned no rows on ClickHouse 26"
    (totals,) = [sql for where, sql in queries() if where.startswith("flows.json Totals")]
    assert current.query(as_grafana_sends(totals, "flowscope", {}), "TSV").bytes().decode() == "22\t1120\t1281388\t15\n"


def test_the_service_map_gives_the_node_graph_its_frames(stored):
    """Grafana's node graph reads a nodes frame (id, title, mainstat) and an edges frame (id, source, target,
    mainstat); every edge joins two nodes, and together they are the recording's workload pairs and bytes."""
    sql = {where.rsplit(" ", 1)[1]: sql for where, sql in queries() if where.startswith("service-map.json")}

    def frame(ref_id: str) -> pd.DataFrame:
        text = stored.query(as_grafana_sends(sql[ref_id], "flowscope", {}) + " FORMAT TabSeparatedWithNames")
        header, *rows = [line.split("\t") for line in text.splitlines()]
        return pd.DataFrame(rows, columns=header)

    nodes, edges = frame("nodes"), frame("edges")
    assert (list(nodes.columns), list(edges.columns)) == (
        ["id", "title", "mainstat"],
        ["id", "source", "target", "mainstat"],
    )
    assert set(edges["source"]) | set(edges["target"]) <= set(nodes["id"]) and nodes["id"].is_unique
    flows = pd.concat([b.flows for b in SHOP])

    def end(side: str) -> pd.Series:
        known = flows[f"{side}_workload"].notna() & (flows[f"{side}_workload"] != "")
        return (flows[f"{side}_namespace"] + "/" + flows[f"{side}_workload"]).where(known, "unknown")

    pairs = flows.assign(source=end("src"), target=end("dst")).groupby(["source", "target"])["bytes"].sum()
    got = edges.assign(mainstat=edges["mainstat"].astype(int)).set_index(["source", "target"])["mainstat"]
    assert got.sort_index().to_dict() == {k: int(v) for k, v in pairs.sort_index().items()}

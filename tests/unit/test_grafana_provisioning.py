"""Grafana file provisioning: the providers point at exactly the dashboard folders we ship, the example
datasources are of the types the dashboards ask for, and every panel takes its datasource from the variable."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
PLUGIN = {"prometheus": "prometheus", "clickhouse": "grafana-clickhouse-datasource"}  # folder -> datasource type


def provisioning(kind: str) -> list[dict]:
    return [yaml.safe_load(path.read_text()) for path in sorted((GRAFANA / "provisioning" / kind).glob("*.yaml"))]


def panels(items: list[dict]) -> list[dict]:
    return [p for item in items for p in [item, *panels(item.get("panels", []))]]


def test_the_dashboard_providers_name_every_folder_of_dashboards_once() -> None:
    (config,) = provisioning("dashboards")
    paths = [p["options"]["path"] for p in config["providers"]]
    assert [p["type"] for p in config["providers"]] == ["file", "file"]
    assert sorted(Path(p).name for p in paths) == sorted(d.name for d in GRAFANA.iterdir() if list(d.glob("*.json")))
    assert len({p["folder"] for p in config["providers"]}) == len(paths)


def test_the_example_datasources_are_of_the_types_the_dashboards_ask_for_and_hold_no_secret() -> None:
    sources = [s for config in provisioning("datasources") for s in config["datasources"]]
    assert sorted(s["type"] for s in sources) == sorted(PLUGIN.values())
    clickhouse = next(s for s in sources if s["type"] == PLUGIN["clickhouse"])
    assert clickhouse["secureJsonData"]["password"] == "$CLICKHOUSE_PASSWORD"  # from Grafana's environment


def test_every_panel_and_query_takes_its_datasource_from_the_variable_of_its_folders_type() -> None:
    uids = []
    for folder, plugin in PLUGIN.items():
        for path in sorted((GRAFANA / folder).glob("*.json")):
            board = json.loads(path.read_text())
            uids.append(board["uid"])
            (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
            assert (variable["name"], variable["query"]) == ("datasource", plugin), path.name
            wanted = {"type": plugin, "uid": "${datasource}"}
            for panel in panels(board["panels"]):
                if panel["type"] == "row":
                    continue
                assert panel["datasource"] == wanted, (path.name, panel["title"])
                assert all(t.get("datasource", wanted) == wanted for t in panel.get("targets", [])), panel["title"]
    assert len(uids) == len(set(uids)) == 5

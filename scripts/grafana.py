"""What the Grafana dashboard generators (scripts/grafana_clickhouse.py, scripts/grafana_prometheus.py) share:
the datasource and selection variables, panels, the dashboard frame and writing the committed JSON."""

from __future__ import annotations

import json
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "grafana"


def datasource_variable(plugin: str, label: str) -> dict:
    """The datasource as a variable: every panel reads `${datasource}`, so one dashboard serves any instance."""
    return {"name": "datasource", "label": label, "type": "datasource", "query": plugin, "current": {}, "hide": 0}


def query_variable(name: str, query: str, datasource: dict) -> dict:
    """A multi-valued selection whose All is the regular expression `.*`."""
    return {
        "name": name, "label": name, "type": "query", "datasource": datasource, "query": query,
        "definition": query, "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"text": "All", "value": "$__all"}, "sort": 1,
    }  # fmt: skip


def panel(
    title: str, kind: str, targets: list[dict], grid: tuple[int, int, int, int], datasource: dict, **extra: object
) -> dict:
    x, y, w, h = grid
    return {
        "type": kind, "title": title, "datasource": datasource, "targets": targets,
        "gridPos": {"x": x, "y": y, "w": w, "h": h}, **extra,
    }  # fmt: skip


def dashboard(uid: str, title: str, description: str, tag: str, variables: list[dict], panels: list[dict]) -> dict:
    for number, item in enumerate(panels, 1):
        item["id"] = number
    return {
        "uid": uid, "title": title, "description": description, "tags": ["flowscope", tag],
        "timezone": "utc", "schemaVersion": 39, "version": 1, "editable": True, "refresh": "1m",
        "time": {"from": "now-1h", "to": "now"}, "templating": {"list": variables}, "panels": panels,
        "annotations": {"list": []},
    }  # fmt: skip


def write(folder: str, dashboards: dict[str, dict]) -> None:
    out = DEPLOY / folder
    out.mkdir(parents=True, exist_ok=True)
    for name, content in dashboards.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
        print(f"wrote {out / name}")

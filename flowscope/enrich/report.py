"""Identity health for people: `flowscope doctor` lines and the one-line capture summary."""

from __future__ import annotations

from typing import Any

from flowscope.config import IdentityConfig
from flowscope.enrich import IdentityConfigError, build_enricher


def identity_report(identity: IdentityConfig, wait: float = 3.0) -> dict[str, Any]:
    """Health of the identity sources the settings configure, after up to `wait` seconds for the API's first list."""
    try:
        enricher = build_enricher(identity)
    except IdentityConfigError as err:
        return {"error": str(err)}
    try:
        kubernetes = enricher.sources.get("kubernetes")
        if kubernetes is not None:
            kubernetes.wait_synced(wait)
        return enricher.health()
    finally:
        enricher.close()


def _objects(counts: dict[str, int]) -> str:
    shown = ("pods", "services", "nodes", "replicasets", "jobs", "networks")
    return ", ".join(f"{counts[name]} {name}" for name in shown if counts.get(name))


def identity_lines(report: dict[str, Any]) -> list[str]:
    if "error" in report:
        return [f"identity      error: {report['error']}"]
    lines = [f"identity      node name {report['node_name']}; deleted pods named for {report['grace_seconds']:g} s"]
    sources = report["sources"]
    node = sources.get("node")
    if node is not None:
        detail = (
            f"cgroup v2 at {node['cgroup_root']}: {node['pods']} pods, {node['containers']} containers, "
            f"{node['pod_netns']} pod netns, {node['pod_interfaces']} pod interfaces"
            if node["cgroup_root"]
            else ""
        )
        note = f" ({node['note']})" if node.get("note") else ""
        lines.append(f"  node        {node['state']:<12} {detail}{note}".rstrip())
    kubernetes = sources.get("kubernetes")
    if kubernetes is None:
        lines.append("  kubernetes  off          not in a pod and no --kubeconfig")
    else:
        objects = _objects(kubernetes["objects"]) or "nothing listed yet"
        lines.append(f"  kubernetes  {kubernetes['state']:<12} {kubernetes['server']} ({kubernetes['kubeconfig']}): "
                     f"{objects}; {kubernetes['skipped_objects']} malformed objects skipped")  # fmt: skip
        for name, resource in kubernetes["resources"].items():
            if resource["last_error"] and resource["state"] != "watching":
                lines.append(f"  {'':<11} {name}: {resource['last_error']}")
    static = sources.get("static")
    if static is not None:
        lines.append(f"  static      {static['state']:<12} {static['file']}: {_objects(static['objects'])}")
    return lines


def identity_summary(report: dict[str, Any]) -> str:
    """One line for the end of a capture: how many sides were named, by what, and what was missed."""
    resolved = report["resolved"]
    named = sum(resolved.values())
    by_source = ", ".join(f"{source} {count}" for source, count in resolved.items())
    misses = ", ".join(f"{kind} {count}" for kind, count in report["misses"].items())
    line = f"identity: {named} of {named + report['unresolved']} sides named"
    line += f" ({by_source})" if by_source else ""
    return line + (f"; misses: {misses}" if misses else "")

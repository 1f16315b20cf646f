"""Renders deploy/helm/flowscope as `helm template` would, with render.go (Go's text/template and sprig from
Debian: Debian 12 has no Helm package), and reads the manifests back."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "flowscope"
RENDERER = Path(__file__).with_name("render.go")
GOPATH = "/usr/share/gocode"  # Debian's Go source packages (sprig, yaml.v2)


class RenderError(RuntimeError):
    pass


@functools.cache
def renderer(build_dir: Path) -> Path:
    """Builds render.go offline against Debian's Go packages (GOPATH mode: no module download)."""
    if shutil.which("go") is None:
        raise RenderError("go missing: make setup-test installs golang-go and golang-github-masterminds-sprig-dev")
    binary = build_dir / "render"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": "", "GOCACHE": str(build_dir / "cache")}
    result = subprocess.run(
        ["go", "build", "-o", str(binary), str(RENDERER)], capture_output=True, text=True, env=env, timeout=300
    )
    if result.returncode != 0:
        raise RenderError(f"go build of render.go failed: {result.stderr}")
    return binary


def render_text(
    binary: Path,
    *values: Path,
    kube_version: str = "v1.35.0",
    name: str = "fs",
    namespace: str = "flowscope",
    cluster: Path | None = None,
    notes: bool = False,
) -> str:
    """The manifests (or, with `notes`, the NOTES.txt helm install prints); `cluster` is a YAML stream of the
    objects Helm's lookup finds (as at an upgrade)."""
    argv = [str(binary), "-chart", str(CHART), "-name", name, "-namespace", namespace, "-kube-version", kube_version]
    if cluster is not None:
        argv += ["-cluster", str(cluster)]
    if notes:
        argv.append("-notes")
    for path in values:
        argv += ["-f", str(path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return result.stdout


def manifests(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, f"{len(matches)} {kind} objects named *{suffix}"
    return matches[0]

"""The tree's architecture, checked: imports point down the data path only (DESIGN.md), there is no import
circle, and the core imports without the heavy libraries that live at the edges."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Where each installed package's sources live (pyproject.toml's package-dir).
SOURCE_DIRS = {
    "flowscope": ROOT / "flowscope",
    "flowscope.ui": ROOT / "ui",
    "flowscope.exporters": ROOT / "exporters",
    "flowscope.proto": ROOT / "proto",
}

# Lowest first: a module may import from its own layer and the layers before it, never from a later one.
LAYERS = (
    ("flowscope.schema", "flowscope.coverage", "flowscope.display", "flowscope.config"),  # contracts, settings
    ("flowscope.kernel",),  # the running kernel: facts, BTF, offsets, names, loading, tc
    ("flowscope.readers",),  # maps, ring and perf buffers
    ("flowscope.decode",),  # one interval's drain -> FlowBatch
    ("flowscope.enrich",),  # identity
    ("flowscope.filters", "flowscope.formats"),  # the filter language; records on disk
    ("flowscope.pipeline",),  # sources, fan-out to sinks
    ("flowscope.proto",),  # the gRPC wire (an edge, like the sinks): protos, their codec, the client
    ("flowscope.analysis",),  # pandas over FlowBatches and flow logs
    ("flowscope.exporters",),  # the sinks
    ("flowscope.ui",),  # display only
    ("flowscope.cli", "flowscope.__main__"),
)
HEAVY = ("bcc", "textual", "grpc", "clickhouse_driver", "pyarrow", "prometheus_client")
CORE = ("kernel", "readers", "decode", "enrich", "pipeline", "analysis", "formats")


def modules() -> dict[str, Path]:
    found = {}
    for package, directory in SOURCE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """flowscope modules that `name` imports anywhere in its text (lazy imports in functions included)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import (flowscope imports absolutely)"
            base = node.module or ""
            # `from package import module` imports the module; `from package import name`, the package
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {t for t in targets if t in known and t != name}


def layer(name: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(f"{p}.") for p in prefixes):
            return index
    raise AssertionError(f"{name} belongs to no layer of DESIGN.md's data path: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_place_on_the_data_path() -> None:
    for name in graph():
        if name != "flowscope":
            layer(name)


def test_imports_point_down_the_data_path_only() -> None:
    upward = sorted(
        f"{name} imports {target}"
        for name, targets in graph().items()
        if name != "flowscope"
        for target in targets
        if target != "flowscope" and layer(target) > layer(name)
    )
    assert upward == []


def test_there_is_no_import_circle() -> None:
    edges = graph()
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_the_core_imports_without_the_edge_libraries() -> None:
    core = sorted(n for n in graph() if n.split(".")[1:2] and n.split(".")[1] in CORE)
    # pandas 3 loads pyarrow itself where it is installed (its string dtype): what counts is what flowscope adds
    script = (
        "import importlib, sys\nimport numpy, pandas\n"
        f"before = {{m for m in {HEAVY!r} if m in sys.modules}}\n"
        f"for name in {core!r}:\n    importlib.import_module(name)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules and m not in before))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_core_imports_the_edge_libraries_only_inside_functions() -> None:
    """The static side of the check above: pandas itself loads pyarrow, which hides a module-level import."""
    found = []
    for name, path in modules().items():
        if not (name.split(".")[1:2] and name.split(".")[1] in CORE):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:  # module level only; a function's imports run when it is called
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{name} imports {n}" for n in names if n.split(".")[0] in HEAVY]
    assert found == []

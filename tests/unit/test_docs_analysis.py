"""docs/analysis.md's examples run, and their outputs are the ones the document shows. To rewrite the outputs
after a deliberate change: `python -m tests.unit.test_docs_analysis`."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "analysis.md"
BLOCK = re.compile(r"```(python|console)\n(.*?)```\n(?:\n```text\n.*?```\n)?", re.S)


def run_python(code: str, namespace: dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pd.option_context("display.width", 120, "display.max_columns", 20):
        exec(compile(code, str(DOC), "exec"), namespace)
    return out.getvalue()


def run_console(block: str) -> str:
    lines = []
    for command in (line[2:] for line in block.splitlines() if line.startswith("$ ")):
        argv = command.split()
        result = subprocess.run(
            [str(Path(sys.executable).with_name(argv[0])), *argv[1:]], capture_output=True, text=True, cwd=ROOT,
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        lines += [f"$ {command}", *result.stdout.rstrip("\n").splitlines()]
    return "\n".join(lines) + "\n"


def rendered(text: str) -> str:
    """The document with every example's output as it is now."""
    namespace: dict = {}

    def render(match: re.Match) -> str:
        kind, code = match.group(1), match.group(2)
        if kind == "python":
            return f"```python\n{code}```\n\n```text\n{run_python(code, namespace)}```\n"
        commands = "\n".join(line for line in code.splitlines() if line.startswith("$ ")) + "\n"
        return f"```console\n{run_console(commands)}```\n"

    return BLOCK.sub(render, text)


def test_the_examples_print_what_the_document_shows(monkeypatch):
    monkeypatch.chdir(ROOT)
    text = DOC.read_text()
    assert rendered(text) == text


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    DOC.write_text(rendered(DOC.read_text()))

"""Kernel tests run by a user other than root: skipped on a workstation, a failure when CI is set (a CI run
without root would otherwise pass with every kernel test skipped). The run is a pytest in a process of its own
whose os.geteuid() answers 1000."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AS_A_USER = (
    "import os, sys, pytest; os.geteuid = lambda: 1000; "
    "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--basetemp', sys.argv[1], "
    "'tests/kernel/test_compile_child.py::test_a_load_error_in_the_child_is_one_sentence']))"
)


@pytest.mark.parametrize(("ci", "code", "outcome"), [(None, 0, "1 skipped"), ("1", 1, "1 error")])
def test_without_root_kernel_tests_skip_or_fail_in_ci(tmp_path, ci, code, outcome):
    environment = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    result = subprocess.run(
        [sys.executable, "-c", AS_A_USER, str(tmp_path / "t")], cwd=ROOT, env=environment, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == code, result.stdout + result.stderr
    assert outcome in result.stdout.splitlines()[-1]
    if ci:
        assert "(CI is set, so not running them fails)" in result.stdout

"""`make setup` is idempotent: once set up, running it again installs nothing (no apt, no pip) and says nothing.

apt and pip are replaced by stand-ins that record any call and fail, so the test never installs anything, as
root in CI either. The venv's pip runs as `.venv/bin/python -m pip`, which make echoes (its recipe line has
no @), so a pip run shows in make's output.
"""

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALLERS = ("apt-get", "apt", "apt-cache", "aptitude", "debconf-set-selections", "pip", "pip3")
STAMPS = (".stamp-venv", ".venv/bin/python", ".venv/distro-bcc/bcc")


def make_setup(shims: Path, log: Path) -> subprocess.CompletedProcess:
    # A make above this one (`make test`) exports its flags and job server; this make is a fresh one.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    env["PATH"] = f"{shims}:{env['PATH']}"
    env["INSTALLER_LOG"] = str(log)
    return subprocess.run(["make", "setup"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_make_setup_a_second_time_does_nothing(tmp_path):
    shims, log = tmp_path / "bin", tmp_path / "installers.log"
    shims.mkdir()
    for name in INSTALLERS:
        shim = shims / name
        shim.write_text(f'#!/bin/sh\necho "{name} $*" >> "$INSTALLER_LOG"\nexit 1\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    first = make_setup(shims, log)  # nothing to do after `make test`'s own set-up; else it sets up the venv
    assert not log.exists(), f"`make setup` is not done here (run it as root first); it ran: {log.read_text()}"
    assert first.returncode == 0, first.stderr
    before = {name: (ROOT / name).lstat().st_mtime_ns for name in STAMPS}

    second = make_setup(shims, log)
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert not log.exists()
    assert {name: (ROOT / name).lstat().st_mtime_ns for name in STAMPS} == before

"""`make install` into a fresh Debian 12 root (mmdebstrap of the runtime packages and systemd), booted with
systemd-nspawn in a lab network namespace: systemd starts the installed unit (enabled with `systemctl --root`),
the agent logs the lab's traffic with the exact packet and byte counts sent, and stops cleanly when the
machine powers off."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.kernel.agent_runs import assert_agent_logs_lab_traffic
from tests.kernel.image import ROOT, SMALLEST
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import two_hosts

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh root (1 min here with Debian's packages cached) with `make install DESTDIR=` run into it."""
    root = tmp_path_factory.mktemp("install") / "root"
    packages = [
        line.split("#")[0].strip() for line in (ROOT / "deploy" / "image" / "packages").read_text().splitlines()
    ]
    subprocess.run(
        ["mmdebstrap", "--quiet", "--mode=root", "--variant=minbase", "--format=directory",
         f"--include={','.join([p for p in packages if p] + ['systemd', 'dbus'])}",
         "--skip=download/empty", "--skip=essential/unlink",
         "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
         "--setup-hook=sync-in /var/cache/apt/archives/ /var/cache/apt/archives/",
         "--customize-hook=rm -rf \"$1\"/var/cache/apt/archives/*.deb",
         "bookworm", str(root), "http://deb.debian.org/debian"],
        check=True, timeout=1200,
    )  # fmt: skip
    subprocess.run(["make", "-C", str(ROOT), "install", f"DESTDIR={root}"], check=True, timeout=900)
    return root


def test_make_install_puts_everything_in_place(installed: Path) -> None:
    unit = (installed / "etc/systemd/system/flowscope.service").read_text()
    assert unit == (ROOT / "deploy/systemd/flowscope.service").read_text()
    assert (installed / "etc/flowscope/agent.yaml").read_text() == (ROOT / "deploy/agent.yaml").read_text()
    assert (installed / "var/lib/flowscope").stat().st_mode & 0o777 == 0o750
    result = subprocess.run(
        ["chroot", str(installed), "flowscope", "agent", "--print-config", "--config", "/etc/flowscope/agent.yaml"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "directory: /var/lib/flowscope" in result.stdout


def test_systemd_starts_the_installed_agent_in_the_booted_root(installed: Path, tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    data, run, log = tmp_path / "data", tmp_path / "run", tmp_path / "log"
    for directory in (data, run, log):
        directory.mkdir()
    subprocess.run(["systemctl", f"--root={installed}", "enable", "flowscope"], check=True, capture_output=True)
    # The test reads the agent's stderr from a file (the unit itself is as installed).
    dropin = installed / "etc/systemd/system/flowscope.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "test-log.conf").write_text("[Service]\nStandardError=file:/var/log/flowscope-test/agent.log\n")
    nspawn = [
        "systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit", f"--directory={installed}",
        f"--network-namespace-path=/run/netns/{hosts.a.name}",
        # the capabilities of the unit's bounding set that the agent needs (tests/kernel/image.py SMALLEST)
        f"--capability={','.join('CAP_' + c for c in SMALLEST)}",
        # nspawn's own seccomp filter refuses bpf() and perf_event_open() ("could not open bpf map: ...
        # Operation not permitted"); a host's systemd has no such filter around the unit
        "--system-call-filter=bpf perf_event_open",
        "--bind=/sys/fs/bpf", "--bind-ro=/sys/kernel/tracing", "--bind-ro=/lib/modules",
        f"--bind={data}:/var/lib/flowscope", f"--bind={run}:/run/flowscope", f"--bind={log}:/var/log/flowscope-test",
    ]  # fmt: skip
    assert_agent_logs_lab_traffic(
        hosts,
        lambda: subprocess.Popen(nspawn, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
        lambda machine: machine.send_signal(signal.SIGTERM),  # nspawn powers the machine off: systemd stops units
        run / "agent.sock",
        data,
    )
    lines = (log / "agent.log").read_text().splitlines()
    assert "agent running on" in lines[0] and "lost nothing" in lines[-1], lines

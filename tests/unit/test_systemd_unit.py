"""The systemd unit under deploy/ is one systemd accepts, and grants the agent what its loader checks for."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "flowscope.service"
INSTALLED = "/opt/flowscope/bin/flowscope"


def test_systemd_verifies_the_unit(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: make setup-test installs systemd"
    unit = tmp_path / "flowscope.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(Path(sys.executable).with_name("flowscope"))))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_unit_keeps_the_capabilities_the_loader_requires():
    text = UNIT.read_text()
    bounding = set(re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M).group(1).split())
    assert {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"} <= bounding  # flowscope.kernel.loader.require_privileges
    assert re.search(rf"^ExecStart={INSTALLED} agent --config /etc/flowscope/agent.yaml$", text, re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, re.M)  # SIGHUP reopens the flow log

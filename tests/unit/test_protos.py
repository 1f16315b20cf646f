"""The generated Python of proto/ is what its .proto files generate now (scripts/protos --check)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_generated_code_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "protos"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert (result.returncode, result.stderr) == (0, "")

"""The process settings that give each interval's freed batch back to the system, in a fresh interpreter (they
must come before pandas loads pyarrow)."""

from __future__ import annotations

import os
import subprocess
import sys

PROGRAM = """
from flowscope.pipeline.memory import return_freed_memory
took = return_freed_memory()
import pandas, pyarrow
print(took, pyarrow.default_memory_pool().backend_name)
"""


def run(**environment: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"} | environment
    return subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True).stdout


def test_glibc_takes_the_threshold_and_arrow_uses_the_system_allocator():
    assert run() == "True system\n"


def test_an_arrow_pool_the_user_chose_is_kept():
    assert run(ARROW_DEFAULT_MEMORY_POOL="mimalloc") == "True mimalloc\n"

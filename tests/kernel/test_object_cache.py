"""The compiled-object cache with the real compile step: a restart on the same kernel loads what the first
start compiled (the same programs, attached the same way), and a corrupt entry is rebuilt, never loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowscope.kernel.compile_child import load
from flowscope.kernel.loader import LoadedProbes, LoadOptions


def started(cache: Path) -> tuple[str, list[tuple[object, ...]], list[str]]:
    """Loads the probes with the cache at `cache`: (what the cache did, each program's name, attach point and
    instruction count, the attachments), then unloads them."""
    loaded: LoadedProbes = load(LoadOptions(object_cache=str(cache), ring_pages=64))
    try:
        programs = [(p["name"], p["attach"], p["instructions"]) for p in loaded.verifier]
        assert all(p["translated_instructions"] > 0 for p in loaded.verifier)  # the kernel holds each one
        return loaded.object_cache, programs, sorted(loaded.attachments)
    finally:
        loaded.close()


@pytest.mark.kernel_matrix
def test_a_restart_loads_the_compiled_probes_from_the_cache_and_a_corrupt_entry_is_rebuilt(tmp_path: Path) -> None:
    outcome, programs, attachments = started(tmp_path)
    assert outcome == "miss"
    assert any(attach.startswith(("raw_tracepoint:", "kprobe:")) for attach in attachments)
    (entry,) = tmp_path.iterdir()
    assert started(tmp_path) == ("hit", programs, attachments)
    raw = bytearray(entry.read_bytes())
    raw[len(raw) // 2] ^= 0x20  # one bit in the middle of the bytecode's text
    entry.write_bytes(bytes(raw))
    assert started(tmp_path) == ("rebuilt: its checksum does not match its content", programs, attachments)
    assert started(tmp_path) == ("hit", programs, attachments)  # the rebuilt entry is sound

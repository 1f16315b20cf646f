"""`flowscope doctor -o json` on the running kernel, checked against what the kernel itself shows: its
release, whether it has kprobes (tracefs' kprobe_events), its drop reasons (bpftool's dump of its BTF:
how many, and whether SKB_CONSUMED is one), the hooks each family chose, and a verifier report of every program
that the load check loaded. Part of the kernel matrix: the facts differ between 6.1, 6.12 and this machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from flowscope.kernel.btf import VMLINUX_BTF
from tests.kernel.capture import FLOWSCOPE
from tests.kernel.tracepoint_lab import RAW_TRACEPOINTS

TRACEFS = Path("/sys/kernel/tracing")


@pytest.mark.kernel_matrix
def test_doctor_reports_the_facts_of_the_running_kernel() -> None:
    result = subprocess.run([FLOWSCOPE, "doctor", "-o", "json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "warning:" not in result.stderr  # the compiler's diagnostics never reach the user
    report = json.loads(result.stdout)
    assert report["kernel"] == os.uname().release
    has_kprobes = (TRACEFS / "kprobe_events").exists()
    assert report["features"]["kprobes"] is has_kprobes
    btf = subprocess.run(
        ["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"], capture_output=True, text=True, check=True
    ).stdout
    reasons = re.search(r"^\[\d+\] ENUM 'skb_drop_reason' .* vlen=(\d+)$((?:\n\t.*)*)", btf, re.MULTILINE)
    if reasons is None:
        assert report["drop_reasons"].startswith("the kernel has no drop reasons"), report["drop_reasons"]
    else:
        assert report["drop_reasons"].startswith(f"{reasons.group(1)} names from the kernel's enum skb_drop_reason")
        consumed = "\t'SKB_CONSUMED' val=" in reasons.group(2)
        assert ("no SKB_CONSUMED" in report["drop_reasons"]) is not consumed, report["drop_reasons"]
    probes = {probe["name"]: probe for probe in report["probes"]}
    assert probes["skb_drop"]["active"], probes["skb_drop"]  # on every kernel, whichever reasons it has
    families = {family["name"]: family["uses"] for family in report["families"]}
    assert families == {
        "tc_flows": "tc clsact",
        "skb_drop": "raw tracepoint",
        "tcp_events": "raw tracepoint",
        "sock_state": "raw tracepoint",
    }
    assert report["load_check"].startswith("ok"), report["load_check"]
    programs = {program["attach"]: program for program in report["verifier"]["programs"]}
    assert set(programs) == {"tc", *(f"raw_tracepoint:{hook}" for hook in RAW_TRACEPOINTS)}
    for program in report["verifier"]["programs"]:
        # Linux 5.16 on says how many instructions the verifier processed.
        assert program["verified_instructions"] > 0 and program["instructions"] > 0, program
        assert program["translated_instructions"] > 0 and program["load_ms"] > 0, program


def test_doctor_names_each_probe_that_cannot_run_with_its_reason_and_remedy() -> None:
    """Doctor in a mount namespace where the kernel's BTF reads as empty (/dev/null bound over it): the
    raw tracepoint families need BTF, so each says why not and what would help; tc needs none and loads."""
    script = f"mount --bind /dev/null {VMLINUX_BTF} && exec {FLOWSCOPE} doctor -o json"
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    unreadable = f"the kernel's BTF at {VMLINUX_BTF} is unreadable: BTF data is too short to hold a header"
    assert (report["features"]["btf"], report["features"]["btf_error"]) == (None, unreadable)
    probes = {probe["name"]: probe for probe in report["probes"]}
    needs_btf = {"skb_drop", "tcp_events", "sock_state"}
    btf_remedy = "a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    for name in needs_btf:
        assert (probes[name]["active"], probes[name]["reason"], probes[name]["remedy"]) == (
            False, unreadable, btf_remedy,
        ), probes[name]  # fmt: skip
    assert (probes["tc_flows"]["active"], probes["tc_flows"]["reason"], probes["tc_flows"]["remedy"]) == (
        True, None, None,
    )  # fmt: skip
    kprobes = (TRACEFS / "kprobe_events").exists()
    for name in (f"{family}_kprobe" for family in needs_btf):
        if kprobes:  # the kprobe variant stands in for its tracepoint family
            assert probes[name]["active"], probes[name]
        else:
            assert (probes[name]["active"], probes[name]["reason"], probes[name]["remedy"]) == (
                False,
                "the kernel is built without kprobes (CONFIG_KPROBES is not set)",
                "a kernel built with CONFIG_KPROBES=y (most distribution kernels)",
            ), probes[name]
    assert report["load_check"].startswith("ok"), report["load_check"]
    attached = {program["attach"] for program in report["verifier"]["programs"]}
    assert "tc" in attached and (kprobes or attached == {"tc"}), attached  # without kprobes: tc alone

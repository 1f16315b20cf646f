from pathlib import Path

import pytest

from flowscope.kernel.btf import VMLINUX_BTF
from flowscope.kernel.catalog import CATALOG, ProbeFamily, Requirement
from flowscope.kernel.features import KernelFeatures
from flowscope.kernel.loader import LoadOptions, cflags_for, module_text, plan_families


def features(tmp_path: Path, tracepoints: list[str], kprobes: bool = False, ringbuf: bool = True) -> KernelFeatures:
    for name in tracepoints:
        category, _, event = name.partition(":")
        fmt = tmp_path / "events" / category / event / "format"
        fmt.parent.mkdir(parents=True, exist_ok=True)
        fmt.write_text("name: x\n")
    return KernelFeatures(
        release="6.18.0",
        tracefs=tmp_path,
        tracefs_note="",
        bpffs=True,
        bpffs_note="",
        btf_path=None,
        btf_error="no BTF here",
        kprobes=kprobes,
        kprobes_reason="" if kprobes else "the kernel is built without kprobes (CONFIG_KPROBES is not set)",
        ringbuf=ringbuf,
        batch_ops=True,
    )


CATALOG_UNDER_TEST = [
    ProbeFamily("flows", "tc_flow.c", "tc", (Requirement("tc"),)),
    ProbeFamily("drops", "skb_drop.c", "tracepoint skb:kfree_skb", (Requirement("tracepoint", "skb:kfree_skb"),)),
    ProbeFamily(
        "drops_kprobe",
        "kprobe_drop.c",
        "kprobe kfree_skb_reason",
        (Requirement("kprobe", "kfree_skb_reason"),),
        replaces="drops",
    ),
    ProbeFamily("btf_user", "x.c", "raw tracepoint", (Requirement("btf"),)),
]


def by_name(statuses):
    return {s.family.name: s for s in statuses}


def test_tracepoint_family_runs_and_its_kprobe_fallback_is_not_needed(tmp_path: Path) -> None:
    statuses = by_name(plan_families(features(tmp_path, ["skb:kfree_skb"]), LoadOptions(), CATALOG_UNDER_TEST))
    assert statuses["flows"].active and statuses["drops"].active
    assert not statuses["drops_kprobe"].active
    assert statuses["drops_kprobe"].reason == (
        "the kernel is built without kprobes (CONFIG_KPROBES is not set); not needed: drops runs on this kernel"
    )
    with_kprobes = by_name(
        plan_families(features(tmp_path, ["skb:kfree_skb"], kprobes=True), LoadOptions(), CATALOG_UNDER_TEST)
    )
    assert not with_kprobes["drops_kprobe"].active


def test_missing_tracepoint_and_missing_kprobes_are_both_explained(tmp_path: Path) -> None:
    statuses = by_name(plan_families(features(tmp_path, []), LoadOptions(), CATALOG_UNDER_TEST))
    assert not statuses["drops"].active
    assert statuses["drops"].reason == "the kernel has no tracepoint skb:kfree_skb"
    assert not statuses["drops_kprobe"].active
    assert statuses["drops_kprobe"].reason == "the kernel is built without kprobes (CONFIG_KPROBES is not set)"
    assert "CONFIG_KPROBES=y" in statuses["drops_kprobe"].remedy
    assert statuses["btf_user"].reason == "no BTF here"


def test_family_selection(tmp_path: Path) -> None:
    options = LoadOptions(families={"flows"})
    statuses = by_name(plan_families(features(tmp_path, ["skb:kfree_skb"]), options, CATALOG_UNDER_TEST))
    assert statuses["flows"].active
    assert not statuses["drops"].active and statuses["drops"].reason == "not selected"
    assert not statuses["drops_kprobe"].active


@pytest.mark.parametrize(
    ("ringbuf", "forced", "perf"), [(True, False, False), (True, True, True), (False, False, True)]
)
def test_perf_buffer_when_forced_or_without_ring_buffer(
    tmp_path: Path, ringbuf: bool, forced: bool, perf: bool
) -> None:
    flags = cflags_for(CATALOG[:1], features(tmp_path, [], ringbuf=ringbuf), LoadOptions(perf_events=forced))
    assert ("-DFLOWSCOPE_PERF_EVENTS" in flags) is perf
    assert "-DFLOWSCOPE_FLOW_MAP_SIZE=65536" in flags


def test_each_flag_once(tmp_path: Path) -> None:
    """The drop, TCP and socket families read the same structures: their offsets (this machine's BTF) once."""
    kernel = features(tmp_path, [])
    kernel.btf_path = VMLINUX_BTF
    flags = cflags_for(CATALOG[:4], kernel, LoadOptions())
    assert len(flags) == len(set(flags))
    assert len([flag for flag in flags if flag.startswith("-DFS_OFF_SKB_HEAD=")]) == 1


def test_module_text_is_the_header_then_each_family_file() -> None:
    text = module_text(CATALOG[:1])
    assert text.index("#define FLOWSCOPE_H") < text.index("int fs_tc_ingress(")


def test_kprobe_family_needs_one_of_its_functions_in_the_kernel(tmp_path: Path) -> None:
    """Read from this machine's /proc/kallsyms: every kernel has `schedule`, none a flowscope function."""

    def kprobe_family(target: str) -> ProbeFamily:
        return ProbeFamily("k", "kprobe_drop.c", "kprobe", (Requirement("kprobe", target),))

    kernel = features(tmp_path, [], kprobes=True)
    found = plan_families(kernel, LoadOptions(), [kprobe_family("flowscope_no_such_function|schedule")])
    assert found[0].active
    missing = plan_families(kernel, LoadOptions(), [kprobe_family("flowscope_no_such_function|flowscope_nor_this")])
    assert not missing[0].active
    assert missing[0].reason == "the kernel has no function flowscope_no_such_function or flowscope_nor_this to probe"


def test_prefer_kprobes_runs_the_kprobe_variant_instead_of_the_tracepoint_family(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(KernelFeatures, "kernel_symbol", lambda _self, name: name == "kfree_skb_reason")
    kernel = features(tmp_path, ["skb:kfree_skb"], kprobes=True)
    statuses = by_name(plan_families(kernel, LoadOptions(prefer_kprobes=True), CATALOG_UNDER_TEST))
    assert statuses["drops_kprobe"].active and not statuses["drops"].active
    assert statuses["drops"].reason == "--prefer-kprobes: drops_kprobe runs instead"
    assert statuses["flows"].active  # a family without a kprobe variant runs as before
    without_kprobes = features(tmp_path, ["skb:kfree_skb"])  # nothing to prefer: the tracepoint family runs
    statuses = by_name(plan_families(without_kprobes, LoadOptions(prefer_kprobes=True), CATALOG_UNDER_TEST))
    assert statuses["drops"].active and not statuses["drops_kprobe"].active

"""The per-packet clock's -D flag: set only where the kernel's BTF lists the bpf_jiffies64 helper."""

from pathlib import Path

from flowscope.kernel.btf import Btf
from flowscope.kernel.catalog import CATALOG
from flowscope.kernel.features import KernelFeatures
from flowscope.kernel.loader import LoadOptions, cflags_for
from flowscope.kernel.offsets import clock_flags
from tests.unit.btf_builder import BtfBuilder


def kernel(helpers: dict[str, int]) -> Btf:
    builder = BtfBuilder()
    builder.enum("bpf_func_id", helpers)
    return Btf(builder.build())


def test_clock_flag_where_the_kernel_has_bpf_jiffies64() -> None:
    assert clock_flags(kernel({"BPF_FUNC_unspec": 0, "BPF_FUNC_jiffies64": 118})) == ["-DFS_HAVE_JIFFIES64"]


def test_no_clock_flag_without_the_helper_or_without_btf() -> None:
    assert clock_flags(kernel({"BPF_FUNC_unspec": 0, "BPF_FUNC_ktime_get_ns": 5})) == []
    assert clock_flags(kernel({})) == []
    assert clock_flags(None) == []


def test_the_module_asks_for_the_clock_once(tmp_path: Path) -> None:
    features = KernelFeatures("6.18.0", tmp_path, "", True, "", tmp_path / "vmlinux", "", False, "", True, True)
    features.btf = kernel({"BPF_FUNC_jiffies64": 118})  # type: ignore[misc]  # the cached BTF, set directly
    flags = cflags_for(CATALOG[:1], features, LoadOptions())
    assert flags.count("-DFS_HAVE_JIFFIES64") == 1
    features.btf = kernel({"BPF_FUNC_ktime_get_ns": 5})  # type: ignore[misc]
    assert "-DFS_HAVE_JIFFIES64" not in cflags_for(CATALOG[:1], features, LoadOptions())

"""The per-packet clock's -D flag: set only where the kernel's BTF lists the bpf_jiffies64 helper."""

from flowscope.btf import Btf
from flowscope.loader import LoadOptions
from flowscope.probe_catalog import TC_FLOWS, clock_flags
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


def test_the_tc_family_asks_for_the_clock() -> None:
    assert TC_FLOWS.cflags is not None
    assert TC_FLOWS.cflags(kernel({"BPF_FUNC_jiffies64": 118}), LoadOptions()) == ["-DFS_HAVE_JIFFIES64"]

"""Kernel names (drop reasons, TCP states, reset reasons) from BTF enums and tracepoint format files."""

from pathlib import Path

import numpy as np

from flowscope.kernel.btf import Btf
from flowscope.kernel.names import UNKNOWN, KernelNames, name_values, print_symbolic
from tests.unit.btf_builder import BtfBuilder

# Excerpts of the running kernel's format files (6.18), as the kernel writes them.
KFREE_SKB_FORMAT = """name: kfree_skb
ID: 1520
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;

print fmt: "skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s", REC->skbaddr, REC->rx_sk, \
REC->protocol, REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, \
{ 12, "NETFILTER_DROP" }, { 0x80, "MAX" })
"""
INET_SOCK_SET_STATE_FORMAT = """print fmt: "family=%s oldstate=%s newstate=%s", \
__print_symbolic(REC->family, { 2, "AF_INET" }, { 10, "AF_INET6" }), \
__print_symbolic(REC->oldstate, { 1, "TCP_ESTABLISHED" }, { 7, "TCP_CLOSE" }), \
__print_symbolic(REC->newstate, { 1, "TCP_ESTABLISHED" }, { 2, "TCP_SYN_SENT" }, { 7, "TCP_CLOSE" })
"""
# Older kernels print states by constant name where they lack TRACE_DEFINE_ENUM: numbers unknown here.
SYMBOLIC_ONLY_FORMAT = """print fmt: "state=%s", __print_symbolic(REC->state, { TCP_ESTABLISHED, "TCP_ESTABLISHED" })"""


def kernel_btf_data() -> bytes:
    b = BtfBuilder()
    b.enum(
        "skb_drop_reason",
        {
            "SKB_NOT_DROPPED_YET": 0,
            "SKB_CONSUMED": 1,
            "SKB_DROP_REASON_NOT_SPECIFIED": 2,
            "SKB_DROP_REASON_NO_SOCKET": 3,
            "SKB_DROP_REASON_SKB_CSUM": 75,
            "SKB_DROP_REASON_NETFILTER_DROP": 12,
            "SKB_DROP_REASON_MAX": 128,
            "SKB_DROP_REASON_SUBSYS_MASK": -65536,  # 0xffff0000, as the builder packs signed values
        },
    )
    b.enum("skb_drop_reason_subsys", {"SKB_DROP_REASON_SUBSYS_CORE": 0, "SKB_DROP_REASON_SUBSYS_OPENVSWITCH": 2})
    b.enum("", {"TCP_ESTABLISHED": 1, "TCP_SYN_SENT": 2, "TCP_CLOSE": 7, "TCP_LISTEN": 10, "TCP_MAX_STATES": 14})
    b.enum("sk_rst_reason", {"SK_RST_REASON_NOT_SPECIFIED": 0, "SK_RST_REASON_NO_SOCKET": 1, "SK_RST_REASON_MAX": 25})
    return b.build()


def kernel_btf() -> Btf:
    return Btf(kernel_btf_data())


def test_btf_names_lose_their_enum_prefix_and_bounds_are_not_names() -> None:
    names = KernelNames.from_btf(kernel_btf())
    assert names.drop_reasons == {
        0: "NOT_DROPPED_YET",
        1: "CONSUMED",
        2: "NOT_SPECIFIED",
        3: "NO_SOCKET",
        75: "SKB_CSUM",
        12: "NETFILTER_DROP",
    }
    assert names.tcp_states == {1: "ESTABLISHED", 2: "SYN_SENT", 7: "CLOSE", 10: "LISTEN"}
    assert names.reset_reasons == {0: "NOT_SPECIFIED", 1: "NO_SOCKET"}
    assert names.source == "BTF"


def test_drop_reason_names_of_values_with_subsystems_unknown_and_unnamed() -> None:
    names = KernelNames.from_btf(kernel_btf())
    values = np.array([3, 12, 3, UNKNOWN, (2 << 16) | 7, (9 << 16) | 1, 99], dtype=np.uint32)
    assert names.drop_reason_names(values).tolist() == [
        "NO_SOCKET",
        "NETFILTER_DROP",
        "NO_SOCKET",
        None,  # the kernel gave no reason (before Linux 5.17)
        "OPENVSWITCH:7",  # a subsystem's own reason: the subsystem named by the kernel, and its code
        str((9 << 16) | 1),  # neither the reason nor its subsystem has a name here: the number, not a guess
        "99",
    ]


def test_state_names_treat_zero_as_no_state() -> None:
    names = KernelNames.from_btf(kernel_btf())
    assert names.tcp_state_names(np.array([0, 1, 7, 13], dtype=np.int32)).tolist() == [
        None,
        "ESTABLISHED",
        "CLOSE",
        "13",
    ]


def test_print_symbolic_tables_of_format_files() -> None:
    assert print_symbolic(KFREE_SKB_FORMAT, "reason") == {
        2: "NOT_SPECIFIED",
        3: "NO_SOCKET",
        12: "NETFILTER_DROP",
        128: "MAX",
    }
    assert print_symbolic(INET_SOCK_SET_STATE_FORMAT, "newstate") == {
        1: "TCP_ESTABLISHED",
        2: "TCP_SYN_SENT",
        7: "TCP_CLOSE",
    }
    assert print_symbolic(INET_SOCK_SET_STATE_FORMAT, "oldstate") == {1: "TCP_ESTABLISHED", 7: "TCP_CLOSE"}
    assert print_symbolic(SYMBOLIC_ONLY_FORMAT, "state") == {}
    assert print_symbolic(KFREE_SKB_FORMAT, "state") == {}


def write_tracefs(root: Path) -> Path:
    for event, text in (("skb/kfree_skb", KFREE_SKB_FORMAT), ("sock/inet_sock_set_state", INET_SOCK_SET_STATE_FORMAT)):
        path = root / "events" / event / "format"
        path.parent.mkdir(parents=True)
        path.write_text(text)
    return root


def test_names_from_tracefs(tmp_path: Path) -> None:
    names = KernelNames.from_tracefs(write_tracefs(tmp_path))
    assert names.drop_reasons[12] == "NETFILTER_DROP"
    assert names.tcp_states == {1: "ESTABLISHED", 2: "SYN_SENT", 7: "CLOSE"}
    assert names.reset_reasons == {}  # no tcp_send_reset format here


def test_load_takes_btf_and_completes_missing_tables_from_tracefs(tmp_path: Path) -> None:
    btf_path = tmp_path / "vmlinux"
    btf_path.write_bytes(BtfBuilder().build())  # BTF without any of the enums
    tracefs = write_tracefs(tmp_path / "tracing")
    names = KernelNames.load(btf_path, (tmp_path / "absent", tracefs))
    assert names.drop_reasons[3] == "NO_SOCKET" and names.tcp_states[2] == "SYN_SENT"
    assert names.source == f"BTF + tracepoint formats under {tracefs}"


def test_load_with_complete_btf_needs_no_tracefs(tmp_path: Path) -> None:
    btf_path = tmp_path / "vmlinux"
    btf_path.write_bytes(kernel_btf_data())
    names = KernelNames.load(btf_path, (write_tracefs(tmp_path / "tracing"),))
    assert names.source == "BTF" and names.tcp_states[10] == "LISTEN"


def test_load_without_btf_or_tracefs_names_nothing(tmp_path: Path) -> None:
    names = KernelNames.load(tmp_path / "missing", (tmp_path / "missing-tracefs",))
    assert names.drop_reasons == {} and names.tcp_states == {}
    assert names.drop_reason_names(np.array([3], dtype=np.uint32)).tolist() == ["3"]


def test_name_values_of_an_empty_array() -> None:
    assert name_values(np.array([], dtype=np.uint32), {1: "A"}).tolist() == []

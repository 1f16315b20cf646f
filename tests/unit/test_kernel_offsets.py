"""-D flags of the drop, TCP and socket probes from BTF: offsets, argument positions, enum values."""

import struct

import pytest

from flowscope.kernel.btf import KIND_FUNC, KIND_STRUCT, Btf, BtfError
from flowscope.kernel.loader import LoadOptions
from flowscope.kernel.offsets import (
    Argument,
    drop_flags,
    drop_kprobe_flags,
    drop_reasons_note,
    kprobe_flags,
    raw_tracepoint_flags,
    sock_flags,
    structure_flags,
    tcp_flags,
    tcp_kprobe_flags,
)
from tests.unit.btf_builder import BtfBuilder


class Builder(BtfBuilder):
    def func(self, name: str, proto: int) -> int:
        return self._add(struct.pack("<III", self._name(name), KIND_FUNC << 24, proto))

    def bitfield_struct(self, name: str, size: int, members: list[tuple[str, int, int, int]]) -> int:
        """members: (name, type id, bit offset, bits); bits 0 for a plain member."""
        blob = struct.pack("<III", self._name(name), 1 << 31 | KIND_STRUCT << 24 | len(members), size)
        for member_name, member_type, bit_offset, bits in members:
            blob += struct.pack("<III", self._name(member_name), member_type, bits << 24 | bit_offset)
        return self._add(blob)


def kernel(
    protocol_bits: int = 0,
    ipv6: bool = True,
    reasons: bool = True,
    consumed: bool = True,
    retransmit: tuple[str, ...] = ("__tcp_retransmit_skb", "tcp_retransmit_skb"),
) -> Btf:
    """A kernel's BTF with what the probes read, at made-up offsets (bytes noted per member). Without
    `consumed`, its drop reasons are those of Linux 6.1 (no SKB_CONSUMED); without `reasons`, it predates
    drop reasons (5.16), and frees dropped packets with kfree_skb(skb). `retransmit`: the functions of the
    retransmit path it has (a compiler may inline __tcp_retransmit_skb)."""
    b = Builder()
    u8, u16, u32, u64 = b.int("u8", 1), b.int("u16", 2), b.int("u32", 4), b.int("u64", 8)
    byte_array = b.composite("in6_addr", 16, [])
    cb = b.composite("cb48", 48, [])
    net = b.composite("net", 200, [("ns_pad", u64, 0), ("ns", b.composite("ns_common", 16, [("inum", u32, 64)]), 1024)])
    net_ptr = b.ptr(net)
    possible = b.composite("possible_net_t", 8, [("net", net_ptr, 0)])
    device = b.composite("net_device", 300, [("ifindex", u32, 8 * 96), ("nd_net", possible, 8 * 256)])
    skb = b.composite(
        "sk_buff",
        240,
        [
            ("dev", b.ptr(device), 8 * 16), ("sk", b.ptr(0), 8 * 24), ("cb", cb, 8 * 40), ("len", u32, 8 * 112),
            ("skb_iif", u32, 8 * 144), ("protocol", u16, 8 * 176), ("transport_header", u16, 8 * 178),
            ("network_header", u16, 8 * 180), ("mac_header", u16, 8 * 182), ("head", b.ptr(u8), 8 * 192),
            ("data", b.ptr(u8), 8 * 200),
        ],
    )  # fmt: skip
    common_members = [
        ("skc_daddr", u32, 0), ("skc_rcv_saddr", u32, 32), ("skc_dport", u16, 96), ("skc_num", u16, 112),
        ("skc_family", u16, 128), ("skc_state", u8, 144), ("skc_net", possible, 8 * 48),
    ]  # fmt: skip
    if ipv6:
        common_members += [("skc_v6_daddr", byte_array, 8 * 56), ("skc_v6_rcv_saddr", byte_array, 8 * 72)]
    common = b.composite("sock_common", 136, common_members)
    if protocol_bits:  # before Linux 5.6: `unsigned int sk_protocol : 8` at bit 16 of the word at 512
        sock = b.bitfield_struct("sock", 600, [("__sk_common", common, 0, 0), ("sk_protocol", u32, 8 * 512 + 16, 8)])
    else:
        sock = b.composite("sock", 600, [("__sk_common", common, 0), ("sk_protocol", u16, 8 * 532)])
    b.composite("inet_sock", 900, [("sk", sock, 0), ("inet_sport", u16, 8 * 814)])
    b.composite("tcp_sock", 2000, [("srtt_us", u32, 8 * 1680)])
    b.composite("tcp_skb_cb", 48, [("seq", u32, 0), ("end_seq", u32, 32), ("tcp_gso_segs", u16, 64)])
    drop_reason = None
    if reasons:
        values = {"SKB_NOT_DROPPED_YET": 0, "SKB_CONSUMED": 1, "SKB_DROP_REASON_NO_SOCKET": 3}
        if not consumed:
            values = {"SKB_NOT_DROPPED_YET": 0, "SKB_DROP_REASON_NOT_SPECIFIED": 1, "SKB_DROP_REASON_NO_SOCKET": 2}
        drop_reason = b.enum("skb_drop_reason", values)
    b.enum("", {"TCP_ESTABLISHED": 1, "TCP_SYN_SENT": 2, "TCP_SYN_RECV": 3, "TCP_CLOSE": 7, "TCP_LISTEN": 10})
    rst = b.enum("sk_rst_reason", {"SK_RST_REASON_NOT_SPECIFIED": 0})
    ctx, skb_ptr, sock_ptr, void_ptr, int_ = b.ptr(0), b.ptr(skb), b.ptr(sock), b.ptr(0), b.int("int", 4)

    def trace(name: str, params: list[int]) -> None:
        b.typedef(f"btf_trace_{name}", b.ptr(b.func_proto([ctx, *params])))

    trace("kfree_skb", [skb_ptr, void_ptr, drop_reason, sock_ptr] if drop_reason else [skb_ptr, void_ptr])
    trace("tcp_retransmit_skb", [sock_ptr, skb_ptr, int_])
    trace("tcp_probe", [sock_ptr, skb_ptr])
    trace("tcp_send_reset", [sock_ptr, skb_ptr, rst])
    trace("tcp_receive_reset", [sock_ptr])
    trace("inet_sock_set_state", [sock_ptr, int_, int_])
    b.func("tcp_set_state", b.func_proto([sock_ptr, int_]))
    for name in retransmit:
        b.func(name, b.func_proto([sock_ptr, skb_ptr, int_]))
    b.func("tcp_rcv_established", b.func_proto([sock_ptr, skb_ptr]))
    b.func("tcp_reset", b.func_proto([sock_ptr, skb_ptr]))
    if drop_reason:
        b.func("kfree_skb_reason", b.func_proto([skb_ptr, drop_reason]))
    else:
        b.func("kfree_skb", b.func_proto([skb_ptr]))
    return Btf(b.build())


STRUCTURE = {
    "FS_OFF_SKB_HEAD": 192,
    "FS_OFF_SKB_NETWORK_HEADER": 180,
    "FS_OFF_SKB_TRANSPORT_HEADER": 178,
    "FS_OFF_SKB_PROTOCOL": 176,
    "FS_OFF_SKB_DEV": 16,
    "FS_OFF_SKB_SK": 24,
    "FS_OFF_SKB_IIF": 144,
    "FS_OFF_SKB_LEN": 112,
    "FS_OFF_SKB_DATA": 200,
    "FS_OFF_SKB_MAC_HEADER": 182,
    "FS_OFF_SKB_CB": 40,
    "FS_OFF_TCP_CB_GSO_SEGS": 8,
    "FS_OFF_DEV_IFINDEX": 96,
    "FS_OFF_DEV_NET": 256,
    "FS_OFF_NET_INUM": 136,
    "FS_OFF_SKC_DADDR": 0,
    "FS_OFF_SKC_RCV_SADDR": 4,
    "FS_OFF_SKC_DPORT": 12,
    "FS_OFF_SKC_NUM": 14,
    "FS_OFF_SKC_FAMILY": 16,
    "FS_OFF_SKC_STATE": 18,
    "FS_OFF_SKC_V6_DADDR": 56,
    "FS_OFF_SKC_V6_RCV_SADDR": 72,
    "FS_OFF_SKC_NET": 48,
    "FS_OFF_INET_SPORT": 814,
    "FS_OFF_TCP_SRTT_US": 1680,
    "FS_OFF_SK_PROTOCOL": 532,
}


def defines(flags: list[str]) -> dict[str, str]:
    return dict(flag.removeprefix("-D").partition("=")[::2] for flag in flags)


def test_structure_offsets_come_from_btf() -> None:
    found = defines(structure_flags(kernel()))
    # One read of struct sk_buff from dev (16) to the end of data (200 + 8) fetches every field used.
    window = {"FS_SKB_WINDOW_START": "16", "FS_SKB_WINDOW_SIZE": "192"}
    assert found == {**{name: str(offset) for name, offset in STRUCTURE.items()}, **window}


def test_a_kernel_without_ipv6_reads_no_ipv6_socket_addresses() -> None:
    found = defines(structure_flags(kernel(ipv6=False)))
    assert "FS_OFF_SKC_V6_DADDR" not in found and "FS_OFF_SKC_V6_RCV_SADDR" not in found
    assert found["FS_OFF_SKC_DADDR"] == "0"


def test_sk_protocol_as_a_bitfield_is_read_from_its_word() -> None:
    found = defines(structure_flags(kernel(protocol_bits=8)))
    assert (found["FS_OFF_SK_PROTOCOL"], found["FS_SK_PROTOCOL_SHIFT"], found["FS_SK_PROTOCOL_BITS"]) == (
        "512",
        "16",
        "8",
    )


def test_a_missing_member_or_a_member_of_another_size_is_one_sentence() -> None:
    b = Builder()
    b.composite("sk_buff", 8, [("head", b.int("u32", 4), 0)])
    with pytest.raises(
        BtfError, match=r"^struct sk_buff\.head is 4 bytes in the running kernel, where flowscope reads 8 bytes\.$"
    ):
        structure_flags(Btf(b.build()))
    with pytest.raises(BtfError, match="has no member 'network_header'"):
        b = Builder()
        b.composite("sk_buff", 8, [("head", b.ptr(0), 0)])
        structure_flags(Btf(b.build()))


def test_raw_tracepoint_arguments_by_type_and_optional_ones() -> None:
    btf = kernel()
    wanted = (
        Argument("SKB", "struct sk_buff *"),
        Argument("LOCATION", "void *"),
        Argument("REASON", "enum skb_drop_reason", required=False),
        Argument("RX_SK", "struct sock *", required=False),
    )
    assert raw_tracepoint_flags(btf, "kfree_skb", "K", wanted) == [
        "-DK_ARG_SKB=0",
        "-DK_ARG_LOCATION=1",
        "-DK_ARG_REASON=2",
        "-DK_ARG_RX_SK=3",
    ]
    assert raw_tracepoint_flags(kernel(reasons=False), "kfree_skb", "K", wanted) == [
        "-DK_ARG_SKB=0",
        "-DK_ARG_LOCATION=1",
    ]
    state = (Argument("OLD", "int"), Argument("NEW", "int", occurrence=2))
    assert raw_tracepoint_flags(btf, "inet_sock_set_state", "S", state) == ["-DS_ARG_OLD=1", "-DS_ARG_NEW=2"]
    with pytest.raises(BtfError, match="raw tracepoint tcp_probe has no int argument"):
        raw_tracepoint_flags(btf, "tcp_probe", "P", (Argument("ERR", "int"),))


def test_kprobe_arguments_count_from_one_like_pt_regs_parm() -> None:
    wanted = (Argument("SK", "struct sock *"), Argument("STATE", "int"))
    assert kprobe_flags(kernel(), "tcp_set_state", "T", wanted) == ["-DT_ARG_SK=1", "-DT_ARG_STATE=2"]


def test_family_flags() -> None:
    btf, options = kernel(), LoadOptions(tcp_events_per_second=7, rtt_sample_ms=250, socket_map_size=1024)
    drops = defines(drop_flags(btf, options))
    assert (drops["FS_SKB_CONSUMED"], drops["FS_SKB_NOT_DROPPED_YET"], drops["FS_KFREE_SKB_ARG_REASON"]) == (
        "1",
        "0",
        "2",
    )
    assert "FS_SKB_CONSUMED" not in defines(drop_flags(kernel(reasons=False), options))
    tcp = defines(tcp_flags(btf, options))
    assert tcp["FLOWSCOPE_TCP_EVENTS_PER_SECOND"] == "7" and tcp["FLOWSCOPE_RTT_SAMPLE_NS"] == "250000000ULL"
    assert (
        tcp["FS_TCP_RETRANSMIT_ARG_SKB"],
        tcp["FS_TCP_RETRANSMIT_ARG_ERR"],
        tcp["FS_TCP_SEND_RESET_ARG_REASON"],
    ) == (
        "1",
        "2",
        "2",
    )
    sock = defines(sock_flags(btf, options))
    assert (sock["FS_TCP_LISTEN"], sock["FS_TCP_SYN_RECV"], sock["FLOWSCOPE_SOCK_MAP_SIZE"]) == ("10", "3", "1024")
    with pytest.raises(BtfError, match="no BTF"):
        drop_flags(None, options)


def test_a_kernel_without_skb_consumed_counts_every_kfree_skb_as_a_drop() -> None:
    """Linux 6.1: reasons, but normal frees go through consume_skb, so no reason means "not a drop" but
    SKB_NOT_DROPPED_YET."""
    btf = kernel(consumed=False)
    drops = defines(drop_flags(btf, LoadOptions()))
    assert "FS_SKB_CONSUMED" not in drops
    assert (drops["FS_SKB_NOT_DROPPED_YET"], drops["FS_KFREE_SKB_ARG_REASON"]) == ("0", "2")
    kprobe = defines(drop_kprobe_flags(btf, LoadOptions()))
    assert (kprobe["FS_DROP_KPROBE"], kprobe["FS_DROP_KPROBE_ARG_REASON"]) == ("kfree_skb_reason", "2")
    assert "FS_SKB_CONSUMED" not in kprobe
    assert drop_reasons_note(btf) == (
        "3 names from the kernel's enum skb_drop_reason; no SKB_CONSUMED (before Linux 6.2): every kfree_skb is "
        "a drop (normal frees: consume_skb)"
    )
    assert drop_reasons_note(kernel()).endswith("SKB_CONSUMED frees are normal, not drops")


def test_a_kernel_without_drop_reasons_counts_drops_with_reason_unknown() -> None:
    btf = kernel(reasons=False)
    drops = defines(drop_flags(btf, LoadOptions()))
    assert not {"FS_SKB_CONSUMED", "FS_SKB_NOT_DROPPED_YET", "FS_KFREE_SKB_ARG_REASON"} & drops.keys()
    kprobe = defines(drop_kprobe_flags(btf, LoadOptions()))
    assert kprobe["FS_DROP_KPROBE"] == "kfree_skb" and kprobe["FS_DROP_KPROBE_ARG_SKB"] == "1"
    assert "FS_DROP_KPROBE_ARG_REASON" not in kprobe
    assert drop_reasons_note(btf) == (
        "the kernel has no drop reasons (before Linux 5.17): drops are counted with reason unknown"
    )


def test_the_retransmit_kprobes_take_each_function_of_the_retransmit_path_the_kernel_has() -> None:
    """Both where both are functions (Debian's 6.1 inlines __tcp_retransmit_skb into tcp_retransmit_skb and
    keeps a copy for the loss probe: neither alone sees every retransmit); either alone; neither: no variant."""
    both = defines(tcp_kprobe_flags(kernel(), LoadOptions()))
    assert {key: both[key] for key in both if key.startswith("FS_KP_RETRANSMIT")} == {
        "FS_KP_RETRANSMIT": "",
        "FS_KP_RETRANSMIT_ARG_SK": "1",
        "FS_KP_RETRANSMIT_ARG_SKB": "2",
        "FS_KP_RETRANSMIT_OUTER": "",
        "FS_KP_RETRANSMIT_OUTER_ARG_SK": "1",
        "FS_KP_RETRANSMIT_OUTER_ARG_SKB": "2",
    }
    outer = defines(tcp_kprobe_flags(kernel(retransmit=("tcp_retransmit_skb",)), LoadOptions()))
    assert "FS_KP_RETRANSMIT_OUTER" in outer and "FS_KP_RETRANSMIT" not in outer
    inner = defines(tcp_kprobe_flags(kernel(retransmit=("__tcp_retransmit_skb",)), LoadOptions()))
    assert "FS_KP_RETRANSMIT" in inner and "FS_KP_RETRANSMIT_OUTER" not in inner
    with pytest.raises(BtfError, match="none of the functions __tcp_retransmit_skb, tcp_retransmit_skb"):
        tcp_kprobe_flags(kernel(retransmit=()), LoadOptions())

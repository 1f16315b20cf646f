import pytest

from flowscope.kernel.btf import Btf, BtfError, Member
from tests.unit.btf_builder import BtfBuilder


@pytest.fixture
def btf() -> Btf:
    b = BtfBuilder()
    u16 = b.int("unsigned short", 2)
    u32 = b.int("unsigned int", 4)
    u64 = b.int("unsigned long long", 8)
    net = b.composite("net", 16, [("passive", u32, 0), ("inum", u32, 64)])
    net_ptr = b.ptr(net)
    possible_net = b.composite("possible_net_t", 8, [("net", net_ptr, 0)])
    device = b.composite("net_device", 32, [("ifindex", u32, 64), ("nd_net", possible_net, 128)])
    device_ptr = b.ptr(device)
    # struct sk_buff { union { struct { u64 next; u64 prev; }; u64 rb; }; struct net_device *dev @16;
    #                  struct { u16 pad; u16 network_header; } (anonymous) @24; }
    pair = b.composite("", 16, [("next", u64, 0), ("prev", u64, 64)])
    head_union = b.composite("", 16, [("", pair, 0), ("rb", u64, 0)], union=True)
    headers = b.composite("", 4, [("pad", u16, 0), ("network_header", u16, 16)])
    skb = b.composite("sk_buff", 32, [("", head_union, 0), ("dev", device_ptr, 128), ("", headers, 192)])
    b.enum("skb_drop_reason", {"SKB_NOT_DROPPED_YET": 0, "SKB_CONSUMED": 1, "SKB_DROP_REASON_NO_SOCKET": 3})
    b.enum("", {"TCP_ESTABLISHED": 1, "TCP_SYN_SENT": 2})
    skb_ptr = b.ptr(skb)
    proto = b.func_proto([b.ptr(0), skb_ptr, b.int("int", 4)])
    b.typedef("btf_trace_kfree_skb", b.ptr(proto))
    return Btf(b.build())


def test_member_offsets_through_anonymous_members(btf: Btf) -> None:
    assert btf.member("sk_buff", "prev") == Member(offset=8, size=8, bit_offset=64, bitfield_size=0)
    assert btf.member("sk_buff", "rb").offset == 0
    assert btf.member("sk_buff", "dev") == Member(offset=16, size=8, bit_offset=128, bitfield_size=0)
    assert btf.member("sk_buff", "network_header") == Member(offset=26, size=2, bit_offset=208, bitfield_size=0)


def test_dotted_paths_through_embedded_structures(btf: Btf) -> None:
    assert btf.member("net_device", "nd_net.net").offset == 16
    assert btf.member("net", "inum").offset == 8


def test_missing_member_names_struct_and_member(btf: Btf) -> None:
    with pytest.raises(BtfError, match="struct sk_buff has no member 'len'"):
        btf.member("sk_buff", "len")
    with pytest.raises(BtfError, match="no 'task_struct'"):
        btf.member("task_struct", "pid")


def test_enums_named_and_anonymous(btf: Btf) -> None:
    assert btf.enum("skb_drop_reason") == {
        "SKB_NOT_DROPPED_YET": 0,
        "SKB_CONSUMED": 1,
        "SKB_DROP_REASON_NO_SOCKET": 3,
    }
    assert btf.enum("TCP_ESTABLISHED") == {"TCP_ESTABLISHED": 1, "TCP_SYN_SENT": 2}


def test_raw_tracepoint_prototype(btf: Btf) -> None:
    assert btf.func_proto_params("btf_trace_kfree_skb") == ["void *", "struct sk_buff *", "int"]


def test_rejects_data_that_is_not_btf() -> None:
    with pytest.raises(BtfError, match="bad magic"):
        Btf(b"\0" * 64)
    with pytest.raises(BtfError, match="too short"):
        Btf(b"\x9f\xeb")

"""-D flags for the socket, drop and TCP probes, all from the running kernel's BTF.

Structure offsets (sk_buff, sock_common, net_device, net, tcp_sock), raw tracepoint and kprobe argument
positions, and the enum values the probes compare against. Nothing here comes from compile-time headers,
whose layouts may belong to another kernel version. A member the probes cannot do without raises
BtfError with a sentence naming it; an optional one (IPv6, network namespaces) is left out and the probe
reads zeros instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowscope.kernel.btf import KIND_ENUM, KIND_ENUM64, KIND_FUNC, Btf, BtfError, Member


@dataclass(frozen=True)
class Field:
    define: str
    struct: str
    path: str
    sizes: tuple[int, ...]  # byte sizes the probe's read handles
    required: bool = True


STRUCTURE_FIELDS = (
    Field("FS_OFF_SKB_HEAD", "sk_buff", "head", (8,)),
    Field("FS_OFF_SKB_NETWORK_HEADER", "sk_buff", "network_header", (2,)),
    Field("FS_OFF_SKB_TRANSPORT_HEADER", "sk_buff", "transport_header", (2,)),
    Field("FS_OFF_SKB_PROTOCOL", "sk_buff", "protocol", (2,)),
    Field("FS_OFF_SKB_DEV", "sk_buff", "dev", (8,)),
    Field("FS_OFF_SKB_SK", "sk_buff", "sk", (8,)),
    Field("FS_OFF_SKB_IIF", "sk_buff", "skb_iif", (4,)),
    Field("FS_OFF_SKB_LEN", "sk_buff", "len", (4,)),
    Field("FS_OFF_SKB_DATA", "sk_buff", "data", (8,)),
    Field("FS_OFF_SKB_MAC_HEADER", "sk_buff", "mac_header", (2,)),
    Field("FS_OFF_SKB_CB", "sk_buff", "cb", (48,)),
    Field("FS_OFF_TCP_CB_GSO_SEGS", "tcp_skb_cb", "tcp_gso_segs", (2,)),
    Field("FS_OFF_DEV_IFINDEX", "net_device", "ifindex", (4,)),
    Field("FS_OFF_DEV_NET", "net_device", "nd_net.net", (8,), required=False),
    Field("FS_OFF_NET_INUM", "net", "ns.inum", (4,), required=False),
    Field("FS_OFF_SKC_DADDR", "sock_common", "skc_daddr", (4,)),
    Field("FS_OFF_SKC_RCV_SADDR", "sock_common", "skc_rcv_saddr", (4,)),
    Field("FS_OFF_SKC_DPORT", "sock_common", "skc_dport", (2,)),
    Field("FS_OFF_SKC_NUM", "sock_common", "skc_num", (2,)),
    Field("FS_OFF_SKC_FAMILY", "sock_common", "skc_family", (2,)),
    Field("FS_OFF_SKC_STATE", "sock_common", "skc_state", (1,)),
    Field("FS_OFF_SKC_V6_DADDR", "sock_common", "skc_v6_daddr", (16,), required=False),
    Field("FS_OFF_SKC_V6_RCV_SADDR", "sock_common", "skc_v6_rcv_saddr", (16,), required=False),
    Field("FS_OFF_SKC_NET", "sock_common", "skc_net.net", (8,), required=False),
    Field("FS_OFF_INET_SPORT", "inet_sock", "inet_sport", (2,)),
    Field("FS_OFF_TCP_SRTT_US", "tcp_sock", "srtt_us", (4,)),
)


def _member(btf: Btf, field: Field) -> Member | None:
    try:
        member = btf.member(field.struct, field.path)
    except BtfError:
        if field.required:
            raise
        return None
    if member.bitfield_size or member.size not in field.sizes:
        size = f"a {member.bitfield_size}-bit field" if member.bitfield_size else f"{member.size} bytes"
        raise BtfError(
            f"struct {field.struct}.{field.path} is {size} in the running kernel, where flowscope reads "
            f"{field.sizes[0]} bytes."
        )
    return member


def structure_flags(btf: Btf) -> list[str]:
    offsets = {}
    for field in STRUCTURE_FIELDS:
        member = _member(btf, field)
        if member is not None:
            offsets[field.define] = member.offset
    if not {"FS_OFF_SKC_V6_DADDR", "FS_OFF_SKC_V6_RCV_SADDR"} <= offsets.keys():  # a kernel without IPv6
        offsets.pop("FS_OFF_SKC_V6_DADDR", None)
        offsets.pop("FS_OFF_SKC_V6_RCV_SADDR", None)
    flags = [f"-D{define}={offset}" for define, offset in offsets.items()]
    flags += _skb_window(btf)
    protocol = btf.member("sock", "sk_protocol")
    if protocol.bitfield_size:  # before Linux 5.6: an 8-bit field packed with others
        flags += [
            f"-DFS_OFF_SK_PROTOCOL={protocol.bit_offset // 32 * 4}",
            f"-DFS_SK_PROTOCOL_SHIFT={protocol.bit_offset % 32}",
            f"-DFS_SK_PROTOCOL_BITS={protocol.bitfield_size}",
        ]
    elif protocol.size == 2:
        flags.append(f"-DFS_OFF_SK_PROTOCOL={protocol.offset}")
    else:
        raise BtfError(f"struct sock.sk_protocol is {protocol.size} bytes in the running kernel; flowscope reads 2.")
    return flags


SKB_WINDOW_LIMIT = 256  # bytes of struct sk_buff the probes read at once (they live on the BPF stack)


def _skb_window(btf: Btf) -> list[str]:
    """-DFS_SKB_WINDOW_START/_SIZE: the 8-aligned span of struct sk_buff that holds every field the probes
    read from it, so that one read fetches them all."""
    members = [btf.member("sk_buff", f.path) for f in STRUCTURE_FIELDS if f.struct == "sk_buff" and f.path != "cb"]
    start = min(m.offset for m in members) // 8 * 8
    size = (max(m.offset + m.size for m in members) - start + 7) // 8 * 8
    if size > SKB_WINDOW_LIMIT:
        raise BtfError(f"the sk_buff fields flowscope reads span {size} bytes in the running kernel (at most 256).")
    return [f"-DFS_SKB_WINDOW_START={start}", f"-DFS_SKB_WINDOW_SIZE={size}"]


@dataclass(frozen=True)
class Argument:
    suffix: str  # the define is <prefix>_ARG_<suffix>
    type_name: str  # as Btf.type_name writes it, e.g. "struct sock *"
    occurrence: int = 1  # the n-th parameter of that type
    required: bool = True


def argument_flags(
    params: list[str], prefix: str, wanted: tuple[Argument, ...], what: str, first: int = 0
) -> list[str]:
    """-D<prefix>_ARG_<suffix>=<position> for each wanted parameter found in `params` (counted from `first`)."""
    flags = []
    for argument in wanted:
        positions = [i for i, name in enumerate(params, start=first) if name == argument.type_name]
        if len(positions) >= argument.occurrence:
            flags.append(f"-D{prefix}_ARG_{argument.suffix}={positions[argument.occurrence - 1]}")
        elif argument.required:
            raise BtfError(f"{what} has no {argument.type_name} argument in the running kernel.")
    return flags


def raw_tracepoint_flags(btf: Btf, tracepoint: str, prefix: str, wanted: tuple[Argument, ...]) -> list[str]:
    # btf_trace_<name> starts with the program's context pointer, which is not a tracepoint argument.
    params = btf.func_proto_params(f"btf_trace_{tracepoint}")[1:]
    return argument_flags(params, prefix, wanted, f"raw tracepoint {tracepoint}")


def kprobe_flags(btf: Btf, function: str, prefix: str, wanted: tuple[Argument, ...]) -> list[str]:
    """Argument positions of a kprobed function, 1-based as PT_REGS_PARMn counts them."""
    return argument_flags(btf.func_proto_params(function), prefix, wanted, f"kernel function {function}", first=1)


def enum_flags(btf: Btf, enum: str, constants: dict[str, str]) -> list[str]:
    """-D<define>=<value> for constants (define -> constant name) of `enum` (as Btf.enum names it)."""
    values = btf.enum(enum)
    missing = [constant for constant in constants.values() if constant not in values]
    if missing:
        raise BtfError(f"the running kernel's enum {enum} has no {', '.join(missing)}.")
    return [f"-D{define}={values[constant]}" for define, constant in constants.items()]


def require_btf(btf: Btf | None) -> Btf:
    if btf is None:
        raise BtfError("the kernel has no BTF (/sys/kernel/btf/vmlinux), which these probes need for offsets.")
    return btf


def first_function(btf: Btf, candidates: tuple[str, ...]) -> str:
    """The first of `candidates` the running kernel has (its name changed between versions)."""
    for name in candidates:
        if btf.has(name, (KIND_FUNC,)):
            return name
    raise BtfError(f"the running kernel has none of the functions {', '.join(candidates)}.")


def clock_flags(btf: Btf | None) -> list[str]:
    """-DFS_HAVE_JIFFIES64 where the running kernel has the bpf_jiffies64 helper (Linux 5.5): fs_now() in
    flowscope.h then reads the precise clock once a tick instead of once a packet. Without it (or without
    BTF to tell), every stamp reads the precise clock. One flag for the whole module, as flowscope.h is."""
    if btf is None:
        return []
    try:
        helpers = btf.enum("bpf_func_id")
    except BtfError:
        return []
    return ["-DFS_HAVE_JIFFIES64"] if "BPF_FUNC_jiffies64" in helpers else []


# ---- per family -------------------------------------------------------------------------------------


def _option(options: object, name: str, default: int) -> int:
    return int(getattr(options, name, default))


def drop_flags(btf: Btf | None, options: object) -> list[str]:
    btf = require_btf(btf)
    flags = structure_flags(btf)
    flags += raw_tracepoint_flags(
        btf,
        "kfree_skb",
        "FS_KFREE_SKB",
        (
            Argument("SKB", "struct sk_buff *"),
            Argument("LOCATION", "void *"),
            Argument("REASON", "enum skb_drop_reason", required=False),
            Argument("RX_SK", "struct sock *", required=False),
        ),
    )
    return flags + _drop_reason_flags(btf)


def _drop_reason_flags(btf: Btf) -> list[str]:
    """-D flags for the reasons that mean "not a drop", those of them the running kernel has: SKB_CONSUMED
    (Linux 6.2 on; before it normal frees go through consume_skb, so every kfree_skb is a drop) and
    SKB_NOT_DROPPED_YET (6.0 on). None before Linux 5.17, which has no reasons at all."""
    if not btf.has("skb_drop_reason", (KIND_ENUM, KIND_ENUM64)):
        return []
    values = btf.enum("skb_drop_reason")
    constants = {"FS_SKB_CONSUMED": "SKB_CONSUMED", "FS_SKB_NOT_DROPPED_YET": "SKB_NOT_DROPPED_YET"}
    return [f"-D{define}={values[constant]}" for define, constant in constants.items() if constant in values]


def drop_reasons_note(btf: Btf | None) -> str:
    """What the drop probes make of the running kernel's reasons, for doctor."""
    if btf is None:
        return "unknown without BTF"
    if not btf.has("skb_drop_reason", (KIND_ENUM, KIND_ENUM64)):
        return "the kernel has no drop reasons (before Linux 5.17): drops are counted with reason unknown"
    values = btf.enum("skb_drop_reason")
    names = f"{len(values)} names from the kernel's enum skb_drop_reason"
    if "SKB_CONSUMED" not in values:
        return f"{names}; no SKB_CONSUMED (before Linux 6.2): every kfree_skb is a drop (normal frees: consume_skb)"
    return f"{names}; SKB_CONSUMED frees are normal, not drops"


DROP_FUNCTIONS = ("sk_skb_reason_drop", "kfree_skb_reason", "kfree_skb")  # Linux 6.11 on, 5.17 on, before


def drop_kprobe_flags(btf: Btf | None, options: object) -> list[str]:
    btf = require_btf(btf)
    function = first_function(btf, DROP_FUNCTIONS)
    flags = structure_flags(btf) + _drop_reason_flags(btf) + ["-DFS_SKB_DROP_KPROBES", f"-DFS_DROP_KPROBE={function}"]
    return flags + kprobe_flags(
        btf,
        function,
        "FS_DROP_KPROBE",
        (
            Argument("SKB", "struct sk_buff *"),
            Argument("REASON", "enum skb_drop_reason", required=False),  # kfree_skb (before 5.17) has none
            Argument("SK", "struct sock *", required=False),
        ),
    )


TCP_STATES = {
    "FS_TCP_ESTABLISHED": "TCP_ESTABLISHED",
    "FS_TCP_SYN_SENT": "TCP_SYN_SENT",
    "FS_TCP_SYN_RECV": "TCP_SYN_RECV",
    "FS_TCP_CLOSE": "TCP_CLOSE",
    "FS_TCP_LISTEN": "TCP_LISTEN",
}


def _sock_options(options: object) -> list[str]:
    return [f"-DFLOWSCOPE_SOCK_MAP_SIZE={_option(options, 'socket_map_size', 65536)}"]


def sock_flags(btf: Btf | None, options: object) -> list[str]:
    btf = require_btf(btf)
    flags = structure_flags(btf) + enum_flags(btf, "TCP_ESTABLISHED", TCP_STATES) + _sock_options(options)
    return flags + raw_tracepoint_flags(
        btf,
        "inet_sock_set_state",
        "FS_INET_SOCK_SET_STATE",
        (Argument("SK", "struct sock *"), Argument("OLD", "int"), Argument("NEW", "int", occurrence=2)),
    )


def sock_kprobe_flags(btf: Btf | None, options: object) -> list[str]:
    btf = require_btf(btf)
    flags = (
        structure_flags(btf)
        + enum_flags(btf, "TCP_ESTABLISHED", TCP_STATES)
        + _sock_options(options)
        + ["-DFS_SOCK_STATE_KPROBES"]
    )
    state_arguments = (Argument("SK", "struct sock *"), Argument("STATE", "int"))
    flags += kprobe_flags(btf, "tcp_set_state", "FS_TCP_SET_STATE", state_arguments)
    if btf.has("inet_sk_set_state", (KIND_FUNC,)):  # LISTEN and new child sockets change state there
        flags += ["-DFS_KPROBE_INET_SK_SET_STATE"]
        flags += kprobe_flags(btf, "inet_sk_set_state", "FS_INET_SK_SET_STATE", state_arguments)
    return flags


def _tcp_options(options: object) -> list[str]:
    return [
        f"-DFLOWSCOPE_TCP_EVENTS_PER_SECOND={_option(options, 'tcp_events_per_second', 1000)}",
        f"-DFLOWSCOPE_RTT_SAMPLE_NS={_option(options, 'rtt_sample_ms', 100) * 1_000_000}ULL",
    ]


def tcp_flags(btf: Btf | None, options: object) -> list[str]:
    btf = require_btf(btf)
    flags = structure_flags(btf) + _tcp_options(options)
    sock = Argument("SK", "struct sock *")
    flags += raw_tracepoint_flags(
        btf,
        "tcp_retransmit_skb",
        "FS_TCP_RETRANSMIT",
        (sock, Argument("SKB", "struct sk_buff *"), Argument("ERR", "int", required=False)),
    )
    flags += raw_tracepoint_flags(btf, "tcp_probe", "FS_TCP_PROBE", (sock,))
    flags += raw_tracepoint_flags(
        btf,
        "tcp_send_reset",
        "FS_TCP_SEND_RESET",
        (sock, Argument("SKB", "struct sk_buff *"), Argument("REASON", "enum sk_rst_reason", required=False)),
    )
    return flags + raw_tracepoint_flags(btf, "tcp_receive_reset", "FS_TCP_RECEIVE_RESET", (sock,))


# Where a retransmit is sent: __tcp_retransmit_skb, called by tcp_retransmit_skb and by the loss probe; a
# compiler may split it so that tcp_retransmit_skb skips its entry (6.1: __tcp_retransmit_skb.part.0), so
# both are probed where the kernel has them as functions (kprobe_tcp_events.c counts each retransmit once).
RETRANSMIT_FUNCTIONS = ("__tcp_retransmit_skb", "tcp_retransmit_skb")
RETRANSMIT_DEFINES = ("FS_KP_RETRANSMIT", "FS_KP_RETRANSMIT_OUTER")


def tcp_kprobe_flags(btf: Btf | None, options: object) -> list[str]:
    btf = require_btf(btf)
    flags = structure_flags(btf) + _tcp_options(options) + ["-DFS_TCP_EVENTS_KPROBES"]
    sock, skb = Argument("SK", "struct sock *"), Argument("SKB", "struct sk_buff *")
    reason = Argument("REASON", "enum sk_rst_reason", required=False)
    first_function(btf, RETRANSMIT_FUNCTIONS)  # one at least
    for function, prefix in zip(RETRANSMIT_FUNCTIONS, RETRANSMIT_DEFINES, strict=True):
        if btf.has(function, (KIND_FUNC,)):
            flags += [f"-D{prefix}", *kprobe_flags(btf, function, prefix, (sock, skb))]
    flags += kprobe_flags(btf, "tcp_rcv_established", "FS_KP_RCV_ESTABLISHED", (sock,))
    flags += kprobe_flags(btf, "tcp_reset", "FS_KP_RESET", (sock,))
    # Optional: static functions a compiler may inline, and IPv6 (sometimes a module).
    for function, prefix, wanted in (
        ("tcp_v4_send_reset", "FS_KP_V4_SEND_RESET", (sock, skb, reason)),
        ("tcp_v6_send_reset", "FS_KP_V6_SEND_RESET", (sock, skb, reason)),
        ("tcp_send_active_reset", "FS_KP_ACTIVE_RESET", (sock, reason)),
    ):
        if btf.has(function, (KIND_FUNC,)):
            flags += [f"-D{prefix}", *kprobe_flags(btf, function, prefix, wanted)]
    return flags

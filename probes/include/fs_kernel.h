/* flowscope: reading kernel structures (sk_buff, sock, net_device, net) through offsets from BTF.
 *
 * The installed headers may belong to another kernel than the running one, so no structure layout comes
 * from them: every FS_OFF_* below is resolved from /sys/kernel/btf/vmlinux by flowscope/kernel_offsets.py
 * and passed as -D. Every read goes through bpf_probe_read_kernel, which fails cleanly (and leaves zeros)
 * on a bad pointer. Only helpers live here (no maps), so this header needs no BCC rewriting and may be
 * included by several families of one module.
 */
#ifndef FS_KERNEL_H
#define FS_KERNEL_H

#include "flowscope.h"

#define FS_AF_INET 2
#define FS_AF_INET6 10
#define FS_ETH_P_IP 0x0800
#define FS_ETH_P_IPV6 0x86DD
#define FS_IPPROTO_ICMP 1
#define FS_IPPROTO_TCP 6
#define FS_IPPROTO_UDP 17
#define FS_IPPROTO_ICMPV6 58
#define FS_IPPROTO_SCTP 132
#define FS_IPPROTO_UDPLITE 136
#define FS_IPPROTO_HOPOPTS 0
#define FS_IPPROTO_ROUTING 43
#define FS_IPPROTO_FRAGMENT 44
#define FS_IPPROTO_AH 51
#define FS_IPPROTO_DSTOPTS 60
#define FS_IPV6_EXTENSION_HEADERS 4
#define FS_HEADER_UNSET 0xFFFF /* sk_buff's transport/mac header offset before it is set */

/* A reason or state the kernel did not give (older tracepoints, no socket). */
#define FS_UNKNOWN 0xFFFFFFFF

#define FS_READ(dst, base, offset) bpf_probe_read_kernel(&(dst), sizeof(dst), (const char *)(base) + (offset))

/* Kprobe arguments by position (1-based, from BTF): FS_PARM(ctx, 2) is PT_REGS_PARM2(ctx). */
#define FS_CAT_(a, b) a##b
#define FS_CAT(a, b) FS_CAT_(a, b)
#define FS_PARM(ctx, n) FS_CAT(PT_REGS_PARM, n)(ctx)

static __always_inline void *fs_read_ptr(const void *base, __u32 offset)
{
    void *value = 0;
    FS_READ(value, base, offset);
    return value;
}

static __always_inline __u32 fs_netns_of_net(const void *net)
{
    __u32 inum = 0;
#ifdef FS_OFF_NET_INUM
    if (net)
        FS_READ(inum, net, FS_OFF_NET_INUM);
#endif
    return inum;
}

static __always_inline __u32 fs_sock_netns(const void *sk)
{
#ifdef FS_OFF_SKC_NET
    return sk ? fs_netns_of_net(fs_read_ptr(sk, FS_OFF_SKC_NET)) : 0;
#else
    return 0;
#endif
}

static __always_inline __u8 fs_sock_state(const void *sk)
{
    __u8 state = 0;
    if (sk)
        FS_READ(state, sk, FS_OFF_SKC_STATE);
    return state;
}

/* sk->sk_protocol: a plain field on current kernels, a bitfield before 5.6 (FS_SK_PROTOCOL_BITS set). */
static __always_inline __u16 fs_sock_protocol(const void *sk)
{
#ifdef FS_SK_PROTOCOL_BITS
    __u32 word = 0;
    FS_READ(word, sk, FS_OFF_SK_PROTOCOL);
    return (word >> FS_SK_PROTOCOL_SHIFT) & ((1u << FS_SK_PROTOCOL_BITS) - 1);
#else
    __u16 protocol = 0;
    FS_READ(protocol, sk, FS_OFF_SK_PROTOCOL);
    return protocol;
#endif
}

static __always_inline int fs_is_v4_mapped(const __u8 *addr)
{
    return ((const __u32 *)addr)[0] == 0 && ((const __u32 *)addr)[1] == 0 && addr[8] == 0 && addr[9] == 0 &&
           addr[10] == 0xff && addr[11] == 0xff;
}

/* The socket's connection as a flow key from the local end (saddr = local) to the remote end.
 * Works for full, request and time-wait sockets alike: everything read lives in struct sock_common.
 * Returns 0 when the socket is neither IPv4 nor IPv6. */
static __always_inline int fs_key_from_sock(const void *sk, struct flow_key *key)
{
    __u16 family = 0, local_port = 0;
    __be16 remote_port = 0;
    FS_READ(family, sk, FS_OFF_SKC_FAMILY);
    FS_READ(local_port, sk, FS_OFF_SKC_NUM);
    FS_READ(remote_port, sk, FS_OFF_SKC_DPORT);
    if (local_port == 0) {
        /* A full socket that gave its port back (closing; its time-wait socket holds the binding now)
         * still has it in inet_sock. Request and time-wait sockets always have skc_num. */
        __be16 source_port = 0;
        FS_READ(source_port, sk, FS_OFF_INET_SPORT);
        local_port = bpf_ntohs(source_port);
    }
    key->sport = local_port;
    key->dport = bpf_ntohs(remote_port);
    key->proto = FS_IPPROTO_TCP;
    if (family == FS_AF_INET) {
        __be32 local = 0, remote = 0;
        FS_READ(local, sk, FS_OFF_SKC_RCV_SADDR);
        FS_READ(remote, sk, FS_OFF_SKC_DADDR);
        fs_set_ipv4(key->saddr, local);
        fs_set_ipv4(key->daddr, remote);
        key->ip_version = 4;
        return 1;
    }
#ifdef FS_OFF_SKC_V6_DADDR
    if (family == FS_AF_INET6) {
        bpf_probe_read_kernel(key->saddr, 16, (const char *)sk + FS_OFF_SKC_V6_RCV_SADDR);
        bpf_probe_read_kernel(key->daddr, 16, (const char *)sk + FS_OFF_SKC_V6_DADDR);
        /* An IPv4 connection on a dual-stack socket travels as IPv4, as the tc flow key counts it. */
        key->ip_version = fs_is_v4_mapped(key->saddr) ? 4 : 6;
        return 1;
    }
#endif
    return 0;
}

static __always_inline void fs_swap_key(struct flow_key *key)
{
    __u8 addr[16];
    __builtin_memcpy(addr, key->saddr, 16);
    __builtin_memcpy(key->saddr, key->daddr, 16);
    __builtin_memcpy(key->daddr, addr, 16);
    __u16 port = key->sport;
    key->sport = key->dport;
    key->dport = port;
}

/* The sk_buff fields the probes use, read with one bpf_probe_read_kernel of the window of struct sk_buff
 * that holds them all (FS_SKB_WINDOW_START/_SIZE, from BTF like the offsets): a drop storm runs this
 * for every dropped packet, and each read costs about as much as a hash lookup. */
struct fs_skb {
    unsigned char *head;
    unsigned char *data;
    void *dev;
    void *sk;
    __u32 len;
    __u32 iif;
    __u16 network;
    __u16 transport;
    __u16 mac;
    __be16 protocol;
};

#define FS_SKB_FIELD(window, field, offset) \
    __builtin_memcpy(&(field), (window) + (offset) - FS_SKB_WINDOW_START, sizeof(field))

static __always_inline int fs_skb_read(const void *skb, struct fs_skb *view)
{
    __u8 window[FS_SKB_WINDOW_SIZE];
    if (bpf_probe_read_kernel(window, sizeof(window), (const char *)skb + FS_SKB_WINDOW_START))
        return 0;
    FS_SKB_FIELD(window, view->head, FS_OFF_SKB_HEAD);
    FS_SKB_FIELD(window, view->data, FS_OFF_SKB_DATA);
    FS_SKB_FIELD(window, view->dev, FS_OFF_SKB_DEV);
    FS_SKB_FIELD(window, view->sk, FS_OFF_SKB_SK);
    FS_SKB_FIELD(window, view->len, FS_OFF_SKB_LEN);
    FS_SKB_FIELD(window, view->iif, FS_OFF_SKB_IIF);
    FS_SKB_FIELD(window, view->network, FS_OFF_SKB_NETWORK_HEADER);
    FS_SKB_FIELD(window, view->transport, FS_OFF_SKB_TRANSPORT_HEADER);
    FS_SKB_FIELD(window, view->mac, FS_OFF_SKB_MAC_HEADER);
    FS_SKB_FIELD(window, view->protocol, FS_OFF_SKB_PROTOCOL);
    return view->head != 0;
}

/* Fills addresses, protocol and ports (ICMP: type/code) from the packet an skb holds, using the header
 * offsets the stack recorded in it; one read covers the IP header and, without IP options or IPv6
 * extension headers, the ports. Returns 0 when the packet is not IPv4/IPv6 or its headers are not set. */
#define FS_PACKET_READ 72 /* an IPv6 header and the ports after it; IPv4 with up to 40 bytes of options */
#define FS_PORTS_IN_READ 60 /* the L4 header offsets whose ports the read holds (masked with 63 below) */

static __always_inline int fs_key_from_skb(const struct fs_skb *view, struct flow_key *key)
{
    __u8 packet[FS_PACKET_READ];
    if (bpf_probe_read_kernel(packet, sizeof(packet), view->head + view->network))
        return 0;
    __u8 l4proto = 0;
    __u32 header = 0; /* bytes from the network header to the L4 header */
    int fragment = 0;
    if (view->protocol == bpf_htons(FS_ETH_P_IP)) {
        if ((packet[0] >> 4) != 4 || (packet[0] & 0xF) < 5)
            return 0;
        __be32 saddr, daddr;
        __builtin_memcpy(&saddr, packet + 12, 4);
        __builtin_memcpy(&daddr, packet + 16, 4);
        fs_set_ipv4(key->saddr, saddr);
        fs_set_ipv4(key->daddr, daddr);
        key->ip_version = 4;
        l4proto = packet[9];
        fragment = ((packet[6] & 0x1F) | packet[7]) != 0; /* not the first fragment: no L4 header */
        header = (packet[0] & 0xF) * 4;
    } else if (view->protocol == bpf_htons(FS_ETH_P_IPV6)) {
        if ((packet[0] >> 4) != 6)
            return 0;
        __builtin_memcpy(key->saddr, packet + 8, 16);
        __builtin_memcpy(key->daddr, packet + 24, 16);
        key->ip_version = 6;
        l4proto = packet[6];
        header = 40;
        /* Extension headers, as the tc probe walks them: the protocol is the last one's next header. */
#pragma unroll
        for (int i = 0; i < FS_IPV6_EXTENSION_HEADERS; i++) {
            if (l4proto != FS_IPPROTO_HOPOPTS && l4proto != FS_IPPROTO_ROUTING && l4proto != FS_IPPROTO_DSTOPTS &&
                l4proto != FS_IPPROTO_FRAGMENT && l4proto != FS_IPPROTO_AH)
                break;
            __u8 ext[4];
            if (bpf_probe_read_kernel(ext, sizeof(ext), view->head + view->network + header)) {
                key->proto = l4proto;
                key->flags |= FS_KEY_NO_PORTS;
                return 1;
            }
            if (l4proto == FS_IPPROTO_FRAGMENT) {
                fragment = ((ext[2] << 8 | ext[3]) & 0xFFF8) != 0;
                header += 8;
            } else if (l4proto == FS_IPPROTO_AH) {
                header += (ext[1] + 2) * 4;
            } else {
                header += (ext[1] + 1) * 8;
            }
            l4proto = ext[0];
        }
    } else {
        return 0;
    }
    /* The stack records where the L4 header is once it has parsed past IP options or IPv6 extension
     * headers; before that (early drops), the fixed header length is the best guess and holds for
     * packets without extension headers. */
    if (view->transport != FS_HEADER_UNSET && view->transport > view->network)
        header = view->transport - view->network;
    key->proto = l4proto;
    if (fragment) {
        key->flags |= FS_KEY_NO_PORTS;
        return 1;
    }
    int has_ports = l4proto == FS_IPPROTO_TCP || l4proto == FS_IPPROTO_UDP || l4proto == FS_IPPROTO_SCTP ||
                    l4proto == FS_IPPROTO_UDPLITE;
    int icmp = l4proto == FS_IPPROTO_ICMP || l4proto == FS_IPPROTO_ICMPV6;
    if (!has_ports && !icmp)
        return 1;
    __u8 ports[4] = {};
    if (header <= FS_PORTS_IN_READ) {
        __builtin_memcpy(ports, packet + (header & 63), 4); /* the mask shows the verifier the bound */
    } else if (bpf_probe_read_kernel(ports, 4, view->head + view->network + header)) {
        key->flags |= FS_KEY_NO_PORTS;
        return 1;
    }
    if (has_ports) {
        key->sport = (ports[0] << 8) | ports[1];
        key->dport = (ports[2] << 8) | ports[3];
    } else {
        key->sport = ports[0];
        key->dport = ports[1];
    }
    return 1;
}

/* Where an skb is (interface, direction, network namespace), the way the tc probe keys the same packet:
 * a received packet (skb_iif set) on the device it arrived at, ingress; a locally sent one on its
 * output device, egress. The netns comes from the device, or from the owning socket when the device is
 * not set (early egress) or its field holds a socket's scratch value. */
static __always_inline __u32 fs_skb_place(const struct fs_skb *view, const void *fallback_sk, struct flow_key *key)
{
    __u32 ifindex = 0, netns = 0;
#if defined(FS_OFF_DEV_NET) && FS_OFF_DEV_NET > FS_OFF_DEV_IFINDEX && FS_OFF_DEV_NET - FS_OFF_DEV_IFINDEX <= 64
    /* The device's ifindex and network namespace in one read of the window that holds both (each read
     * costs ~30 ns in a drop storm). */
    __u8 window[FS_OFF_DEV_NET - FS_OFF_DEV_IFINDEX + 8];
    if (view->dev && bpf_probe_read_kernel(window, sizeof(window), (const char *)view->dev + FS_OFF_DEV_IFINDEX) == 0) {
        void *net;
        __builtin_memcpy(&ifindex, window, sizeof(ifindex));
        __builtin_memcpy(&net, window + FS_OFF_DEV_NET - FS_OFF_DEV_IFINDEX, sizeof(net));
        netns = fs_netns_of_net(net);
    }
#else
    if (view->dev && FS_READ(ifindex, view->dev, FS_OFF_DEV_IFINDEX) == 0) {
#ifdef FS_OFF_DEV_NET
        netns = fs_netns_of_net(fs_read_ptr(view->dev, FS_OFF_DEV_NET));
#endif
    } else {
        ifindex = 0;
    }
#endif
    if (!netns)
        netns = fs_sock_netns(view->sk ? view->sk : fallback_sk);
    key->direction = view->iif ? FS_DIRECTION_INGRESS : FS_DIRECTION_EGRESS;
    key->ifindex = view->iif ? view->iif : ifindex;
    return netns;
}

/* The packet's length as the tc probe counts it (from the link-layer header on) where the skb still
 * records that header, else from the network header (a packet dropped before it had one). skb->len alone
 * would depend on how far the stack had pulled the packet when it dropped it. */
static __always_inline __u32 fs_skb_len(const struct fs_skb *view)
{
    __u64 start = (__u64)view->head + (view->mac != FS_HEADER_UNSET && view->mac <= view->network ? view->mac
                                                                                                  : view->network);
    __u64 data = (__u64)view->data;
    if (data >= start && data - start < 65536)
        return view->len + (data - start);
    return view->len;
}

static __always_inline void fs_event_from_key(struct fs_event *event, const struct flow_key *key)
{
    __builtin_memcpy(event->saddr, key->saddr, 16);
    __builtin_memcpy(event->daddr, key->daddr, 16);
    event->sport = key->sport;
    event->dport = key->dport;
    event->proto = key->proto;
    event->ip_version = key->ip_version;
    event->direction = key->direction;
    event->ifindex = key->ifindex;
    event->key_flags = key->flags;
}

#endif /* FS_KERNEL_H */

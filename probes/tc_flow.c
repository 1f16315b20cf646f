/* tc clsact ingress + egress: per-flow packet and byte counters in a kernel hash map.
 *
 * No per-packet event leaves the kernel: user space drains the previous generation's map every
 * interval. When the map is full, the packet is counted and spilled through the event ring, so that
 * no flow disappears; if the ring is full too, the packet is counted as lost.
 *
 * A packet is an skb as tc sees it, and its bytes are skb->len (Ethernet header included; a VLAN tag the
 * kernel holds outside the frame is not). A GSO super-packet counts once, with all its payload: where the
 * device segments in software after tc, the wire carries more packets, each with its own headers. */
#include "flowscope.h"
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#define FS_ETH_P_8021Q 0x8100
#define FS_ETH_P_8021AD 0x88A8
#define FS_IPV6_MAX_EXT_HEADERS 4

BPF_HASH(flows_0, struct flow_key, struct flow_stats, FLOWSCOPE_FLOW_MAP_SIZE);
BPF_HASH(flows_1, struct flow_key, struct flow_stats, FLOWSCOPE_FLOW_MAP_SIZE);

struct fs_vlan_hdr {
    __be16 tci;
    __be16 encapsulated_proto;
};

#define FS_PARSE_NOT_IP 0
#define FS_PARSE_DONE 1
#define FS_PARSE_SHORT 2 /* a header runs past the linear data; the key holds what was read before it */
#define FS_PULL_BYTES 256 /* enough for Ethernet, two VLAN tags, IPv6 with options, and TCP */

/* Fills the key's addresses, protocol and ports (or ICMP type/code) from the packet.
 * A packet whose transport header cannot be read (a non-first fragment, a protocol without ports, a short
 * packet) keeps FS_KEY_NO_PORTS, so user space shows no ports rather than made-up zeros. */
static __always_inline int fs_parse(struct __sk_buff *skb, struct flow_key *key, __u64 *tcp_flags)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    __u32 offset = sizeof(*eth);
    if (data + offset > data_end)
        return FS_PARSE_SHORT;
    __u16 proto = eth->h_proto;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (proto != htons(FS_ETH_P_8021Q) && proto != htons(FS_ETH_P_8021AD))
            break;
        struct fs_vlan_hdr *vlan = data + offset;
        if ((void *)(vlan + 1) > data_end)
            return FS_PARSE_SHORT;
        proto = vlan->encapsulated_proto;
        offset += sizeof(*vlan);
    }

    __u8 l4proto;
    int fragment = 0;
    if (proto == htons(ETH_P_IP)) {
        struct iphdr *ip = data + offset;
        if ((void *)(ip + 1) > data_end)
            return FS_PARSE_SHORT;
        key->ip_version = 4;
        fs_set_ipv4(key->saddr, ip->saddr);
        fs_set_ipv4(key->daddr, ip->daddr);
        key->proto = ip->protocol;
        key->flags = FS_KEY_NO_PORTS; /* until a transport header is read */
        l4proto = ip->protocol;
        /* Not the first fragment (no transport header), or a malformed header length. */
        fragment = (ip->frag_off & htons(0x1FFF)) != 0 || ip->ihl < 5;
        offset += ip->ihl * 4;
    } else if (proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + offset;
        if ((void *)(ip6 + 1) > data_end)
            return FS_PARSE_SHORT;
        key->ip_version = 6;
        __builtin_memcpy(key->saddr, &ip6->saddr, 16);
        __builtin_memcpy(key->daddr, &ip6->daddr, 16);
        key->flags = FS_KEY_NO_PORTS;
        l4proto = ip6->nexthdr;
        offset += sizeof(*ip6);
#pragma unroll
        for (int i = 0; i < FS_IPV6_MAX_EXT_HEADERS; i++) {
            if (l4proto != IPPROTO_HOPOPTS && l4proto != IPPROTO_ROUTING && l4proto != IPPROTO_DSTOPTS &&
                l4proto != IPPROTO_FRAGMENT && l4proto != IPPROTO_AH)
                break;
            key->proto = l4proto; /* if the walk stops here, the flow is keyed by the header it stopped at */
            __u8 *ext = data + offset;
            if ((void *)(ext + 8) > data_end)
                return FS_PARSE_SHORT;
            if (l4proto == IPPROTO_FRAGMENT) {
                fragment = ((ext[2] << 8 | ext[3]) & 0xFFF8) != 0;
                offset += 8;
            } else if (l4proto == IPPROTO_AH) {
                offset += (ext[1] + 2) * 4; /* AH counts 4-byte words, minus 2 */
            } else {
                offset += (ext[1] + 1) * 8;
            }
            l4proto = ext[0];
        }
        key->proto = l4proto;
    } else {
        return FS_PARSE_NOT_IP;
    }
    if (fragment)
        return FS_PARSE_DONE;

    __u8 *l4 = data + offset;
    if (l4proto == IPPROTO_TCP) {
        if ((void *)(l4 + 14) > data_end)
            return FS_PARSE_SHORT;
        key->sport = (l4[0] << 8) | l4[1];
        key->dport = (l4[2] << 8) | l4[3];
        *tcp_flags = l4[13] | ((l4[12] & 0x01) << 8);
    } else if (l4proto == IPPROTO_UDP || l4proto == IPPROTO_SCTP || l4proto == IPPROTO_UDPLITE) {
        if ((void *)(l4 + 4) > data_end)
            return FS_PARSE_SHORT;
        key->sport = (l4[0] << 8) | l4[1];
        key->dport = (l4[2] << 8) | l4[3];
    } else if (l4proto == IPPROTO_ICMP || l4proto == IPPROTO_ICMPV6) {
        if ((void *)(l4 + 2) > data_end)
            return FS_PARSE_SHORT;
        key->sport = l4[0];
        key->dport = l4[1];
    } else {
        return FS_PARSE_DONE; /* a protocol without ports */
    }
    key->flags = 0;
    return FS_PARSE_DONE;
}

/* The current generation's entry for `key`. One map per lookup call, so that the verifier inlines each:
 * clang would merge `generation ? flows_1.lookup() : flows_0.lookup()` into one call on a selected map,
 * which the verifier leaves to the generic helper and its indirect call (BPF_PROG_TEST_RUN 57 -> 42 ns,
 * live 171 -> 124 ns a packet). The empty asm after one of the two keeps them apart. */
static __always_inline struct flow_stats *fs_flow_lookup(__u32 generation, struct flow_key *key)
{
    struct flow_stats *stats;
    if (generation) {
        stats = flows_1.lookup(key);
        asm volatile("" : "+r"(stats));
    } else {
        stats = flows_0.lookup(key);
    }
    return stats;
}

static __always_inline int fs_account(struct __sk_buff *skb, __u8 direction)
{
    struct flow_key key = {};
    __u64 tcp_flags = 0;
    __u32 generation = fs_current_generation();
    __u64 len = skb->len;

    fs_count(generation, FS_CNT_TC_PACKETS, 1);
    fs_count(generation, FS_CNT_TC_BYTES, len);
    int parsed = fs_parse(skb, &key, &tcp_flags);
    if (parsed == FS_PARSE_SHORT && len > (__u64)((long)skb->data_end - (long)skb->data)) {
        /* Some drivers leave part of the headers in page fragments: pull them into the linear data and
         * parse again, so that the flow is keyed by its real 5-tuple. */
        __builtin_memset(&key, 0, sizeof(key));
        tcp_flags = 0;
        bpf_skb_pull_data(skb, len < FS_PULL_BYTES ? len : FS_PULL_BYTES);
        parsed = fs_parse(skb, &key, &tcp_flags);
    }
    if (parsed == FS_PARSE_NOT_IP)
        __builtin_memset(&key, 0, sizeof(key)); /* not IP: counted per interface and direction only */
    key.ifindex = skb->ifindex;
    key.direction = direction;

    __u64 now = fs_now();
    struct flow_stats *stats = fs_flow_lookup(generation, &key);
    if (!stats) {
        /* Read when the interval's entry is created, not per packet: a flow's socket, and so its cgroup,
         * stays the same. */
        __u64 cgroup_id = direction == FS_DIRECTION_EGRESS ? bpf_skb_cgroup_id(skb) : 0;
        struct flow_stats fresh = {};
        fresh.packets = 1;
        fresh.bytes = len;
        fresh.first_seen_ns = now;
        fresh.last_seen_ns = now;
        fresh.cgroup_id = cgroup_id;
        fresh.tcp_flags = tcp_flags;
        int err = generation ? flows_1.insert(&key, &fresh) : flows_0.insert(&key, &fresh);
        if (err == 0)
            return TC_ACT_UNSPEC;
        /* Another CPU inserted the same key first: add to its entry. */
        stats = fs_flow_lookup(generation, &key);
        if (!stats) {
            /* The map is full: spill this packet through the ring so the flow is still counted. */
            struct fs_event spill = {};
            spill.ts_ns = now;
            __builtin_memcpy(spill.saddr, key.saddr, 16);
            __builtin_memcpy(spill.daddr, key.daddr, 16);
            spill.sport = key.sport;
            spill.dport = key.dport;
            spill.kind = FS_EV_FLOW_SPILL;
            spill.proto = key.proto;
            spill.ip_version = key.ip_version;
            spill.direction = direction;
            spill.ifindex = key.ifindex;
            spill.cgroup_id = cgroup_id;
            spill.value = len;
            spill.tcp_flags = tcp_flags;
            spill.key_flags = key.flags;
            fs_count(generation, FS_CNT_FLOW_MAP_FULL, 1);
            if (fs_emit(skb, &spill, generation))
                fs_count(generation, FS_CNT_SPILL_LOST_BYTES, len);
            return TC_ACT_UNSPEC;
        }
    }
    __sync_fetch_and_add(&stats->packets, 1);
    __sync_fetch_and_add(&stats->bytes, len);
    if (tcp_flags)
        __sync_fetch_and_or(&stats->tcp_flags, tcp_flags);
    stats->last_seen_ns = now;
    return TC_ACT_UNSPEC;
}

int fs_tc_ingress(struct __sk_buff *skb)
{
    return fs_account(skb, FS_DIRECTION_INGRESS);
}

int fs_tc_egress(struct __sk_buff *skb)
{
    return fs_account(skb, FS_DIRECTION_EGRESS);
}

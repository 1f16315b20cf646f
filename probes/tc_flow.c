/* tc clsact ingress + egress: per-flow packet and byte counters in a kernel hash map.
 *
 * No per-packet event leaves the kernel: user space drains the previous generation's map every
 * interval. When the map is full, the packet is counted and spilled through the event ring, so that
 * no flow disappears; if the ring is full too, the packet is counted as lost. */
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

/* Fills the key's addresses, protocol and ports (or ICMP type/code) from the packet; 0 when it is not IP. */
static __always_inline int fs_parse(struct __sk_buff *skb, struct flow_key *key, __u64 *tcp_flags)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    __u32 offset = sizeof(*eth);
    if (data + offset > data_end)
        return 0;
    __u16 proto = eth->h_proto;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (proto != htons(FS_ETH_P_8021Q) && proto != htons(FS_ETH_P_8021AD))
            break;
        struct fs_vlan_hdr *vlan = data + offset;
        if ((void *)(vlan + 1) > data_end)
            return 0;
        proto = vlan->encapsulated_proto;
        offset += sizeof(*vlan);
    }

    __u8 l4proto;
    int fragment = 0;
    if (proto == htons(ETH_P_IP)) {
        struct iphdr *ip = data + offset;
        if ((void *)(ip + 1) > data_end)
            return 0;
        key->ip_version = 4;
        fs_set_ipv4(key->saddr, ip->saddr);
        fs_set_ipv4(key->daddr, ip->daddr);
        l4proto = ip->protocol;
        fragment = (ip->frag_off & htons(0x1FFF)) != 0; /* not the first fragment: no L4 header */
        offset += ip->ihl * 4;
    } else if (proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + offset;
        if ((void *)(ip6 + 1) > data_end)
            return 0;
        key->ip_version = 6;
        __builtin_memcpy(key->saddr, &ip6->saddr, 16);
        __builtin_memcpy(key->daddr, &ip6->daddr, 16);
        l4proto = ip6->nexthdr;
        offset += sizeof(*ip6);
#pragma unroll
        for (int i = 0; i < FS_IPV6_MAX_EXT_HEADERS; i++) {
            if (l4proto != IPPROTO_HOPOPTS && l4proto != IPPROTO_ROUTING && l4proto != IPPROTO_DSTOPTS &&
                l4proto != IPPROTO_FRAGMENT)
                break;
            __u8 *ext = data + offset;
            if ((void *)(ext + 8) > data_end)
                return 0;
            if (l4proto == IPPROTO_FRAGMENT) {
                fragment = ((ext[2] << 8 | ext[3]) & 0xFFF8) != 0;
                l4proto = ext[0];
                offset += 8;
            } else {
                l4proto = ext[0];
                offset += (ext[1] + 1) * 8;
            }
        }
    } else {
        return 0;
    }
    key->proto = l4proto;
    if (fragment)
        return 1;

    __u8 *l4 = data + offset;
    if (l4proto == IPPROTO_TCP) {
        if ((void *)(l4 + 14) > data_end)
            return 1;
        key->sport = (l4[0] << 8) | l4[1];
        key->dport = (l4[2] << 8) | l4[3];
        *tcp_flags = l4[13] | ((l4[12] & 0x01) << 8);
    } else if (l4proto == IPPROTO_UDP || l4proto == IPPROTO_SCTP || l4proto == IPPROTO_UDPLITE) {
        if ((void *)(l4 + 4) > data_end)
            return 1;
        key->sport = (l4[0] << 8) | l4[1];
        key->dport = (l4[2] << 8) | l4[3];
    } else if (l4proto == IPPROTO_ICMP || l4proto == IPPROTO_ICMPV6) {
        if ((void *)(l4 + 2) > data_end)
            return 1;
        key->sport = l4[0];
        key->dport = l4[1];
    }
    return 1;
}

static __always_inline int fs_account(struct __sk_buff *skb, __u8 direction)
{
    struct flow_key key = {};
    __u64 tcp_flags = 0;
    __u32 generation = fs_current_generation();
    __u64 len = skb->len;

    fs_count(generation, FS_CNT_TC_PACKETS, 1);
    fs_count(generation, FS_CNT_TC_BYTES, len);
    if (!fs_parse(skb, &key, &tcp_flags)) {
        /* Not IP: accounted per interface under protocol 0 with empty addresses. */
        key.ip_version = 0;
    }
    key.ifindex = skb->ifindex;
    key.direction = direction;

    __u64 now = bpf_ktime_get_ns();
    __u64 cgroup_id = direction == FS_DIRECTION_EGRESS ? bpf_skb_cgroup_id(skb) : 0;
    struct flow_stats *stats = generation ? flows_1.lookup(&key) : flows_0.lookup(&key);
    if (!stats) {
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
        stats = generation ? flows_1.lookup(&key) : flows_0.lookup(&key);
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
    if (cgroup_id)
        stats->cgroup_id = cgroup_id;
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

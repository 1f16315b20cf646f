/* Packet drops: skb:kfree_skb (raw tracepoint), counted in the kernel per flow and drop reason.
 *
 * Normal frees (SKB_CONSUMED, and SKB_NOT_DROPPED_YET which would be a kernel bug) never leave the
 * program; kernels before SKB_CONSUMED (Linux 6.2) free normal packets through consume_skb, which has a
 * tracepoint of its own, so there every kfree_skb is a drop (NOT_SPECIFIED where the caller gave no reason). Every drop is counted in the double-buffered drops map, so a drop storm costs a hash update
 * per packet, like normal traffic in tc; drop events (with the kernel location) go to user space through
 * a per-CPU token bucket, and what the bucket holds back is counted (FS_CNT_DROP_EVENTS_SAMPLED_OUT).
 *
 * -D flags (flowscope/kernel_offsets.py): FS_OFF_* structure offsets; FS_KFREE_SKB_ARG_SKB/_LOCATION/
 * _REASON/_RX_SK, the raw tracepoint argument positions (REASON and RX_SK only where the kernel has
 * them); FS_SKB_CONSUMED and FS_SKB_NOT_DROPPED_YET, the running kernel's enum values (where it has them).
 * The kprobe variant (kprobe_skb_drop.c) reuses everything here but the tracepoint program.
 */
#include "flowscope.h"
#include "fs_kernel.h"

#ifndef FLOWSCOPE_DROP_MAP_SIZE
#define FLOWSCOPE_DROP_MAP_SIZE 16384
#endif
#ifndef FLOWSCOPE_DROP_EVENTS_PER_SECOND
#define FLOWSCOPE_DROP_EVENTS_PER_SECOND 1000
#endif

struct drop_key {
    struct flow_key flow;
    __u32 netns; /* inode number of the network namespace the packet was dropped in */
    __u32 reason; /* enum skb_drop_reason of the running kernel (FS_UNKNOWN: the kernel gives none) */
};

struct drop_stats {
    __u64 packets;
    __u64 bytes;
    __u64 first_seen_ns;
    __u64 last_seen_ns;
    __u64 location; /* kernel address of the latest drop */
};

BPF_HASH(drops_0, struct drop_key, struct drop_stats, FLOWSCOPE_DROP_MAP_SIZE);
BPF_HASH(drops_1, struct drop_key, struct drop_stats, FLOWSCOPE_DROP_MAP_SIZE);

static __always_inline int fs_is_drop(__u32 reason)
{
    int drop = 1;
#ifdef FS_SKB_CONSUMED
    drop &= reason != FS_SKB_CONSUMED;
#endif
#ifdef FS_SKB_NOT_DROPPED_YET
    drop &= reason != FS_SKB_NOT_DROPPED_YET;
#endif
    return drop;
}

/* The current generation's entry for `key`: one map per lookup call, so that the verifier inlines each (see
 * fs_flow_lookup in tc_flow.c). */
static __always_inline struct drop_stats *fs_drop_lookup(__u32 generation, struct drop_key *key)
{
    struct drop_stats *stats;
    if (generation) {
        stats = drops_1.lookup(key);
        asm volatile("" : "+r"(stats));
    } else {
        stats = drops_0.lookup(key);
    }
    return stats;
}

static __always_inline void fs_drop(void *ctx, const void *skb, __u64 location, __u32 reason, const void *rx_sk)
{
    struct fs_skb view = {};
    if (!skb || !fs_is_drop(reason) || !fs_skb_read(skb, &view))
        return;
    __u32 generation = fs_current_generation();
    __u64 now = fs_now();
    __u32 len = fs_skb_len(&view);
    struct drop_key key = {};
    if (!fs_key_from_skb(&view, &key.flow))
        __builtin_memset(&key.flow, 0, sizeof(key.flow)); /* not IP: counted per interface, ip_version 0 */
    key.netns = fs_skb_place(&view, rx_sk, &key.flow);
    key.reason = reason;
    fs_count(generation, FS_CNT_DROPS, 1);

    struct drop_stats *stats = fs_drop_lookup(generation, &key);
    if (!stats) {
        struct drop_stats fresh = {};
        fresh.first_seen_ns = now;
        if (generation)
            drops_1.insert(&key, &fresh);
        else
            drops_0.insert(&key, &fresh);
        /* Looked up again: another CPU may have inserted the key first. */
        stats = fs_drop_lookup(generation, &key);
    }
    if (stats) {
        __sync_fetch_and_add(&stats->packets, 1);
        __sync_fetch_and_add(&stats->bytes, len);
        stats->last_seen_ns = now;
        stats->location = location;
    } else {
        fs_count(generation, FS_CNT_DROP_MAP_FULL, 1);
    }

    if (!fs_take_token(FS_BUCKET_DROP_EVENTS, FLOWSCOPE_DROP_EVENTS_PER_SECOND, now)) {
        fs_count(generation, FS_CNT_DROP_EVENTS_SAMPLED_OUT, 1);
        return;
    }
    struct fs_event event = {};
    fs_event_from_key(&event, &key.flow);
    event.ts_ns = bpf_ktime_get_ns(); /* precise: events are rate-limited */
    event.kind = FS_EV_DROP;
    event.netns = key.netns;
    event.reason = reason;
    event.location = location;
    event.value = len;
    fs_emit(ctx, &event, generation);
}

#ifndef FS_SKB_DROP_KPROBES
RAW_TRACEPOINT_PROBE(kfree_skb)
{
#ifdef FS_KFREE_SKB_ARG_REASON
    __u32 reason = (__u32)ctx->args[FS_KFREE_SKB_ARG_REASON];
#else
    __u32 reason = FS_UNKNOWN;
#endif
#ifdef FS_KFREE_SKB_ARG_RX_SK
    const void *rx_sk = (const void *)ctx->args[FS_KFREE_SKB_ARG_RX_SK];
#else
    const void *rx_sk = 0;
#endif
    fs_drop(ctx, (const void *)ctx->args[FS_KFREE_SKB_ARG_SKB], ctx->args[FS_KFREE_SKB_ARG_LOCATION], reason, rx_sk);
    return 0;
}
#endif

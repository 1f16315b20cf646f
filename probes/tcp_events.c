/* TCP health per flow: retransmits, resets and smoothed RTT samples, counted in the kernel.
 *
 * Raw tracepoints tcp:tcp_retransmit_skb, tcp:tcp_probe, tcp:tcp_send_reset and tcp:tcp_receive_reset
 * (cheaper per hit than classic tracepoints: no trace record is built; argument positions and structure
 * offsets come from the running kernel's BTF as -D flags, see flowscope/kernel_offsets.py).
 *
 * Orientation of the double-buffered tcp map's keys: retransmits and RTT belong to the data direction
 * (the socket's local -> remote end, egress); a reset to the RST segment's direction (sender -> receiver:
 * egress where it was sent, ingress where only its reception was seen). When both ends of a connection
 * live on this node, tcp_send_reset and tcp_receive_reset both fire for one RST: the sender notes the RST
 * in fs_resets_sent and the receiver consumes the note instead of counting the RST again.
 *
 * RTT: tcp_probe fires for every segment an established socket receives; each socket is sampled about once
 * per FLOWSCOPE_RTT_SAMPLE_NS per CPU (fs_rtt_slots), so most segments cost an array access.
 */
#include "flowscope.h"
#include "fs_kernel.h"

#ifndef FLOWSCOPE_TCP_MAP_SIZE
#define FLOWSCOPE_TCP_MAP_SIZE 16384
#endif
#ifndef FLOWSCOPE_TCP_EVENTS_PER_SECOND
#define FLOWSCOPE_TCP_EVENTS_PER_SECOND 1000
#endif
#ifndef FLOWSCOPE_RTT_SAMPLE_NS
#define FLOWSCOPE_RTT_SAMPLE_NS 100000000ULL
#endif
#ifndef FLOWSCOPE_RTT_SLOTS
#define FLOWSCOPE_RTT_SLOTS 4096 /* per CPU; a power of two */
#endif
#ifndef FLOWSCOPE_RESETS_PENDING
#define FLOWSCOPE_RESETS_PENDING 4096
#endif

struct tcp_key {
    struct flow_key flow; /* ifindex 0 unless the interface is known (a reset answering a received segment) */
    __u32 netns;
};

struct tcp_stats {
    __u64 retransmits;
    __u64 resets;
    __u64 rtt_samples;
    __u64 srtt_sum_us;
    __u64 first_seen_ns;
    __u64 last_seen_ns;
    __u32 srtt_us; /* the latest sample */
    __u32 pad;
};

/* A RST by its segment's addresses and ports (no namespace: sender and receiver may be in different ones). */
struct fs_rst_key {
    __u8 saddr[16];
    __u8 daddr[16];
    __u16 sport;
    __u16 dport;
};

BPF_HASH(tcp_0, struct tcp_key, struct tcp_stats, FLOWSCOPE_TCP_MAP_SIZE);
BPF_HASH(tcp_1, struct tcp_key, struct tcp_stats, FLOWSCOPE_TCP_MAP_SIZE);
/* The sockets a CPU sampled lately, direct-mapped by socket address: a segment of a socket sampled less
 * than FLOWSCOPE_RTT_SAMPLE_NS ago costs one array access, not a hash lookup. Two sockets that share a slot
 * evict each other, and each then samples again: more samples, never fewer. */
struct fs_rtt_slot {
    __u64 socket;
    __u64 sampled_ns;
};
BPF_PERCPU_ARRAY(fs_rtt_slots, struct fs_rtt_slot, FLOWSCOPE_RTT_SLOTS);
BPF_TABLE("lru_hash", struct fs_rst_key, __u64, fs_resets_sent, FLOWSCOPE_RESETS_PENDING);

/* One map per lookup call, so that the verifier inlines each (see fs_flow_lookup in tc_flow.c). */
static __always_inline struct tcp_stats *fs_tcp_lookup(__u32 generation, struct tcp_key *key)
{
    struct tcp_stats *stats;
    if (generation) {
        stats = tcp_1.lookup(key);
        asm volatile("" : "+r"(stats));
    } else {
        stats = tcp_0.lookup(key);
    }
    return stats;
}

static __always_inline struct tcp_stats *fs_tcp_entry(__u32 generation, struct tcp_key *key, __u64 now)
{
    struct tcp_stats *stats = fs_tcp_lookup(generation, key);
    if (stats)
        return stats;
    struct tcp_stats fresh = {};
    fresh.first_seen_ns = now;
    if (generation)
        tcp_1.insert(key, &fresh);
    else
        tcp_0.insert(key, &fresh);
    return fs_tcp_lookup(generation, key); /* NULL: the map is full */
}

static __always_inline void fs_tcp_event(void *ctx, __u32 generation, struct tcp_key *key, __u8 kind, __u64 now,
                                         __u32 reason, int state, __u32 n)
{
    if (!fs_take_token(FS_BUCKET_TCP_EVENTS, FLOWSCOPE_TCP_EVENTS_PER_SECOND, now)) {
        fs_count(generation, FS_CNT_TCP_EVENTS_SAMPLED_OUT, n);
        return;
    }
    struct fs_event event = {};
    fs_event_from_key(&event, &key->flow);
    event.ts_ns = now;
    event.kind = kind;
    event.netns = key->netns;
    event.reason = reason;
    event.new_state = state;
    event.value = n; /* segments (retransmits) */
    fs_emit(ctx, &event, generation);
}

/* Counts `n` retransmitted segments or one reset on `key` and sends its (rate-limited) event. */
static __always_inline void fs_tcp_count(void *ctx, struct tcp_key *key, __u8 kind, __u32 reason, int state, __u32 n)
{
    __u32 generation = fs_current_generation();
    __u64 now = bpf_ktime_get_ns();
    fs_count(generation, FS_CNT_TCP_COUNTS, n);
    struct tcp_stats *stats = fs_tcp_entry(generation, key, now);
    if (stats) {
        if (kind == FS_EV_RETRANSMIT)
            __sync_fetch_and_add(&stats->retransmits, n);
        else
            __sync_fetch_and_add(&stats->resets, n);
        stats->last_seen_ns = now;
    } else {
        fs_count(generation, FS_CNT_TCP_MAP_FULL, n);
    }
    fs_tcp_event(ctx, generation, key, kind, now, reason, state, n);
}

static __always_inline void fs_rst_key(struct fs_rst_key *rst, const struct flow_key *flow)
{
    __builtin_memcpy(rst->saddr, flow->saddr, 16);
    __builtin_memcpy(rst->daddr, flow->daddr, 16);
    rst->sport = flow->sport;
    rst->dport = flow->dport;
}

/* `segments` TCP segments sent again (one skb may hold several). */
static __always_inline void fs_tcp_retransmit(void *ctx, const void *sk, __u32 segments)
{
    struct tcp_key key = {};
    if (!sk || !fs_key_from_sock(sk, &key.flow))
        return;
    key.flow.direction = FS_DIRECTION_EGRESS;
    key.netns = fs_sock_netns(sk);
    fs_tcp_count(ctx, &key, FS_EV_RETRANSMIT, FS_UNKNOWN, fs_sock_state(sk), segments ? segments : 1);
}

/* The segments an skb of the write queue holds: tcp_skb_pcount(), from TCP's control block in skb->cb. */
static __always_inline __u32 fs_tcp_skb_segments(const void *skb)
{
    __u16 segments = 0;
    if (skb)
        FS_READ(segments, skb, FS_OFF_SKB_CB + FS_OFF_TCP_CB_GSO_SEGS);
    return segments;
}

static __always_inline void fs_tcp_rtt(const void *sk)
{
    /* Fibonacci hashing of the socket's address: its high bits pick the slot. */
    __u32 index = (__u32)(((__u64)sk * 0x9E3779B97F4A7C15ULL) >> 32) & (FLOWSCOPE_RTT_SLOTS - 1);
    struct fs_rtt_slot *slot = fs_rtt_slots.lookup(&index);
    if (!slot)
        return;
    __u64 now = fs_now();
    if (slot->socket == (__u64)sk && now - slot->sampled_ns < FLOWSCOPE_RTT_SAMPLE_NS)
        return;
    slot->socket = (__u64)sk;
    slot->sampled_ns = now;
    __u32 srtt8 = 0; /* tcp_sock.srtt_us holds 8 times the smoothed RTT in microseconds */
    FS_READ(srtt8, sk, FS_OFF_TCP_SRTT_US);
    if (srtt8 == 0)
        return;
    struct tcp_key key = {};
    if (!fs_key_from_sock(sk, &key.flow))
        return;
    key.flow.direction = FS_DIRECTION_EGRESS;
    key.netns = fs_sock_netns(sk);
    __u32 generation = fs_current_generation();
    struct tcp_stats *stats = fs_tcp_entry(generation, &key, now);
    if (!stats) {
        fs_count(generation, FS_CNT_RTT_MAP_FULL, 1);
        return;
    }
    stats->srtt_us = srtt8 >> 3;
    __sync_fetch_and_add(&stats->rtt_samples, 1);
    __sync_fetch_and_add(&stats->srtt_sum_us, srtt8 >> 3);
    stats->last_seen_ns = now;
}

/* A RST this node sends. With the segment it answers (skb), the RST's addresses are that segment's,
 * swapped, and it leaves by the interface the segment came in on; without one (an active reset), they
 * are the socket's. Not from the socket when both exist: a listener answering a stray segment has no
 * remote end. */
static __always_inline void fs_tcp_send_reset(void *ctx, const void *sk, const void *skb, __u32 reason)
{
    struct tcp_key key = {};
    struct fs_skb view = {};
    if (skb) {
        if (!fs_skb_read(skb, &view) || !fs_key_from_skb(&view, &key.flow))
            return;
        fs_swap_key(&key.flow);
        key.netns = fs_skb_place(&view, sk, &key.flow);
        key.flow.ifindex = key.flow.direction == FS_DIRECTION_INGRESS ? key.flow.ifindex : 0;
    } else if (sk) {
        if (!fs_key_from_sock(sk, &key.flow))
            return;
        key.netns = fs_sock_netns(sk);
    } else {
        return;
    }
    key.flow.direction = FS_DIRECTION_EGRESS;
    struct fs_rst_key rst = {};
    fs_rst_key(&rst, &key.flow);
    __u64 *pending = fs_resets_sent.lookup(&rst);
    if (pending) {
        __sync_fetch_and_add(pending, 1);
    } else {
        __u64 one = 1;
        fs_resets_sent.update(&rst, &one);
    }
    fs_tcp_count(ctx, &key, FS_EV_RESET, reason, sk ? fs_sock_state(sk) : 0, 1);
}

/* A RST a socket accepted: counted unless this node sent it (then it was counted when sent). */
static __always_inline void fs_tcp_receive_reset(void *ctx, const void *sk)
{
    struct tcp_key key = {};
    if (!sk || !fs_key_from_sock(sk, &key.flow))
        return;
    fs_swap_key(&key.flow); /* the RST travelled remote -> local */
    key.flow.direction = FS_DIRECTION_INGRESS;
    key.netns = fs_sock_netns(sk);
    struct fs_rst_key rst = {};
    fs_rst_key(&rst, &key.flow);
    __u64 *pending = fs_resets_sent.lookup(&rst);
    if (pending && *pending > 0) {
        if (*pending == 1)
            fs_resets_sent.delete(&rst);
        else
            __sync_fetch_and_add(pending, -1);
        return;
    }
    fs_tcp_count(ctx, &key, FS_EV_RESET, FS_UNKNOWN, fs_sock_state(sk), 1);
}

#ifndef FS_TCP_EVENTS_KPROBES
RAW_TRACEPOINT_PROBE(tcp_retransmit_skb)
{
#ifdef FS_TCP_RETRANSMIT_ARG_ERR
    if ((int)ctx->args[FS_TCP_RETRANSMIT_ARG_ERR] != 0)
        return 0; /* the segment was not sent again */
#endif
    /* After the retransmit, the skb holds the segments that went out again (TcpRetransSegs counts them). */
    fs_tcp_retransmit(ctx, (const void *)ctx->args[FS_TCP_RETRANSMIT_ARG_SK],
                      fs_tcp_skb_segments((const void *)ctx->args[FS_TCP_RETRANSMIT_ARG_SKB]));
    return 0;
}

RAW_TRACEPOINT_PROBE(tcp_probe)
{
    const void *sk = (const void *)ctx->args[FS_TCP_PROBE_ARG_SK];
    if (sk)
        fs_tcp_rtt(sk);
    return 0;
}

RAW_TRACEPOINT_PROBE(tcp_send_reset)
{
#ifdef FS_TCP_SEND_RESET_ARG_REASON
    __u32 reason = (__u32)ctx->args[FS_TCP_SEND_RESET_ARG_REASON];
#else
    __u32 reason = FS_UNKNOWN;
#endif
    fs_tcp_send_reset(ctx, (const void *)ctx->args[FS_TCP_SEND_RESET_ARG_SK],
                      (const void *)ctx->args[FS_TCP_SEND_RESET_ARG_SKB], reason);
    return 0;
}

RAW_TRACEPOINT_PROBE(tcp_receive_reset)
{
    fs_tcp_receive_reset(ctx, (const void *)ctx->args[FS_TCP_RECEIVE_RESET_ARG_SK]);
    return 0;
}
#endif

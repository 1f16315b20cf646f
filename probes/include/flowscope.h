/* flowscope: types, maps and helpers shared by every probe family.
 *
 * Layouts here are mirrored by numpy dtypes in flowscope/kernel_records.py; change both together.
 *
 * Double buffering: every counting map exists twice (<name>_0, <name>_1). Programs read the current
 * generation from fs_generation and update that generation's map. The reader flips the generation,
 * waits for running programs to finish (an RCU grace period, forced by a map-in-map update), then
 * drains the previous generation's maps, which no program touches any more: no update can race the
 * drain, so no count is lost at an interval boundary.
 */
#ifndef FLOWSCOPE_H
#define FLOWSCOPE_H

#ifndef FLOWSCOPE_FLOW_MAP_SIZE
#define FLOWSCOPE_FLOW_MAP_SIZE 65536
#endif
#ifndef FLOWSCOPE_RING_PAGES
#define FLOWSCOPE_RING_PAGES 4096 /* as LoadOptions.ring_pages (the loader passes it): 16 MiB; a power of two */
#endif

#define FS_DIRECTION_INGRESS 0
#define FS_DIRECTION_EGRESS 1

/* One flow key for both address families: IPv4 as IPv4-mapped IPv6. 44 bytes, no implicit padding. */
struct flow_key {
    __u8 saddr[16];
    __u8 daddr[16];
    __u16 sport; /* host byte order; ICMP/ICMPv6: type */
    __u16 dport; /* host byte order; ICMP/ICMPv6: code */
    __u32 ifindex;
    __u8 proto;
    __u8 direction;
    __u8 ip_version; /* 4 or 6; 0 when not IP (only ifindex and direction are set) */
    __u8 flags; /* FS_KEY_* */
};

/* No transport header to read ports (or ICMP type/code) from: a non-first fragment, a truncated packet. */
#define FS_KEY_NO_PORTS 0x01

struct flow_stats {
    __u64 packets;
    __u64 bytes;
    __u64 first_seen_ns; /* fs_now(): CLOCK_MONOTONIC as bpf_ktime_get_ns, to a tick */
    __u64 last_seen_ns;
    __u64 cgroup_id; /* cgroup v2 id of the sending local socket (egress) when the entry was made, 0 when none */
    __u64 tcp_flags; /* OR of the TCP flags seen (FIN=0x01 ... CWR=0x80, AE=0x100); 64 bits for atomic OR */
};

enum fs_event_kind {
    FS_EV_CONNECT = 1,
    FS_EV_ACCEPT = 2,
    FS_EV_CLOSE = 3,
    FS_EV_DROP = 4,
    FS_EV_RETRANSMIT = 5,
    FS_EV_RESET = 6,
    FS_EV_FLOW_SPILL = 7, /* a packet the full flow map could not hold */
    FS_EV_KIND_MAX = 8,
};

/* Every record on the event ring has this one fixed size (120 bytes + the ring's 8-byte header), so
 * user space decodes a whole ring's worth with one numpy view. */
struct fs_event {
    __u64 ts_ns;
    __u8 saddr[16];
    __u8 daddr[16];
    __u16 sport;
    __u16 dport;
    __u8 kind;
    __u8 proto;
    __u8 ip_version;
    __u8 direction;
    __u32 ifindex;
    __u32 netns;
    __u32 pid; /* tgid */
    __u32 reason; /* drop reason, reset reason */
    __u64 cgroup_id;
    __u64 location; /* kernel address (drops) */
    __u64 value; /* duration_ns (close), skb length (drop, spill), srtt_us */
    __s32 old_state;
    __s32 new_state;
    char comm[16];
    __u16 tcp_flags; /* spill records */
    __u8 generation; /* which interval produced it, for exact per-interval accounting */
    __u8 key_flags; /* spill records: the flow key's FS_KEY_* flags */
    __u8 pad[4];
};

/* Counters: per-CPU, one block of FS_CNT_MAX per generation. */
enum fs_counter {
    FS_CNT_TC_PACKETS = 0, /* packets seen by the tc programs */
    FS_CNT_TC_BYTES,
    FS_CNT_FLOW_MAP_FULL, /* packets that found the flow map full (then spilled to the ring) */
    FS_CNT_SPILL_LOST_BYTES, /* bytes of spills the ring could not take (packets: event lost[SPILL]) */
    FS_CNT_DROP_MAP_FULL, /* drops that found the drop-count map full */
    FS_CNT_DROP_EVENTS_SAMPLED_OUT, /* drops counted in the map but not sent as events */
    FS_CNT_TCP_MAP_FULL, /* retransmits/resets that found the tcp map full */
    FS_CNT_TCP_EVENTS_SAMPLED_OUT, /* retransmits/resets counted in the tcp map but not sent as events */
    FS_CNT_SOCK_MAP_FULL, /* connections the socket table could not hold (their events lack pid/duration) */
    FS_CNT_DROPS, /* drops seen (normal frees are filtered out before counting) */
    FS_CNT_TCP_COUNTS, /* retransmits + resets seen (a reset seen at both ends of a local connection: once) */
    FS_CNT_RTT_MAP_FULL, /* RTT samples that found the tcp map full */
    FS_CNT_EVENT_SENT_BASE = 16, /* + kind: events written to the ring */
    FS_CNT_EVENT_LOST_BASE = FS_CNT_EVENT_SENT_BASE + FS_EV_KIND_MAX, /* + kind: ring full */
    FS_CNT_MAX = FS_CNT_EVENT_LOST_BASE + FS_EV_KIND_MAX,
};

BPF_ARRAY(fs_generation, __u32, 1);
BPF_PERCPU_ARRAY(fs_counters, __u64, 2 * FS_CNT_MAX);

#ifdef FLOWSCOPE_PERF_EVENTS
BPF_PERF_OUTPUT(fs_events);
#else
BPF_RINGBUF_OUTPUT(fs_events, FLOWSCOPE_RING_PAGES);
#endif

/* The time for per-packet first/last-seen stamps: CLOCK_MONOTONIC read once per jiffy (by the first program
 * to run in it, on any CPU) and shared, since bpf_ktime_get_ns() reads the TSC and costs ~30 ns a packet.
 * bpf_jiffies64() is inlined by the JIT (a load); FS_HAVE_JIFFIES64 is set where the kernel has it (5.5).
 * A stamp is at most one tick early (4 ms at HZ=250), never late; stamps stay in the bpf_ktime_get_ns
 * clock, so user space converts them as before. Event times and durations keep the precise clock. */
struct fs_clock {
    __u64 jiffies;
    __u64 ns;
};
BPF_ARRAY(fs_clock, struct fs_clock, 1);

static __always_inline __u64 fs_now(void)
{
#ifdef FS_HAVE_JIFFIES64
    __u32 zero = 0;
    struct fs_clock *clock = fs_clock.lookup(&zero);
    if (clock) {
        __u64 jiffies = bpf_jiffies64();
        if (clock->jiffies == jiffies)
            return clock->ns;
        __u64 now = bpf_ktime_get_ns();
        clock->ns = now;
        /* Stored before the tick that vouches for it (x86 keeps the order of stores; a reader on a weakly
         * ordered CPU may see the previous tick's time, one tick early). */
        asm volatile("" ::: "memory");
        clock->jiffies = jiffies;
        return now;
    }
#endif
    return bpf_ktime_get_ns();
}

static __always_inline __u32 fs_current_generation(void)
{
    __u32 zero = 0;
    __u32 *generation = fs_generation.lookup(&zero);
    return generation ? (*generation & 1) : 0;
}

static __always_inline void fs_count(__u32 generation, __u32 counter, __u64 n)
{
    __u32 index = generation * FS_CNT_MAX + counter;
    __u64 *value = fs_counters.lookup(&index);
    if (value)
        __sync_fetch_and_add(value, n);
}

#ifndef FLOWSCOPE_PERF_EVENTS
/* Ring wake-ups: a record wakes the reader only once every FLOWSCOPE_RING_WAKE_EVERY records (an eighth of
 * the ring); the others are written with BPF_RB_NO_WAKEUP and wait for that wake-up or for the interval's
 * drain, which reads the ring itself. The kernel's default wakes a reader that has caught up at the next
 * record: under a drop or retransmit storm, the reader's thread woke ~100 times a second (as often as it
 * reads) for a handful of records each. Records written between wake-ups are fewer than an eighth of the
 * ring, so the reader still comes long before the ring fills. The count is shared by every CPU and not
 * atomic: an increment lost to a race only delays a wake-up by a record. */
#ifndef FLOWSCOPE_RING_WAKE_EVERY
#define FLOWSCOPE_RING_WAKE_EVERY (FLOWSCOPE_RING_PAGES * PAGE_SIZE / (8 * (sizeof(struct fs_event) + 8)))
#endif
BPF_ARRAY(fs_ring_unsignalled, __u64, 1);

static __always_inline __u64 fs_ring_wakeup_flags(void)
{
    __u32 zero = 0;
    __u64 *unsignalled = fs_ring_unsignalled.lookup(&zero);
    if (!unsignalled)
        return 0; /* the kernel's own policy */
    if (*unsignalled + 1 < FLOWSCOPE_RING_WAKE_EVERY) {
        *unsignalled += 1;
        return BPF_RB_NO_WAKEUP;
    }
    *unsignalled = 0;
    return BPF_RB_FORCE_WAKEUP;
}
#endif

/* Sends an event and counts it as sent or lost (the ring does not count its own losses); 0 when sent. */
static __always_inline int fs_emit(void *ctx, struct fs_event *event, __u32 generation)
{
    int err;
    event->generation = generation;
#ifdef FLOWSCOPE_PERF_EVENTS
    err = fs_events.perf_submit(ctx, event, sizeof(*event));
#else
    err = fs_events.ringbuf_output(event, sizeof(*event), fs_ring_wakeup_flags());
#endif
    __u32 kind = event->kind < FS_EV_KIND_MAX ? event->kind : 0;
    fs_count(generation, (err ? FS_CNT_EVENT_LOST_BASE : FS_CNT_EVENT_SENT_BASE) + kind, 1);
    return err;
}

/* Per-CPU token buckets that rate-limit events whose occurrences are already counted in a map: up to
 * `per_second` events per second per CPU, in bursts of up to one second's worth. */
#define FS_BUCKET_DROP_EVENTS 0
#define FS_BUCKET_TCP_EVENTS 1
#define FS_BUCKET_MAX 2
#define FS_NS_PER_SECOND 1000000000ULL

struct fs_token_bucket {
    __u64 credit; /* in billionths of an event */
    __u64 last_ns;
};

BPF_PERCPU_ARRAY(fs_event_buckets, struct fs_token_bucket, FS_BUCKET_MAX);

/* 1 when an event may be sent at `now` and takes its token, else 0. Each bucket is fed by one clock (drops:
 * fs_now, TCP events: bpf_ktime_get_ns). */
static __always_inline int fs_take_token(__u32 bucket, __u64 per_second, __u64 now)
{
    struct fs_token_bucket *state = fs_event_buckets.lookup(&bucket);
    if (!state || per_second == 0)
        return 0;
    if (now < state->last_ns)
        now = state->last_ns; /* fs_now steps back a hair when two CPUs refresh it at once: no credit for it */
    __u64 elapsed = now - state->last_ns;
    if (elapsed > FS_NS_PER_SECOND)
        elapsed = FS_NS_PER_SECOND;
    __u64 credit = state->credit + elapsed * per_second;
    if (credit > per_second * FS_NS_PER_SECOND)
        credit = per_second * FS_NS_PER_SECOND;
    state->last_ns = now;
    if (credit < FS_NS_PER_SECOND) {
        state->credit = credit;
        return 0;
    }
    state->credit = credit - FS_NS_PER_SECOND;
    return 1;
}

static __always_inline void fs_set_ipv4(__u8 *dst, __u32 addr_be)
{
    __builtin_memset(dst, 0, 10);
    dst[10] = 0xff;
    dst[11] = 0xff;
    __builtin_memcpy(dst + 12, &addr_be, 4);
}

#endif /* FLOWSCOPE_H */

/* Retransmits, resets and RTT through kprobes, for kernels without the tcp:* tracepoints.
 *
 * The module text holds tcp_events.c first (its maps and logic, without its tracepoint programs: built
 * with -DFS_TCP_EVENTS_KPROBES). Differences from the tracepoints: tcp_rcv_established stands in for
 * tcp_probe (the same place); sent resets come from tcp_v4_send_reset, tcp_v6_send_reset and
 * tcp_send_active_reset where the kernel has them (FS_KP_* defined from BTF).
 *
 * Retransmits: FS_KP_RETRANSMIT (__tcp_retransmit_skb, which the loss probe calls too; tcp_retransmit_skb
 * where the kernel has no such symbol) is probed at entry and at return, and a call counts only when it
 * returned 0, with the segments its skb then holds: what the tracepoint counts. Counted at entry, every
 * attempt would count, with the segments it was allowed to send (70 for 52 TcpRetransSegs on Linux 6.1).
 */
#include "flowscope.h"
#include "fs_kernel.h"
#include <linux/ptrace.h> /* struct pt_regs: the architecture's register ABI, stable across versions */

#ifndef FLOWSCOPE_RETRANSMIT_CALLS
#define FLOWSCOPE_RETRANSMIT_CALLS 4096
#endif

/* A retransmit call in progress, from its entry to its return. The calls of one context form a stack:
 * a softirq may retransmit on another socket while the task it interrupted is inside a retransmit, and it
 * returns first. A context is a task (a task may move to another CPU during the call), or the CPU for the
 * idle tasks, which all have pid 0 (their softirqs do not move). */
struct fs_retransmit_call_key {
    __u64 context;
    __u32 depth;
    __u32 pad;
};
struct fs_retransmit_call {
    __u64 sk;
    __u64 skb;
};
BPF_TABLE("lru_hash", __u64, __u32, fs_retransmit_depth, FLOWSCOPE_RETRANSMIT_CALLS);
BPF_TABLE("lru_hash", struct fs_retransmit_call_key, struct fs_retransmit_call, fs_retransmit_calls,
          FLOWSCOPE_RETRANSMIT_CALLS);

static __always_inline __u64 fs_call_context(void)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    return pid_tgid ? pid_tgid : (1ULL << 63) | bpf_get_smp_processor_id();
}

int FS_CAT(kprobe__, FS_KP_RETRANSMIT)(struct pt_regs *ctx)
{
    struct fs_retransmit_call_key key = {.context = fs_call_context()};
    __u32 *depth = fs_retransmit_depth.lookup(&key.context);
    key.depth = depth ? *depth : 0;
    struct fs_retransmit_call call = {
        .sk = (__u64)FS_PARM(ctx, FS_KP_RETRANSMIT_ARG_SK),
        .skb = (__u64)FS_PARM(ctx, FS_KP_RETRANSMIT_ARG_SKB),
    };
    fs_retransmit_calls.update(&key, &call);
    __u32 deeper = key.depth + 1;
    fs_retransmit_depth.update(&key.context, &deeper);
    return 0;
}

int FS_CAT(kretprobe__, FS_KP_RETRANSMIT)(struct pt_regs *ctx)
{
    struct fs_retransmit_call_key key = {.context = fs_call_context()};
    __u32 *depth = fs_retransmit_depth.lookup(&key.context);
    if (!depth || *depth == 0)
        return 0; /* its entry was not seen (the probes attached meanwhile) */
    key.depth = *depth - 1;
    if (key.depth)
        fs_retransmit_depth.update(&key.context, &key.depth);
    else
        fs_retransmit_depth.delete(&key.context);
    struct fs_retransmit_call *found = fs_retransmit_calls.lookup(&key);
    if (!found)
        return 0;
    struct fs_retransmit_call call = *found;
    fs_retransmit_calls.delete(&key);
    if ((int)PT_REGS_RC(ctx) == 0) /* else nothing was sent again */
        fs_tcp_retransmit(ctx, (const void *)call.sk, fs_tcp_skb_segments((const void *)call.skb));
    return 0;
}

int kprobe__tcp_rcv_established(struct pt_regs *ctx)
{
    const void *sk = (const void *)FS_PARM(ctx, FS_KP_RCV_ESTABLISHED_ARG_SK);
    if (sk)
        fs_tcp_rtt(sk);
    return 0;
}

int kprobe__tcp_reset(struct pt_regs *ctx)
{
    fs_tcp_receive_reset(ctx, (const void *)FS_PARM(ctx, FS_KP_RESET_ARG_SK));
    return 0;
}

#ifdef FS_KP_V4_SEND_RESET_ARG_REASON
#define FS_KP_V4_REASON(ctx) ((__u32)FS_PARM(ctx, FS_KP_V4_SEND_RESET_ARG_REASON))
#else
#define FS_KP_V4_REASON(ctx) FS_UNKNOWN
#endif
#ifdef FS_KP_V6_SEND_RESET_ARG_REASON
#define FS_KP_V6_REASON(ctx) ((__u32)FS_PARM(ctx, FS_KP_V6_SEND_RESET_ARG_REASON))
#else
#define FS_KP_V6_REASON(ctx) FS_UNKNOWN
#endif
#ifdef FS_KP_ACTIVE_RESET_ARG_REASON
#define FS_KP_ACTIVE_REASON(ctx) ((__u32)FS_PARM(ctx, FS_KP_ACTIVE_RESET_ARG_REASON))
#else
#define FS_KP_ACTIVE_REASON(ctx) FS_UNKNOWN
#endif

#ifdef FS_KP_V4_SEND_RESET
int kprobe__tcp_v4_send_reset(struct pt_regs *ctx)
{
    fs_tcp_send_reset(ctx, (const void *)FS_PARM(ctx, FS_KP_V4_SEND_RESET_ARG_SK),
                      (const void *)FS_PARM(ctx, FS_KP_V4_SEND_RESET_ARG_SKB), FS_KP_V4_REASON(ctx));
    return 0;
}
#endif

#ifdef FS_KP_V6_SEND_RESET
int kprobe__tcp_v6_send_reset(struct pt_regs *ctx)
{
    fs_tcp_send_reset(ctx, (const void *)FS_PARM(ctx, FS_KP_V6_SEND_RESET_ARG_SK),
                      (const void *)FS_PARM(ctx, FS_KP_V6_SEND_RESET_ARG_SKB), FS_KP_V6_REASON(ctx));
    return 0;
}
#endif

#ifdef FS_KP_ACTIVE_RESET
int kprobe__tcp_send_active_reset(struct pt_regs *ctx)
{
    fs_tcp_send_reset(ctx, (const void *)FS_PARM(ctx, FS_KP_ACTIVE_RESET_ARG_SK), 0, FS_KP_ACTIVE_REASON(ctx));
    return 0;
}
#endif

/* Retransmits, resets and RTT through kprobes, for kernels without the tcp:* tracepoints.
 *
 * The module text holds tcp_events.c first (its maps and logic, without its tracepoint programs: built
 * with -DFS_TCP_EVENTS_KPROBES). Differences from the tracepoints: tcp_rcv_established stands in for
 * tcp_probe (the same place); sent resets come from tcp_v4_send_reset, tcp_v6_send_reset and
 * tcp_send_active_reset where the kernel has them (FS_KP_* defined from BTF).
 *
 * Retransmits: __tcp_retransmit_skb (FS_KP_RETRANSMIT, where the kernel has it as a function) sends a
 * retransmit; tcp_retransmit_skb (FS_KP_RETRANSMIT_OUTER) calls it, the loss probe calls it directly. Both
 * are probed at entry and at return, and a call counts only when it returned 0, with the segments its skb
 * then holds: what the tracepoint counts. A compiler may split __tcp_retransmit_skb and have
 * tcp_retransmit_skb call its body past the entry (Debian's 6.1: GCC's __tcp_retransmit_skb.part.0; a
 * kprobe on __tcp_retransmit_skb alone saw none of 52 retransmits), so neither function alone sees every
 * retransmit; a call of
 * __tcp_retransmit_skb made by tcp_retransmit_skb (for the same socket and skb, in the same context) is
 * left to its caller's return. Counted at entry, every attempt would count, with the segments it was
 * allowed to send (70 for 52 TcpRetransSegs on Linux 6.1).
 */
#include "flowscope.h"
#include "fs_kernel.h"
#include <linux/ptrace.h> /* struct pt_regs: the architecture's register ABI, stable across versions */

#ifndef FLOWSCOPE_RETRANSMIT_CALLS
#define FLOWSCOPE_RETRANSMIT_CALLS 4096
#endif

/* A retransmit call in progress, from its entry to its return. The calls of one context form a stack:
 * tcp_retransmit_skb calls __tcp_retransmit_skb, and a softirq may retransmit on another socket while the
 * task it interrupted is inside a retransmit, and it returns first. A context is a task (a task may move
 * to another CPU during the call), or the CPU for the idle tasks, which all have pid 0 (their softirqs do
 * not move). */
struct fs_retransmit_call_key {
    __u64 context;
    __u32 depth;
    __u32 pad;
};
struct fs_retransmit_call {
    __u64 sk;
    __u64 skb;
    __u32 outer; /* a call of tcp_retransmit_skb (else of __tcp_retransmit_skb) */
    __u32 pad;
};
BPF_TABLE("lru_hash", __u64, __u32, fs_retransmit_depth, FLOWSCOPE_RETRANSMIT_CALLS);
BPF_TABLE("lru_hash", struct fs_retransmit_call_key, struct fs_retransmit_call, fs_retransmit_calls,
          FLOWSCOPE_RETRANSMIT_CALLS);

static __always_inline __u64 fs_call_context(void)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    return pid_tgid ? pid_tgid : (1ULL << 63) | bpf_get_smp_processor_id();
}

static __always_inline void fs_retransmit_entry(__u32 outer, __u64 sk, __u64 skb)
{
    struct fs_retransmit_call_key key = {.context = fs_call_context()};
    __u32 *depth = fs_retransmit_depth.lookup(&key.context);
    key.depth = depth ? *depth : 0;
    struct fs_retransmit_call call = {.sk = sk, .skb = skb, .outer = outer};
    fs_retransmit_calls.update(&key, &call);
    __u32 deeper = key.depth + 1;
    fs_retransmit_depth.update(&key.context, &deeper);
}

static __always_inline void fs_retransmit_return(struct pt_regs *ctx, __u32 outer)
{
    struct fs_retransmit_call_key key = {.context = fs_call_context()};
    __u32 *depth = fs_retransmit_depth.lookup(&key.context);
    if (!depth || *depth == 0)
        return; /* its entry was not seen (the probes attached meanwhile) */
    key.depth = *depth - 1;
    if (key.depth)
        fs_retransmit_depth.update(&key.context, &key.depth);
    else
        fs_retransmit_depth.delete(&key.context);
    struct fs_retransmit_call *found = fs_retransmit_calls.lookup(&key);
    if (!found)
        return;
    struct fs_retransmit_call call = *found;
    fs_retransmit_calls.delete(&key);
    if (call.outer != outer)
        return; /* not this call's entry (a return probe the kernel missed): the stack is out of step */
    if ((int)PT_REGS_RC(ctx) != 0)
        return; /* nothing was sent again */
    if (!outer && key.depth) {
        struct fs_retransmit_call_key below = {.context = key.context, .depth = key.depth - 1};
        struct fs_retransmit_call *caller = fs_retransmit_calls.lookup(&below);
        if (caller && caller->outer && caller->sk == call.sk && caller->skb == call.skb)
            return; /* tcp_retransmit_skb's own call: counted at its return */
    }
    fs_tcp_retransmit(ctx, (const void *)call.sk, fs_tcp_skb_segments((const void *)call.skb));
}

#ifdef FS_KP_RETRANSMIT
int kprobe____tcp_retransmit_skb(struct pt_regs *ctx)
{
    fs_retransmit_entry(0, (__u64)FS_PARM(ctx, FS_KP_RETRANSMIT_ARG_SK),
                        (__u64)FS_PARM(ctx, FS_KP_RETRANSMIT_ARG_SKB));
    return 0;
}

int kretprobe____tcp_retransmit_skb(struct pt_regs *ctx)
{
    fs_retransmit_return(ctx, 0);
    return 0;
}
#endif

#ifdef FS_KP_RETRANSMIT_OUTER
int kprobe__tcp_retransmit_skb(struct pt_regs *ctx)
{
    fs_retransmit_entry(1, (__u64)FS_PARM(ctx, FS_KP_RETRANSMIT_OUTER_ARG_SK),
                        (__u64)FS_PARM(ctx, FS_KP_RETRANSMIT_OUTER_ARG_SKB));
    return 0;
}

int kretprobe__tcp_retransmit_skb(struct pt_regs *ctx)
{
    fs_retransmit_return(ctx, 1);
    return 0;
}
#endif

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

/* Retransmits, resets and RTT through kprobes, for kernels without the tcp:* tracepoints.
 *
 * The module text holds tcp_events.c first (its maps and logic, without its tracepoint programs: built
 * with -DFS_TCP_EVENTS_KPROBES). Differences from the tracepoints: tcp_retransmit_skb is probed at entry,
 * so a retransmit the kernel then fails to send is counted too, with the segments it was asked to send;
 * tcp_rcv_established stands in for tcp_probe (the same place); sent resets come from tcp_v4_send_reset,
 * tcp_v6_send_reset and tcp_send_active_reset where the kernel has them (FS_KP_* defined from BTF).
 */
#include "flowscope.h"
#include "fs_kernel.h"
#include <linux/ptrace.h> /* struct pt_regs: the architecture's register ABI, stable across versions */

int kprobe__tcp_retransmit_skb(struct pt_regs *ctx)
{
    fs_tcp_retransmit(ctx, (const void *)FS_PARM(ctx, FS_KP_RETRANSMIT_ARG_SK),
                      (__u32)FS_PARM(ctx, FS_KP_RETRANSMIT_ARG_SEGS));
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

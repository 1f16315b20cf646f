/* Packet drops through a kprobe, for kernels whose skb:kfree_skb cannot be attached as a raw tracepoint.
 *
 * The module text holds skb_drop.c first (its maps and fs_drop, without its tracepoint program: built with
 * -DFS_SKB_DROP_KPROBES); this file adds the kprobe on the function that frees a dropped skb with its
 * reason: FS_DROP_KPROBE (sk_skb_reason_drop since Linux 6.11, kfree_skb_reason since 5.17, kfree_skb
 * without a reason before), its argument positions FS_DROP_KPROBE_ARG_* from BTF. The drop location is the
 * function's caller.
 */
#include "flowscope.h"
#include "fs_kernel.h"
#include <linux/ptrace.h> /* struct pt_regs: the architecture's register ABI, stable across versions */

static __always_inline __u64 fs_caller(struct pt_regs *ctx)
{
#ifdef bpf_target_x86
    __u64 address = 0; /* at function entry the return address is on top of the stack */
    bpf_probe_read_kernel(&address, sizeof(address), (void *)PT_REGS_SP(ctx));
    return address;
#else
    return PT_REGS_RET(ctx); /* the link register */
#endif
}

int FS_CAT(kprobe__, FS_DROP_KPROBE)(struct pt_regs *ctx)
{
#ifdef FS_DROP_KPROBE_ARG_SK
    const void *sk = (const void *)FS_PARM(ctx, FS_DROP_KPROBE_ARG_SK);
#else
    const void *sk = 0;
#endif
#ifdef FS_DROP_KPROBE_ARG_REASON
    __u32 reason = (__u32)FS_PARM(ctx, FS_DROP_KPROBE_ARG_REASON);
#else
    __u32 reason = FS_UNKNOWN;
#endif
    fs_drop(ctx, (const void *)FS_PARM(ctx, FS_DROP_KPROBE_ARG_SKB), fs_caller(ctx), reason, sk);
    return 0;
}

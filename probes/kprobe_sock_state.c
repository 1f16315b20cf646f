/* TCP connection lifecycle through kprobes, for kernels without the sock:inet_sock_set_state tracepoint.
 *
 * The module text holds sock_state.c first (its maps and fs_sock_state_change, without its tracepoint
 * program: built with -DFS_SOCK_STATE_KPROBES). At the entry of tcp_set_state and inet_sk_set_state (which
 * sets LISTEN and the SYN_RECV state of new child sockets) the socket still holds its old state.
 */
#include "flowscope.h"
#include "fs_kernel.h"
#include <linux/ptrace.h> /* struct pt_regs: the architecture's register ABI, stable across versions */

int kprobe__tcp_set_state(struct pt_regs *ctx)
{
    const void *sk = (const void *)FS_PARM(ctx, FS_TCP_SET_STATE_ARG_SK);
    if (sk)
        fs_sock_state_change(ctx, sk, fs_sock_state(sk), (int)FS_PARM(ctx, FS_TCP_SET_STATE_ARG_STATE));
    return 0;
}

#ifdef FS_KPROBE_INET_SK_SET_STATE
int kprobe__inet_sk_set_state(struct pt_regs *ctx)
{
    const void *sk = (const void *)FS_PARM(ctx, FS_INET_SK_SET_STATE_ARG_SK);
    if (sk)
        fs_sock_state_change(ctx, sk, fs_sock_state(sk), (int)FS_PARM(ctx, FS_INET_SK_SET_STATE_ARG_STATE));
    return 0;
}
#endif

/* TCP connection lifecycle: connect, accept and close events from sock:inet_sock_set_state (raw
 * tracepoint; argument positions and structure offsets from the running kernel's BTF as -D flags).
 *
 * Who owns a connection is known only in process context, and the transitions that complete one run in
 * softirq (bpf_get_current_pid_tgid would name whatever task was interrupted). So:
 *  - connect: the task that entered SYN_SENT (connect(2), process context) owns the socket; the event is
 *    sent when the handshake completes (SYN_SENT -> ESTABLISHED) with that owner;
 *  - accept: the task that entered LISTEN (listen(2)) owns the listener; a child socket (CLOSE -> SYN_RECV)
 *    takes the owner of the listener on its local address and port; the event is sent at SYN_RECV ->
 *    ESTABLISHED;
 *  - close: any -> CLOSE, with the owner and the time since the socket's SYN_SENT/SYN_RECV (duration);
 *    a socket that predates the probe closes with neither (pid 0, duration 0).
 * Events carry the connection from the local end (saddr = local), netns and the TCP states.
 *
 * -D flags: FS_OFF_* offsets, FS_INET_SOCK_SET_STATE_ARG_SK/_OLD/_NEW, FS_TCP_<state> enum values.
 */
#include "flowscope.h"
#include "fs_kernel.h"

#ifndef FLOWSCOPE_SOCK_MAP_SIZE
#define FLOWSCOPE_SOCK_MAP_SIZE 65536
#endif
#ifndef FLOWSCOPE_LISTENER_MAP_SIZE
#define FLOWSCOPE_LISTENER_MAP_SIZE 4096
#endif

struct fs_owner {
    __u64 start_ns;
    __u64 cgroup_id;
    __u64 socket; /* listeners: the listening socket's address, so only its own close removes the entry
                   * (0 for listeners user space found in /proc at start: flowscope/listeners.py) */
    __u32 pid;
    __u32 pad;
    char comm[16];
};

struct fs_listen_key {
    __u8 addr[16]; /* IPv4-mapped for IPv4; the unspecified address for a wildcard listener */
    __u32 netns;
    __u16 port;
    __u16 pad;
};

BPF_HASH(fs_sockets, __u64, struct fs_owner, FLOWSCOPE_SOCK_MAP_SIZE);
BPF_HASH(fs_listeners, struct fs_listen_key, struct fs_owner, FLOWSCOPE_LISTENER_MAP_SIZE);

static __always_inline void fs_owner_current(struct fs_owner *owner, __u64 now)
{
    owner->start_ns = now;
    owner->pid = bpf_get_current_pid_tgid() >> 32;
    owner->cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(owner->comm, sizeof(owner->comm));
}

static __always_inline void fs_listen_key_of(struct fs_listen_key *listen, const struct flow_key *flow, __u32 netns)
{
    __builtin_memcpy(listen->addr, flow->saddr, 16);
    listen->port = flow->sport;
    listen->netns = netns;
}

/* The listener a new child socket came from: bound to its local address, else to the wildcard address. */
static __always_inline struct fs_owner *fs_find_listener(const struct flow_key *flow, __u32 netns)
{
    struct fs_listen_key listen = {};
    fs_listen_key_of(&listen, flow, netns);
    struct fs_owner *owner = fs_listeners.lookup(&listen);
    if (owner)
        return owner;
    if (flow->ip_version == 4) {
        fs_set_ipv4(listen.addr, 0);
        owner = fs_listeners.lookup(&listen);
        if (owner)
            return owner;
    }
    __builtin_memset(listen.addr, 0, 16);
    return fs_listeners.lookup(&listen);
}

static __always_inline void fs_remember(__u32 generation, __u64 socket, struct fs_owner *owner)
{
    if (fs_sockets.update(&socket, owner))
        fs_count(generation, FS_CNT_SOCK_MAP_FULL, 1);
}

static __always_inline void fs_sock_event(void *ctx, __u32 generation, const struct flow_key *flow, __u32 netns,
                                          __u8 kind, int old_state, int new_state, struct fs_owner *owner,
                                          __u64 now)
{
    struct fs_event event = {};
    fs_event_from_key(&event, flow);
    event.ts_ns = now;
    event.kind = kind;
    event.netns = netns;
    event.old_state = old_state;
    event.new_state = new_state;
    if (owner) {
        event.pid = owner->pid;
        event.cgroup_id = owner->cgroup_id;
        __builtin_memcpy(event.comm, owner->comm, sizeof(event.comm));
        if (kind == FS_EV_CLOSE)
            event.value = now - owner->start_ns;
    }
    fs_emit(ctx, &event, generation);
}

static __always_inline void fs_sock_state_change(void *ctx, const void *sk, int old_state, int new_state)
{
    if (!sk || fs_sock_protocol(sk) != FS_IPPROTO_TCP)
        return;
    struct flow_key flow = {};
    if (!fs_key_from_sock(sk, &flow))
        return;
    __u32 netns = fs_sock_netns(sk);
    __u32 generation = fs_current_generation();
    __u64 now = bpf_ktime_get_ns();
    __u64 socket = (__u64)sk;

    if (new_state == FS_TCP_LISTEN) {
        struct fs_listen_key listen = {};
        struct fs_owner owner = {};
        fs_listen_key_of(&listen, &flow, netns);
        fs_owner_current(&owner, now);
        owner.socket = socket;
        if (fs_listeners.update(&listen, &owner))
            fs_count(generation, FS_CNT_SOCK_MAP_FULL, 1);
        return;
    }
    if (new_state == FS_TCP_SYN_SENT) {
        struct fs_owner owner = {};
        fs_owner_current(&owner, now);
        fs_remember(generation, socket, &owner);
        return;
    }
    if (new_state == FS_TCP_SYN_RECV) { /* a child socket, cloned from its listener: LISTEN -> SYN_RECV */
        struct fs_owner owner = {};
        struct fs_owner *listener = fs_find_listener(&flow, netns);
        if (listener)
            __builtin_memcpy(&owner, listener, sizeof(owner));
        owner.start_ns = now;
        owner.socket = 0;
        fs_remember(generation, socket, &owner);
        return;
    }
    if (old_state == FS_TCP_LISTEN) { /* the listener closes (its children start from LISTEN, above) */
        struct fs_listen_key listen = {};
        fs_listen_key_of(&listen, &flow, netns);
        struct fs_owner *owner = fs_listeners.lookup(&listen);
        if (owner && (owner->socket == socket || owner->socket == 0)) /* 0: seeded from /proc */
            fs_listeners.delete(&listen);
        return;
    }
    if (new_state == FS_TCP_ESTABLISHED && (old_state == FS_TCP_SYN_SENT || old_state == FS_TCP_SYN_RECV)) {
        struct fs_owner *owner = fs_sockets.lookup(&socket);
        __u8 kind = old_state == FS_TCP_SYN_SENT ? FS_EV_CONNECT : FS_EV_ACCEPT;
        fs_sock_event(ctx, generation, &flow, netns, kind, old_state, new_state, owner, now);
        return;
    }
    if (new_state == FS_TCP_CLOSE && old_state != FS_TCP_CLOSE) {
        struct fs_owner *owner = fs_sockets.lookup(&socket);
        fs_sock_event(ctx, generation, &flow, netns, FS_EV_CLOSE, old_state, new_state, owner, now);
        if (owner)
            fs_sockets.delete(&socket);
    }
}

#ifndef FS_SOCK_STATE_KPROBES
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    const void *sk = (const void *)ctx->args[FS_INET_SOCK_SET_STATE_ARG_SK];
    fs_sock_state_change(ctx, sk, (int)ctx->args[FS_INET_SOCK_SET_STATE_ARG_OLD],
                         (int)ctx->args[FS_INET_SOCK_SET_STATE_ARG_NEW]);
    return 0;
}
#endif

//! `sockops`: moves a redirected socket's original destination from its cookie (all connect4
//! knows) to its 4-tuple (all the proxy's accepted socket knows), and forgets it at close;
//! registers the workload's inbound capture listener for sk_lookup; and, with `--fast-path`,
//! enrolls both ends of captured local pairs in the sockhash at their handshake, before either
//! can send a byte.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
        bpf_sock_ops,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use redirect_common::{
    INBOUND_PASSTHROUGH_SRC_BE, LOCALHOST_BE, PendingOrigDst, TupleKey, events, fast_path, port, workload_flags,
};

use crate::maps::{
    FAST_PATH_SENDERS, FAST_PATH_SOCKETS, INBOUND_LISTENERS, INBOUND_PENDING, ORIG_BY_COOKIE, ORIG_BY_TUPLE,
    count_event, is_local_addr, workload,
};

const AF_INET: u32 = 2;

// Every `ctx` below is the one the `#[sock_ops]` macro built from the program's only argument,
// the `bpf_sock_ops` the kernel passes to this run: the invariant aya's own safe accessors
// (`ctx.op()`, `ctx.local_ip4()`, ...) rely on, and the one the SAFETY comments here cite as
// "the program's own context".

#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.family() != AF_INET {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // Ask for state changes only on sockets connect4 redirected, so that entries of
            // connections that never establish are removed too.
            if redirected(&ctx).is_some() {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // Runs before the final ACK leaves, so the entry exists before the proxy can
            // accept the connection.
            let local_pair_end = if let Some((cookie, pending)) = redirected(&ctx) {
                // SAFETY: a non-null lookup result: a whole, 8-aligned PendingOrigDst in
                // ORIG_BY_COOKIE, mapped until the program returns, copied out at once. Only
                // connect4 writes this socket's cookie, before connect() proceeds, and only
                // this socket's own sock_ops runs remove it; if an LRU eviction recycles the
                // slot while we copy, we copy other integers: still a valid PendingOrigDst.
                let pending = unsafe { *pending };
                let key = tuple(&ctx, pending.netns_cookie);
                let _ = ORIG_BY_TUPLE.insert(key, pending.orig, 0);
                let _ = ORIG_BY_COOKIE.remove(cookie);
                // The workload's end of app -> capture listener.
                Some(key)
            } else if ctx.local_ip4() == INBOUND_PASSTHROUGH_SRC_BE {
                // The proxy's end of its passthrough connection to the app.
                // SAFETY: the helper's one argument is the program's own context (it reads
                // the socket's namespace from it); sock_ops may call it (5.15+, probed).
                Some(tuple(&ctx, unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }))
            } else {
                None
            };
            if let Some(key) = local_pair_end {
                enroll(&ctx, &key);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // The accepted end, before accept() returns it. Its peer's view of the connection
            // is the key the original destination was kept under.
            // SAFETY: as above: the program's own context is the helper's one argument.
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            let key = tuple(&ctx, netns_cookie);
            let seen_from_peer = key.reversed();
            // SAFETY: the reference is only copied from (into the insert below), while the
            // value is mapped (until the program returns). sk_lookup wrote this key on the
            // connection's SYN, before this handshake could complete; if an LRU eviction
            // recycles the slot while we copy, we copy other integers: still a valid OrigDst.
            if let Some(orig) = unsafe { INBOUND_PENDING.get(seen_from_peer) } {
                // From a capture listener in this cgroup: kept until close, like outbound.
                let _ = ORIG_BY_TUPLE.insert(seen_from_peer, *orig, 0);
                let _ = INBOUND_PENDING.remove(seen_from_peer);
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            } else if ORIG_BY_TUPLE.get_ptr(seen_from_peer).is_some() || key.dst_addr == INBOUND_PASSTHROUGH_SRC_BE {
                // The capture listener's end of a redirected connection, or the app's end of
                // the proxy's passthrough connection: both are local pairs.
                enroll(&ctx, &key);
            }
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => {
            // A proxy of the workload (Envoy, with --proxy none) starts listening on the
            // inbound capture port: that is where sk_lookup sends connections from other
            // hosts. With SO_REUSEPORT the kernel still spreads them over the whole group.
            // SAFETY: as above: the program's own context is the helper's one argument.
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            if let Some(w) = workload(netns_cookie)
                && w.flags & workload_flags::WORKLOAD_LISTENER != 0
                && ctx.local_port() == u32::from(w.inbound_port)
            {
                // SAFETY: `ctx.ops` is the program's own context, which the verifier lets
                // sock_ops pass to `bpf_sock_hash_update`; the reference only carries it to
                // that helper (nothing reads or writes through it in Rust) and ends with the
                // call, so it aliases none of the accessors' reads.
                let ops = unsafe { &mut *ctx.ops };
                let _ = INBOUND_LISTENERS.update(netns_cookie, ops, u64::from(BPF_ANY));
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // Only sockets this program flagged get here.
            // SAFETY: the helper's one argument is the program's own context (it reads, or
            // makes, the socket's cookie).
            let _ = ORIG_BY_COOKIE.remove(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) });
            // Addresses and ports are still set: STATE_CB runs before the port is released.
            // Either end may be the one that holds the original destination.
            // SAFETY: as above: the program's own context is the helper's one argument.
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            let key = tuple(&ctx, netns_cookie);
            let _ = ORIG_BY_TUPLE.remove(key);
            let _ = ORIG_BY_TUPLE.remove(key.reversed());
            // The kernel drops the socket from the sockhash itself.
            let _ = FAST_PATH_SENDERS.remove(key);
        }
        _ => {}
    }
    1
}

/// A socket connect4 redirected: its cookie and what connect4 recorded under it. connect4
/// sends every connection it captures to 127.0.0.1, so any other connection of the node
/// (node mode runs this for all of them) is passed over before it pays for a socket cookie,
/// which the kernel would otherwise make for it with a global atomic counter.
#[inline(always)]
fn redirected(ctx: &SockOpsContext) -> Option<(u64, *const PendingOrigDst)> {
    if ctx.remote_ip4() != LOCALHOST_BE {
        return None;
    }
    // SAFETY: the helper's one argument is the program's own context (it reads, or makes, the
    // socket's cookie).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_BY_COOKIE.get_ptr(cookie).map(|p| (cookie, p))
}

/// Puts a socket of a captured local pair in the sockhash, if its workload asked for the fast
/// path and its peer is in the same namespace (a connection from another host that sk_lookup
/// sent to the capture listener has no local peer to hand bytes to).
#[inline(always)]
fn enroll(ctx: &SockOpsContext, key: &TupleKey) {
    let Some(w) = workload(key.netns_cookie) else {
        return;
    };
    if w.flags & workload_flags::FAST_PATH == 0 {
        return;
    }
    if !is_local_addr(key.netns_cookie, key.dst_addr) {
        return;
    }
    // The sender state first: sk_msg treats a socket without one as "TCP for good", so a
    // socket must never be in the sockhash without it. Overwrites a stale entry of an earlier
    // connection with the same 4-tuple.
    if FAST_PATH_SENDERS.insert(key, fast_path::UNDECIDED, 0).is_err() {
        return;
    }
    // SAFETY: `ctx.ops` is the program's own context, which the verifier lets sock_ops pass to
    // `bpf_sock_hash_update`; the reference only carries it to that helper (nothing reads or
    // writes through it in Rust) and ends with the call, so it aliases none of the accessors'
    // reads.
    let ops: &mut bpf_sock_ops = unsafe { &mut *ctx.ops };
    if FAST_PATH_SOCKETS.update(*key, ops, u64::from(BPF_ANY)).is_ok() {
        // Forget the sender state at close.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        count_event(w, events::FAST_PATH_ENROLLED);
    } else {
        let _ = FAST_PATH_SENDERS.remove(key);
    }
}

/// The socket's own view of its connection: local -> remote. `local_port` is host order;
/// `remote_port` holds the network-order port in its upper half (`redirect_common::port`).
#[inline(always)]
fn tuple(ctx: &SockOpsContext, netns_cookie: u64) -> TupleKey {
    TupleKey::new(
        netns_cookie,
        ctx.local_ip4(),
        port::host(ctx.local_port()),
        ctx.remote_ip4(),
        port::be_high(ctx.remote_port()),
    )
}

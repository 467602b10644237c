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
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_setsockopt},
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::read_volatile;

use redirect_common::{
    AMBIENT_CONN_MARK, AMBIENT_MARK, AMBIENT_MARK_MASK, FamilyKey, PendingOrigDst, TupleKey,
    addr::{self, Addr, Family},
    events, fast_path, port, workload_flags,
};

use crate::maps::{
    FAST_PATH_SENDERS, FAST_PATH_SOCKETS, INBOUND_LISTENERS, INBOUND_PENDING, ORIG_BY_COOKIE, ORIG_BY_TUPLE,
    SYN_MARK_BY_COOKIE, SYN_MARKS, count_event, is_local_addr, workload,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

// Every `ctx` below is the one the `#[sock_ops]` macro built from the program's only argument,
// the `bpf_sock_ops` the kernel passes to this run: the invariant aya's own safe accessors
// (`ctx.op()`, `ctx.local_ip4()`, ...) rely on, and the one the SAFETY comments here cite as
// "the program's own context".

#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    // AF_INET6 sockets include those connected to v4-mapped addresses: their `*_ip6` fields
    // hold the v4-mapped form, which is the key form of IPv4 (`redirect_common::addr`).
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // Ask for state changes only on sockets connect4 redirected, so that entries of
            // connections that never establish are removed too.
            if redirected(&ctx).is_some() {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
            note_syn_mark(&ctx);
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
            } else if is_passthrough_src(&addresses(&ctx).0) {
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
            } else if ORIG_BY_TUPLE.get_ptr(seen_from_peer).is_some() || is_passthrough_src(&key.dst_addr) {
                // The capture listener's end of a redirected connection, or the app's end of
                // the proxy's passthrough connection: both are local pairs.
                enroll(&ctx, &key);
            }
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => {
            // A proxy of the workload (Envoy, with --proxy none) starts listening on the
            // inbound capture port: that is where sk_lookup sends connections from other
            // hosts of the listener's family (an AF_INET6 one also takes IPv4 ones when
            // there is no AF_INET one). With SO_REUSEPORT the kernel still spreads them over
            // the whole group.
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
                let family = if family == AF_INET6 { Family::V6 } else { Family::V4 };
                let _ = INBOUND_LISTENERS.update(FamilyKey::new(netns_cookie, family), ops, u64::from(BPF_ANY));
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

/// TPROXY and ambient modes: the mark this connection's SYN leaves with, kept under its
/// 4-tuple for sk_lookup's `-m mark` (TPROXY) or its "made here" (ambient) when it comes back
/// in over loopback. Mangle OUTPUT's (connect4/6 noted it under the cookie: the proxy's own,
/// 1338), else the socket's own SO_MARK (the proxy's transparent dial to the app, 1337;
/// ztunnel's, 0x539). Nothing is kept for an unmarked socket, the common case, which costs one
/// lookup here; nor for a destination off the namespace, unless TPROXY's own mark routes it
/// back in over lo. Ambient also marks ztunnel's transparent dial into the pod
/// ([`mark_inbound_proxied`]).
#[inline(always)]
fn note_syn_mark(ctx: &SockOpsContext) {
    // SAFETY: the helper's one argument is the program's own context (it reads, or makes, the
    // socket's cookie).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the reference is copied from at once (4 bytes), while the value is mapped.
    let noted = unsafe { SYN_MARK_BY_COOKIE.get(cookie) }.copied();
    let mark = match noted {
        Some(m) => {
            let _ = SYN_MARK_BY_COOKIE.remove(cookie);
            m
        }
        None => {
            // SAFETY: a read of the program's own context's `sk` (TCP_CONNECT_CB runs on a
            // full socket; the verifier still makes the pointer nullable, checked below).
            let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
            if sk.is_null() {
                return;
            }
            // SAFETY: `sk` is non-null, a socket the context hands out, whose `mark` field
            // sock_ops may read (4 bytes).
            unsafe { read_volatile(&raw const (*sk).mark) }
        }
    };
    if mark == 0 {
        return;
    }
    // SAFETY: as above: the program's own context is the helper's one argument.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(w) = workload(netns_cookie) else {
        return;
    };
    let key = tuple(ctx, netns_cookie);
    // Over lo: to the namespace's own addresses, or anywhere with TPROXY's own mark (its
    // `ip rule` sends that mark to `local default dev lo`).
    let tproxy = w.flags & workload_flags::TPROXY != 0;
    if !tproxy && w.flags & workload_flags::AMBIENT == 0 {
        return;
    }
    // Ambient needs the note only where sk_lookup cannot tell the SYN is the namespace's own by
    // its source, a transparent socket's foreign one (ztunnel dialing the app as the client):
    // sk_lookup consumes no other, and an entry never consumed would only crowd the LRU.
    if !tproxy && is_local_addr(netns_cookie, &key.src_addr) {
        return;
    }
    if !(tproxy && mark == w.tproxy_mark) && !is_local_addr(netns_cookie, &key.dst_addr) {
        return;
    }
    // Ambient without inbound capture (ingress mode): sk_lookup leaves every SYN alone and
    // consumes no note.
    if tproxy || w.flags & workload_flags::INBOUND != 0 {
        let _ = SYN_MARKS.insert(key, mark, 0);
    }
    if !tproxy && mark & AMBIENT_MARK_MASK == AMBIENT_MARK {
        mark_inbound_proxied(ctx);
    }
}

/// `SOL_SOCKET` and `SO_MARK` (asm-generic/socket.h).
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

/// Ambient: ztunnel dialing the app from the client's address. istio-cni's mangle rules give
/// such a connection connmark 0x111 (its SYN arrives with ztunnel's 0x539) and restore it onto
/// every later packet of both ends, and `ip rule fwmark 0x111/0xfff lookup 100` delivers the
/// app's replies, addressed to the client, back to ztunnel. There is no conntrack here: the
/// socket itself takes 0x111 before its SYN is built, and the app's socket, accepted with
/// `tcp_fwmark_accept=1`, takes the SYN's mark, so every reply carries it (the SYN-ACK too:
/// the request's mark is the SYN's). The rule and route are the agent's, as istio-cni's.
#[inline(always)]
fn mark_inbound_proxied(ctx: &SockOpsContext) {
    let mut conn_mark = AMBIENT_CONN_MARK;
    // SAFETY: the program's own context (TCP_CONNECT_CB runs on a full socket, which
    // bpf_setsockopt requires and checks), an option the helper accepts in sock_ops, and a
    // pointer to a live u32 on the stack with its size.
    let _ = unsafe {
        bpf_setsockopt(
            ctx.ops.cast(),
            SOL_SOCKET,
            SO_MARK,
            (&raw mut conn_mark).cast(),
            core::mem::size_of::<u32>() as i32,
        )
    };
}

/// A socket connect4/6 redirected: its cookie and what they recorded under it. They send
/// every connection they capture to 127.0.0.1 or `::1`, so any other connection of the node
/// (node mode runs this for all of them) is passed over before it pays for a socket cookie,
/// which the kernel would otherwise make for it with a global atomic counter.
#[inline(always)]
fn redirected(ctx: &SockOpsContext) -> Option<(u64, *const PendingOrigDst)> {
    let (_, remote) = addresses(ctx);
    if !addr::words_eq(&remote, &addr::localhost(Family::V4)) && !addr::words_eq(&remote, &addr::LOCALHOST6) {
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
    if !is_local_addr(key.netns_cookie, &key.dst_addr) {
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

/// 127.0.0.6 or `::6`: the source Envoy (and the embedded proxy) connects to the app from.
#[inline(always)]
fn is_passthrough_src(a: &Addr) -> bool {
    addr::words_eq(a, &addr::passthrough_src(Family::V4)) || addr::words_eq(a, &addr::passthrough_src(Family::V6))
}

/// The socket's local and remote addresses in key form: `*_ip4` of an AF_INET socket, the
/// `*_ip6` words of an AF_INET6 one (v4-mapped for an IPv4 connection). Every field is read
/// and the family picks: loads in two branches get merged by the compiler into one through a
/// computed context pointer, which the verifier refuses.
#[inline(always)]
fn addresses(ctx: &SockOpsContext) -> (Addr, Addr) {
    let o = ctx.ops;
    // SAFETY: 4-byte reads of the program's own context's `local_ip4`, `remote_ip4` and the
    // `local_ip6` and `remote_ip6` words, which sock_ops may read one word at a time (aya's
    // `local_ip6()` copies the array in one go, which the compiler may widen into loads the
    // verifier refuses).
    let (local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(&raw const (*o).local_ip4),
            read_volatile(&raw const (*o).remote_ip4),
            [
                read_volatile(&raw const (*o).local_ip6[0]),
                read_volatile(&raw const (*o).local_ip6[1]),
                read_volatile(&raw const (*o).local_ip6[2]),
                read_volatile(&raw const (*o).local_ip6[3]),
            ],
            [
                read_volatile(&raw const (*o).remote_ip6[0]),
                read_volatile(&raw const (*o).remote_ip6[1]),
                read_volatile(&raw const (*o).remote_ip6[2]),
                read_volatile(&raw const (*o).remote_ip6[3]),
            ],
        )
    };
    if ctx.family() == AF_INET {
        (addr::v4(local4), addr::v4(remote4))
    } else {
        (local6, remote6)
    }
}

/// The socket's own view of its connection: local -> remote. `local_port` is host order;
/// `remote_port` holds the network-order port in its upper half (`redirect_common::port`).
#[inline(always)]
fn tuple(ctx: &SockOpsContext, netns_cookie: u64) -> TupleKey {
    let (local, remote) = addresses(ctx);
    TupleKey::new(
        netns_cookie,
        local,
        port::host(ctx.local_port()),
        remote,
        port::be_high(ctx.remote_port()),
    )
}

//! `cgroup/getpeername6`: as getpeername4, for AF_INET6 sockets: a v4-mapped connection
//! names its original destination v4-mapped (`::ffff:a.b.c.d`, as the kernel would), a native
//! IPv6 one its IPv6 original destination.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    TupleKey,
    addr::{self, Family},
    port,
};

use crate::maps::{captured_orig_dst, dns_answer_source};

/// getpeername cannot be refused: 1 always.
#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: `ctx` is this invocation's context: the macro builds it from the program's only
    // argument, the `bpf_sock_addr` the kernel passes, which is what `answer` requires.
    unsafe { answer(&ctx) };
    1
}

/// # Safety
///
/// As getpeername4's `answer`, for a `cgroup/getpeername6` program, whose `user_ip6` words
/// and `user_port` are the address getpeername returns.
#[inline(always)]
unsafe fn answer(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: 4-byte reads of the context's `user_ip6` words and `user_port`, and the 8-byte
    // `sk`, a full socket (`PTR_TO_SOCKET`; checked anyway).
    let (peer_ip, peer_port, sk) = unsafe {
        (
            [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
            read_volatile(&raw const (*sa).user_port),
            (*sa).__bindgen_anon_1.sk,
        )
    };
    // connect6 sends what it captures to ::ffff:127.0.0.1 or ::1; any other peer is passed
    // over before the lookups.
    let captured_peer = addr::words_eq(&peer_ip, &addr::localhost(Family::V4))
        || addr::words_eq(&peer_ip, &addr::localhost(Family::V6));
    if !captured_peer || sk.is_null() {
        return;
    }
    // SAFETY: `sk` is a non-null full AF_INET6 socket: 4-byte reads of its `src_ip6` words
    // and `src_port` (host order).
    let (local_ip, local_port) = unsafe {
        (
            [
                read_volatile(&raw const (*sk).src_ip6[0]),
                read_volatile(&raw const (*sk).src_ip6[1]),
                read_volatile(&raw const (*sk).src_ip6[2]),
                read_volatile(&raw const (*sk).src_ip6[3]),
            ],
            read_volatile(&raw const (*sk).src_port),
        )
    };
    let key = TupleKey::new(
        // SAFETY: the helper's one argument is the program's own context.
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local_ip,
        port::host(local_port),
        peer_ip,
        port::be_low(peer_port),
    );
    // A TCP connection's original destination; else a connected UDP socket's DNS resolver.
    let orig = captured_orig_dst(&key).or_else(|| {
        // SAFETY: the program's own context is the helper's one argument (it reads the socket).
        let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
        dns_answer_source(cookie, &peer_ip, port::be_low(peer_port))
    });
    let Some(orig) = orig else {
        return;
    };
    // One 4-byte store per word: the verifier refuses wider stores to the context.
    // SAFETY: 4-byte writes of the context's `user_ip6` words and `user_port`, which
    // getpeername6 may write: the kernel returns what they hold.
    unsafe {
        write_volatile(&raw mut (*sa).user_ip6[0], orig.addr[0]);
        write_volatile(&raw mut (*sa).user_ip6[1], orig.addr[1]);
        write_volatile(&raw mut (*sa).user_ip6[2], orig.addr[2]);
        write_volatile(&raw mut (*sa).user_ip6[3], orig.addr[3]);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(orig.port));
    }
}

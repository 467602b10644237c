//! `cgroup/getpeername4`: a captured app's AF_INET socket names its original destination as
//! its peer, as it would under REDIRECT (where the socket really is connected to it), instead
//! of the capture listener on 127.0.0.1 it is connected to. The proxy's sockets are not
//! captured connecting ends and keep their own view.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{LOCALHOST_BE, TupleKey, addr, port};

use crate::maps::{captured_orig_dst, dns_answer_source};

/// getpeername cannot be refused: 1 always.
#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: `ctx` is this invocation's context: the macro builds it from the program's only
    // argument, the `bpf_sock_addr` the kernel passes, which is what `answer` requires.
    unsafe { answer(&ctx) };
    1
}

/// # Safety
///
/// `ctx.sock_addr` must be the context the kernel passed to this run of a
/// `cgroup/getpeername4` program: its field accesses are then context accesses the verifier
/// checked at load (offset, size, direction) and rewrote into accesses of the kernel's own
/// `bpf_sock_addr_kern`, whose `user_ip4`/`user_port` are the address getpeername returns.
#[inline(always)]
unsafe fn answer(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: 4-byte reads of the context's `user_ip4` and `user_port` (the peer the kernel is
    // about to return), and the 8-byte `sk`, a full socket (`PTR_TO_SOCKET`; checked anyway).
    let (peer_ip, peer_port, sk) = unsafe {
        (
            read_volatile(&raw const (*sa).user_ip4),
            read_volatile(&raw const (*sa).user_port),
            (*sa).__bindgen_anon_1.sk,
        )
    };
    // connect4 sends every connection it captures to 127.0.0.1: any other peer is passed over
    // before the lookups (node mode runs this for every socket of the node).
    if peer_ip != LOCALHOST_BE || sk.is_null() {
        return;
    }
    // SAFETY: `sk` is a non-null full socket: 4-byte reads of its `src_ip4` and `src_port`
    // (host order).
    let (local_ip, local_port) = unsafe {
        (
            read_volatile(&raw const (*sk).src_ip4),
            read_volatile(&raw const (*sk).src_port),
        )
    };
    let key = TupleKey::new(
        // SAFETY: the helper's one argument is the program's own context (it reads the
        // socket's namespace from it).
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr::v4(local_ip),
        port::host(local_port),
        addr::v4(peer_ip),
        port::be_low(peer_port),
    );
    // A TCP connection's original destination; else a connected UDP socket's DNS resolver.
    let orig = captured_orig_dst(&key).or_else(|| {
        // SAFETY: the program's own context is the helper's one argument (it reads the socket).
        let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
        dns_answer_source(cookie, &addr::v4(peer_ip), port::be_low(peer_port))
    });
    let Some(orig) = orig else {
        return;
    };
    // SAFETY: 4-byte writes of the context's `user_ip4` and `user_port`, which getpeername4
    // may write: the kernel returns what they hold.
    unsafe {
        write_volatile(&raw mut (*sa).user_ip4, orig.addr[3]);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(orig.port));
    }
}

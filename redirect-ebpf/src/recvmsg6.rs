//! `cgroup/recvmsg6`: [`crate::recvmsg4`]'s job for AF_INET6 UDP sockets (native IPv6
//! answers from `::1`, and v4-mapped ones from 127.0.0.1).
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{
    maps::{dns_answer_source, note_udp_peer},
    user_addr,
};

/// recvmsg hooks cannot refuse: 1 always.
#[cgroup_sock_addr(recvmsg6)]
pub fn redirect_recvmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: `ctx` is this invocation's context, which is what `restore` requires.
    unsafe { restore(&ctx) };
    1
}

/// # Safety
///
/// `ctx.sock_addr` must be the context the kernel passed to this run of a `cgroup/recvmsg6`
/// program: its `user_ip6`/`user_port` are then the datagram's source, which the verifier
/// let this program read and write (checked at load).
#[inline(always)]
unsafe fn restore(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: this run's own context (see `# Safety`).
    let (from, port) = unsafe { user_addr::read6(sa) };
    // SAFETY: the program's own context is each helper's one argument (they read the socket,
    // and its namespace).
    let (cookie, netns_cookie) = unsafe { (bpf_get_socket_cookie(sa.cast()), bpf_get_netns_cookie(ctx.as_ptr())) };
    note_udp_peer(netns_cookie, cookie, &from, port);
    if let Some(orig) = dns_answer_source(cookie, &from, port) {
        // SAFETY: this run's own context, whose source a recvmsg hook may write.
        unsafe { user_addr::write6(sa, &orig.addr, orig.port) };
    }
}

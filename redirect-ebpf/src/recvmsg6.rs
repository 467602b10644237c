//! `cgroup/recvmsg6`: [`crate::recvmsg4`]'s job for AF_INET6 UDP sockets (native IPv6
//! answers from `::1`, and v4-mapped ones from 127.0.0.1).
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::port;

use crate::maps::{dns_answer_source, note_udp_peer};

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
/// program (see `recvmsg4`).
#[inline(always)]
unsafe fn restore(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: 4-byte context reads of the source's words and port (see `# Safety`).
    let (ip, p) = unsafe {
        (
            [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
            read_volatile(&raw const (*sa).user_port),
        )
    };
    // SAFETY: the program's own context is the helper's one argument (it reads the socket).
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // SAFETY: the program's own context is the helper's one argument (it reads the socket's
    // namespace).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    note_udp_peer(netns_cookie, cookie, &ip, port::be_low(p));
    let Some(orig) = dns_answer_source(cookie, &ip, port::be_low(p)) else {
        return;
    };
    // SAFETY: 4-byte writes of the context's `user_ip6` words and `user_port`.
    unsafe {
        write_volatile(&raw mut (*sa).user_ip6[0], orig.addr[0]);
        write_volatile(&raw mut (*sa).user_ip6[1], orig.addr[1]);
        write_volatile(&raw mut (*sa).user_ip6[2], orig.addr[2]);
        write_volatile(&raw mut (*sa).user_ip6[3], orig.addr[3]);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(orig.port));
    }
}

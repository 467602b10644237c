//! `cgroup/recvmsg4`: the DNS proxy's answer to a captured query names the resolver the app
//! asked as its source (`recvfrom`), as NAT's reverse translation would, so that a resolver
//! library that checks who answered accepts it.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{addr, port};

use crate::maps::{dns_answer_source, note_udp_peer};

/// recvmsg hooks cannot refuse: 1 always.
#[cgroup_sock_addr(recvmsg4)]
pub fn redirect_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: `ctx` is this invocation's context, which is what `restore` requires.
    unsafe { restore(&ctx) };
    1
}

/// # Safety
///
/// `ctx.sock_addr` must be the context the kernel passed to this run of a `cgroup/recvmsg4`
/// program: its `user_ip4`/`user_port` are then the datagram's source, which the verifier let
/// this program read and write (checked at load).
#[inline(always)]
unsafe fn restore(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: 4-byte context reads of the source (see `# Safety`).
    let (ip, p) = unsafe {
        (
            read_volatile(&raw const (*sa).user_ip4),
            read_volatile(&raw const (*sa).user_port),
        )
    };
    // SAFETY: the program's own context is the helper's one argument (it reads the socket).
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // SAFETY: the program's own context is the helper's one argument (it reads the socket's
    // namespace).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    note_udp_peer(netns_cookie, cookie, &addr::v4(ip), port::be_low(p));
    let Some(orig) = dns_answer_source(cookie, &addr::v4(ip), port::be_low(p)) else {
        return;
    };
    // SAFETY: 4-byte writes of the context's `user_ip4` and `user_port` (see `# Safety`).
    unsafe {
        write_volatile(&raw mut (*sa).user_ip4, orig.addr[3]);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(orig.port));
    }
}

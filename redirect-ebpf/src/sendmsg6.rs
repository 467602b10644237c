//! `cgroup/sendmsg6`: [`crate::sendmsg4`]'s job for AF_INET6 UDP sockets: native IPv6
//! destinations (ip6tables' chains) and v4-mapped ones (iptables').
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{output, user_addr};

/// Returning 1 lets the datagram go; 0 would fail sendmsg with EPERM. As at connect, a mesh
/// decision never becomes an error the workload sees.
#[cgroup_sock_addr(sendmsg6)]
pub fn redirect_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: `ctx` is this invocation's context: the macro builds it from the program's only
    // argument, the `bpf_sock_addr` the kernel passes, which is what `decide` requires.
    unsafe { decide(&ctx) };
    1
}

/// # Safety
///
/// `ctx.sock_addr` must be the context the kernel passed to this run of a `cgroup/sendmsg6`
/// program: its field accesses are then context accesses the verifier checked at load and
/// rewrote into accesses of the kernel's `bpf_sock_addr_kern`, whose `user_ip6`/`user_port`
/// are the datagram's destination.
#[inline(always)]
unsafe fn decide(ctx: &SockAddrContext) {
    // SAFETY: this run's own context; `read` reads the context and its full socket only.
    let judged = unsafe {
        output::judge(ctx, true, |sa, sk| {
            let (dst, port) = user_addr::read6(sa);
            (dst, port, user_addr::src6(sk))
        })
    };
    // The datagram keeps the source routing gives it (sendmsg cannot bind): the DNS proxy
    // answers whatever address asked.
    if let Some(to) = judged {
        // SAFETY: this run's own context, whose destination a sendmsg hook may write.
        unsafe { user_addr::write6(ctx.sock_addr, &to.addr, to.port) };
    }
}

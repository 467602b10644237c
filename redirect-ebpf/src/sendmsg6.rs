//! `cgroup/sendmsg6`: [`crate::sendmsg4`]'s job for AF_INET6 UDP sockets: native IPv6
//! destinations (ip6tables' chains) and v4-mapped ones (iptables').
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::{IPPROTO_UDP, port};

use crate::output::{self, Connect};

/// Returning 1 lets the datagram go (see `sendmsg4`).
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
/// program (see `sendmsg4`'s `decide`).
#[inline(always)]
unsafe fn decide(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this sendmsg6 run's own context (see `# Safety`).
    let Some((sk, cookie, proto)) = (unsafe { output::judged_socket(sa) }) else {
        return;
    };
    if proto != IPPROTO_UDP {
        return;
    }
    // SAFETY: context reads (see `# Safety`): the 4-byte `user_port` and each 4-byte word of
    // `user_ip6`; and the full AF_INET6 socket's `src_ip6` words.
    let (user_port, user_ip6, src) = unsafe {
        (
            read_volatile(&raw const (*sa).user_port),
            [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
            [
                read_volatile(&raw const (*sk).src_ip6[0]),
                read_volatile(&raw const (*sk).src_ip6[1]),
                read_volatile(&raw const (*sk).src_ip6[2]),
                read_volatile(&raw const (*sk).src_ip6[3]),
            ],
        )
    };
    let c = Connect {
        sk,
        cookie,
        proto,
        // SAFETY: the helper's one argument is the program's own context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        dst: user_ip6,
        dst_port: port::be_low(user_port),
        src,
    };
    // SAFETY: `c.sk` is the socket `judged_socket` returned for this run's context.
    let Some(to) = (unsafe { output::decide(&c) }) else {
        return;
    };
    // SAFETY: 4-byte writes of the context's `user_ip6` words and `user_port`, which a
    // sendmsg6 program may write; an IPv4 destination is written v4-mapped, as the socket
    // names it.
    unsafe {
        write_volatile(&raw mut (*sa).user_ip6[0], to.addr[0]);
        write_volatile(&raw mut (*sa).user_ip6[1], to.addr[1]);
        write_volatile(&raw mut (*sa).user_ip6[2], to.addr[2]);
        write_volatile(&raw mut (*sa).user_ip6[3], to.addr[3]);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(to.port));
    }
}

//! `cgroup/connect6`: ISTIO_OUTPUT for AF_INET6 sockets. A connect to a v4-mapped address
//! (`::ffff:a.b.c.d`, how the JVM and other dual-stack runtimes reach IPv4) leaves as IPv4
//! packets, which iptables' nat OUTPUT would see: it is judged by the IPv4 chain, exactly as
//! connect4 judges an AF_INET connect, and sent to `::ffff:127.0.0.1`. A native IPv6 connect
//! is judged by the ip6tables chain (when the workload has an IPv6 address) and sent to `::1`.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::{addr, port};

use crate::{
    output::{self, Connect},
    sockaddr::SockaddrIn6,
};

/// Returns 1 always, as connect4: see there.
#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: `ctx` is this invocation's context: the macro builds it from the program's only
    // argument, the `bpf_sock_addr` the kernel passes, which is what `decide` requires.
    unsafe { decide(&ctx) };
    1
}

/// Reads the connect, has `output::decide` judge it, and rewrites the destination when it
/// says so.
///
/// # Safety
///
/// `ctx.sock_addr` must be the context the kernel passed to this run of a `cgroup/connect6`
/// program. Its field accesses are then context accesses: the verifier checked each one's
/// offset, size and direction against what connect6 may touch when the program was loaded
/// (refusing the program otherwise) and rewrote it into an access of the kernel's own
/// `bpf_sock_addr_kern`.
#[inline(always)]
unsafe fn decide(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this connect6 run's own context (see `# Safety`).
    let Some((sk, cookie, proto)) = (unsafe { output::judged_socket(sa) }) else {
        return;
    };
    // SAFETY: context reads (see `# Safety`): the 4-byte `user_port` and each 4-byte word of
    // `user_ip6` (the verifier takes them one word at a time).
    let (user_port, user_ip6) = unsafe {
        (
            read_volatile(&raw const (*sa).user_port),
            [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
        )
    };
    // SAFETY: `sk` is a non-null full AF_INET6 socket: 4-byte reads of its `src_ip6` words
    // (`sk_v6_rcv_saddr`: `::` when unbound, v4-mapped when bound to an IPv4 address).
    let src = unsafe {
        [
            read_volatile(&raw const (*sk).src_ip6[0]),
            read_volatile(&raw const (*sk).src_ip6[1]),
            read_volatile(&raw const (*sk).src_ip6[2]),
            read_volatile(&raw const (*sk).src_ip6[3]),
        ]
    };
    let c = Connect {
        sk,
        cookie,
        proto,
        // SAFETY: the helper's one argument is the program's own context (it reads the
        // socket's namespace from it); connect6 may call it (5.7+, which the agent probes for).
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        dst: user_ip6,
        dst_port: port::be_low(user_port),
        src,
    };
    // SAFETY: `c.sk` is the socket `judged_socket` returned for this run's context.
    let Some(to) = (unsafe { output::decide(&c) }) else {
        return;
    };
    if !addr::words_eq(&to.bind, &addr::UNSPECIFIED) {
        // An IPv4 source is bound v4-mapped, as an AF_INET6 socket holds it.
        // SAFETY: `sa` is this connect6 run's own context (see `# Safety`).
        unsafe { output::bind(sa, &mut SockaddrIn6::new(to.bind, 0)) };
    }
    // One 4-byte store per word: the verifier refuses wider stores to the context.
    // SAFETY: 4-byte writes of the context's `user_ip6` words and `user_port`, the fields a
    // connect6 program may write (see `# Safety`); the kernel connects to what they hold.
    unsafe {
        write_volatile(&raw mut (*sa).user_ip6[0], to.addr[0]);
        write_volatile(&raw mut (*sa).user_ip6[1], to.addr[1]);
        write_volatile(&raw mut (*sa).user_ip6[2], to.addr[2]);
        write_volatile(&raw mut (*sa).user_ip6[3], to.addr[3]);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(to.port));
    }
}

//! `cgroup/connect4`: ISTIO_OUTPUT for AF_INET sockets, evaluated where iptables' nat OUTPUT
//! would see the SYN (the decision itself is `output::decide`, shared with connect6).
//!
//! Deciding at connect() instead of on the first packet means no conntrack entry and no NAT on
//! every later packet; the cost is that the app's socket really is connected to the proxy, so
//! the original destination must be carried to it through maps (see `sockops`).
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::{addr, port};

use crate::{
    output::{self, Connect},
    sockaddr::SockaddrIn,
};

/// Returning 1 lets connect() proceed; 0 would fail it with EPERM. We never refuse: a mesh
/// decision must not become an error the workload sees at connect(). Where a decision cannot be
/// carried through, the proxy makes it visible instead (a reset).
#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: `ctx` is this invocation's context: the macro builds it from the program's only
    // argument, the `bpf_sock_addr` the kernel passes, which is what `decide` requires.
    unsafe { decide(&ctx) };
    1
}

/// Reads the connect, has `output::decide` judge it, and rewrites the destination to
/// 127.0.0.1:PORT when it says so.
///
/// # Safety
///
/// `ctx.sock_addr` must be the context the kernel passed to this run of a `cgroup/connect4`
/// program. Its field accesses are then context accesses: the verifier checked each one's
/// offset, size and direction against what connect4 may touch when the program was loaded
/// (refusing the program otherwise) and rewrote it into an access of the kernel's own
/// `bpf_sock_addr_kern`, so none can reach memory the kernel did not mean to expose.
#[inline(always)]
unsafe fn decide(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this connect4 run's own context (see `# Safety`).
    let Some((sk, cookie, proto)) = (unsafe { output::judged_socket(sa) }) else {
        return;
    };
    // An unbound socket gets its source from routing: 0.0.0.0 stands for "not chosen yet".
    // SAFETY: context reads (see `# Safety`) of the 4-byte `user_port` and `user_ip4`; and of
    // the full socket `sk`'s `src_ip4`, which the verifier lets programs read.
    let (user_port, user_ip4, src_ip4) = unsafe {
        (
            read_volatile(&raw const (*sa).user_port),
            read_volatile(&raw const (*sa).user_ip4),
            read_volatile(&raw const (*sk).src_ip4),
        )
    };
    let c = Connect {
        sk,
        cookie,
        proto,
        // SAFETY: the helper's one argument is the program's own context (it reads the
        // socket's namespace from it); connect4 may call it (5.7+, which the agent probes for).
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        dst: addr::v4(user_ip4),
        dst_port: port::be_low(user_port),
        src: addr::v4(src_ip4),
    };
    // SAFETY: `c.sk` is the socket `judged_socket` returned for this run's context.
    let Some(to) = (unsafe { output::decide(&c) }) else {
        return;
    };
    if !addr::words_eq(&to.bind, &addr::UNSPECIFIED) {
        // SAFETY: `sa` is this connect4 run's own context (see `# Safety`).
        unsafe { output::bind(sa, &mut SockaddrIn::new(to.bind[3], 0)) };
    }
    // Separate volatile stores: merged into one 8-byte store, the verifier refuses them.
    // SAFETY: 4-byte writes of the context's `user_ip4` and `user_port`, the two fields a
    // connect4 program may write (see `# Safety`); the kernel connects to what they hold.
    unsafe {
        write_volatile(&raw mut (*sa).user_ip4, to.addr[3]);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(to.port));
    }
}

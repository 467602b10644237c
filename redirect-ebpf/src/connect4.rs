//! `cgroup/connect4`: ISTIO_OUTPUT for AF_INET sockets, evaluated where iptables' nat OUTPUT
//! would see the SYN (the decision itself is `output::decide`, shared with connect6).
//!
//! Deciding at connect() instead of on the first packet means no conntrack entry and no NAT on
//! every later packet; the cost is that the app's socket really is connected to the proxy, so
//! the original destination must be carried to it through maps (see `sockops`).
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::addr;

use crate::{output, probe_source, sockaddr::SockaddrIn, user_addr};

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

/// Has `output::judge` judge the connect (a TCP or a UDP one), and sends it to the capture
/// port on loopback when it says so.
///
/// # Safety
///
/// `ctx.sock_addr` must be the context the kernel passed to this run of a `cgroup/connect4`
/// program: its field accesses are then context accesses the verifier checked (offset, size,
/// direction) when the program was loaded and rewrote into accesses of the kernel's own
/// `bpf_sock_addr_kern`.
#[inline(always)]
unsafe fn decide(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // The node's connects to ambient pods (a namespace no workload is).
    // SAFETY: `sa` is this run's own context, a connect hook's (see `# Safety`).
    if unsafe { probe_source::redirect_probe_bind4(sa) } != 0 {
        return;
    }
    // SAFETY: this run's own context; `read` reads the context and its full socket only.
    let judged = unsafe {
        output::judge(ctx, false, |sa, sk| {
            let (dst, port) = user_addr::read4(sa);
            (dst, port, user_addr::src4(sk))
        })
    };
    let Some(to) = judged else {
        return;
    };
    if !addr::words_eq(&to.bind, &addr::UNSPECIFIED) {
        // SAFETY: `sa` is this run's own context (see `# Safety`).
        unsafe { output::bind(sa, &mut SockaddrIn::new(to.bind[3], 0)) };
    }
    // SAFETY: `sa` is this run's own context, whose address a connect hook may write.
    unsafe { user_addr::write4(sa, &to.addr, to.port) };
}

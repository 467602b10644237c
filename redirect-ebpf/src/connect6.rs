//! `cgroup/connect6`: ISTIO_OUTPUT for AF_INET6 sockets. A connect to a v4-mapped address
//! (`::ffff:a.b.c.d`, how the JVM and other dual-stack runtimes reach IPv4) leaves as IPv4
//! packets, which iptables' nat OUTPUT would see: it is judged by the IPv4 chain, exactly as
//! connect4 judges an AF_INET connect, and sent to `::ffff:127.0.0.1`. A native IPv6 connect
//! is judged by the ip6tables chain (when the workload has an IPv6 address) and sent to `::1`.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::addr;

use crate::{output, probe_source, sockaddr::SockaddrIn6, user_addr};

/// Returning 1 lets connect() proceed; 0 would fail it with EPERM. We never refuse: a mesh
/// decision must not become an error the workload sees at connect(). Where a decision cannot be
/// carried through, the proxy makes it visible instead (a reset).
#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
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
/// `ctx.sock_addr` must be the context the kernel passed to this run of a `cgroup/connect6`
/// program: its field accesses are then context accesses the verifier checked (offset, size,
/// direction) when the program was loaded and rewrote into accesses of the kernel's own
/// `bpf_sock_addr_kern`.
#[inline(always)]
unsafe fn decide(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // The node's connects to ambient pods (a namespace no workload is).
    // SAFETY: `sa` is this run's own context, a connect hook's (see `# Safety`).
    if unsafe { probe_source::redirect_probe_bind6(sa) } != 0 {
        return;
    }
    // SAFETY: this run's own context; `read` reads the context and its full socket only.
    let judged = unsafe {
        output::judge(ctx, false, |sa, sk| {
            let (dst, port) = user_addr::read6(sa);
            (dst, port, user_addr::src6(sk))
        })
    };
    let Some(to) = judged else {
        return;
    };
    if !addr::words_eq(&to.bind, &addr::UNSPECIFIED) {
        // An IPv4 source is bound v4-mapped, as an AF_INET6 socket holds it.
        // SAFETY: `sa` is this run's own context (see `# Safety`).
        unsafe { output::bind(sa, &mut SockaddrIn6::new(to.bind, 0)) };
    }
    // SAFETY: `sa` is this run's own context, whose address a connect hook may write.
    unsafe { user_addr::write6(sa, &to.addr, to.port) };
}

//! `cgroup/connect4`: ISTIO_OUTPUT for AF_INET sockets, evaluated where iptables' nat OUTPUT
//! would see the SYN (the decision itself is `output::decide`, shared with connect6).
//!
//! Deciding at connect() instead of on the first packet means no conntrack entry and no NAT on
//! every later packet; the cost is that the app's socket really is connected to the proxy, so
//! the original destination must be carried to it through maps (see `sockops`).
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::sockaddr,
    helpers::{bpf_bind, bpf_get_netns_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{AGENT_SOCKET_MARK, IPPROTO_TCP, addr, port};

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
    // SAFETY: a 4-byte read of the context's `protocol`, readable by connect4 (see `# Safety`).
    let protocol = unsafe { read_volatile(&raw const (*sa).protocol) };
    // UDP "connections" are untouched, as the rule set's REDIRECT targets are -p tcp.
    if protocol != u32::from(IPPROTO_TCP) {
        return;
    }
    // SAFETY: context reads (see `# Safety`): the 4-byte `user_port`, and the 8-byte `sk`, the
    // socket being connected, which the verifier types as a full socket (`PTR_TO_SOCKET`,
    // never null for connect4; the null checks below cost a branch and guard the derefs
    // anyway).
    let (user_port, user_ip4, sk) = unsafe {
        (
            read_volatile(&raw const (*sa).user_port),
            read_volatile(&raw const (*sa).user_ip4),
            (*sa).__bindgen_anon_1.sk,
        )
    };
    // The agent's own upstream connections (node mode attaches above the agent).
    // SAFETY: `sk` is non-null here and a full socket, whose `mark` the verifier lets
    // programs read (a 4-byte load it rewrites into one of `sk->sk_mark`).
    if !sk.is_null() && unsafe { read_volatile(&raw const (*sk).mark) } == AGENT_SOCKET_MARK {
        return;
    }
    // An unbound socket gets its source from routing, which never picks 127.0.0.6: 0.0.0.0
    // stands for "not chosen yet" and matches no -s rule.
    let src_ip4 = if sk.is_null() {
        0
    } else {
        // SAFETY: `sk` is non-null (this branch) and `src_ip4` is a readable field of a full
        // socket's `bpf_sock`, as `mark` above.
        unsafe { read_volatile(&raw const (*sk).src_ip4) }
    };
    let c = Connect {
        // SAFETY: the helper's one argument is the program's own context (it reads the
        // socket's namespace from it); connect4 may call it (5.7+, which the agent probes for).
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        dst: addr::v4(user_ip4),
        dst_port: port::be_low(user_port),
        src: addr::v4(src_ip4),
    };
    // SAFETY: `ctx` is this connect4 run's own context (see `# Safety`).
    let Some(to) = (unsafe { output::decide(ctx.as_ptr(), &c) }) else {
        return;
    };
    let src = to.bind;
    if !addr::words_eq(&src, &addr::UNSPECIFIED) {
        let mut sin = SockaddrIn::new(src[3], 0);
        // Best effort: should it fail (the address just went away), the socket keeps the
        // source the kernel picks for 127.0.0.1, and only what getsockname shows differs.
        // SAFETY: `ctx.sock_addr` is this connect4 run's own context, which the helper may
        // take here (connect4/connect6 only); `sin` is a whole sockaddr_in on our stack and the
        // length is its size, which the kernel checks before reading.
        let _ = unsafe {
            bpf_bind(
                ctx.sock_addr,
                (&raw mut sin).cast::<sockaddr>(),
                core::mem::size_of::<SockaddrIn>() as i32,
            )
        };
    }
    // Separate volatile stores: merged into one 8-byte store, the verifier refuses them.
    // SAFETY: 4-byte writes of the context's `user_ip4` and `user_port`, the two fields a
    // connect4 program may write (see `# Safety`); the kernel connects to what they hold.
    unsafe {
        write_volatile(&raw mut (*sa).user_ip4, to.addr[3]);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(to.port));
    }
}

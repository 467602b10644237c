//! `cgroup/connect4`: ISTIO_OUTPUT, evaluated where iptables' nat OUTPUT would see the SYN.
//!
//! Deciding at connect() instead of on the first packet means no conntrack entry and no NAT on
//! every later packet; the cost is that the app's socket really is connected to the proxy, so
//! the original destination must be carried to it through maps (see `sockops`).
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    AGENT_SOCKET_MARK, ChainId, ConnFacts, IPPROTO_TCP, LOCALHOST_BE, OrigDst, PendingOrigDst, Target, events,
    is_loopback, port,
};

use crate::{
    chain,
    maps::{ORIG_BY_COOKIE, count_event, is_local_addr, workload},
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

/// ISTIO_OUTPUT for one connect(): rewrites the destination to 127.0.0.1:PORT when the chain
/// says REDIRECT or IN_REDIRECT, and records the original one under the socket's cookie.
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
    // SAFETY: the helper's one argument is the program's own context (it reads the socket's
    // namespace from it); connect4 may call it (5.7+, which the agent probes for).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(workload) = workload(netns_cookie) else {
        return;
    };
    // A workload enrolled with its cgroup: ISTIO_OUTPUT is that cgroup's, as it is for a
    // `run` instance attached there.
    if workload.cgroup_id != 0
        // SAFETY: the helper takes only an integer (the ancestor's depth: any value is
        // accepted, and one deeper than the task's own cgroup gives 0) and reads the current
        // task.
        && unsafe { bpf_get_current_ancestor_cgroup_id(workload.cgroup_level as i32) } != workload.cgroup_id
    {
        return;
    }

    // SAFETY: context reads (see `# Safety`): the 4-byte `user_port`, and the 8-byte `sk`, the
    // socket being connected, which the verifier types as a full socket (`PTR_TO_SOCKET`,
    // never null for connect4; the null checks below cost a branch and guard the derefs
    // anyway).
    let (user_port, sk) = unsafe { (read_volatile(&raw const (*sa).user_port), (*sa).__bindgen_anon_1.sk) };
    let dst_port = port::be_low(user_port);
    // The agent's own upstream connections (node mode attaches above the agent).
    // SAFETY: `sk` is non-null here and a full socket, whose `mark` the verifier lets
    // programs read (a 4-byte load it rewrites into one of `sk->sk_mark`).
    if !sk.is_null() && unsafe { read_volatile(&raw const (*sk).mark) } == AGENT_SOCKET_MARK {
        return;
    }
    // An unbound socket gets its source from routing, which never picks 127.0.0.6: 0 stands
    // for "not chosen yet" and matches no -s rule.
    let src_addr = if sk.is_null() {
        0
    } else {
        // SAFETY: `sk` is non-null (this branch) and `src_ip4` is a readable field of a full
        // socket's `bpf_sock`, as `mark` above.
        unsafe { read_volatile(&raw const (*sk).src_ip4) }
    };
    // connect() to 0.0.0.0 is routed to the bound source, else 127.0.0.1, over lo: that is the
    // destination the nat table would see.
    // SAFETY: a 4-byte read of the context's `user_ip4`, readable by connect4.
    let dst_addr = match unsafe { read_volatile(&raw const (*sa).user_ip4) } {
        0 if src_addr != 0 => src_addr,
        0 => LOCALHOST_BE,
        addr => addr,
    };
    // The calling task's uid/gid. The owner match reads the socket file's fsuid/fsgid: the same
    // unless a set-id program connects a socket, or one is passed to another process.
    let uid_gid = bpf_get_current_uid_gid();
    let out_lo = is_local_addr(netns_cookie, dst_addr);
    // A socket bound to a loopback address cannot reach anything but lo: the kernel's route
    // lookup fails the connect() (EINVAL) before nat OUTPUT ever sees a packet. Leave it to
    // fail the same way rather than redirect it to a listener it could reach.
    if is_loopback(src_addr) && !out_lo {
        return;
    }
    let facts = ConnFacts {
        proto: IPPROTO_TCP,
        dst_addr,
        dst_port,
        src_addr,
        out_lo,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
    };

    let (target, capture_port) = match chain::decide(workload, ChainId::Output, &facts) {
        Some(t @ Target::Redirect) => (t, workload.outbound_port),
        Some(t @ Target::InRedirect) => (t, workload.inbound_port),
        Some(Target::Return) | None => return,
    };
    // SAFETY: as `bpf_get_netns_cookie` above: the program's own context is the one argument
    // (for sock_addr programs the kernel's variant of the helper reads the socket from it).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let pending = PendingOrigDst {
        netns_cookie,
        orig: OrigDst {
            addr: dst_addr,
            port: dst_port,
            target: target as u8,
            _pad: 0,
        },
    };
    // Redirect even if the record fails (the LRU only fails under memory pressure): the proxy
    // then finds no original destination and resets the connection, which is loud, where
    // leaving it uncaptured would silently bypass the mesh.
    if ORIG_BY_COOKIE.insert(cookie, pending, 0).is_err() {
        count_event(workload, events::ORIG_DST_NOT_RECORDED);
    }
    // Separate volatile stores: merged into one 8-byte store, the verifier refuses them.
    // SAFETY: 4-byte writes of the context's `user_ip4` and `user_port`, the two fields a
    // connect4 program may write (see `# Safety`); the kernel connects to what they hold.
    unsafe {
        write_volatile(&raw mut (*sa).user_ip4, LOCALHOST_BE);
        write_volatile(&raw mut (*sa).user_port, port::to_be_low(capture_port));
    }
}

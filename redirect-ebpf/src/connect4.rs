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
    // SAFETY: the kernel hands connect4 a valid bpf_sock_addr.
    unsafe { decide(&ctx) };
    1
}

#[inline(always)]
unsafe fn decide(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // UDP "connections" are untouched, as the rule set's REDIRECT targets are -p tcp.
    if unsafe { read_volatile(&(*sa).protocol) } != u32::from(IPPROTO_TCP) {
        return;
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(workload) = workload(netns_cookie) else {
        return;
    };
    // A workload enrolled with its cgroup: ISTIO_OUTPUT is that cgroup's, as it is for a
    // `run` instance attached there.
    if workload.cgroup_id != 0
        && unsafe { bpf_get_current_ancestor_cgroup_id(workload.cgroup_level as i32) } != workload.cgroup_id
    {
        return;
    }

    let dst_port = port::be_low(unsafe { read_volatile(&(*sa).user_port) });
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    // The agent's own upstream connections (node mode attaches above the agent).
    if !sk.is_null() && unsafe { read_volatile(&(*sk).mark) } == AGENT_SOCKET_MARK {
        return;
    }
    // An unbound socket gets its source from routing, which never picks 127.0.0.6: 0 stands
    // for "not chosen yet" and matches no -s rule.
    let src_addr = if sk.is_null() {
        0
    } else {
        unsafe { read_volatile(&(*sk).src_ip4) }
    };
    // connect() to 0.0.0.0 is routed to the bound source, else 127.0.0.1, over lo: that is the
    // destination the nat table would see.
    let dst_addr = match unsafe { read_volatile(&(*sa).user_ip4) } {
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
    unsafe {
        write_volatile(&mut (*sa).user_ip4, LOCALHOST_BE);
        write_volatile(&mut (*sa).user_port, port::to_be_low(capture_port));
    }
}

//! `sockops`: moves a redirected socket's original destination from its cookie (all connect4
//! knows) to its 4-tuple (all the proxy's accepted socket knows), and forgets it at close; and
//! registers the workload's inbound capture listener for sk_lookup.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use redirect_common::{TupleKey, workload_flags};

use crate::maps::{INBOUND_LISTENERS, ORIG_BY_COOKIE, ORIG_BY_TUPLE, WORKLOADS};

const AF_INET: u32 = 2;

#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.family() != AF_INET {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // Ask for state changes only on sockets connect4 redirected, so that entries of
            // connections that never establish are removed too.
            if ORIG_BY_COOKIE.get_ptr(cookie).is_some() {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // Runs before the final ACK leaves, so the entry exists before the proxy can
            // accept the connection.
            if let Some(pending) = ORIG_BY_COOKIE.get_ptr(cookie) {
                let pending = unsafe { *pending };
                let key = tuple(&ctx, pending.netns_cookie);
                let _ = ORIG_BY_TUPLE.insert(key, pending.orig, 0);
                let _ = ORIG_BY_COOKIE.remove(cookie);
            }
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => {
            // A proxy of the workload (Envoy, with --proxy none) starts listening on the
            // inbound capture port: that is where sk_lookup sends connections from other
            // hosts. With SO_REUSEPORT the kernel still spreads them over the whole group.
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            if let Some(w) = WORKLOADS.get_ptr(netns_cookie)
                && unsafe { (*w).flags } & workload_flags::WORKLOAD_LISTENER != 0
                && ctx.local_port() == u32::from(unsafe { (*w).inbound_port })
            {
                // SAFETY: the context pointer is the kernel's bpf_sock_ops for this call.
                let ops = unsafe { &mut *ctx.ops };
                let _ = INBOUND_LISTENERS.update(netns_cookie, ops, u64::from(BPF_ANY));
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _ = ORIG_BY_COOKIE.remove(cookie);
            // Addresses and ports are still set: STATE_CB runs before the port is released.
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            let _ = ORIG_BY_TUPLE.remove(tuple(&ctx, netns_cookie));
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn tuple(ctx: &SockOpsContext, netns_cookie: u64) -> TupleKey {
    TupleKey {
        netns_cookie,
        src_addr: ctx.local_ip4(),
        dst_addr: ctx.remote_ip4(),
        src_port: ctx.local_port() as u16,
        // remote_port holds the network-order port in its upper half on little-endian.
        dst_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        _pad: 0,
    }
}

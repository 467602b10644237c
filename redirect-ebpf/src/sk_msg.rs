//! `sk_msg` on the fast path's sockhash (`--fast-path`): a message sent on one end of a
//! captured local pair goes straight into the other end's receive queue, skipping TCP/IP and
//! loopback, both ways.
//!
//! Every byte of a connection in one direction takes one path. The receiving side
//! (`tcp_bpf_recvmsg`) reads redirected messages before any bytes TCP queued earlier, so a
//! sender whose stream switched paths would have it reordered. A sender's first message decides
//! for good: its peer is in the sockhash (redirect from then on) or not yet (TCP from then on).
//! Both ends join at their handshake (sock_ops) or, for the embedded proxy's own sockets,
//! before the proxy writes, so "not yet" only happens when a sender races its peer's
//! enrollment.
use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_INGRESS, sk_action},
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use redirect_common::{TupleKey, events, fast_path, port};

use crate::maps::{FAST_PATH_SENDERS, FAST_PATH_SOCKETS, count_event, workload};

const AF_INET: u32 = 2;

#[sk_msg]
pub fn redirect_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the kernel hands sk_msg a valid sk_msg_md.
    unsafe { forward(&ctx) };
    // Always SK_PASS: with a redirect set it goes to the peer, without one over TCP. SK_DROP
    // would fail the sender's write.
    sk_action::SK_PASS
}

#[inline(always)]
unsafe fn forward(ctx: &SkMsgContext) {
    let m = ctx.msg;
    if unsafe { read_volatile(&(*m).family) } != AF_INET {
        return;
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The sender's own view: local -> remote. `local_port` is host order; `remote_port` holds
    // the network-order port in its upper half (`redirect_common::port::be_high`).
    let (local_ip, remote_ip, local_port, remote_port) = unsafe {
        (
            read_volatile(&(*m).local_ip4),
            read_volatile(&(*m).remote_ip4),
            read_volatile(&(*m).local_port),
            read_volatile(&(*m).remote_port),
        )
    };
    let me = TupleKey::new(
        netns_cookie,
        local_ip,
        port::host(local_port),
        remote_ip,
        port::be_high(remote_port),
    );
    let Some(state) = FAST_PATH_SENDERS.get_ptr_mut(me) else {
        // No state (aged out of the LRU, or never enrolled by us): TCP, the path that is
        // always safe.
        return;
    };
    // SAFETY: one sender's messages are serialized by its socket lock.
    let decided = unsafe { *state };
    if decided == fast_path::TCP {
        return;
    }
    let mut peer = me.reversed();
    let redirected =
        FAST_PATH_SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(sk_action::SK_PASS);
    if decided == fast_path::UNDECIDED {
        unsafe {
            *state = if redirected {
                fast_path::REDIRECT
            } else {
                fast_path::TCP
            }
        };
        if let Some(w) = workload(netns_cookie) {
            let event = if redirected {
                events::FAST_PATH_REDIRECTED
            } else {
                events::FAST_PATH_DECLINED
            };
            count_event(w, event);
        }
    } else if !redirected {
        // The peer left the sockhash: it closed, so nothing it could still read is reordered.
        unsafe { *state = fast_path::TCP };
    }
}

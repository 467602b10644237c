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
use redirect_common::{TupleKey, addr, events, fast_path, port};

use crate::maps::{FAST_PATH_SENDERS, FAST_PATH_SOCKETS, count_event, workload};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sk_msg]
pub fn redirect_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: `ctx` is this invocation's context: the macro builds it from the program's only
    // argument, the `sk_msg_md` the kernel passes, which is what `forward` requires.
    unsafe { forward(&ctx) };
    // Always SK_PASS: with a redirect set it goes to the peer, without one over TCP. SK_DROP
    // would fail the sender's write.
    sk_action::SK_PASS
}

/// Sets the redirect of one message to the sender's peer when its connection takes the fast
/// path, and settles that on its first message.
///
/// # Safety
///
/// `ctx.msg` must be the context the kernel passed to this run of an `sk_msg` program. Its
/// field reads are then context accesses: the verifier checked each one's offset and size
/// against what sk_msg may read when the program was loaded (refusing the program otherwise)
/// and rewrote it into a read of the kernel's `sk_msg` and its socket.
#[inline(always)]
unsafe fn forward(ctx: &SkMsgContext) {
    let m = ctx.msg;
    // SAFETY: a 4-byte read of the context's `family` (see `# Safety`).
    let family = unsafe { read_volatile(&raw const (*m).family) };
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    // SAFETY: the helper's one argument is the program's own context (it reads the socket's
    // namespace from it); sk_msg may call it (5.15+, which the agent probes for).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The sender's own view: local -> remote. `local_port` is host order; `remote_port` holds
    // the network-order port in its upper half (`redirect_common::port::be_high`).
    // SAFETY: 4-byte reads of the context's `local_port` and `remote_port`.
    let (local_port, remote_port) = unsafe {
        (
            read_volatile(&raw const (*m).local_port),
            read_volatile(&raw const (*m).remote_port),
        )
    };
    // Addresses in key form: `*_ip4` of an AF_INET socket, the `*_ip6` words of an AF_INET6
    // one (v4-mapped for an IPv4 connection). All are read and the family picks: loads in two
    // branches get merged into one through a computed context pointer, which the verifier
    // refuses.
    // SAFETY: 4-byte reads of the context's `local_ip4`, `remote_ip4` and the `local_ip6` and
    // `remote_ip6` words, which sk_msg may read one word at a time.
    let (local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(&raw const (*m).local_ip4),
            read_volatile(&raw const (*m).remote_ip4),
            [
                read_volatile(&raw const (*m).local_ip6[0]),
                read_volatile(&raw const (*m).local_ip6[1]),
                read_volatile(&raw const (*m).local_ip6[2]),
                read_volatile(&raw const (*m).local_ip6[3]),
            ],
            [
                read_volatile(&raw const (*m).remote_ip6[0]),
                read_volatile(&raw const (*m).remote_ip6[1]),
                read_volatile(&raw const (*m).remote_ip6[2]),
                read_volatile(&raw const (*m).remote_ip6[3]),
            ],
        )
    };
    let (local_ip, remote_ip) = if family == AF_INET {
        (addr::v4(local4), addr::v4(remote4))
    } else {
        (local6, remote6)
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
    // SAFETY: `state` is a non-null lookup result: one byte of map memory that stays mapped
    // until the program returns, and any byte is a valid u8. This sender's messages reach
    // sk_msg one at a time (under its socket lock), so no other run of this program writes
    // the entry meanwhile. (sock_ops and the agent replace or remove entries, which may
    // recycle the slot while we hold it: an LRU hash map reuses freed slots at once. The
    // same holds for the writes below; a write into a recycled slot cannot corrupt memory,
    // only another sender's state.)
    let decided = unsafe { *state };
    if decided == fast_path::TCP {
        return;
    }
    let mut peer = me.reversed();
    let redirected =
        FAST_PATH_SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(sk_action::SK_PASS);
    if decided == fast_path::UNDECIDED {
        // SAFETY: `state` as above.
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
        // SAFETY: `state` as above.
        unsafe { *state = fast_path::TCP };
    }
}

//! tc ingress of a workload's `-k` device (a KubeVirt VM's): nat PREROUTING's `-k` rules for
//! the connections the VM makes, which the namespace forwards (or delivers) without sk_lookup
//! ever judging them in a way it could change.
//!
//! istio-iptables' `-i K [-d CIDR] -j ISTIO_REDIRECT` rewrites such a connection's destination
//! to the device's own address and the outbound capture port (REDIRECT in PREROUTING), so the
//! proxy accepts it there, reads the VM's destination with SO_ORIGINAL_DST, and its replies
//! are translated back by conntrack; `-i K -j RETURN` lets every other connection from the
//! device by, away from ISTIO_INBOUND. Here a connection's first segment is judged by the same
//! walk as every chain (counting each rule as nat counts a connection's first packet), and what
//! it decided is kept per connection in `VIRT_FLOWS`, by its tuple as the VM dialed it: every
//! later segment is rewritten as the first was. A redirected one is also kept by the VM's end
//! (`VIRT_REPLIES`), which is what its replies show: tc egress (`virt_egress`) rewrites them
//! back by it. The original destination is left where sk_lookup leaves an inbound one
//! (`INBOUND_PENDING`), for SO_ORIGINAL_DST and the embedded proxy to find under the
//! connection's 4-tuple.
//!
//! In TPROXY mode mangle PREROUTING comes first: its ISTIO_INBOUND sees every TCP connection
//! entering the namespace, forwarded ones too, and its TPROXY hands one to the inbound capture
//! listener (and marks it to be delivered locally) before nat's `-k` rules rewrite it or not.
//! Here the same walk of mangle's chain goes first; each packet of a connection it TPROXYs is
//! marked [`VIRT_DIVERT_MARK`] (see there) as TPROXY and ISTIO_DIVERT mark them, which routes
//! it locally, and its SYN is handed to the listener by sk_lookup, by the original destination
//! recorded here with TPROXY's target.
//!
//! Each verdict passes the packet on to the device's next program (`TC_ACT_UNSPEC`, tcx's
//! NEXT), never ends the chain for others; during a takeover two instances' programs may both
//! run, and the second finds the segment translated already and leaves it.
//!
//! One instance per workload, like sk_lookup (`crate::instance`): a device's index names it
//! only within its namespace.
use aya_ebpf::{macros::classifier, programs::TcContext};
use redirect_common::{
    ChainId, ConnFacts, IPPROTO_TCP, OrigDst, Target, TupleKey, VIRT_DIVERT_MARK, VirtFlow, VirtFlowKey, VirtIface,
    Workload,
    addr::{self, Family},
    events, workload_flags,
};

use crate::{
    chain,
    instance::NETNS_COOKIE,
    maps::{
        INBOUND_PENDING, VIRT_FLOWS, VIRT_REPLIES, count_event, iface_entries, ipv6_on, virt_flow, virt_reply, workload,
    },
    virt::{End, Parsed, Segment, device, rewrite, segment, verdict},
};

/// What PREROUTING decided for a connection's first segment ([`decide`]'s bits; none: let by).
/// Bits, not a struct: a non-inlined function's return type goes into the object's BTF, and
/// the compiler's layout of an `Option` of a tuple is one the kernel's BTF check refuses.
mod steer {
    /// nat's `-k` ISTIO_REDIRECT: to the device's address and the outbound capture port.
    pub const REDIRECT: u8 = 1;
    /// mangle's ISTIO_TPROXY (TPROXY mode): to the inbound capture listener, delivered
    /// locally.
    pub const DIVERT: u8 = 2;
}

#[classifier]
pub fn redirect_virt_ingress(ctx: TcContext) -> i32 {
    verdict(judge(&ctx))
}

/// `Err`: the segment must not go on (a translation that failed half-way or cannot be made,
/// or a REDIRECT with nowhere to go, which iptables drops too).
#[inline(always)]
fn judge(ctx: &TcContext) -> Result<(), ()> {
    let netns_cookie = NETNS_COOKIE.load();
    let Some((dev, ifindex)) = device(ctx) else {
        return Ok(());
    };
    let mut seg = Segment::EMPTY;
    match segment(ctx, dev.l2_len, &mut seg) {
        Parsed::Tcp => {}
        Parsed::Other => return Ok(()),
        Parsed::Unreadable => return Err(()),
    }
    if let Some(done) = known(ctx, &seg, netns_cookie) {
        return done;
    }
    // Only a SYN opens a connection here. conntrack would also pick up a lone ACK of one it
    // never saw (`nf_conntrack_tcp_loose`), but what it has seen these programs cannot know:
    // the namespace's own connections to the VM, or any from before the agent started, whose
    // segments must pass as they are.
    if !seg.syn {
        return Ok(());
    }
    // No workload (unenrolled): new connections go by; those judged before still follow
    // their records (`known`) until the agent removes them.
    let Some(workload) = workload(netns_cookie) else {
        return Ok(());
    };
    let (redirect, divert) = walks(&seg, ifindex, workload, netns_cookie);
    match decide(&seg, netns_cookie, redirect, divert) {
        0 => Ok(()),
        how => steer(ctx, &seg, dev, workload, how),
    }
}

/// A segment of a connection judged already, or translated already: what becomes of it.
/// `None`: the segment opens a connection to be judged (or is a stray one).
///
/// This and the next two steps are functions of their own (not inlined) so that each has its
/// own stack frame: inlined together their keys and values overflow BPF's 512 bytes.
#[inline(never)]
fn known(ctx: &TcContext, seg: &Segment, netns_cookie: u64) -> Option<Result<(), ()>> {
    let tuple = TupleKey::new(netns_cookie, seg.src, seg.sport, seg.dst, seg.dport);
    let end = VirtFlowKey::new(netns_cookie, seg.src, seg.sport);
    if let Some(flow) = virt_flow(&tuple)
        // A SYN after a FIN or RST opens a new connection on the same ports (conntrack's
        // reopen), judged below.
        && !(seg.syn && flow.closing != 0)
    {
        // A segment of a connection judged already (its retransmitted SYN too, uncounted as
        // conntrack's NEW is counted once): as its first went.
        if seg.fin_or_rst && flow.closing == 0 {
            let _ = VIRT_FLOWS.insert(tuple, flow.closed(), 0);
            if flow.redirected() {
                let _ = VIRT_REPLIES.insert(end, flow.closed(), 0);
            }
        } else if flow.redirected() && VIRT_REPLIES.get_ptr(end).is_none() {
            // Its reply entry aged out of the LRU: the replies need it back.
            let _ = VIRT_REPLIES.insert(end, *flow, 0);
        }
        return Some(follow(ctx, seg, flow));
    }
    match virt_reply(&end) {
        // Translated already, by another instance's program before this one. (Not when that
        // connection is closing: the VM may then dial the device's address and capture port
        // itself from the same port, a connection of its own.)
        Some(r) if r.closing == 0 && r.to_port == seg.dport && addr::words_eq(&r.to, &seg.dst) => Some(Ok(())),
        // A redirected connection whose decision aged out of the LRU while its reply record
        // lasted: translated as before, never let through to the destination unproxied.
        Some(r) if !seg.syn && r.orig_port == seg.dport && addr::words_eq(&r.orig, &seg.dst) => {
            let _ = VIRT_FLOWS.insert(tuple, *r, 0);
            Some(follow(ctx, seg, r))
        }
        _ => None,
    }
}

/// A later segment of a judged connection: as its first went. Marked for local delivery when
/// ISTIO_TPROXY took it (ISTIO_DIVERT's mark), and rewritten when nat redirected it.
#[inline(always)]
fn follow(ctx: &TcContext, seg: &Segment, flow: &VirtFlow) -> Result<(), ()> {
    if flow.divert != 0 {
        ctx.set_mark(VIRT_DIVERT_MARK);
    }
    if flow.redirected() {
        return rewrite(ctx, seg, End::Dst, &flow.to, flow.to_port).map_err(drop);
    }
    Ok(())
}

/// A connection's first segment: PREROUTING's walks, counted (in TPROXY mode mangle's
/// ISTIO_INBOUND, then nat's `-k` rules): whether nat REDIRECTs it and whether mangle
/// TPROXYs it. A function of its own, holding only the connection's facts, so that its frame
/// and the walk's stay well within the 512 bytes the verifier allows the call chain.
#[inline(never)]
fn walks(seg: &Segment, ifindex: u32, workload: &Workload, netns_cookie: u64) -> (bool, bool) {
    // ip6tables has no rules for a pod without an IPv6 address of its own.
    if seg.family == Family::V6 && !ipv6_on(netns_cookie) {
        return (false, false);
    }
    let ifaces = iface_entries(netns_cookie, ifindex);
    // mangle's walk first, with the `-k` entries' bits left out: their rules are nat's, stored
    // in the same list (first, before mangle's), and must not decide there. (`-c`'s mangle
    // RETURN for the same device still does.) One value changed in place for nat's walk, not a
    // copy, which would grow this frame by the facts' size.
    let mut facts = ConnFacts {
        family: seg.family as u8,
        proto: IPPROTO_TCP,
        dst_addr: seg.dst,
        dst_port: seg.dport,
        src_addr: seg.src,
        out_lo: false,
        // PREROUTING has no owner.
        uid: u32::MAX,
        gid: u32::MAX,
        in_owner_groups: false,
        ifaces: ifaces & !workload.virt_ifaces,
        // Packets from another host carry no mark; nor does conntrack know the connection yet.
        mark: 0,
        established: false,
    };
    // As in sk_lookup, nothing jumps to mangle's ISTIO_INBOUND without inbound capture
    // (`-b ''`).
    let divert = workload.flags & workload_flags::TPROXY != 0
        && workload.flags & workload_flags::INBOUND != 0
        && chain::inbound(netns_cookie, workload, &facts) == Some(Target::Tproxy);
    facts.ifaces = ifaces;
    // nat PREROUTING: one of the `-k` rules, first in the chain, matches whatever the device.
    let redirect = chain::decide(netns_cookie, workload, ChainId::Inbound, &facts, true) == Some(Target::Redirect);
    (redirect, divert)
}

/// What [`walks`] said, as [`steer`]'s bits; 0 when the connection is left alone (RETURN),
/// which is remembered.
#[inline(never)]
fn decide(seg: &Segment, netns_cookie: u64, redirect: bool, divert: bool) -> u8 {
    let end = VirtFlowKey::new(netns_cookie, seg.src, seg.sport);
    if !redirect {
        // A connection straight to the device's address and capture port, from the port of a
        // closing redirected one: its replies are its own, not that one's to translate.
        if let Some(r) = virt_reply(&end)
            && r.to_port == seg.dport
            && addr::words_eq(&r.to, &seg.dst)
        {
            let _ = VIRT_REPLIES.remove(end);
        }
    }
    if redirect || divert {
        return (u8::from(redirect) * steer::REDIRECT) | (u8::from(divert) * steer::DIVERT);
    }
    let tuple = TupleKey::new(netns_cookie, seg.src, seg.sport, seg.dst, seg.dport);
    let _ = VIRT_FLOWS.insert(tuple, VirtFlow::returned(seg.dst, seg.dport), 0);
    0
}

/// Carries out what [`decide`] said: REDIRECT in PREROUTING (to the first address of the
/// arrival device of the family, and the outbound capture port), TPROXY (to the inbound
/// capture listener), or both, as iptables does both when both tables say so.
#[inline(never)]
fn steer(ctx: &TcContext, seg: &Segment, dev: &VirtIface, workload: &Workload, how: u8) -> Result<(), ()> {
    let netns_cookie = NETNS_COOKIE.load();
    let (redirect, divert) = (how & steer::REDIRECT != 0, how & steer::DIVERT != 0);
    let end = VirtFlowKey::new(netns_cookie, seg.src, seg.sport);
    let mut flow = VirtFlow::returned(seg.dst, seg.dport);
    if redirect {
        let Some(to) = dev.redirect_addr(seg.family) else {
            count_event(workload, events::VIRT_NO_ADDRESS);
            return Err(());
        };
        // Another open connection from this VM port, redirected too: after the REDIRECT both
        // would have one reply tuple, which conntrack refuses (the SYN is dropped; the first
        // goes on).
        if let Some(r) = virt_reply(&end)
            && r.closing == 0
            && !(r.orig_port == seg.dport && addr::words_eq(&r.orig, &seg.dst))
        {
            count_event(workload, events::VIRT_PORT_CLASH);
            return Err(());
        }
        flow = VirtFlow::new(seg.dst, seg.dport, to, workload.outbound_port);
    }
    if divert {
        flow = flow.diverted();
    }
    let tuple = TupleKey::new(netns_cookie, seg.src, seg.sport, seg.dst, seg.dport);
    if (redirect && VIRT_REPLIES.insert(end, flow, 0).is_err()) || VIRT_FLOWS.insert(tuple, flow, 0).is_err() {
        count_event(workload, events::VIRT_FLOW_NOT_RECORDED);
        return Err(());
    }
    // Where SO_ORIGINAL_DST (and the embedded proxy) look for a connection accepted from
    // another host, under its 4-tuple as the VM's end sees it after any rewrite. (After a
    // TPROXY alone conntrack answers the socket's own address: the destination dialed, too.)
    // TPROXY's target says sk_lookup is to hand it to the inbound listener.
    let (to, port) = match redirect {
        true => (flow.to, flow.to_port),
        false => (seg.dst, seg.dport),
    };
    let target = if divert { Target::Tproxy } else { Target::Redirect };
    let accepted = TupleKey::new(netns_cookie, seg.src, seg.sport, to, port);
    if INBOUND_PENDING
        .insert(accepted, OrigDst::new(seg.dst, seg.dport, target), 0)
        .is_err()
    {
        count_event(workload, events::ORIG_DST_NOT_RECORDED);
    }
    // The SYN as every later segment ([`follow`]). Marked, it is delivered locally (the
    // agent's `iif` rule) and sk_lookup hands it to the listener by that record, as TPROXY
    // would; the kernel's own lookup runs first, so a SYN for a connection that has a socket
    // already (a retransmission, a TIME_WAIT reopen) goes to it. (tc's own bpf_sk_assign would
    // skip that lookup, and before 6.6 refuses the reuseport listeners Envoy makes.)
    follow(ctx, seg, &flow)
}

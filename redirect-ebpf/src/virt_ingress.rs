//! tc ingress of a workload's `-k` device (a KubeVirt VM's): nat PREROUTING's `-k` rules for
//! the connections the VM makes, which the namespace forwards (or delivers) without sk_lookup
//! ever judging them in a way it could change.
//!
//! istio-iptables' `-i K [-d CIDR] -j ISTIO_REDIRECT` rewrites such a connection's destination
//! to the device's own address and the outbound capture port (REDIRECT in PREROUTING), so the
//! proxy accepts it there, reads the VM's destination with SO_ORIGINAL_DST, and its replies
//! are translated back by conntrack; `-i K -j RETURN` lets every other connection from the
//! device by, away from ISTIO_INBOUND. Here the SYN is judged by the same walk as every chain
//! (counting each rule as nat counts a connection's first packet), and what it decided is kept
//! per connection in `VIRT_FLOWS`, by the VM's address and port: every later segment from the
//! VM is rewritten as the SYN was, and tc egress (`virt_egress`) rewrites the replies back. The
//! original destination is left where sk_lookup leaves an inbound one (`INBOUND_PENDING`), for
//! SO_ORIGINAL_DST and the embedded proxy to find under the connection's 4-tuple.
//!
//! One instance per workload, like sk_lookup (`crate::instance`): a device's index names it
//! only within its namespace.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use redirect_common::{
    ChainId, ConnFacts, IPPROTO_TCP, OrigDst, Target, TupleKey, VirtFlow, VirtFlowKey,
    addr::{self, Family},
    events,
};

use crate::{
    chain,
    instance::NETNS_COOKIE,
    maps::{INBOUND_PENDING, VIRT_FLOWS, count_event, iface_entries, ipv6_on, virt_flow, virt_iface, workload},
    virt::{End, rewrite, segment},
};

#[classifier]
pub fn redirect_virt_ingress(ctx: TcContext) -> i32 {
    match judge(&ctx) {
        Ok(()) => TC_ACT_OK,
        Err(()) => TC_ACT_SHOT,
    }
}

/// `Err`: the segment must not go on (a translation that failed half-way, or a REDIRECT
/// with nowhere to go, which iptables drops too).
#[inline(always)]
fn judge(ctx: &TcContext) -> Result<(), ()> {
    let netns_cookie = NETNS_COOKIE.load();
    // SAFETY: `skb` is the context the kernel passed to this run; `ifindex` (the device the
    // packet is on) is a field tc programs may read.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(dev) = virt_iface(netns_cookie, ifindex) else {
        return Ok(());
    };
    let Some(seg) = segment(ctx, dev.l2_len) else {
        return Ok(());
    };
    let key = VirtFlowKey::new(netns_cookie, seg.src, seg.sport);
    if let Some(flow) = virt_flow(&key)
        && addr::words_eq(&flow.orig, &seg.dst)
        && flow.orig_port == seg.dport
        // A SYN after a FIN or RST opens a new connection on the same ports (conntrack's
        // reopen), judged below.
        && !(seg.syn && flow.closing != 0)
    {
        // A segment of a connection judged already (its retransmitted SYN too, uncounted as
        // conntrack's NEW is counted once): as its SYN went.
        if seg.fin_or_rst && flow.closing == 0 {
            let _ = VIRT_FLOWS.insert(key, flow.closed(), 0);
        }
        if flow.redirected() {
            return rewrite(ctx, &seg, End::Dst, &flow.to, flow.to_port).map_err(drop);
        }
        return Ok(());
    }
    if !seg.syn {
        // Not a connection this program saw open (one from before the agent, or aged out):
        // left as it comes, as conntrack leaves what it picks up mid-stream unNATed.
        return Ok(());
    }
    let Some(workload) = workload(netns_cookie) else {
        return Ok(());
    };
    // ip6tables has no rules for a pod without an IPv6 address of its own.
    if seg.family == Family::V6 && !ipv6_on(netns_cookie) {
        return Ok(());
    }
    let facts = ConnFacts {
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
        ifaces: iface_entries(netns_cookie, ifindex),
        mark: 0,
        established: false,
        tproxy: false,
    };
    if chain::decide(workload, ChainId::Inbound, &facts, true) != Some(Target::Redirect) {
        let _ = VIRT_FLOWS.insert(key, VirtFlow::returned(seg.dst, seg.dport), 0);
        return Ok(());
    }
    // REDIRECT in PREROUTING: to the first address of the arrival device of the family.
    let Some(to) = dev.redirect_addr(seg.family) else {
        count_event(workload, events::VIRT_NO_ADDRESS);
        return Err(());
    };
    let port = workload.outbound_port;
    if VIRT_FLOWS
        .insert(key, VirtFlow::new(seg.dst, seg.dport, to, port), 0)
        .is_err()
    {
        count_event(workload, events::VIRT_FLOW_NOT_RECORDED);
        return Err(());
    }
    // Where SO_ORIGINAL_DST (and the embedded proxy) look for a connection accepted from
    // another host, under its 4-tuple as the VM's end sees it after the rewrite.
    let accepted = TupleKey::new(netns_cookie, seg.src, seg.sport, to, port);
    if INBOUND_PENDING
        .insert(accepted, OrigDst::new(seg.dst, seg.dport, Target::Redirect), 0)
        .is_err()
    {
        count_event(workload, events::ORIG_DST_NOT_RECORDED);
    }
    rewrite(ctx, &seg, End::Dst, &to, port).map_err(drop)
}

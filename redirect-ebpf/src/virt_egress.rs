//! tc egress of a workload's `-k` device: the replies of the connections `virt_ingress`
//! redirected leave with the address and port the VM dialed, as conntrack translates a
//! REDIRECT's replies back (the proxy's SYN-ACK, its data, and the reset a closed capture port
//! answers with alike).
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use redirect_common::{TupleKey, VirtFlowKey, addr};

use crate::{
    instance::NETNS_COOKIE,
    maps::{VIRT_FLOWS, VIRT_REPLIES, virt_iface, virt_reply},
    virt::{End, Parsed, Segment, rewrite, segment},
};

#[classifier]
pub fn redirect_virt_egress(ctx: TcContext) -> i32 {
    // On to the device's next program either way (tcx's NEXT): this one ends no chain.
    match translate(&ctx) {
        Ok(()) => TC_ACT_UNSPEC,
        Err(()) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn translate(ctx: &TcContext) -> Result<(), ()> {
    let netns_cookie = NETNS_COOKIE.load();
    // SAFETY: `skb` is the context the kernel passed to this run; `ifindex` (the device the
    // packet leaves by) is a field tc programs may read.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(dev) = virt_iface(netns_cookie, ifindex) else {
        return Ok(());
    };
    // What the local stack sends is never a fragment (GSO segments are whole TCP).
    let mut seg = Segment::EMPTY;
    if segment(ctx, dev.l2_len, &mut seg) != Parsed::Tcp {
        return Ok(());
    }
    // To the VM: its end is the destination.
    let end = VirtFlowKey::new(netns_cookie, seg.dst, seg.dport);
    let Some(flow) = virt_reply(&end) else {
        return Ok(());
    };
    if flow.to_port != seg.sport || !addr::words_eq(&flow.to, &seg.src) {
        return Ok(());
    }
    // The proxy's FIN or reset: the VM's next SYN on these ports is a new connection.
    if seg.fin_or_rst && flow.closing == 0 {
        let _ = VIRT_REPLIES.insert(end, flow.closed(), 0);
        let tuple = TupleKey::new(netns_cookie, seg.dst, seg.dport, flow.orig, flow.orig_port);
        let _ = VIRT_FLOWS.insert(tuple, flow.closed(), 0);
    }
    rewrite(ctx, &seg, End::Src, &flow.orig, flow.orig_port).map_err(drop)
}

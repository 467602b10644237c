//! tc egress of a workload's `-k` device: the replies of the connections `virt_ingress`
//! redirected leave with the address and port the VM dialed, as conntrack translates a
//! REDIRECT's replies back (the proxy's SYN-ACK, its data, and the reset a closed capture port
//! answers with alike).
use aya_ebpf::{macros::classifier, programs::TcContext};
use redirect_common::{TupleKey, VirtFlowKey, addr};

use crate::{
    instance::NETNS_COOKIE,
    maps::{VIRT_FLOWS, VIRT_REPLIES, virt_reply},
    virt::{End, Parsed, Segment, device, rewrite, segment, verdict},
};

#[classifier]
pub fn redirect_virt_egress(ctx: TcContext) -> i32 {
    verdict(translate(&ctx))
}

#[inline(always)]
fn translate(ctx: &TcContext) -> Result<(), ()> {
    let netns_cookie = NETNS_COOKIE.load();
    let Some((dev, _)) = device(ctx) else {
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

//! tc egress of a workload's `-k` device: the replies of the connections `virt_ingress`
//! redirected leave with the address and port the VM dialed, as conntrack translates a
//! REDIRECT's replies back (the proxy's SYN-ACK, its data, and the reset a closed capture port
//! answers with alike).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use redirect_common::{VirtFlowKey, addr};

use crate::{
    instance::NETNS_COOKIE,
    maps::{VIRT_FLOWS, virt_flow, virt_iface},
    virt::{End, rewrite, segment},
};

#[classifier]
pub fn redirect_virt_egress(ctx: TcContext) -> i32 {
    match translate(&ctx) {
        Ok(()) => TC_ACT_OK,
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
    let Some(seg) = segment(ctx, dev.l2_len) else {
        return Ok(());
    };
    // To the VM: its end is the destination.
    let key = VirtFlowKey::new(netns_cookie, seg.dst, seg.dport);
    let Some(flow) = virt_flow(&key) else {
        return Ok(());
    };
    if !flow.redirected() || flow.to_port != seg.sport || !addr::words_eq(&flow.to, &seg.src) {
        return Ok(());
    }
    // The proxy's FIN or reset: the VM's next SYN on these ports is a new connection.
    if seg.fin_or_rst && flow.closing == 0 {
        let _ = VIRT_FLOWS.insert(key, flow.closed(), 0);
    }
    rewrite(ctx, &seg, End::Src, &flow.orig, flow.orig_port).map_err(drop)
}

//! What the tc programs of a `-k` device share: reading a TCP segment's addresses and
//! rewriting one end of it, checksums included (iptables' REDIRECT in PREROUTING, and
//! conntrack's reverse translation of the replies).
//!
//! The packet is read and written through `bpf_skb_load_bytes`/`bpf_skb_store_bytes`, not
//! direct access: a segment is read once per program run, and the helpers leave the verifier
//! no packet bounds to track. Only what iptables' REDIRECT meets in a VM's traffic is
//! handled: TCP straight over IPv4 (not a fragment) or IPv6 (no extension header). Anything
//! else passes untouched, as it passes nat PREROUTING's `-p tcp` REDIRECT.
use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use redirect_common::{
    VirtIface,
    addr::{self, Addr, Family},
};

use crate::{instance::NETNS_COOKIE, maps::virt_iface};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
/// `BPF_F_RECOMPUTE_CSUM`: keep a CHECKSUM_COMPLETE skb's sum right across a store.
const RECOMPUTE_CSUM: u64 = 1;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_FIN_SYN_RST_ACK: u8 = TCP_FIN | TCP_SYN | TCP_RST | 0x10;

/// A TCP segment's addresses, as the keys hold them, and where its headers are.
#[derive(Clone, Copy)]
pub struct Segment {
    pub family: Family,
    pub src: Addr,
    pub dst: Addr,
    /// Host order.
    pub sport: u16,
    /// Host order.
    pub dport: u16,
    /// The segment opens a connection: SYN, no ACK (nor RST or FIN).
    pub syn: bool,
    /// A FIN or RST: the connection is closing.
    pub fin_or_rst: bool,
    l3: usize,
    l4: usize,
}

/// Which end of a segment [`rewrite`] changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

impl Segment {
    /// Filled in by [`segment`].
    pub const EMPTY: Self = Self {
        family: Family::V4,
        src: addr::UNSPECIFIED,
        dst: addr::UNSPECIFIED,
        sport: 0,
        dport: 0,
        syn: false,
        fin_or_rst: false,
        l3: 0,
        l4: 0,
    };
}

/// What a packet on a `-k` device is to the tc programs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A TCP segment, read into the caller's [`Segment`].
    Tcp,
    /// Not TCP over IP (or TCP behind IPv6 extension headers, which nat's `-p tcp` does not
    /// see either), or on a VLAN of the device (`-i K` does not match `K.N`): none of theirs.
    Other,
    /// A TCP fragment: conntrack would reassemble it and translate the whole; a VM's TCP does
    /// not fragment (it follows the path's MTU), and half a translation must not leave.
    Unreadable,
}

/// The TCP segment in `ctx`, whose IP header starts `l2_len` bytes in, read into `seg`.
///
/// Not inlined, and writing into its caller's `seg`: the reads' temporaries then live in a
/// frame of their own, beside (not under) the callers' later steps, which BPF's 512-byte stack
/// for a whole call chain needs (6.1's verifier rounds each frame up to 32 bytes, too).
#[inline(never)]
pub fn segment(ctx: &TcContext, l2_len: u32, seg: &mut Segment) -> Parsed {
    match read(ctx, l2_len, seg) {
        Some(p) => p,
        // Too short to hold the headers it says it has.
        None => Parsed::Unreadable,
    }
}

#[inline(always)]
fn read(ctx: &TcContext, l2_len: u32, seg: &mut Segment) -> Option<Parsed> {
    let l3 = l2_len as usize;
    // SAFETY: `skb` is the context the kernel passed to this run; `vlan_present` is a field
    // tc programs may read.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Some(Parsed::Other);
    }
    // `protocol` is the skb's, set by the device (ETH_P_* in network order).
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    let (family, src, dst, l4) = if proto == ETH_P_IP {
        let ver_ihl: u8 = ctx.load(l3).ok()?;
        let frag: u16 = ctx.load(l3 + 6).ok()?;
        let ip_proto: u8 = ctx.load(l3 + 9).ok()?;
        if ver_ihl >> 4 != 4 || ip_proto != IPPROTO_TCP {
            return Some(Parsed::Other);
        }
        // More fragments, or an offset.
        if u16::from_be(frag) & 0x3fff != 0 {
            return Some(Parsed::Unreadable);
        }
        let ihl = usize::from(ver_ihl & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        let src: u32 = ctx.load(l3 + 12).ok()?;
        let dst: u32 = ctx.load(l3 + 16).ok()?;
        (Family::V4, addr::v4(src), addr::v4(dst), l3 + ihl)
    } else if proto == ETH_P_IPV6 {
        let next: u8 = ctx.load(l3 + 6).ok()?;
        if next != IPPROTO_TCP {
            return Some(Parsed::Other);
        }
        let src: Addr = ctx.load(l3 + 8).ok()?;
        let dst: Addr = ctx.load(l3 + 24).ok()?;
        (Family::V6, src, dst, l3 + 40)
    } else {
        return Some(Parsed::Other);
    };
    let sport: u16 = ctx.load(l4).ok()?;
    let dport: u16 = ctx.load(l4 + 2).ok()?;
    let flags: u8 = ctx.load(l4 + 13).ok()?;
    let syn = flags & TCP_FIN_SYN_RST_ACK == TCP_SYN;
    *seg = Segment {
        family,
        src,
        dst,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        syn,
        fin_or_rst: flags & (TCP_FIN | TCP_RST) != 0,
        l3,
        l4,
    };
    Some(Parsed::Tcp)
}

/// Rewrites one end of `seg` (address and port) to `to`/`port` (host order), with the
/// checksums: the TCP one (its pseudo-header holds the addresses) and IPv4's header one. A
/// failure leaves the packet to be dropped: half a translation must never leave.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, seg: &Segment, end: End, to: &Addr, port: u16) -> Result<(), i64> {
    let (from, old_port) = match end {
        End::Src => (seg.src, seg.sport),
        End::Dst => (seg.dst, seg.dport),
    };
    let (addr_off, port_off) = match (end, seg.family) {
        (End::Src, Family::V4) => (seg.l3 + 12, seg.l4),
        (End::Dst, Family::V4) => (seg.l3 + 16, seg.l4 + 2),
        (End::Src, Family::V6) => (seg.l3 + 8, seg.l4),
        (End::Dst, Family::V6) => (seg.l3 + 24, seg.l4 + 2),
    };
    let csum = seg.l4 + 16;
    let (old_be, new_be) = (old_port.to_be(), port.to_be());
    if seg.family == Family::V4 {
        let (old, new) = (from[3], to[3]);
        ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), u64::from(BPF_F_PSEUDO_HDR) | 4)?;
        ctx.l3_csum_replace(seg.l3 + 10, u64::from(old), u64::from(new), 4)?;
        ctx.store(addr_off, &new, 0)?;
    } else {
        let (mut old, mut new) = (from, *to);
        // SAFETY: both pointers are to 16-byte arrays on this stack frame, live for the call,
        // and the sizes given are theirs; the helper only reads them.
        let diff = unsafe { bpf_csum_diff(old.as_mut_ptr(), 16, new.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(diff);
        }
        ctx.l4_csum_replace(csum, 0, diff as u64, u64::from(BPF_F_PSEUDO_HDR))?;
        // IPv6 has no header checksum to balance the address change in a CHECKSUM_COMPLETE
        // skb's sum, and the pseudo-header update above moved that sum as if it had: the
        // recomputing store puts it right (the kernel's own fix, BPF_F_IPV6, is 6.16+).
        ctx.store(addr_off, &new, RECOMPUTE_CSUM)?;
    }
    ctx.l4_csum_replace(csum, u64::from(old_be), u64::from(new_be), 2)?;
    ctx.store(port_off, &new_be, 0)?;
    Ok(())
}

/// What a tc program of a `-k` device returns: on to the device's next program (tcx's NEXT,
/// cls_bpf's next filter) whatever it did, for these programs end no chain; or the segment
/// dropped.
#[inline(always)]
pub fn verdict(r: Result<(), ()>) -> i32 {
    match r {
        Ok(()) => TC_ACT_UNSPEC,
        Err(()) => TC_ACT_SHOT,
    }
}

/// The `-k` device of this instance's namespace the packet is on (and its index), if it is
/// one.
#[inline(always)]
pub fn device(ctx: &TcContext) -> Option<(&'static VirtIface, u32)> {
    // SAFETY: `skb` is the context the kernel passed to this run; `ifindex` (the device the
    // packet is on, arriving or leaving) is a field tc programs may read.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Some((virt_iface(NETNS_COOKIE.load(), ifindex)?, ifindex))
}

//! Map keys and values the programs and the agent both build. Each has one constructor (and a
//! user-space one from socket addresses); never build them field by field: the programs read
//! addresses and ports from context fields in several layouts ([`port`], [`crate::addr`]), and
//! the agent and the programs must agree on every byte.

use crate::addr::{Addr, Family};

/// An address of a workload's network namespace: a destination routed over `lo`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct LocalAddrKey {
    pub netns_cookie: u64,
    /// [`crate::addr`] form: IPv4 v4-mapped.
    pub addr: Addr,
}

impl LocalAddrKey {
    /// The key of address `addr` of the namespace whose cookie is `netns_cookie`.
    #[inline(always)]
    pub const fn new(netns_cookie: u64, addr: Addr) -> Self {
        Self { netns_cookie, addr }
    }

    /// [`LocalAddrKey::new`] from an address as user space holds it.
    #[cfg(any(feature = "user", test))]
    pub const fn from_ip(netns_cookie: u64, ip: core::net::IpAddr) -> Self {
        Self::new(netns_cookie, crate::addr::from_ip(ip))
    }
}

/// A destination the node's own sockets reach an ambient pod at: the key of `PROBE_SNAT`.
/// istio-cni's node rules (`CreateHostRulesForHealthChecks`) SNAT every TCP connection a
/// socket of the node makes to an address in the `istio-inpod-probes` ipsets; this is a
/// member of that set, in the node's namespace.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeSnatKey {
    /// The cookie of the namespace whose sockets are the node's (the agent's own).
    pub node_netns_cookie: u64,
    /// The pod's address, [`crate::addr`] form: IPv4 v4-mapped.
    pub pod_addr: Addr,
}

impl ProbeSnatKey {
    /// The key of pod address `pod_addr` as seen from the namespace `node_netns_cookie`.
    #[inline(always)]
    pub const fn new(node_netns_cookie: u64, pod_addr: Addr) -> Self {
        Self {
            node_netns_cookie,
            pod_addr,
        }
    }

    /// [`ProbeSnatKey::new`] from an address as user space holds it.
    #[cfg(any(feature = "user", test))]
    pub const fn from_ip(node_netns_cookie: u64, pod_addr: core::net::IpAddr) -> Self {
        Self::new(node_netns_cookie, crate::addr::from_ip(pod_addr))
    }
}

/// What a `PROBE_SNAT` entry gives the node's connections to that pod address: the source
/// they are bound to (the pod's `--host-probe-snat` or `--host-probe-v6-snat`), which
/// workload wrote it, so that its removal takes exactly its own entries, and whether the agent
/// put the source on the node's `lo` (1) or found it there (0), so that it removes only its
/// own.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeSnat {
    /// [`crate::addr`] form.
    pub source: Addr,
    /// The pod's namespace cookie.
    pub pod_netns_cookie: u64,
    pub owned: u8,
    pub _pad: [u8; 7],
}

impl ProbeSnat {
    #[cfg(any(feature = "user", test))]
    pub const fn from_ip(source: core::net::IpAddr, pod_netns_cookie: u64, owned: bool) -> Self {
        Self {
            source: crate::addr::from_ip(source),
            pod_netns_cookie,
            owned: owned as u8,
            _pad: [0; 7],
        }
    }
}

/// Something a workload has once per address family: its capture listener
/// (`INBOUND_LISTENERS`), its own address (`POD_ADDRS`).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct FamilyKey {
    pub netns_cookie: u64,
    /// [`Family`] discriminant.
    pub family: u8,
    pub _pad: [u8; 7],
}

impl FamilyKey {
    #[inline(always)]
    pub const fn new(netns_cookie: u64, family: Family) -> Self {
        Self {
            netns_cookie,
            family: family as u8,
            _pad: [0; 7],
        }
    }
}

/// A destination as seen from one workload's namespace: the data of a `ROUTE_SOURCES` key
/// (an LPM trie: the namespace's bits always match in full, then the address's prefix).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteDst {
    /// The netns cookie, as two words (no padding after the trie key's `u32` prefix length).
    pub netns: [u32; 2],
    /// [`crate::addr`] form: IPv4 v4-mapped.
    pub addr: Addr,
}

impl RouteDst {
    /// The key length that looks a whole address up.
    pub const FULL: u32 = 64 + 128;

    #[inline(always)]
    pub const fn new(netns_cookie: u64, addr: Addr) -> Self {
        Self {
            netns: [netns_cookie as u32, (netns_cookie >> 32) as u32],
            addr,
        }
    }

    /// The key length of a route of `family` whose prefix is `prefix` bits of its family's
    /// address (an IPv4 route covers the v4-mapped /96 too).
    pub const fn prefix_len(family: Family, prefix: u8) -> u32 {
        64 + match family {
            Family::V4 => 96 + prefix as u32,
            Family::V6 => prefix as u32,
        }
    }

    /// The netns cookie the key is for.
    pub const fn netns_cookie(&self) -> u64 {
        self.netns[0] as u64 | (self.netns[1] as u64) << 32
    }
}

/// What a workload's main routing table says of a destination (`ROUTE_SOURCES`' value).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// The source it gives (its preferred source, else its device's address); all zeros for
    /// none.
    pub src: Addr,
    /// Its device (nat OUTPUT's `-o`); 0 for none (an unreachable route).
    pub oif: u32,
}

impl RouteInfo {
    #[inline(always)]
    pub const fn new(src: Addr, oif: u32) -> Self {
        Self { src, oif }
    }
}

/// A device of one workload's namespace: the `IFACES` key.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct IfaceKey {
    pub netns_cookie: u64,
    pub ifindex: u32,
    pub _pad: u32,
}

impl IfaceKey {
    #[inline(always)]
    pub const fn new(netns_cookie: u64, ifindex: u32) -> Self {
        Self {
            netns_cookie,
            ifindex,
            _pad: 0,
        }
    }
}

/// What connect4/connect6 remember about a redirected socket until sock_ops sees its 4-tuple.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PendingOrigDst {
    pub netns_cookie: u64,
    pub orig: OrigDst,
    pub _pad: u32,
}

/// A UDP flow as conntrack would tell it apart, from the sending socket's side: the socket
/// (its cookie: its source address and port are fixed once it sent) and the destination.
/// `UDP_FLOWS` keeps when each was last seen, so that a flow's first datagram counts on the
/// rule that decides it and later ones, as conntrack's, follow uncounted.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct UdpFlowKey {
    pub cookie: u64,
    /// [`crate::addr`] form.
    pub dst: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

impl UdpFlowKey {
    #[inline(always)]
    pub const fn new(cookie: u64, dst: Addr, port: u16) -> Self {
        Self {
            cookie,
            dst,
            port,
            _pad: [0; 6],
        }
    }
}

/// A redirected connection's original destination.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// [`crate::addr`] form: IPv4 v4-mapped.
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    /// The [`crate::Target`] that redirected it.
    pub target: u8,
    /// `INBOUND_PENDING` only: 1 once the agent's sweep found the record still there, which the
    /// next sweep then removes (a record nothing will take). 0 as the programs write it.
    pub swept: u8,
}

impl OrigDst {
    #[inline(always)]
    pub const fn new(addr: Addr, port: u16, target: crate::Target) -> Self {
        Self {
            addr,
            port,
            target: target as u8,
            swept: 0,
        }
    }
}

/// A connection as seen from the connecting (workload) side, within one network namespace.
/// The proxy builds the same key from an accepted socket's peer and local addresses.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub netns_cookie: u64,
    /// [`crate::addr`] form: IPv4 v4-mapped.
    pub src_addr: Addr,
    /// [`crate::addr`] form.
    pub dst_addr: Addr,
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    pub _pad: u32,
}

impl TupleKey {
    /// The key of the connection from `src` to `dst` (as its connecting end sees it) in the
    /// namespace whose cookie is `netns_cookie`. Addresses in [`crate::addr`] form; ports in
    /// host byte order (the number itself, e.g. `15001`): convert a context's port field with
    /// the [`port`] function named for its layout.
    #[inline(always)]
    pub const fn new(netns_cookie: u64, src: Addr, src_port_host: u16, dst: Addr, dst_port_host: u16) -> Self {
        Self {
            netns_cookie,
            src_addr: src,
            dst_addr: dst,
            src_port: src_port_host,
            dst_port: dst_port_host,
            _pad: 0,
        }
    }

    /// [`TupleKey::new`] from socket addresses as user space holds them: `src` is the
    /// connecting end (an accepted socket's peer, a connected socket's local address). An
    /// AF_INET6 socket's v4-mapped addresses give the same key as the AF_INET ones.
    #[cfg(any(feature = "user", test))]
    pub const fn from_addrs(netns_cookie: u64, src: core::net::SocketAddr, dst: core::net::SocketAddr) -> Self {
        Self::new(
            netns_cookie,
            crate::addr::from_ip(src.ip()),
            src.port(),
            crate::addr::from_ip(dst.ip()),
            dst.port(),
        )
    }

    /// The same connection seen from its other end.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.netns_cookie,
            self.dst_addr,
            self.dst_port,
            self.src_addr,
            self.src_port,
        )
    }
}

/// A `-k` device's REDIRECT addresses (`VIRT_IFACES`' value): where iptables' REDIRECT in
/// PREROUTING sends a connection, the first address of the arrival device of its family, and
/// how the device frames its packets.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct VirtIface {
    /// [`crate::addr`] form (v4-mapped); meaningful when `has & VirtIface::V4`.
    pub v4: Addr,
    /// Meaningful when `has & VirtIface::V6`.
    pub v6: Addr,
    /// Bytes before the IP header in what tc sees: 14 on an Ethernet device (a veth, a tap,
    /// a bridge), 0 on an IP one (a tun).
    pub l2_len: u32,
    pub has: u32,
}

impl VirtIface {
    pub const V4: u32 = 1;
    pub const V6: u32 = 2;

    #[inline(always)]
    pub const fn new(v4: Option<Addr>, v6: Option<Addr>, l2_len: u32) -> Self {
        let mut has = 0;
        if v4.is_some() {
            has |= Self::V4;
        }
        if v6.is_some() {
            has |= Self::V6;
        }
        Self {
            v4: match v4 {
                Some(a) => a,
                None => crate::addr::UNSPECIFIED,
            },
            v6: match v6 {
                Some(a) => a,
                None => crate::addr::UNSPECIFIED,
            },
            l2_len,
            has,
        }
    }

    /// The address of `family` a REDIRECT sends to, if the device has one.
    #[inline(always)]
    pub const fn redirect_addr(&self, family: Family) -> Option<Addr> {
        match family {
            Family::V4 if self.has & Self::V4 != 0 => Some(self.v4),
            Family::V6 if self.has & Self::V6 != 0 => Some(self.v6),
            _ => None,
        }
    }
}

/// The VM's end of a redirected connection in one workload's namespace (`VIRT_REPLIES`' key):
/// after a REDIRECT, every connection of a VM has the same far end (the device's address and
/// the capture port), so the VM's address and port alone name one, as its replies show it.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct VirtFlowKey {
    pub netns_cookie: u64,
    /// [`crate::addr`] form.
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

impl VirtFlowKey {
    #[inline(always)]
    pub const fn new(netns_cookie: u64, addr: Addr, port_host: u16) -> Self {
        Self {
            netns_cookie,
            addr,
            port: port_host,
            _pad: [0; 6],
        }
    }
}

/// What nat PREROUTING decided for a connection from a `-k` device (`VIRT_FLOWS`' value):
/// where it was going, and for a redirected one where it goes instead.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct VirtFlow {
    /// The destination the VM dialed, [`crate::addr`] form.
    pub orig: Addr,
    /// The device's address the connection was redirected to (unspecified when not).
    pub to: Addr,
    /// Host byte order.
    pub orig_port: u16,
    /// Host byte order: the outbound capture port, 0 when not redirected.
    pub to_port: u16,
    /// A FIN or RST went by, either way: a SYN on the same ports after it opens a new
    /// connection (conntrack's reopen), judged and counted afresh.
    pub closing: u8,
    /// mangle's ISTIO_TPROXY took the connection (TPROXY mode): each of its packets is
    /// marked [`crate::VIRT_DIVERT_MARK`] for local delivery, as ISTIO_DIVERT marks them.
    pub divert: u8,
    pub _pad: [u8; 2],
}

impl VirtFlow {
    #[inline(always)]
    pub const fn new(orig: Addr, orig_port: u16, to: Addr, to_port: u16) -> Self {
        Self {
            orig,
            to,
            orig_port,
            to_port,
            closing: 0,
            divert: 0,
            _pad: [0; 2],
        }
    }

    /// The same, for a connection mangle's ISTIO_TPROXY took.
    #[inline(always)]
    pub const fn diverted(self) -> Self {
        Self { divert: 1, ..self }
    }

    /// The same, once a FIN or RST went by.
    #[inline(always)]
    pub const fn closed(self) -> Self {
        Self { closing: 1, ..self }
    }

    /// A connection nat PREROUTING let by (RETURN): remembered so that a retransmitted SYN
    /// is not counted again, as conntrack's NEW is counted once.
    #[inline(always)]
    pub const fn returned(orig: Addr, orig_port: u16) -> Self {
        Self::new(orig, orig_port, crate::addr::UNSPECIFIED, 0)
    }

    #[inline(always)]
    pub const fn redirected(&self) -> bool {
        self.to_port != 0
    }
}

/// Ports as the kernel's program contexts present them, to the host-order `u16` the keys and
/// rules hold. Each takes the whole 4-byte field (read as a `u32`, the access the kernel
/// accepts on every version) and is named for where the port sits in it. The BPF target is
/// little-endian (`bpfel`), which these layouts assume: on big-endian the kernel lays the
/// remote ports out differently.
pub mod port {
    /// Host byte order in the low 16 bits: every *local* port (`bpf_sock_ops.local_port`,
    /// `sk_msg_md.local_port`, `bpf_sock.src_port`, for which the kernel loads the socket's
    /// `skc_num`; `bpf_sk_lookup.local_port`, the SYN's destination port in host order).
    #[inline(always)]
    pub const fn host(field: u32) -> u16 {
        field as u16
    }

    /// Network byte order in the field's first two bytes, so in the low half of the `u32`:
    /// `bpf_sk_lookup.remote_port`, `bpf_sock.dst_port` (both `__be16` plus 16 bits of zeros
    /// since 5.19, a `__u32` holding the `__be16` before) and `bpf_sock_addr.user_port`.
    #[inline(always)]
    pub const fn be_low(field: u32) -> u16 {
        u16::from_be(field as u16)
    }

    /// Network byte order in the high half of the `u32`: `bpf_sock_ops.remote_port` and
    /// `sk_msg_md.remote_port`, for which the kernel loads `skc_dport` and shifts it left by
    /// 16 on little-endian.
    #[inline(always)]
    pub const fn be_high(field: u32) -> u16 {
        u16::from_be((field >> 16) as u16)
    }

    /// `port` (host order) as `bpf_sock_addr.user_port` takes it: network order in the low
    /// half. The inverse of [`be_low`].
    #[inline(always)]
    pub fn to_be_low(port: u16) -> u32 {
        u32::from(port.to_be())
    }
}

/// aya copies these to and from the kernel's map memory as plain bytes. What makes that sound
/// for each: `#[repr(C)]` and `Copy`; no implicit padding, so every byte aya writes is a
/// named, initialized field (the sizes are pinned by `layout::sizes_have_no_implicit_padding`,
/// which would fail if the compiler inserted any); and only integer fields, so any bytes the
/// kernel hands back are a valid value (enums such as [`crate::Target`] are kept as `u8` and
/// decoded with `from_u8`, never transmuted).
#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy; u64 then [u32; 4]; 24 bytes, no gaps.
    unsafe impl aya::Pod for super::LocalAddrKey {}
    // SAFETY: repr(C), Copy; [u32; 2] and [u32; 4]; 24 bytes, no gaps.
    unsafe impl aya::Pod for super::RouteDst {}
    // SAFETY: repr(C), Copy; u64, u8 (`family`, decoded with Family::from_u8), [u8; 7]
    // `_pad`; 16 bytes, no gaps.
    unsafe impl aya::Pod for super::FamilyKey {}
    // SAFETY: repr(C), Copy; u64, a 20-byte 4-aligned OrigDst, explicit u32 `_pad`; 32
    // bytes, no gaps.
    unsafe impl aya::Pod for super::PendingOrigDst {}
    // SAFETY: repr(C), Copy; [u32; 4], u16, u8 (`target`, decoded with Target::from_u8), u8
    // `_pad`; 20 bytes, no gaps.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: repr(C), Copy; u64, 2 x [u32; 4], 2 x u16, explicit u32 `_pad`; 48 bytes, no
    // gaps.
    unsafe impl aya::Pod for super::TupleKey {}
    // SAFETY: repr(C), Copy; u64, [u32; 4], u16 and explicit padding: no implicit padding,
    // any bytes valid.
    unsafe impl aya::Pod for super::UdpFlowKey {}
    // SAFETY: repr(C), Copy; [u32; 4] and u32; 20 bytes, no gaps.
    unsafe impl aya::Pod for super::RouteInfo {}
    // SAFETY: repr(C), Copy; u64, u32 and an explicit u32 `_pad`; 16 bytes, no gaps.
    unsafe impl aya::Pod for super::IfaceKey {}
    // SAFETY: repr(C), Copy; 2 x [u32; 4], 2 x u32; 40 bytes, no gaps.
    unsafe impl aya::Pod for super::VirtIface {}
    // SAFETY: repr(C), Copy; u64, [u32; 4], u16, explicit [u8; 6] `_pad`; 32 bytes, no gaps.
    unsafe impl aya::Pod for super::VirtFlowKey {}
    // SAFETY: repr(C), Copy; 2 x [u32; 4], 2 x u16, u8, explicit [u8; 3] `_pad`; 40 bytes,
    // no gaps.
    unsafe impl aya::Pod for super::VirtFlow {}
    // SAFETY: repr(C), Copy; u64 then [u32; 4]; 24 bytes, no gaps.
    unsafe impl aya::Pod for super::ProbeSnatKey {}
    // SAFETY: repr(C), Copy; [u32; 4], u64 (at offset 16, 8-aligned), u8 and an explicit
    // [u8; 7] `_pad`; 32 bytes, no gaps.
    unsafe impl aya::Pod for super::ProbeSnat {}
}

#[cfg(test)]
mod layout {
    use core::mem::size_of;

    use super::*;

    // The eBPF side and the agent read these bytes; padding must be explicit and zeroed.
    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<LocalAddrKey>(), 24);
        assert_eq!(size_of::<FamilyKey>(), 16);
        assert_eq!(size_of::<OrigDst>(), 20);
        assert_eq!(size_of::<PendingOrigDst>(), 32);
        assert_eq!(size_of::<TupleKey>(), 48);
        assert_eq!(size_of::<RouteDst>(), 24);
        assert_eq!(size_of::<UdpFlowKey>(), 32);
        assert_eq!(size_of::<RouteInfo>(), 20);
        assert_eq!(size_of::<IfaceKey>(), 16);
        assert_eq!(size_of::<VirtIface>(), 40);
        assert_eq!(size_of::<VirtFlowKey>(), 32);
        assert_eq!(size_of::<VirtFlow>(), 40);
        assert_eq!(size_of::<ProbeSnatKey>(), 24);
        assert_eq!(size_of::<ProbeSnat>(), 32);
        assert_eq!(
            RouteDst::new(0x0102_0304_0506_0708, [0; 4]).netns_cookie(),
            0x0102_0304_0506_0708
        );
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests;

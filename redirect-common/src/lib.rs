//! Types shared by the redirect eBPF programs and the agent.
//!
//! The rule chain lives here once: [`Rule`] is both what the eBPF programs evaluate (in map
//! values) and what `stats`/`explain` render as iptables-save text, and a rule's index in its
//! workload's chain is its counter slot. The agent compiles istio-iptables flags into rules with
//! [`chain::compile`] (feature `user`).
#![cfg_attr(not(feature = "std"), no_std)]

mod rule;
pub use rule::*;

#[cfg(feature = "user")]
pub mod chain;
#[cfg(feature = "user")]
pub mod config;

/// Most rules one workload's chains may hold. Bounds the eBPF loop; large CIDR lists
/// beyond this are rejected by the agent rather than silently truncated.
pub const MAX_RULES: usize = 64;

/// 127.0.0.1 in network byte order: where iptables REDIRECT sends locally generated
/// connections, and so where connect4 sends every connection it captures.
pub const LOCALHOST_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// 127.0.0.6, Envoy's inbound passthrough source, in network byte order as the kernel's
/// address fields hold it: the proxy's connections to its own app come from here.
pub const INBOUND_PASSTHROUGH_SRC_BE: u32 = u32::from_ne_bytes([127, 0, 0, 6]);

/// SO_MARK of the sockets the agent itself connects from inside a workload's namespace (the
/// embedded proxy's upstream connections). In node mode the programs are attached above the
/// agent's own cgroup, so connect4 sees those connects too and must leave them alone, as
/// ISTIO_OUTPUT leaves the proxy's uid alone. 0x539 (1337) is the mark Istio's node proxy
/// gives its own traffic for the same reason.
pub const AGENT_SOCKET_MARK: u32 = 0x539;

/// Most workloads one set of programs serves (counter slots = `MAX_WORKLOADS * MAX_RULES`).
pub const MAX_WORKLOADS: u32 = 64;

/// Things the programs count besides rule decisions: each is a connection the agent could not
/// serve as the rules say, and made fail visibly instead. Slot of event `e` of a workload:
/// `Workload::event_base() + e`.
pub mod events {
    /// sk_lookup chose ISTIO_IN_REDIRECT but no socket listens on the inbound capture port:
    /// the connection was refused.
    pub const INBOUND_NO_LISTENER: u32 = 0;
    /// connect4 redirected a connection but could not record its original destination (map
    /// full): the proxy will reset it.
    pub const ORIG_DST_NOT_RECORDED: u32 = 1;
    /// getsockopt(SOL_IP, SO_ORIGINAL_DST) answered from the maps, as conntrack would.
    pub const ORIG_DST_ANSWERED: u32 = 2;
    /// A socket of a captured local pair joined the fast path's sockhash.
    pub const FAST_PATH_ENROLLED: u32 = 3;
    /// A sender's first message found its peer in the sockhash: all its bytes skip TCP/IP.
    pub const FAST_PATH_REDIRECTED: u32 = 4;
    /// A sender's first message found no peer (it had not joined yet): the connection keeps
    /// TCP in that direction, since mixing paths would reorder bytes.
    pub const FAST_PATH_DECLINED: u32 = 5;
    /// Slots per workload (room to grow without changing the map's layout).
    pub const PER_WORKLOAD: u32 = 8;
    /// Names as `stats` prints them, by slot.
    pub const NAMES: [&str; 6] = [
        "inbound_no_listener",
        "orig_dst_not_recorded",
        "orig_dst_answered",
        "fast_path_enrolled",
        "fast_path_redirected",
        "fast_path_declined",
    ];
}

/// Map names, shared so the agent and `stats` find what the programs declare.
pub mod maps {
    /// netns cookie -> [`crate::Workload`].
    pub const WORKLOADS: &str = "WORKLOADS";
    /// [`crate::LocalAddrKey`] -> 1: the addresses `-o lo` means, per workload.
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    /// Per-CPU u64 per counter slot.
    pub const RULE_COUNTERS: &str = "RULE_COUNTERS";
    /// Per-CPU u64 per [`crate::events`] slot.
    pub const EVENT_COUNTERS: &str = "EVENT_COUNTERS";
    /// socket cookie -> [`crate::PendingOrigDst`], from connect until established.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// [`crate::TupleKey`] -> [`crate::OrigDst`], from established until close.
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    /// Address (network order) -> netns cookie of the workload that holds it: how sk_lookup,
    /// which has no netns cookie helper, finds the workload a connection is addressed to.
    pub const ADDR_OWNERS: &str = "ADDR_OWNERS";
    /// netns cookie -> the socket listening on that workload's inbound capture port.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// [`crate::TupleKey`] -> [`crate::OrigDst`]: inbound connections sk_lookup handed to the
    /// capture listener, from the SYN until accepted (or aged out, if never established).
    pub const INBOUND_PENDING: &str = "INBOUND_PENDING";
    /// [`crate::TupleKey`] (the socket's own view) -> socket: both ends of captured local
    /// pairs, for sk_msg to hand bytes from one to the other (`--fast-path`).
    pub const FAST_PATH_SOCKETS: &str = "FAST_PATH_SOCKETS";
    /// [`crate::TupleKey`] (the sender's view) -> a [`crate::fast_path`] state.
    pub const FAST_PATH_SENDERS: &str = "FAST_PATH_SENDERS";
    /// Every map the agent pins while it runs.
    pub const ALL: [&str; 11] = [
        WORKLOADS,
        LOCAL_ADDRS,
        RULE_COUNTERS,
        EVENT_COUNTERS,
        ORIG_BY_COOKIE,
        ORIG_BY_TUPLE,
        ADDR_OWNERS,
        INBOUND_LISTENERS,
        INBOUND_PENDING,
        FAST_PATH_SOCKETS,
        FAST_PATH_SENDERS,
    ];
}

/// What sk_msg knows of a sender in `FAST_PATH_SENDERS`. A connection's bytes in one direction
/// must all take one path: a receiver reads redirected bytes before any still queued by TCP, so
/// a sender that switched paths mid-stream would reorder its own stream.
pub mod fast_path {
    /// Enrolled before it sent anything; its first message decides.
    pub const UNDECIDED: u8 = 0;
    /// Its first message reached the peer's socket directly; so do all later ones.
    pub const REDIRECT: u8 = 1;
    /// Its first message went over TCP (no peer yet), or a redirect failed: TCP for good.
    pub const TCP: u8 = 2;
}

/// Program names (the Rust function names in `redirect-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "redirect_connect4";
    pub const SOCK_OPS: &str = "redirect_sockops";
    pub const SK_LOOKUP: &str = "redirect_sk_lookup";
    pub const GETSOCKOPT: &str = "redirect_getsockopt";
    pub const SK_MSG: &str = "redirect_sk_msg";
    pub const SK_SKB: &str = "redirect_sk_skb";
}

/// Bits of [`Workload::flags`].
pub mod workload_flags {
    /// `nat PREROUTING -p tcp -j ISTIO_INBOUND` exists (`-b` is not empty): connections from
    /// other hosts go through the inbound chain.
    pub const INBOUND: u32 = 1 << 0;
    /// Another proxy owns the capture ports (`--proxy none`): sock_ops registers the
    /// workload's own listener on the inbound capture port. Without it the agent registers its
    /// embedded proxy's listener, and a workload socket on that port must not replace it.
    pub const WORKLOAD_LISTENER: u32 = 1 << 1;
    /// `--fast-path`: sock_ops enrolls both ends of captured local pairs in the sockhash.
    pub const FAST_PATH: u32 = 1 << 2;
}

/// One workload's configuration, keyed by its network namespace cookie.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// First counter slot of this workload in `RULE_COUNTERS`.
    pub counter_base: u32,
    /// Rules in use at the front of `rules`.
    pub n_rules: u32,
    /// `-p`: where `ISTIO_REDIRECT` sends connections (host order).
    pub outbound_port: u16,
    /// `-z`: where `ISTIO_IN_REDIRECT` sends connections (host order).
    pub inbound_port: u16,
    /// [`workload_flags`] bits.
    pub flags: u32,
    /// Depth of `cgroup_id` below the cgroup v2 root (the root is 0).
    pub cgroup_level: u32,
    pub _pad: u32,
    /// Only tasks of this cgroup (or below) are captured outbound; 0: every task of the
    /// namespace. Node mode's programs sit at the cgroup root and see them all; a `run`
    /// instance is attached to the cgroup itself and leaves this 0.
    pub cgroup_id: u64,
    pub rules: [Rule; MAX_RULES],
}

impl Workload {
    pub const fn empty() -> Self {
        Self {
            counter_base: 0,
            n_rules: 0,
            outbound_port: 0,
            inbound_port: 0,
            flags: 0,
            cgroup_level: 0,
            _pad: 0,
            cgroup_id: 0,
            rules: [Rule::EMPTY; MAX_RULES],
        }
    }

    /// First slot of this workload's [`events`] counters.
    pub const fn event_base(&self) -> u32 {
        self.counter_base / MAX_RULES as u32 * events::PER_WORKLOAD
    }

    pub fn rules(&self) -> &[Rule] {
        let n = (self.n_rules as usize).min(MAX_RULES);
        &self.rules[..n]
    }
}

/// An address of a workload's network namespace: a destination routed over `lo`. Build it
/// with [`LocalAddrKey::new`] (or `from_ip` in user space), never field by field.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct LocalAddrKey {
    pub netns_cookie: u64,
    /// Network byte order, as the kernel's `user_ip4`.
    pub addr: u32,
    pub _pad: u32,
}

impl LocalAddrKey {
    /// The key of address `addr_be` of the namespace whose cookie is `netns_cookie`.
    /// `addr_be` is in network byte order: the `u32` the kernel's `*_ip4` context fields load
    /// as, whose bytes in memory are the address's octets in order.
    #[inline(always)]
    pub const fn new(netns_cookie: u64, addr_be: u32) -> Self {
        Self {
            netns_cookie,
            addr: addr_be,
            _pad: 0,
        }
    }

    /// [`LocalAddrKey::new`] from an address as user space holds it.
    #[cfg(any(feature = "user", test))]
    pub const fn from_ip(netns_cookie: u64, ip: core::net::Ipv4Addr) -> Self {
        Self::new(netns_cookie, ip_be(ip))
    }
}

/// `ip` in network byte order, as the kernel's `*_ip4` fields hold it (its octets in order in
/// memory, whatever the host's byte order).
#[cfg(any(feature = "user", test))]
const fn ip_be(ip: core::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// What connect4 remembers about a redirected socket until sock_ops sees its 4-tuple.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PendingOrigDst {
    pub netns_cookie: u64,
    pub orig: OrigDst,
}

/// A redirected connection's original destination.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Network byte order.
    pub addr: u32,
    /// Host byte order.
    pub port: u16,
    /// The [`Target`] that redirected it.
    pub target: u8,
    pub _pad: u8,
}

/// A connection as seen from the connecting (workload) side, within one network namespace.
/// The proxy builds the same key from an accepted socket's peer and local addresses. Build it
/// with [`TupleKey::new`] (or `from_addrs` in user space), never field by field: the programs
/// read its ports from context fields in three different byte-order layouts ([`port`]), and
/// the agent and the programs must agree on every byte.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub netns_cookie: u64,
    /// Network byte order.
    pub src_addr: u32,
    /// Network byte order.
    pub dst_addr: u32,
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    pub _pad: u32,
}

impl TupleKey {
    /// The key of the connection from `src` to `dst` (as its connecting end sees it) in the
    /// namespace whose cookie is `netns_cookie`.
    ///
    /// Addresses in network byte order: the `u32` the kernel's `*_ip4` context fields load as,
    /// whose bytes in memory are the address's octets in order. Ports in host byte order: the
    /// number itself, e.g. `15001`; convert a context's port field with the [`port`] function
    /// named for its layout.
    #[inline(always)]
    pub const fn new(
        netns_cookie: u64,
        src_ip_be: u32,
        src_port_host: u16,
        dst_ip_be: u32,
        dst_port_host: u16,
    ) -> Self {
        Self {
            netns_cookie,
            src_addr: src_ip_be,
            dst_addr: dst_ip_be,
            src_port: src_port_host,
            dst_port: dst_port_host,
            _pad: 0,
        }
    }

    /// [`TupleKey::new`] from socket addresses as user space holds them: `src` is the
    /// connecting end (an accepted socket's peer, a connected socket's local address).
    #[cfg(any(feature = "user", test))]
    pub const fn from_addrs(netns_cookie: u64, src: core::net::SocketAddrV4, dst: core::net::SocketAddrV4) -> Self {
        Self::new(netns_cookie, ip_be(*src.ip()), src.port(), ip_be(*dst.ip()), dst.port())
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
/// kernel hands back are a valid value (enums such as [`Target`] are kept as `u8` and decoded
/// with `from_u8`, never transmuted).
#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy; integers and `[Rule; MAX_RULES]` (Rule: repr(C), integers only,
    // padding in `_pad`/`_pad2`), explicit `_pad`; 32 + 36 * MAX_RULES bytes, no gaps.
    unsafe impl aya::Pod for super::Workload {}
    // SAFETY: repr(C), Copy; u64, u32, explicit u32 `_pad`; 16 bytes, no gaps.
    unsafe impl aya::Pod for super::LocalAddrKey {}
    // SAFETY: repr(C), Copy; u64 then an 8-byte, 4-aligned OrigDst; 16 bytes, no gaps.
    unsafe impl aya::Pod for super::PendingOrigDst {}
    // SAFETY: repr(C), Copy; u32, u16, u8 (`target`, decoded with Target::from_u8), u8
    // `_pad`; 8 bytes, no gaps.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: repr(C), Copy; u64, 2 x u32, 2 x u16, explicit u32 `_pad`; 24 bytes, no gaps.
    unsafe impl aya::Pod for super::TupleKey {}
}

#[cfg(test)]
mod layout {
    use super::*;
    use core::mem::size_of;

    // The eBPF side and the agent read these bytes; padding must be explicit and zeroed.
    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<Rule>(), 36);
        assert_eq!(size_of::<Workload>(), 32 + 36 * MAX_RULES);
        assert_eq!(size_of::<LocalAddrKey>(), 16);
        assert_eq!(size_of::<OrigDst>(), 8);
        assert_eq!(size_of::<PendingOrigDst>(), 16);
        assert_eq!(size_of::<TupleKey>(), 24);
    }
}

/// The keys the programs build from their contexts are the keys the agent builds from socket
/// addresses, byte for byte. Each test feeds [`TupleKey::new`] exactly as one program does,
/// from context fields laid out the way the kernel presents them on a little-endian machine
/// (the BPF target, `bpfel`, and the hosts these tests run on), and compares the bytes with
/// [`TupleKey::from_addrs`] and with the literal the agent built before the constructors existed.
#[cfg(all(test, target_endian = "little"))]
mod keys {
    use super::*;
    use core::net::{Ipv4Addr, SocketAddrV4};

    const NETNS: u64 = 0x0102_0304_0506_0708;

    /// A connection as its connecting end sees it: app -> capture listener, with ports whose
    /// two bytes differ and one above 32767, so a swapped or sign-extended port shows.
    fn conn() -> (SocketAddrV4, SocketAddrV4) {
        (
            SocketAddrV4::new(Ipv4Addr::new(10, 200, 1, 1), 0xabcd),
            SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 15001),
        )
    }

    /// Every `*_ip4` field (`local_ip4`, `remote_ip4`, `src_ip4`, `dst_ip4`): the address's
    /// octets in order in memory, loaded as a `u32`.
    fn ip4_field(a: SocketAddrV4) -> u32 {
        u32::from_le_bytes(a.ip().octets())
    }

    /// Local ports (`bpf_sock_ops.local_port`, `sk_msg_md.local_port`,
    /// `bpf_sk_lookup.local_port`, `bpf_sock.src_port`): `skc_num`, host order.
    fn local_port_field(a: SocketAddrV4) -> u32 {
        u32::from(a.port())
    }

    /// `bpf_sk_lookup.remote_port`, `bpf_sock.dst_port`: the `__be16` in the first two bytes
    /// of the 4-byte field, zeros after.
    fn be16_first_field(a: SocketAddrV4) -> u32 {
        let [hi, lo] = a.port().to_be_bytes();
        u32::from_le_bytes([hi, lo, 0, 0])
    }

    /// `bpf_sock_ops.remote_port`, `sk_msg_md.remote_port`: `skc_dport` loaded into a
    /// register, then shifted left by 16.
    fn be16_shifted_field(a: SocketAddrV4) -> u32 {
        u32::from(u16::from_le_bytes(a.port().to_be_bytes())) << 16
    }

    fn bytes(k: TupleKey) -> [u8; 24] {
        // SAFETY: TupleKey is repr(C), 24 bytes with no implicit padding (see `layout`), so
        // all 24 bytes are initialized integers and any [u8; 24] is a valid result.
        unsafe { core::mem::transmute::<TupleKey, [u8; 24]>(k) }
    }

    /// What the agent's `proxy::tuple_key` built before `from_addrs` existed.
    fn agent_literal(netns_cookie: u64, src: SocketAddrV4, dst: SocketAddrV4) -> TupleKey {
        TupleKey {
            netns_cookie,
            src_addr: u32::from(*src.ip()).to_be(),
            dst_addr: u32::from(*dst.ip()).to_be(),
            src_port: src.port(),
            dst_port: dst.port(),
            _pad: 0,
        }
    }

    #[test]
    fn from_addrs_is_the_agents_key() {
        let (app, listener) = conn();
        let key = TupleKey::from_addrs(NETNS, app, listener);
        assert_eq!(bytes(key), bytes(agent_literal(NETNS, app, listener)));
        // And the layout, spelled out: cookie, addresses as octets, ports in host order.
        let mut want = [0u8; 24];
        want[..8].copy_from_slice(&NETNS.to_ne_bytes());
        want[8..12].copy_from_slice(&[10, 200, 1, 1]);
        want[12..16].copy_from_slice(&[127, 0, 0, 1]);
        want[16..18].copy_from_slice(&0xabcd_u16.to_ne_bytes());
        want[18..20].copy_from_slice(&15001_u16.to_ne_bytes());
        assert_eq!(bytes(key), want);
    }

    /// sock_ops (`tuple` in sockops.rs) on the connecting end at ACTIVE_ESTABLISHED, and on
    /// the accepted end at PASSIVE_ESTABLISHED (which looks up its peer's view, `reversed`):
    /// `local_port` host order, `remote_port` network order in the high half.
    #[test]
    fn sock_ops() {
        let (app, listener) = conn();
        let want = bytes(TupleKey::from_addrs(NETNS, app, listener));
        let (local, remote) = (app, listener);
        let active = TupleKey::new(
            NETNS,
            ip4_field(local),
            port::host(local_port_field(local)),
            ip4_field(remote),
            port::be_high(be16_shifted_field(remote)),
        );
        assert_eq!(bytes(active), want);
        let (local, remote) = (listener, app);
        let passive = TupleKey::new(
            NETNS,
            ip4_field(local),
            port::host(local_port_field(local)),
            ip4_field(remote),
            port::be_high(be16_shifted_field(remote)),
        );
        assert_eq!(bytes(passive.reversed()), want);
    }

    /// sk_msg (`forward` in sk_msg.rs), the sender's own view: `local_port` host order,
    /// `remote_port` network order in the high half, as in sock_ops.
    #[test]
    fn sk_msg() {
        let (app, listener) = conn();
        let (local, remote) = (app, listener);
        let me = TupleKey::new(
            NETNS,
            ip4_field(local),
            port::host(local_port_field(local)),
            ip4_field(remote),
            port::be_high(be16_shifted_field(remote)),
        );
        assert_eq!(bytes(me), bytes(TupleKey::from_addrs(NETNS, app, listener)));
        // Its peer's key, which sk_msg redirects to, is the other end's own view.
        assert_eq!(bytes(me.reversed()), bytes(TupleKey::from_addrs(NETNS, listener, app)));
    }

    /// sk_lookup (`decide` in sk_lookup.rs), on the SYN from a client of another host: the
    /// remote end connects. `remote_port` network order in the low half, `local_port` host
    /// order.
    #[test]
    fn sk_lookup() {
        let client = SocketAddrV4::new(Ipv4Addr::new(10, 200, 1, 2), 0xabcd);
        let pod = SocketAddrV4::new(Ipv4Addr::new(10, 200, 1, 1), 9080);
        let (local, remote) = (pod, client);
        let key = TupleKey::new(
            NETNS,
            ip4_field(remote),
            port::be_low(be16_first_field(remote)),
            ip4_field(local),
            port::host(local_port_field(local)),
        );
        assert_eq!(bytes(key), bytes(TupleKey::from_addrs(NETNS, client, pod)));
        assert_eq!(bytes(key), bytes(agent_literal(NETNS, client, pod)));
    }

    /// getsockopt (`answer` in getsockopt.rs), on the accepted socket's `bpf_sock`: its peer
    /// (`dst_*`) connected. `dst_port` network order in the low half, `src_port` host order.
    #[test]
    fn getsockopt() {
        let (app, listener) = conn();
        let (src, dst) = (listener, app); // bpf_sock's own src_* / dst_* (local / peer)
        let key = TupleKey::new(
            NETNS,
            ip4_field(dst),
            port::be_low(be16_first_field(dst)),
            ip4_field(src),
            port::host(local_port_field(src)),
        );
        assert_eq!(bytes(key), bytes(TupleKey::from_addrs(NETNS, app, listener)));
    }

    #[test]
    fn user_port_round_trips() {
        let (app, _) = conn();
        // connect4 reads `user_port` with be_low and writes it with to_be_low.
        assert_eq!(port::to_be_low(app.port()), be16_first_field(app));
        assert_eq!(port::be_low(port::to_be_low(app.port())), app.port());
    }

    #[test]
    fn local_addr_key() {
        let ip = Ipv4Addr::new(10, 200, 1, 1);
        let from_ctx = LocalAddrKey::new(NETNS, u32::from_le_bytes(ip.octets()));
        let agent_literal = LocalAddrKey {
            netns_cookie: NETNS,
            addr: u32::from(ip).to_be(),
            _pad: 0,
        };
        assert_eq!(from_ctx, LocalAddrKey::from_ip(NETNS, ip));
        assert_eq!(from_ctx, agent_literal);
    }
}

//! Types shared by the redirect eBPF programs and the agent.
//!
//! The rule chain lives here once: [`Rule`] is both what the eBPF programs evaluate (in map
//! values) and what `stats`/`explain` render as iptables-save text, and a rule's index in its
//! workload's chain is its counter slot. The agent compiles istio-iptables flags into rules with
//! [`chain::compile`] and packs runs of them into set entries with [`chain::pack`] (feature
//! `user`).
#![cfg_attr(not(feature = "std"), no_std)]

pub mod addr;
mod keys;
pub mod owner;
mod rule;
mod sets;
pub use keys::*;
pub use rule::*;
pub use sets::*;

#[cfg(feature = "user")]
pub mod chain;
#[cfg(feature = "user")]
pub mod config;

/// Most entries one family's chains may hold once packed (iptables' ISTIO_OUTPUT and
/// ISTIO_INBOUND, or ip6tables'): the bound of the eBPF walk, which only walks the
/// connection's family. A CIDR or port list of any length is one entry ([`chain::pack`]), so
/// only flags with more than this many rules that no set can hold (owner ids, interfaces)
/// are refused, rather than silently truncated.
pub const MAX_RULES_PER_FAMILY: usize = 64;

/// Most entries one workload holds: both families'.
pub const MAX_RULES: usize = 2 * MAX_RULES_PER_FAMILY;

/// Most rule counters all workloads together hold (`RULE_COUNTERS`, one per rule as
/// istio-iptables would write it): a thousand workloads of a hundred rules, or fewer with
/// longer lists. Allocated as workloads enroll.
pub const MAX_RULE_COUNTERS: u32 = 1 << 17;

/// Most members all set entries together hold, per kind (`CIDR_SETS`, `PORT_SETS`).
pub const MAX_SET_MEMBERS: u32 = 1 << 16;

/// 127.0.0.1 in network byte order: where iptables REDIRECT sends locally generated
/// connections, and so where connect4 sends every connection it captures.
pub const LOCALHOST_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// 127.0.0.6, Envoy's inbound passthrough source, in network byte order as the kernel's
/// address fields hold it: the proxy's connections to its own app come from here.
pub const INBOUND_PASSTHROUGH_SRC_BE: u32 = u32::from_ne_bytes([127, 0, 0, 6]);

/// Where istio-agent's DNS proxy listens (`IstioAgentDNSListenerPort`): istio-iptables
/// redirects captured DNS here, and no flag changes it.
pub const DNS_PROXY_PORT: u16 = 15053;

/// SO_MARK of the sockets the agent itself connects from inside a workload's namespace (the
/// embedded proxy's upstream connections): 0x539 (1337), the mark Istio's node proxy gives its
/// own traffic, so that the node's own rules can tell them apart. It exempts nothing from
/// capture: a workload with CAP_NET_ADMIN can set any mark. The connect hooks leave the
/// agent's sockets alone by their cookies instead ([`maps::AGENT_SOCKETS`]).
pub const AGENT_SOCKET_MARK: u32 = 0x539;

/// Ambient mode: ztunnel's mark on its own sockets (istio-cni's `InpodMark`); their
/// connections are never redirected. The agent's own upstream sockets carry it too
/// ([`AGENT_SOCKET_MARK`]).
pub const AMBIENT_MARK: u32 = 0x539;
/// Ambient mode: the mark of a connection ztunnel made into the pod (`InpodTProxyMark`): its
/// packets are routed back to ztunnel, never redirected.
pub const AMBIENT_CONN_MARK: u32 = 0x111;
/// The bits of the mark either is matched on (`InpodMask`, `InpodTProxyMask`).
pub const AMBIENT_MARK_MASK: u32 = 0xfff;

/// The mark istio-iptables gives the proxy's own connections to its pod in TPROXY mode
/// (`OutboundMark`), fixed like the DNS port.
pub const TPROXY_OUTBOUND_MARK: u32 = 1338;

/// In TPROXY mode, the mark tc ingress of a `-k` device gives each packet of a VM's connection
/// that mangle's ISTIO_TPROXY took, where iptables' TPROXY (its SYN) and ISTIO_DIVERT (the
/// rest) give the TPROXY mark. The agent's `ip rule iif DEVICE fwmark 0x52440000 lookup TABLE`
/// delivers them locally (and the `prohibit` after it refuses them should that table lose its
/// route), where sk_lookup hands the SYN to the inbound listener. Not the TPROXY mark: the socket accepted from the SYN takes the SYN's
/// mark (`tcp_fwmark_accept`, which the agent sets in TPROXY mode), and with the TPROXY mark its
/// replies would match `fwmark MARK lookup TABLE` and loop into lo. This rule matches only what
/// arrives on the device.
pub const VIRT_DIVERT_MARK: u32 = 0x5244_0000;

/// Most groups `ISTIO_OUTBOUND_OWNER_GROUPS` may name (istio-iptables' own limit on the
/// include list); the programs test them with a loop of this bound.
pub const MAX_OWNER_GROUPS: usize = 64;

/// Most workloads one set of programs serves: the kubelet's default of 110 pods per node many
/// times over. The maps that hold an entry per workload allocate it as it is added.
pub const MAX_WORKLOADS: u32 = 1024;

/// Things the programs count besides rule decisions: each is a connection the agent could not
/// serve as the rules say, and made fail visibly instead. Slot of event `e` of a workload:
/// `Workload::event_base() + e`.
pub mod events {
    /// sk_lookup chose ISTIO_IN_REDIRECT but no socket listens on the inbound capture port:
    /// the connection was refused.
    pub const INBOUND_NO_LISTENER: u32 = 0;
    /// connect4/6 redirected a connection but could not record its original destination (map
    /// full): the proxy will reset it.
    pub const ORIG_DST_NOT_RECORDED: u32 = 1;
    /// getsockopt(SOL_IP, SO_ORIGINAL_DST) or (SOL_IPV6, IP6T_SO_ORIGINAL_DST) answered from
    /// the maps, as conntrack would.
    pub const ORIG_DST_ANSWERED: u32 = 2;
    /// A socket of a captured local pair joined the fast path's sockhash.
    pub const FAST_PATH_ENROLLED: u32 = 3;
    /// A sender's first message found its peer in the sockhash: all its bytes skip TCP/IP.
    pub const FAST_PATH_REDIRECTED: u32 = 4;
    /// A sender's first message found no peer (it had not joined yet): the connection keeps
    /// TCP in that direction, since mixing paths would reorder bytes.
    pub const FAST_PATH_DECLINED: u32 = 5;
    /// A connection from a `-k` interface was to be redirected, but the interface has no
    /// address of its family to redirect it to: dropped, as iptables' REDIRECT drops it.
    pub const VIRT_NO_ADDRESS: u32 = 6;
    /// A connection from a `-k` interface was redirected but its flow could not be recorded
    /// (map full): its SYN was dropped, to be retried, rather than sent on half-translated.
    pub const VIRT_FLOW_NOT_RECORDED: u32 = 7;
    /// A connection from a `-k` interface was to be redirected from a VM port whose earlier
    /// redirected connection (to another destination) is still open: after the REDIRECT both
    /// would be one connection, so its SYN was dropped, as conntrack drops a NAT clash.
    pub const VIRT_PORT_CLASH: u32 = 8;
    /// Slots per workload (room to grow without changing the map's layout).
    pub const PER_WORKLOAD: u32 = 16;
    /// Names as `stats` prints them, by slot.
    pub const NAMES: [&str; 9] = [
        "inbound_no_listener",
        "orig_dst_not_recorded",
        "orig_dst_answered",
        "fast_path_enrolled",
        "fast_path_redirected",
        "fast_path_declined",
        "virt_no_address",
        "virt_flow_not_recorded",
        "virt_port_clash",
    ];
}

/// Map names, shared so the agent and `stats` find what the programs declare.
pub mod maps {
    /// netns cookie -> [`crate::Workload`].
    pub const WORKLOADS: &str = "WORKLOADS";
    /// [`crate::LocalAddrKey`] -> 1: the addresses `-o lo` means, per workload.
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    /// [`crate::FamilyKey`] -> [`crate::addr::Addr`]: a workload's own address of each family
    /// it has (not on `lo`, not link-local). An IPv6 one turns the workload's ip6tables chains
    /// on, as istio-iptables installs them only for a pod with an IPv6 address.
    pub const POD_ADDRS: &str = "POD_ADDRS";
    /// LPM trie of [`crate::RouteDst`] -> [`crate::RouteInfo`]: the workload's main routing
    /// table as the source each route gives a connection (its preferred source, else its
    /// device's address: what an unbound captured socket is bound to) and its device (what
    /// `-o IFACE` sees).
    pub const ROUTE_SOURCES: &str = "ROUTE_SOURCES";
    /// [`crate::IfaceKey`] -> u32: which entries of the workload's interface list (`-c`, then
    /// `-k`; bit `i` for entry `i`) name that device of its namespace. Devices no entry names
    /// are absent.
    pub const IFACES: &str = "IFACES";
    /// [`crate::CounterKey`] -> u64: connections each rule decided.
    pub const RULE_COUNTERS: &str = "RULE_COUNTERS";
    /// LPM trie of [`crate::CidrSetKey`] -> [`crate::SetMember`]: the CIDRs of the
    /// workloads' CIDR set entries ([`crate::m::DST_SET`]).
    pub const CIDR_SETS: &str = "CIDR_SETS";
    /// [`crate::PortSetKey`] -> [`crate::SetMember`]: the (protocol, port) pairs of the
    /// workloads' port set entries ([`crate::m::PORT_SET`]).
    pub const PORT_SETS: &str = "PORT_SETS";
    /// u64 per [`crate::events`] slot.
    pub const EVENT_COUNTERS: &str = "EVENT_COUNTERS";
    /// socket cookie -> [`crate::PendingOrigDst`], from connect until established.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// [`crate::TupleKey`] -> [`crate::OrigDst`], from established until close.
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    /// [`crate::FamilyKey`] -> the socket listening on that workload's inbound capture port
    /// for connections of that family.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// [`crate::TupleKey`] -> [`crate::OrigDst`]: inbound connections sk_lookup handed to the
    /// capture listener, from the SYN until accepted (or aged out, if never established).
    pub const INBOUND_PENDING: &str = "INBOUND_PENDING";
    /// [`crate::TupleKey`] (the socket's own view) -> socket: both ends of captured local
    /// pairs, for sk_msg to hand bytes from one to the other (`--fast-path`).
    pub const FAST_PATH_SOCKETS: &str = "FAST_PATH_SOCKETS";
    /// [`crate::TupleKey`] (the sender's view) -> a [`crate::fast_path`] state.
    pub const FAST_PATH_SENDERS: &str = "FAST_PATH_SENDERS";
    /// Socket-local storage (1) on each upstream socket the embedded proxy made: the sockets
    /// connect4/6 leave alone (node mode attaches above the agent, so they see its connects
    /// too). Freed by the kernel with the socket.
    pub const AGENT_SOCKETS: &str = "AGENT_SOCKETS";
    /// socket cookie -> [`crate::OrigDst`]: where a UDP socket's latest captured DNS datagram
    /// (or its connect) was going, so that the DNS proxy's answer reads as the resolver's.
    pub const UDP_ORIG: &str = "UDP_ORIG";
    /// [`crate::UdpFlowKey`] -> when the flow last sent (ns, monotonic): the UDP flows
    /// ISTIO_OUTPUT judged, counted once each as conntrack's first packet.
    pub const UDP_FLOWS: &str = "UDP_FLOWS";
    /// socket cookie -> the mark mangle OUTPUT gives a TPROXY-mode workload's loopback
    /// connection (1338, the proxy's own), from connect until sock_ops moves it to
    /// `SYN_MARKS` at the SYN.
    pub const SYN_MARK_BY_COOKIE: &str = "SYN_MARK_BY_COOKIE";
    /// [`crate::TupleKey`] (the connecting side's view) -> the mark a TPROXY-mode workload's
    /// loopback SYN carries (its socket's, or mangle OUTPUT's): what sk_lookup's `-m mark`
    /// reads, from the SYN until sk_lookup judges it.
    pub const SYN_MARKS: &str = "SYN_MARKS";
    /// [`crate::IfaceKey`] -> [`crate::VirtIface`]: a `-k` device of a workload's namespace,
    /// with the addresses its REDIRECT sends connections to (its first of each family).
    pub const VIRT_IFACES: &str = "VIRT_IFACES";
    /// [`crate::TupleKey`] (as the VM dialed it) -> [`crate::VirtFlow`]: what nat PREROUTING
    /// decided for each TCP connection that arrived on a `-k` device.
    pub const VIRT_FLOWS: &str = "VIRT_FLOWS";
    /// [`crate::VirtFlowKey`] (the VM's end) -> [`crate::VirtFlow`]: the redirected ones, by
    /// what their replies carry (after a REDIRECT every connection of a VM port has the same
    /// far end, the device's address and the capture port): conntrack's reply tuple.
    pub const VIRT_REPLIES: &str = "VIRT_REPLIES";
    /// [`crate::ProbeSnatKey`] -> [`crate::ProbeSnat`]: node mode's stand-in for istio-cni's
    /// SNAT of the node's connections to ambient pods (the kubelet's probes), which connect4/6
    /// bind to the pod's probe address.
    pub const PROBE_SNAT: &str = "PROBE_SNAT";
    /// Every map the agent pins while it runs.
    pub const ALL: [&str; 24] = [
        WORKLOADS,
        LOCAL_ADDRS,
        POD_ADDRS,
        ROUTE_SOURCES,
        IFACES,
        RULE_COUNTERS,
        CIDR_SETS,
        PORT_SETS,
        EVENT_COUNTERS,
        ORIG_BY_COOKIE,
        ORIG_BY_TUPLE,
        INBOUND_LISTENERS,
        INBOUND_PENDING,
        FAST_PATH_SOCKETS,
        FAST_PATH_SENDERS,
        AGENT_SOCKETS,
        UDP_ORIG,
        UDP_FLOWS,
        SYN_MARK_BY_COOKIE,
        SYN_MARKS,
        VIRT_IFACES,
        VIRT_FLOWS,
        VIRT_REPLIES,
        PROBE_SNAT,
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
    pub const CONNECT6: &str = "redirect_connect6";
    pub const SENDMSG4: &str = "redirect_sendmsg4";
    pub const SENDMSG6: &str = "redirect_sendmsg6";
    pub const RECVMSG4: &str = "redirect_recvmsg4";
    pub const RECVMSG6: &str = "redirect_recvmsg6";
    pub const GETPEERNAME4: &str = "redirect_getpeername4";
    pub const GETPEERNAME6: &str = "redirect_getpeername6";
    pub const SOCK_OPS: &str = "redirect_sockops";
    pub const SK_LOOKUP: &str = "redirect_sk_lookup";
    pub const GETSOCKOPT: &str = "redirect_getsockopt";
    pub const SK_MSG: &str = "redirect_sk_msg";
    pub const SK_SKB: &str = "redirect_sk_skb";
    /// tc ingress of a `-k` device: nat PREROUTING's `-i IFACE` rules (one instance per
    /// workload, like sk_lookup).
    pub const VIRT_INGRESS: &str = "redirect_virt_ingress";
    /// tc egress of a `-k` device: the replies of the connections ingress redirected.
    pub const VIRT_EGRESS: &str = "redirect_virt_egress";
}

/// Read-only globals of the programs, which the agent sets when it loads them.
pub mod globals {
    /// `u64`: the netns cookie of the one namespace an instance of the sk_lookup program (and
    /// of the tc programs of its `-k` devices) runs in: neither has a helper that says which
    /// namespace it runs in on the kernels supported. The agent loads one instance per
    /// workload.
    pub const SK_LOOKUP_NETNS_COOKIE: &str = "NETNS_COOKIE";
    /// `u8`: 1 when sk_lookup may read its context's `ingress_ifindex` (Linux 5.17+), which
    /// `-c`'s `PREROUTING -i IFACE` rules need; 0 leaves those rules unmatched.
    pub const SK_LOOKUP_INGRESS_IFINDEX: &str = "INGRESS_IFINDEX";
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
    /// The workload has an interface list (`-c`): its rules match devices, so the programs
    /// look up which (`IFACES`); without one they skip the lookups.
    pub const IFACES: u32 = 1 << 3;
    /// `-m TPROXY`: ISTIO_INBOUND is mangle's, which judges connections made in the namespace
    /// too (`-i lo`, by their mark), so sk_lookup walks those as well, and connect4/6 note the
    /// mark the proxy's loopback connections leave with (mangle OUTPUT).
    pub const TPROXY: u32 = 1 << 4;
    /// `--mode ambient`: istio-cni's in-pod rules. A connection made in the namespace is
    /// decided by ISTIO_OUTPUT alone, even from a transparent socket's foreign source (ztunnel
    /// dialing the app as the client): sock_ops notes such a marked SYN for sk_lookup, which
    /// leaves it alone.
    pub const AMBIENT: u32 = 1 << 5;
}

/// One workload's configuration, keyed by its network namespace cookie.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The workload's slot among the programs' `MAX_WORKLOADS`: its block of `EVENT_COUNTERS`.
    pub slot: u32,
    /// iptables' entries in use at the front of `rules`.
    pub n_rules: u32,
    /// `-p`: where `ISTIO_REDIRECT` sends connections (host order).
    pub outbound_port: u16,
    /// `-z`: where `ISTIO_IN_REDIRECT` sends connections (host order).
    pub inbound_port: u16,
    /// [`workload_flags`] bits.
    pub flags: u32,
    /// Depth of `cgroup_id` below the cgroup v2 root (the root is 0).
    pub cgroup_level: u32,
    /// ip6tables' entries in use at the front of `rules[MAX_RULES_PER_FAMILY..]`.
    pub n_rules6: u32,
    /// Only tasks of this cgroup (or below) are captured outbound; 0: every task of the
    /// namespace. Node mode's programs sit at the cgroup root and see them all; a `run`
    /// instance is attached to the cgroup itself and leaves this 0.
    pub cgroup_id: u64,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS`' gids, the first `n_owner_groups`: a rule with
    /// [`m::GROUPS`] matches a socket whose group is one of them.
    pub owner_groups: [u32; MAX_OWNER_GROUPS],
    pub n_owner_groups: u32,
    /// `-t` in TPROXY mode: the mark whose `ip rule` (installed with the workload) routes a
    /// socket over lo whatever its destination; 0 otherwise.
    pub tproxy_mark: u32,
    /// The entries of the interface list that are `-k`'s (bit `i` for entry `i`): connections
    /// arriving on those devices are nat PREROUTING's `-k` rules' alone, which the tc programs
    /// judge, so sk_lookup leaves them be.
    pub virt_ifaces: u32,
    pub _pad: u32,
    /// iptables' entries from index 0, ip6tables' from `MAX_RULES_PER_FAMILY`: each family's
    /// table is a fixed half, which is what the walk of a connection's family takes. An entry
    /// is a rule (counted in its [`Rule::slot`]) or a set of them ([`chain::pack`]).
    pub rules: [Rule; MAX_RULES],
}

impl Workload {
    pub const fn empty() -> Self {
        Self {
            slot: 0,
            n_rules: 0,
            outbound_port: 0,
            inbound_port: 0,
            flags: 0,
            cgroup_level: 0,
            n_rules6: 0,
            cgroup_id: 0,
            owner_groups: [0; MAX_OWNER_GROUPS],
            n_owner_groups: 0,
            tproxy_mark: 0,
            virt_ifaces: 0,
            _pad: 0,
            rules: [Rule::EMPTY; MAX_RULES],
        }
    }

    /// Whether `gid` is one of the owner groups (what a [`m::GROUPS`] match tests).
    #[inline(always)]
    pub fn in_owner_groups(&self, gid: u32) -> bool {
        let n = (self.n_owner_groups as usize).min(MAX_OWNER_GROUPS);
        let mut i = 0;
        while i < n {
            if self.owner_groups[i] == gid {
                return true;
            }
            i += 1;
        }
        false
    }

    /// First slot of this workload's [`events`] counters.
    pub const fn event_base(&self) -> u32 {
        self.slot * events::PER_WORKLOAD
    }

    /// The entries of `family`'s table in use, and the index of the first.
    pub fn family_rules(&self, family: addr::Family) -> (&[Rule], usize) {
        let (start, n) = match family {
            addr::Family::V4 => (0, self.n_rules),
            addr::Family::V6 => (MAX_RULES_PER_FAMILY, self.n_rules6),
        };
        let n = (n as usize).min(MAX_RULES_PER_FAMILY);
        (&self.rules[start..start + n], start)
    }

    /// Every entry in use with its index: iptables' table, then ip6tables'.
    pub fn entries(&self) -> impl Iterator<Item = (usize, &Rule)> {
        [addr::Family::V4, addr::Family::V6].into_iter().flat_map(move |f| {
            let (rules, start) = self.family_rules(f);
            rules.iter().enumerate().map(move |(i, r)| (start + i, r))
        })
    }
}

// SAFETY: repr(C), Copy; integers and `[Rule; MAX_RULES]` (Rule: repr(C), integers only,
// no padding); 304 + 96 * MAX_RULES bytes, no gaps (pinned by `layout`
// below). Any bytes the kernel hands back are a valid value: enums are kept as `u8`.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Workload {}

#[cfg(test)]
mod layout {
    use core::mem::size_of;

    use super::*;

    // The eBPF side and the agent read these bytes; padding must be explicit and zeroed.
    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<Rule>(), 96);
        assert_eq!(size_of::<Workload>(), 304 + 96 * MAX_RULES);
    }
}

//! One iptables rule, as data the eBPF programs evaluate.

use crate::addr::{self, Addr, Family};

/// The chain a rule belongs to (istio-iptables' names).
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ChainId {
    Output = 1,
    Inbound = 2,
    /// `ISTIO_OUTPUT_DNS` (nat), walked where ISTIO_OUTPUT jumps to it: its rules follow the
    /// jump in the list.
    OutputDns = 3,
    /// nat `PREROUTING`'s own rules (`-c`'s `-i IFACE -j RETURN`), walked before the jump to
    /// ISTIO_INBOUND. Never stored: such a rule is an ISTIO_INBOUND one with
    /// [`m::BUILTIN`] (see [`Rule::chain_id`]), first in the list, so that the walk needs no
    /// test of its own for it.
    Prerouting = 4,
    /// nat `OUTPUT`'s own rules (`-c`'s `-o IFACE -j RETURN`), walked before the jump to
    /// ISTIO_OUTPUT: stored as ISTIO_OUTPUT ones with [`m::BUILTIN`], first in the list.
    OutputNat = 5,
    /// mangle `ISTIO_TPROXY` (TPROXY mode): its one rule, `! -d LOOPBACK -p tcp -j TPROXY`,
    /// stored just before mangle ISTIO_INBOUND's rules, which jump to it
    /// ([`Target::JumpTproxy`]). Walked with ISTIO_INBOUND: the walk notes whether it matches
    /// and counts it where a jump reaches it.
    Tproxy = 6,
    /// mangle `OUTPUT`'s own rules in TPROXY mode: `-o lo -m mark --mark MARK -j RETURN`, then
    /// the proxy's `-o lo` connections marked 1338 ([`Target::Mark`]), which mangle
    /// ISTIO_INBOUND tells apart when they come back in on lo.
    MarkOutput = 7,
}

/// What a matching rule does. Discriminants are what the `target` byte of [`Rule`] holds.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Leave the connection alone.
    Return = 1,
    /// `ISTIO_REDIRECT`: to the outbound capture port on 127.0.0.1.
    Redirect = 2,
    /// `ISTIO_IN_REDIRECT`: to the inbound capture port on 127.0.0.1.
    InRedirect = 3,
    /// `REDIRECT --to-ports 15053`: to the DNS proxy on 127.0.0.1.
    DnsRedirect = 4,
    /// `-j ISTIO_OUTPUT_DNS`: counted, then the walk goes on into that chain's rules (and on
    /// in ISTIO_OUTPUT when none of them decides).
    JumpDns = 5,
    /// `-j ISTIO_TPROXY`: counted, then ISTIO_TPROXY's rule decides ([`ChainId::Tproxy`]);
    /// when it does not match, the walk goes on in ISTIO_INBOUND.
    JumpTproxy = 6,
    /// `TPROXY --on-port PORT --tproxy-mark MARK`: to the inbound capture listener, the
    /// connection's own addresses kept (the rule's `dport2` and `mark` hold the two options).
    Tproxy = 7,
    /// `-j ISTIO_DIVERT` (mark and accept a packet of a connection conntrack knows): the
    /// connection keeps the socket it has.
    Divert = 8,
    /// `MARK --set-xmark MARK/0xffffffff` (the rule's `mark`): the packets leave marked, and
    /// nothing else is decided (mangle OUTPUT's marks are the only ones it sets).
    Mark = 9,
    /// `ACCEPT` (ambient's in-pod chains): the connection is left alone, as by `RETURN` from a
    /// chain its built-in one's policy accepts.
    Accept = 10,
}

impl Target {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Return),
            2 => Some(Self::Redirect),
            3 => Some(Self::InRedirect),
            4 => Some(Self::DnsRedirect),
            5 => Some(Self::JumpDns),
            6 => Some(Self::JumpTproxy),
            7 => Some(Self::Tproxy),
            8 => Some(Self::Divert),
            9 => Some(Self::Mark),
            10 => Some(Self::Accept),
            _ => None,
        }
    }

    /// The iptables jump target, with its options (TPROXY's and MARK's come from the rule:
    /// `crate::chain::rule_text`).
    pub const fn iptables_name(self) -> &'static str {
        match self {
            Self::Return => "RETURN",
            Self::Redirect => "ISTIO_REDIRECT",
            Self::InRedirect => "ISTIO_IN_REDIRECT",
            Self::DnsRedirect => "REDIRECT --to-ports 15053",
            Self::JumpDns => "ISTIO_OUTPUT_DNS",
            Self::JumpTproxy => "ISTIO_TPROXY",
            Self::Tproxy => "TPROXY",
            Self::Divert => "ISTIO_DIVERT",
            Self::Mark => "MARK",
            Self::Accept => "ACCEPT",
        }
    }

    /// Whether a matching rule ends the walk (a jump goes on into the chain it names).
    pub const fn decides(self) -> bool {
        !matches!(self, Self::JumpDns | Self::JumpTproxy)
    }
}

impl ChainId {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Output),
            2 => Some(Self::Inbound),
            3 => Some(Self::OutputDns),
            4 => Some(Self::Prerouting),
            5 => Some(Self::OutputNat),
            6 => Some(Self::Tproxy),
            7 => Some(Self::MarkOutput),
            _ => None,
        }
    }

    pub const fn iptables_name(self) -> &'static str {
        match self {
            Self::Output => "ISTIO_OUTPUT",
            Self::Inbound => "ISTIO_INBOUND",
            Self::OutputDns => "ISTIO_OUTPUT_DNS",
            Self::Prerouting => "PREROUTING",
            Self::OutputNat | Self::MarkOutput => "OUTPUT",
            Self::Tproxy => "ISTIO_TPROXY",
        }
    }
}

/// Bits of [`Rule::has`] and [`Rule::neg`]: which matches a rule carries, and which of
/// those are negated (`!`).
pub mod m {
    /// `-o lo`: the destination is routed over loopback (127/8 or an address of the netns);
    /// in an inbound chain `-i lo`: the connection arrived over loopback (made in the
    /// namespace).
    pub const OUT_LO: u16 = 1 << 0;
    /// `-s ADDR/MASK`.
    pub const SRC: u16 = 1 << 1;
    /// `-d ADDR/MASK`.
    pub const DST: u16 = 1 << 2;
    /// `--dport PORT` (needs a protocol).
    pub const DPORT: u16 = 1 << 3;
    /// `-m owner --uid-owner UID`.
    pub const UID: u16 = 1 << 4;
    /// `-m owner --gid-owner GID`.
    pub const GID: u16 = 1 << 5;
    /// `-m multiport --dports PORT,PORT2` (needs a protocol; `DPORT` is not set with it).
    pub const DPORTS: u16 = 1 << 6;
    /// `-m owner --gid-owner G1 [-m owner --gid-owner G2 ...]` over the workload's owner
    /// groups ([`crate::Workload::owner_groups`]); negated: `! G1 ! G2 ...`, none of them.
    pub const GROUPS: u16 = 1 << 7;
    /// Not a match: the `GID` match is owner group number `uid` of
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`, printed by the name it was given.
    pub const NAMED: u16 = 1 << 8;
    /// `-i IFACE` (PREROUTING) or `-o IFACE` (OUTPUT): the packet's interface is one that
    /// entry `i` of the workload's interface list names, `uid` holding `1 << i`
    /// ([`super::ConnFacts::ifaces`]).
    pub const IFACE: u16 = 1 << 9;
    /// Not a match: the rule is nat's built-in chain's own, walked before its jump to the
    /// chain the rule is stored in (PREROUTING before ISTIO_INBOUND, OUTPUT before
    /// ISTIO_OUTPUT).
    pub const BUILTIN: u16 = 1 << 10;
    /// `-m mark --mark MARK` (the rule's `mark`): the packet's mark, which for the first
    /// packet of a connection is what its socket and mangle OUTPUT gave it.
    pub const MARK: u16 = 1 << 11;
    /// `-m conntrack --ctstate RELATED,ESTABLISHED`: never a connection's first packet,
    /// which is the only one the programs judge.
    pub const ESTABLISHED: u16 = 1 << 12;
    /// Not a match of iptables': the entry stands for a run of rules that differ only in their
    /// `-d CIDR` (none negated), whose CIDRs are its members in `CIDR_SETS`; the entry's own
    /// DST fields are unused.
    pub const DST_SET: u16 = 1 << 13;
    /// The same for a run that differs only in `-p PROTO --dport PORT` (none negated): the
    /// entry's `proto` is 0 and its members in `PORT_SETS` hold each rule's pair.
    pub const PORT_SET: u16 = 1 << 14;
    /// Either kind of set entry.
    pub const SETS: u16 = DST_SET | PORT_SET;
    /// Not a match: the rule is one of the chains istio-cni writes in an ambient pod
    /// (`crate::chain::ambient`), spelled as those are: its inbound chain is `ISTIO_PRERT`,
    /// and its redirects are `REDIRECT --to-ports PORT`, the port in `dport2`.
    pub const AMBIENT: u16 = 1 << 15;
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// One rule of an iptables (IPv4) or ip6tables (IPv6) chain. Addresses and masks in
/// [`crate::addr`] form (an IPv4 CIDR as its v4-mapped /96+n), ports in host order.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// [`ChainId`] discriminant.
    pub chain: u8,
    /// [`Target`] discriminant.
    pub target: u8,
    /// Matches present ([`m`] bits).
    pub has: u16,
    /// Matches negated ([`m`] bits, subset of `has`).
    pub neg: u16,
    /// `-p`: 0 for any, else an IPPROTO number.
    pub proto: u8,
    /// [`Family`] discriminant: whose table the rule is in, iptables' or ip6tables'.
    pub family: u8,
    pub src_addr: Addr,
    pub src_mask: Addr,
    pub dst_addr: Addr,
    pub dst_mask: Addr,
    pub uid: u32,
    pub gid: u32,
    pub dport: u16,
    /// The second port of `-m multiport --dports` ([`m::DPORTS`]); a [`Target::Tproxy`]
    /// rule's `--on-port`.
    pub dport2: u16,
    /// `-m mark --mark MARK/MASK` ([`m::MARK`]); the mark a [`Target::Tproxy`] or
    /// [`Target::Mark`] rule sets.
    pub mark: u32,
    /// The mask of `-m mark --mark` (all ones when iptables prints none): the match is
    /// `packet mark & mark_mask == mark`.
    pub mark_mask: u32,
    /// The rule's counter slot (`crate::CounterKey`); unused in a set entry, whose members
    /// say theirs.
    pub slot: u32,
}

/// What the kernel knows about a connection when a chain is evaluated.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ConnFacts {
    /// [`Family`] discriminant: the family on the wire (a v4-mapped connect is IPv4).
    pub family: u8,
    pub proto: u8,
    /// [`crate::addr`] form.
    pub dst_addr: Addr,
    /// Host byte order.
    pub dst_port: u16,
    /// [`crate::addr`] form; all zeros when the socket is not bound to an address.
    pub src_addr: Addr,
    /// The destination is routed over loopback.
    pub out_lo: bool,
    pub uid: u32,
    pub gid: u32,
    /// The socket's group is one of the workload's owner groups.
    pub in_owner_groups: bool,
    /// The entries of the workload's interface list (`-c`, then `-k`) that name the packet's
    /// interface (the route's device outbound, the arrival device inbound), bit `i` for entry
    /// `i`: the `IFACES` map's value for it.
    pub ifaces: u32,
    /// The first packet's mark: the socket's `SO_MARK` outbound, as mangle OUTPUT left it
    /// inbound over loopback; 0 from other hosts (a packet's mark does not cross namespaces).
    pub mark: u32,
    /// The connection is one conntrack knows already (`--ctstate RELATED,ESTABLISHED`).
    pub established: bool,
}

impl Rule {
    pub const EMPTY: Rule = Rule {
        chain: 0,
        target: 0,
        has: 0,
        neg: 0,
        proto: 0,
        family: 0,
        src_addr: addr::UNSPECIFIED,
        src_mask: addr::UNSPECIFIED,
        dst_addr: addr::UNSPECIFIED,
        dst_mask: addr::UNSPECIFIED,
        uid: 0,
        gid: 0,
        dport: 0,
        dport2: 0,
        mark: 0,
        // All bits, as iptables' `--mark VALUE` without a mask.
        mark_mask: u32::MAX,
        slot: 0,
    };

    pub const fn new(family: Family, chain: ChainId, target: Target) -> Self {
        let mut r = Self::EMPTY;
        r.family = family as u8;
        r.chain = chain as u8;
        r.target = target as u8;
        r
    }

    /// Does this rule match? Written for the verifier as much as for people: straight-line
    /// tests, no loops, no allocation.
    #[inline(always)]
    pub fn matches(&self, c: &ConnFacts) -> bool {
        if self.family != c.family || (self.proto != 0 && self.proto != c.proto) {
            return false;
        }
        self.test(m::OUT_LO, c.out_lo)
            && self.test(m::SRC, addr::masked_eq(&c.src_addr, &self.src_mask, &self.src_addr))
            && self.test(m::DST, addr::masked_eq(&c.dst_addr, &self.dst_mask, &self.dst_addr))
            && self.test(m::DPORT, c.dst_port == self.dport)
            && self.test(m::DPORTS, c.dst_port == self.dport || c.dst_port == self.dport2)
            && self.test(m::UID, c.uid == self.uid)
            && self.test(m::GID, c.gid == self.gid)
            && self.test(m::GROUPS, c.in_owner_groups)
            && self.test(m::IFACE, c.ifaces & self.uid != 0)
            && self.test(m::MARK, c.mark & self.mark_mask == self.mark)
            && self.test(m::ESTABLISHED, c.established)
    }

    /// A match that is absent passes; a present one passes when `hit` differs from its `!`.
    #[inline(always)]
    fn test(&self, bit: u16, hit: bool) -> bool {
        self.has & bit == 0 || hit != (self.neg & bit != 0)
    }

    /// The chain the rule is in, as iptables names it ([`m::BUILTIN`] ones in PREROUTING or
    /// OUTPUT).
    pub fn chain_id(&self) -> Option<ChainId> {
        let stored = ChainId::from_u8(self.chain)?;
        Some(match (stored, self.has & m::BUILTIN != 0) {
            (ChainId::Inbound, true) => ChainId::Prerouting,
            (ChainId::Output, true) => ChainId::OutputNat,
            (c, _) => c,
        })
    }

    pub fn target_kind(&self) -> Option<Target> {
        Target::from_u8(self.target)
    }

    pub fn family_kind(&self) -> Option<Family> {
        Family::from_u8(self.family)
    }
}

/// Whether `addr_be` (network byte order, as the kernel holds `user_ip4`) is in 127.0.0.0/8.
#[inline(always)]
pub fn is_loopback4(addr_be: u32) -> bool {
    u32::from_be(addr_be) >> 24 == 127
}

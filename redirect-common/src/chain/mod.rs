//! istio-iptables flags -> the rule chain, and rules -> iptables-save text.
//!
//! The order of [`compile`] is istio-iptables' `Run()` order
//! (`tools/istio-iptables/pkg/capture/run.go`). ISTIO_OUTPUT: per `-o` port RETURN, 127.0.0.6
//! RETURN, the three owner rules per UID then per GID, 127.0.0.1 RETURN, `-x` RETURNs, `-q`
//! redirects, then the `-i` include. ISTIO_INBOUND: the `-e` tunnel port RETURN, then with
//! `-b '*'` the `-d` RETURNs and a catch-all redirect, or one redirect per `-b` port.
//!
//! istio-iptables writes the same chains with ip6tables for a pod with an IPv6 address, with
//! `::6` for 127.0.0.6, `::1/128` for 127.0.0.1/32, and each family's own `-i`/`-x` CIDRs
//! (`separateV4V6`). All four chains live in one list: iptables' ISTIO_OUTPUT and
//! ISTIO_INBOUND, then ip6tables' two; a rule's index in it is its counter slot, the number
//! `explain` and `stats` print and the tests read. The ip6tables rules are always compiled (so
//! slots never move) and evaluated only while the workload has an IPv6 address. [`pack`] turns
//! the list into what the programs walk: runs of CIDR or port rules become set entries.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    vec::Vec,
};

use crate::{
    ChainId, IPPROTO_TCP, IPPROTO_UDP, MAX_RULES_PER_FAMILY, Rule, Target,
    addr::Family,
    config::{
        CaptureConfig, Cidr, DnsCapture, Include, InterceptionMode, Interface, OwnerGroup, OwnerGroups,
        TPROXY_OUTBOUND_MARK,
    },
    m,
};

/// Envoy's inbound passthrough source (`ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN`).
pub const INBOUND_PASSTHROUGH_SRC: Ipv4Addr = Ipv4Addr::from_bits(u32::from_be(crate::INBOUND_PASSTHROUGH_SRC_BE));
/// The same for ip6tables (`-s ::6/128`), which istio-iptables adds to `lo`.
pub const INBOUND_PASSTHROUGH_SRC6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// A family's 127.0.0.6 and its loopback CIDR (`ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`, by
/// default 127.0.0.1/32; always `::1/128` for ip6tables).
fn family_addrs(family: Family, ipv4_loopback: Cidr) -> (Cidr, Cidr) {
    let host = |ip: IpAddr| Cidr {
        addr: ip,
        prefix: if ip.is_ipv4() { 32 } else { 128 },
    };
    match family {
        Family::V4 => (host(IpAddr::V4(INBOUND_PASSTHROUGH_SRC)), ipv4_loopback),
        Family::V6 => (
            host(IpAddr::V6(INBOUND_PASSTHROUGH_SRC6)),
            host(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ),
    }
}

/// DNS's port.
pub const DNS_PORT: u16 = 53;

/// The flags need more entries than one workload's table holds, once packed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooManyRules {
    pub needed: usize,
    pub family: Family,
}

impl core::fmt::Display for TooManyRules {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "these flags need {} entries in {}' chains once their CIDR and port lists are \
             packed; redirect holds at most {MAX_RULES_PER_FAMILY} per family (shorten the lists \
             it cannot pack: -u/-g owner ids, -c/-k interfaces, \
             or ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)",
            self.needed,
            self.family.iptables()
        )
    }
}

impl std::error::Error for TooManyRules {}

struct Builder {
    rules: Vec<Rule>,
    family: Family,
}

impl Builder {
    fn push(&mut self, r: Rule) {
        self.rules.push(r);
    }

    fn out(&self, target: Target) -> Rule {
        Rule::new(self.family, ChainId::Output, target)
    }

    fn inb(&self, target: Target) -> Rule {
        Rule::new(self.family, ChainId::Inbound, target)
    }
}

fn with_dport(mut r: Rule, proto: u8, port: u16, negate: bool) -> Rule {
    r.proto = proto;
    r.has |= m::DPORT;
    r.dport = port;
    if negate {
        r.neg |= m::DPORT;
    }
    r
}

/// `-m multiport ! --dports A,B`: the one multiport rule istio-iptables writes is negated.
fn with_dports(mut r: Rule, proto: u8, a: u16, b: u16) -> Rule {
    r.proto = proto;
    r.has |= m::DPORTS;
    r.neg |= m::DPORTS;
    r.dport = a;
    r.dport2 = b;
    r
}

fn with_dst(mut r: Rule, cidr: &Cidr, negate: bool) -> Rule {
    r.has |= m::DST;
    (r.dst_addr, r.dst_mask) = cidr.words();
    if negate {
        r.neg |= m::DST;
    }
    r
}

fn with_src(mut r: Rule, cidr: &Cidr) -> Rule {
    r.has |= m::SRC;
    (r.src_addr, r.src_mask) = cidr.words();
    r
}

/// `-m mark [!] --mark VALUE/MASK`.
fn with_mark(mut r: Rule, value: u32, mask: u32, negate: bool) -> Rule {
    r.has |= m::MARK;
    r.mark = value;
    r.mark_mask = mask;
    if negate {
        r.neg |= m::MARK;
    }
    r
}

fn out_lo(mut r: Rule) -> Rule {
    r.has |= m::OUT_LO;
    r
}

#[derive(Copy, Clone)]
enum Owner {
    Uid(u32),
    Gid(u32),
}

/// The proxy's ids as istio-iptables writes one rule per id: each UID, then each GID.
fn proxy_owners(cfg: &CaptureConfig) -> impl Iterator<Item = Owner> + '_ {
    cfg.proxy_uids
        .iter()
        .map(|&u| Owner::Uid(u))
        .chain(cfg.proxy_gids.iter().map(|&g| Owner::Gid(g)))
}

fn with_owner(mut r: Rule, owner: Owner, negate: bool) -> Rule {
    let bit = match owner {
        Owner::Uid(u) => {
            r.uid = u;
            m::UID
        }
        Owner::Gid(g) => {
            r.gid = g;
            m::GID
        }
    };
    r.has |= bit;
    if negate {
        r.neg |= bit;
    }
    r
}

/// The chains for these flags, in evaluation order: iptables' ISTIO_OUTPUT and ISTIO_INBOUND,
/// then ip6tables' ISTIO_OUTPUT and ISTIO_INBOUND, each rule's `slot` its index. Refused when
/// [`pack`] cannot fit them in a workload's table.
pub fn compile(cfg: &CaptureConfig) -> Result<Vec<Rule>, TooManyRules> {
    compile_packed(cfg).map(|c| c.rules)
}

/// The chains for these flags as [`compile`] lists them, and as the programs hold them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    pub rules: Vec<Rule>,
    pub packed: Packed,
}

/// [`compile`] and [`pack`] in one: for the enroll, which writes both, so the packing (a pass
/// over every list member) runs once.
pub fn compile_packed(cfg: &CaptureConfig) -> Result<Compiled, TooManyRules> {
    let mut rules = Vec::new();
    for family in [Family::V4, Family::V6] {
        let mut b = Builder {
            rules: Vec::new(),
            family,
        };
        match &cfg.ambient {
            Some(ambient) => ambient::chains(&mut b, cfg, ambient),
            None => family_chains(&mut b, cfg),
        }
        rules.append(&mut b.rules);
    }
    for (slot, r) in rules.iter_mut().enumerate() {
        r.slot = slot as u32;
    }
    let interfaces: Vec<Interface> = cfg.interface_list().cloned().collect();
    let packed = pack(&rules, &interfaces)?;
    Ok(Compiled { rules, packed })
}

/// nat PREROUTING's `-k` rules, first in the chain as the kernel holds them: istio-iptables
/// inserts each at position 1, the RETURNs (`-i K -j RETURN`) first, then, for `-i '*'` or
/// per included CIDR of the family, the jumps to ISTIO_REDIRECT above them. Each `-I ... 1`
/// lands above the one before, so the chain lists them in the reverse of the order written.
/// A `-k` entry's bit follows `-c`'s entries in the interface list.
fn virt_rules(b: &mut Builder, cfg: &CaptureConfig) {
    let entries: Vec<u32> = virt_entry_bits(cfg).collect();
    let on = |mut r: Rule, bit: u32| {
        r.has |= m::IFACE | m::BUILTIN;
        r.uid = bit;
        r
    };
    let mut written: Vec<Rule> = entries.iter().map(|&bit| on(b.inb(Target::Return), bit)).collect();
    match &cfg.outbound_cidrs {
        Include::All => written.extend(entries.iter().map(|&bit| on(b.inb(Target::Redirect), bit))),
        Include::List(cidrs) => {
            for c in of_family(cidrs, b.family) {
                written.extend(
                    entries
                        .iter()
                        .map(|&bit| on(with_dst(b.inb(Target::Redirect), c, false), bit)),
                );
            }
        }
    }
    for r in written.into_iter().rev() {
        b.push(r);
    }
}

/// The CIDRs of `family` in a list of both (istio-iptables' `separateV4V6`).
fn of_family(cidrs: &[Cidr], family: Family) -> impl Iterator<Item = &Cidr> {
    cidrs.iter().filter(move |c| c.family() == family)
}

/// One family's ISTIO_OUTPUT and ISTIO_INBOUND, after nat PREROUTING's and OUTPUT's own
/// rules (`-c`: traffic on an excluded interface is left alone both ways).
fn family_chains(b: &mut Builder, cfg: &CaptureConfig) {
    let (passthrough_src, localhost) = family_addrs(b.family, cfg.ipv4_loopback);
    let dns = cfg.dns.enabled();
    virt_rules(b, cfg);
    for (i, _) in cfg.exclude_interfaces.iter().enumerate() {
        // PREROUTING's then OUTPUT's, stored with the chain each is walked before.
        for chain in [ChainId::Inbound, ChainId::Output] {
            let mut r = Rule::new(b.family, chain, Target::Return);
            r.has |= m::IFACE | m::BUILTIN;
            // `parse_interfaces` holds a list to MAX_INTERFACES (32) entries.
            r.uid = 1u32.checked_shl(i as u32).unwrap_or(0);
            b.push(r);
        }
    }
    for &p in &cfg.outbound_exclude_ports {
        b.push(with_dport(b.out(Target::Return), IPPROTO_TCP, p, false));
        b.push(with_dport(b.out(Target::Return), IPPROTO_UDP, p, false));
    }

    b.push(out_lo(with_src(b.out(Target::Return), &passthrough_src)));

    // istio-iptables skips the "app -> itself over lo" RETURN when -i names a loopback
    // address of either family (`HasLoopBackIP`, checked for both in both tables).
    let include_has_loopback = match &cfg.outbound_cidrs {
        Include::All => false,
        Include::List(c) => c.iter().any(|c| c.addr.is_loopback()),
    };
    for owner in proxy_owners(cfg) {
        // The proxy dialing its own pod through a VIP goes back to it as inbound traffic.
        // With DNS capture, the proxy's own TCP queries to a resolver in the pod are not
        // (istio-iptables writes that multiport form for the UIDs only, not the GIDs).
        let to_self = out_lo(with_dst(b.out(Target::InRedirect), &localhost, true));
        let to_self = match owner {
            Owner::Uid(_) if dns => with_dports(to_self, IPPROTO_TCP, DNS_PORT, cfg.inbound_tunnel_port),
            _ => with_dport(to_self, IPPROTO_TCP, cfg.inbound_tunnel_port, true),
        };
        b.push(with_owner(to_self, owner, false));
        if !include_has_loopback {
            // The app calling itself over lo, except (with DNS capture) TCP to a resolver on
            // loopback, which must reach the DNS rules below.
            let app_to_self = out_lo(b.out(Target::Return));
            let app_to_self = match dns {
                true => with_dport(app_to_self, IPPROTO_TCP, DNS_PORT, true),
                false => app_to_self,
            };
            b.push(with_owner(app_to_self, owner, true));
        }
        b.push(with_owner(b.out(Target::Return), owner, false));
    }

    match &cfg.owner_groups {
        OwnerGroups::All => {}
        OwnerGroups::Only(_) => {
            let mut r = b.out(Target::Return);
            r.has |= m::GROUPS;
            r.neg |= m::GROUPS;
            b.push(r);
        }
        OwnerGroups::Except(groups) => {
            for (i, g) in groups.iter().enumerate() {
                let mut r = with_owner(b.out(Target::Return), Owner::Gid(group_gid(g)), false);
                r.has |= m::NAMED;
                r.uid = i as u32;
                b.push(r);
            }
        }
    }

    if dns {
        dns_rules(b, &cfg.dns);
    }

    b.push(with_dst(b.out(Target::Return), &localhost, false));

    let exclude: Vec<Cidr> = of_family(&cfg.outbound_exclude_cidrs, b.family).copied().collect();
    for c in &exclude {
        b.push(with_dst(b.out(Target::Return), c, false));
    }
    for &p in &cfg.outbound_ports {
        b.push(with_dport(b.out(Target::Redirect), IPPROTO_TCP, p, false));
    }
    match &cfg.outbound_cidrs {
        Include::All => b.push(b.out(Target::Redirect)),
        Include::List(cidrs) => {
            let include: Vec<Cidr> = of_family(cidrs, b.family).copied().collect();
            for c in &include {
                b.push(with_dst(b.out(Target::Redirect), c, false));
            }
        }
    }

    if cfg.inbound_mode == InterceptionMode::Tproxy {
        tproxy_chains(b, cfg, passthrough_src, localhost);
        return;
    }

    // Written unconditionally by istio-iptables, even when -b '' leaves the chain unused.
    b.push(with_dport(
        b.inb(Target::Return),
        IPPROTO_TCP,
        cfg.inbound_tunnel_port,
        false,
    ));
    match &cfg.inbound_ports {
        Include::All => {
            inbound_returns(b, cfg);
            let mut all = b.inb(Target::InRedirect);
            all.proto = IPPROTO_TCP;
            b.push(all);
        }
        // istio-iptables ignores -d here: only the listed ports are captured anyway.
        Include::List(ports) => {
            for &p in ports {
                b.push(with_dport(b.inb(Target::InRedirect), IPPROTO_TCP, p, false));
            }
        }
    }
}

/// TPROXY mode's inbound chains, which are mangle's (nat's ISTIO_INBOUND is written but
/// never jumped to: `tables` prints its tunnel-port RETURN uncounted): ISTIO_TPROXY's one
/// rule, then ISTIO_INBOUND as `Run()` leaves it (its three `-I ... 1/2/3` RETURNs first), then
/// mangle OUTPUT's rules, which give the proxy's own loopback connections the mark those
/// RETURNs read. With `-b ''` (an empty list) nothing jumps to ISTIO_INBOUND, which holds only
/// the RETURNs.
fn tproxy_chains(b: &mut Builder, cfg: &CaptureConfig, passthrough_src: Cidr, localhost: Cidr) {
    let mark = cfg.tproxy.mark;
    let tcp = |mut r: Rule| {
        r.proto = IPPROTO_TCP;
        r
    };
    let with_mark = |r: Rule, value: u32, negate: bool| with_mark(r, value, u32::MAX, negate);
    let jumped = !cfg.inbound_ports.is_empty();
    if jumped {
        let mut tproxy = tcp(with_dst(
            Rule::new(b.family, ChainId::Tproxy, Target::Tproxy),
            &localhost,
            true,
        ));
        tproxy.dport2 = cfg.inbound_capture_port;
        tproxy.mark = mark;
        b.push(tproxy);
    }
    // What comes back from the proxy's transparent dial (already marked), from its
    // passthrough source, and whatever else the namespace sends itself, except the proxy's
    // own connections (1338: mangle OUTPUT below). Written with `-b ''` too, unused.
    b.push(with_mark(tcp(b.inb(Target::Return)), mark, false));
    b.push(out_lo(tcp(with_src(b.inb(Target::Return), &passthrough_src))));
    b.push(with_mark(
        out_lo(tcp(b.inb(Target::Return))),
        TPROXY_OUTBOUND_MARK,
        true,
    ));
    let divert = |b: &Builder| {
        let mut r = tcp(b.inb(Target::Divert));
        r.has |= m::ESTABLISHED;
        r
    };
    match &cfg.inbound_ports {
        Include::All => {
            inbound_returns(b, cfg);
            b.push(divert(b));
            b.push(tcp(b.inb(Target::JumpTproxy)));
        }
        Include::List(ports) => {
            for &p in ports {
                b.push(with_dport(divert(b), IPPROTO_TCP, p, false));
                b.push(with_dport(b.inb(Target::JumpTproxy), IPPROTO_TCP, p, false));
            }
        }
    }
    let out = |b: &Builder, target| Rule::new(b.family, ChainId::MarkOutput, target);
    b.push(with_mark(out_lo(tcp(out(b, Target::Return))), mark, false));
    for owner in proxy_owners(cfg) {
        let mut r = with_owner(
            out_lo(tcp(with_dst(out(b, Target::Mark), &localhost, true))),
            owner,
            false,
        );
        r.mark = TPROXY_OUTBOUND_MARK;
        b.push(r);
    }
}

/// ISTIO_INBOUND's RETURNs under `-b '*'`, in either mode's table: the SSH port of older
/// releases, then each `-d` port.
fn inbound_returns(b: &mut Builder, cfg: &CaptureConfig) {
    if cfg.compat.inbound_ssh_return() {
        b.push(with_dport(b.inb(Target::Return), IPPROTO_TCP, SSH_PORT, false));
    }
    for &p in &cfg.inbound_exclude_ports {
        b.push(with_dport(b.inb(Target::Return), IPPROTO_TCP, p, false));
    }
}

/// istio-iptables' `SetupDNSRedir` in nat, for one family: the jump to ISTIO_OUTPUT_DNS when
/// that family has something to capture, then its TCP rules and its UDP rules.
fn dns_rules(b: &mut Builder, dns: &DnsCapture) {
    let servers: Vec<Cidr> = match b.family {
        Family::V4 => dns.servers_v4.iter().map(|&a| host_cidr(IpAddr::V4(a))).collect(),
        Family::V6 => dns.servers_v6.iter().map(|&a| host_cidr(IpAddr::V6(a))).collect(),
    };
    if !dns.capture_all && servers.is_empty() {
        return;
    }
    b.push(b.out(Target::JumpDns));
    let to_proxy = |b: &Builder, proto| {
        with_dport(
            Rule::new(b.family, ChainId::OutputDns, Target::DnsRedirect),
            proto,
            DNS_PORT,
            false,
        )
    };
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        if dns.capture_all {
            b.push(to_proxy(b, proto));
        } else {
            for s in &servers {
                b.push(with_dst(to_proxy(b, proto), s, false));
            }
        }
    }
}

fn host_cidr(ip: IpAddr) -> Cidr {
    Cidr {
        addr: ip,
        prefix: if ip.is_ipv4() { 32 } else { 128 },
    }
}

/// The gid of an owner group; a name not resolved (only `explain` compiles one) stands as
/// `u32::MAX`, which no socket has.
fn group_gid(g: &OwnerGroup) -> u32 {
    g.gid.unwrap_or(u32::MAX)
}

/// SSH's port, which older istio-iptables releases left alone under `-b '*'`.
pub const SSH_PORT: u16 = 22;

/// The counter slot of each rule of [`compile`]'s list: its index there. What `explain` and
/// `stats` print as `slot`.
pub fn slots(rules: &[Rule]) -> Vec<usize> {
    rules.iter().map(|r| r.slot as usize).collect()
}

mod ambient;
#[cfg(test)]
mod ambient_tests;
mod pack;
#[cfg(test)]
mod pack_tests;
mod tables;
#[cfg(test)]
mod tests;
mod text;
#[cfg(test)]
mod virt_tests;
mod workload;

pub use ambient::node_rule;
pub use pack::{CidrMember, Packed, PortMember, pack, unpack};
pub use tables::{DROP_INVALID_BY, Table, TableLine, iptables_save, rule_table, tables};
pub use text::{
    ListColumns, Names, chain_name, list_columns, list_columns_named, match_text, match_text_named, rule_text,
    rule_text_named, target_name, target_text,
};
use workload::virt_entry_bits;
pub use workload::{Serving, flags, virt_entries, workload};

//! [`pack`] against the rules it packs: for random chains and connections, walking the
//! entries with set lookups (as `redirect_walk_chain` does, the trie answering with its
//! longest matching member) decides the same and counts the same rules as walking every rule
//! (as iptables does).

use super::*;
use crate::{ConnFacts, IPPROTO_TCP, IPPROTO_UDP, addr, config};

/// xorshift64: the same chains on every run, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, of: &[T]) -> T {
        of[self.below(of.len() as u64) as usize]
    }
}

/// Addresses in a small space (10.200.{0..3}.{0..3}) so that CIDRs nest and repeat, and
/// connections hit them.
fn small_addr(rng: &mut Rng) -> addr::Addr {
    let ip = std::net::Ipv4Addr::new(10, 200, rng.below(4) as u8, rng.below(4) as u8);
    addr::from_ip(ip.into())
}

fn random_rule(rng: &mut Rng, shape: &Rule, kind: u64) -> Rule {
    let mut r = *shape;
    match kind {
        0 => {
            let prefix = rng.pick(&[0u8, 8, 16, 22, 24, 30, 31, 32]);
            let mask = addr::prefix_mask(96 + prefix);
            r.has |= m::DST;
            (r.dst_addr, r.dst_mask) = (addr::and(&small_addr(rng), &mask), mask);
        }
        _ => {
            r.has |= m::DPORT;
            r.proto = rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]);
            r.dport = rng.pick(&[53, 80, 81, 82, 8080]);
        }
    }
    r
}

/// A chain of runs: each a shape (target, protocol, an owner match or not) and rules that
/// vary in a CIDR or a port, sometimes with a rule of another shape between.
fn random_chain(rng: &mut Rng) -> Vec<Rule> {
    let mut rules = Vec::new();
    for _ in 0..rng.below(6) + 1 {
        let target = rng.pick(&[
            Target::Return,
            Target::Redirect,
            Target::InRedirect,
            Target::DnsRedirect,
        ]);
        let mut shape = Rule::new(Family::V4, ChainId::Output, target);
        shape.proto = rng.pick(&[0, 0, IPPROTO_TCP, IPPROTO_UDP]);
        if rng.below(3) == 0 {
            shape.has |= m::UID;
            shape.uid = rng.pick(&[0, 1337]);
        }
        let kind = rng.below(2);
        if kind == 1 && shape.proto == 0 {
            shape.proto = IPPROTO_TCP;
        }
        for _ in 0..rng.below(12) + 1 {
            rules.push(random_rule(rng, &shape, kind));
        }
        if rng.below(3) == 0 {
            tuples(rng, &mut rules);
        }
        if rng.below(4) == 0 {
            on_interfaces(rng, &mut rules);
        }
        if rng.below(4) == 0 {
            rules.push(Rule::new(Family::V4, ChainId::Output, Target::Return));
            rules.last_mut().unwrap().has |= m::GID;
        }
    }
    for (slot, r) in rules.iter_mut().enumerate() {
        r.slot = slot as u32;
    }
    rules
}

/// Tuples of rules on one port, as TPROXY's `-b` writes them (a RELATED,ESTABLISHED divert,
/// then a jump to ISTIO_TPROXY), 1 to 3 rules each, with a port now and then repeated (which
/// ends the run of tuples) or a tuple cut short.
fn tuples(rng: &mut Rng, rules: &mut Vec<Rule>) {
    let width = rng.below(3) as usize + 1;
    let shapes: Vec<Rule> = (0..width)
        .map(|_| {
            let mut r = Rule::new(
                Family::V4,
                ChainId::Output,
                rng.pick(&[Target::Divert, Target::JumpTproxy, Target::Return, Target::Redirect]),
            );
            if rng.below(2) == 0 {
                r.has |= m::ESTABLISHED;
            }
            r.has |= m::DPORT;
            r
        })
        .collect();
    let proto = rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]);
    for _ in 0..rng.below(6) + 1 {
        let port = rng.pick(&[53, 80, 81, 82, 8080]);
        let cut = if rng.below(8) == 0 { 1 } else { width };
        for shape in &shapes[..cut] {
            let mut r = *shape;
            (r.proto, r.dport) = (proto, port);
            rules.push(r);
        }
    }
}

/// The interface list of every random chain: entries 0 to 2 name no interface in common,
/// entry 3 shares eth1 and eth2 with 0 and 1.
const INTERFACES: &str = "eth1,eth2,veth+,eth+";

fn interfaces() -> Vec<config::Interface> {
    config::parse_interfaces("-k", INTERFACES).unwrap()
}

/// Rules on interfaces as `-k` writes them: per CIDR, a rule for each of 1 to 3 entries of
/// [`INTERFACES`] (one target for all), then now and then a RETURN per entry; the entries
/// sometimes include two that overlap, whose rules must then keep their order.
fn on_interfaces(rng: &mut Rng, rules: &mut Vec<Rule>) {
    let entries: Vec<u32> = (0..rng.below(3) + 1).map(|_| 1 << rng.below(4)).collect();
    let target = rng.pick(&[Target::Return, Target::Redirect, Target::InRedirect]);
    let mut shape = Rule::new(Family::V4, ChainId::Output, target);
    shape.proto = rng.pick(&[0, IPPROTO_TCP]);
    shape.has |= m::IFACE;
    for _ in 0..rng.below(5) + 1 {
        let cidr = random_rule(rng, &shape, 0);
        for &bit in &entries {
            rules.push(Rule { uid: bit, ..cidr });
        }
    }
    if rng.below(2) == 0 {
        for &bit in &entries {
            let mut r = Rule::new(Family::V4, ChainId::Output, Target::Return);
            r.has |= m::IFACE;
            r.uid = bit;
            rules.push(r);
        }
    }
}

/// What a walk decided, and the slots it counted.
type Walked = (Option<u8>, Vec<u32>);

/// After a matching rule (or member) with target `t`: whether the walk goes on, as
/// `redirect_walk_chain` does for a counted walk of nat's chains.
/// A jump to ISTIO_TPROXY goes on when that chain's one rule does not match: here, for a
/// connection to port 53 (a stand-in for the walk's own flag).
fn passes(t: u8, facts: &ConnFacts) -> bool {
    t == Target::JumpDns as u8
        || (facts.proto == IPPROTO_UDP && (t == Target::Redirect as u8 || t == Target::InRedirect as u8))
        || (t == Target::JumpTproxy as u8 && facts.dst_port == 53)
}

/// iptables: every rule in order.
fn walk_rules(rules: &[Rule], facts: &ConnFacts) -> Walked {
    let mut counted = Vec::new();
    for r in rules.iter().filter(|r| r.matches(facts)) {
        counted.push(r.slot);
        if !passes(r.target, facts) {
            return (Some(r.target), counted);
        }
    }
    (None, counted)
}

/// The programs: the entries in order, a set entry answering from its members as the maps
/// would (the trie with its longest matching member, the hash with the exact pair).
fn walk_packed(p: &Packed, facts: &ConnFacts) -> Walked {
    let mut counted = Vec::new();
    for (i, e) in p.entries[0].iter().enumerate() {
        if !e.matches(facts) {
            continue;
        }
        let slot = if e.has & m::DST_SET != 0 {
            let hit = p
                .cidrs
                .iter()
                .filter(|c| c.entry as usize == i && addr::masked_eq(&facts.dst_addr, &c.mask, &c.addr))
                .max_by_key(|c| addr::mask_prefix(&c.mask));
            match hit {
                Some(c) => c.member.decides,
                None => continue,
            }
        } else if e.has & m::PORT_SET != 0 {
            match p
                .ports
                .iter()
                .find(|x| x.entry as usize == i && x.proto == facts.proto && x.port == facts.dst_port)
            {
                Some(x) => x.member.decides,
                None => continue,
            }
        } else {
            e.slot
        };
        counted.push(slot);
        if !passes(e.target, facts) {
            return (Some(e.target), counted);
        }
    }
    (None, counted)
}

fn facts(rng: &mut Rng) -> ConnFacts {
    // The entries of [`INTERFACES`] naming the device it arrived on.
    let device = rng.pick(&["eth1", "eth2", "veth0", "lo"]);
    let ifaces = interfaces()
        .iter()
        .enumerate()
        .filter(|(_, i)| i.matches(device))
        .fold(0, |bits, (n, _)| bits | 1 << n);
    ConnFacts {
        family: Family::V4 as u8,
        proto: rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]),
        dst_addr: small_addr(rng),
        dst_port: rng.pick(&[53, 80, 81, 82, 8080, 9999]),
        src_addr: addr::UNSPECIFIED,
        out_lo: false,
        uid: rng.pick(&[0, 1337]),
        gid: 0,
        in_owner_groups: false,
        ifaces,
        mark: 0,
        established: rng.below(2) == 0,
    }
}

#[test]
fn packed_walk_decides_and_counts_as_the_rules() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut sets, mut too_long) = (0, 0);
    for _ in 0..2_000 {
        let rules = random_chain(&mut rng);
        // Some chains (overlapping interfaces, short runs) still need too many entries.
        let Ok(packed) = pack(&rules, &interfaces()) else {
            too_long += 1;
            continue;
        };
        sets += packed.entries[0].iter().filter(|e| e.has & m::SETS != 0).count();
        for _ in 0..50 {
            let f = facts(&mut rng);
            assert_eq!(walk_packed(&packed, &f), walk_rules(&rules, &f), "{rules:#?}\n{f:#?}");
        }
        let entries: Vec<(usize, Rule)> = packed.entries[0].iter().copied().enumerate().collect();
        assert_eq!(unpack(&entries, &packed.cidrs, &packed.ports), rules);
    }
    // The chains made sets, many of them: the walk above compared lookups, not just rules.
    assert!(sets > 2_000, "{sets}");
    assert!(too_long < 40, "{too_long} of 2,000 chains did not pack");
}

#[test]
fn a_thousand_cidrs_and_ports_are_one_entry_each() {
    let cidrs: Vec<String> = (0..1000)
        .map(|i| format!("10.{}.{}.0/24", 100 + i / 256, i % 256))
        .collect();
    let ports: Vec<u16> = (1..=1000).collect();
    let cfg = config::CaptureConfig {
        outbound_cidrs: config::Include::List(cidrs.iter().map(|c| config::parse_cidr("-i", c).unwrap()).collect()),
        outbound_exclude_cidrs: cidrs.iter().map(|c| config::parse_cidr("-x", c).unwrap()).collect(),
        outbound_exclude_ports: ports.clone(),
        inbound_ports: config::Include::List(ports.clone()),
        ..Default::default()
    };
    let rules = compile(&cfg).unwrap();
    // 1,000 each of -x, -i and -b, and 2,000 of -o (TCP and UDP), plus the fixed rules.
    assert!(rules.len() > 5_000, "{}", rules.len());
    let packed = pack(&rules, &[]).unwrap();
    let sets = |f: usize| packed.entries[f].iter().filter(|e| e.has & m::SETS != 0).count();
    assert_eq!(sets(0), 4, "{:#?}", packed.entries[0]);
    assert!(packed.entries[0].len() < 20, "{}", packed.entries[0].len());
    // -x's and -i's, and the 127.0.0.1/32 RETURN just before -x's, which is one of its run.
    assert_eq!(packed.cidrs.len(), 2_001);
    // -o's in both families, -b's in both.
    assert_eq!(packed.ports.len(), 2 * (2_000 + 1_000));
    assert_eq!(unpacked(&packed), rules);
}

/// A REDIRECT a UDP flow walks past counts every rule it matches, so its run must not hold
/// two members one address matches: the /24 inside the /16 starts a new entry. RETURN ends the
/// walk, so its /24 stays in the run, answering with the /16 before it.
#[test]
fn nested_cidrs_split_a_redirect_run_but_not_a_return_run() {
    let cidr = |target, s: &str, slot| {
        let c = config::parse_cidr("-i", s).unwrap();
        let mut r = with_dst(Rule::new(Family::V4, ChainId::Output, target), &c, false);
        r.slot = slot;
        r
    };
    let redirect = [
        cidr(Target::Redirect, "10.200.0.0/16", 0),
        cidr(Target::Redirect, "10.201.0.0/16", 1),
        cidr(Target::Redirect, "10.200.1.0/24", 2),
    ];
    let p = pack(&redirect, &[]).unwrap();
    assert_eq!(p.entries[0].len(), 2);
    assert_eq!(p.entries[0][1].slot, 2);
    let ret = redirect.map(|mut r| {
        r.target = Target::Return as u8;
        r
    });
    let p = pack(&ret, &[]).unwrap();
    assert_eq!(p.entries[0].len(), 1);
    let inner = p.cidrs.iter().find(|c| c.member.own == 2).unwrap();
    assert_eq!(inner.member.decides, 0);
}

/// Both families' entries unpacked, as `stats` reads them from the maps.
fn unpacked(packed: &Packed) -> Vec<Rule> {
    let entries: Vec<(usize, Rule)> = packed
        .entries
        .iter()
        .enumerate()
        .flat_map(|(f, e)| {
            e.iter()
                .enumerate()
                .map(move |(i, r)| (f * MAX_RULES_PER_FAMILY + i, *r))
        })
        .collect();
    unpack(&entries, &packed.cidrs, &packed.ports)
}

/// TPROXY mode's `-b` writes two rules per port (a RELATED,ESTABLISHED divert, then the jump
/// to ISTIO_TPROXY): a thousand ports are two set entries, one per rule of the pair.
#[test]
fn tproxy_inbound_ports_of_a_thousand_are_two_entries() {
    let ports: Vec<u16> = (20_000..21_000).collect();
    let cfg = config::CaptureConfig {
        inbound_mode: config::InterceptionMode::Tproxy,
        inbound_ports: config::Include::List(ports.clone()),
        ..Default::default()
    };
    let rules = compile(&cfg).unwrap();
    let packed = pack(&rules, &[]).unwrap();
    for f in 0..2 {
        let sets: Vec<&Rule> = packed.entries[f].iter().filter(|e| e.has & m::PORT_SET != 0).collect();
        let targets: Vec<u8> = sets.iter().map(|e| e.target).collect();
        assert_eq!(
            targets,
            [Target::Divert as u8, Target::JumpTproxy as u8],
            "{:#?}",
            packed.entries[f]
        );
        assert!(sets[0].has & m::ESTABLISHED != 0);
    }
    assert_eq!(packed.ports.len(), 2 * 2 * ports.len());
    assert_eq!(unpacked(&packed), rules);
}

/// `-k` with two interfaces writes a PREROUTING jump per `-i` CIDR per interface, alternating
/// between them: taken interface by interface, the thousand CIDRs are one set entry each.
/// Interfaces some name could match both (`eth+` and `eth1`) keep their rules' order, and
/// need an entry per rule.
#[test]
fn kube_virt_interfaces_with_a_thousand_cidrs_are_an_entry_each() {
    let cidrs: Vec<String> = (0..1000)
        .map(|i| format!("10.{}.{}.0/24", 100 + i / 256, i % 256))
        .collect();
    let with = |k: &str| config::CaptureConfig {
        outbound_cidrs: config::Include::List(cidrs.iter().map(|c| config::parse_cidr("-i", c).unwrap()).collect()),
        kube_virt_interfaces: config::parse_interfaces("-k", k).unwrap(),
        ..Default::default()
    };
    let cfg = with("eth1,vm+");
    let compiled = compile_packed(&cfg).unwrap();
    let prerouting = |p: &Packed| {
        p.entries[0]
            .iter()
            .filter(|e| e.has & m::IFACE != 0)
            .map(|e| (e.uid, e.has & m::DST_SET != 0))
            .collect::<Vec<_>>()
    };
    // vm+ is the second entry, first in the chain (-k's rules are inserted at the top).
    assert_eq!(
        prerouting(&compiled.packed),
        [(0b10, true), (0b10, false), (0b01, true), (0b01, false)],
        "each interface's CIDR set, then its RETURN"
    );
    assert_eq!(unpacked(&compiled.packed), compiled.rules);
    let overlapping = compile_packed(&with("eth1,eth+")).unwrap_err();
    assert!(overlapping.needed > MAX_RULES_PER_FAMILY, "{overlapping:?}");
    // A `-c` name that `vm+` also names: its RETURN, after `-k`'s rules in the chain, starts
    // a run of its own, and `-k`'s still pack.
    let cfg = config::CaptureConfig {
        exclude_interfaces: config::parse_interfaces("-c", "vmx0").unwrap(),
        ..with("eth1,vm+")
    };
    let compiled = compile_packed(&cfg).unwrap();
    assert_eq!(unpacked(&compiled.packed), compiled.rules);
    assert!(
        compiled.packed.entries[0].len() < 20,
        "{:#?}",
        compiled.packed.entries[0]
    );
}

//! [`compile`](super::compile)'s list -> the entries the programs walk.
//!
//! istio-iptables writes one rule per `-i`/`-x` CIDR and per `-q`/`-o`/`-b`/`-d` port, and
//! walking them one by one would make a connect's cost grow with the lists (and their length
//! would be bounded by the walk's). A run of consecutive rules that differ only in their
//! `-d CIDR`, or only in `-p PROTO --dport PORT`, is one *set entry* instead: one lookup in an
//! LPM trie (`CIDR_SETS`) or a hash (`PORT_SETS`), whose answer is the rule of the run that
//! iptables would have stopped at, which is then counted as that rule. So the walk's cost is
//! the number of entries, which no list changes, and the counters stay per rule.
//!
//! What keeps this exact:
//! - A run's rules share everything but the varying field, so they match or fail together
//!   on the rest; the first of them whose CIDR (or pair) matches is the one iptables stops at.
//!   Nested CIDRs are allowed: each member's answer is the earliest member containing it
//!   (iptables takes the first rule that matches, not the longest prefix), and an address's
//!   longest matching member is contained in every other member that matches it.
//! - Only targets that end the walk are packed, except a REDIRECT jump whose chain (one
//!   `-p tcp` rule) a UDP flow comes back from and walks on, counted at every rule it
//!   matched: such a run never holds two members one address or pair can match (a
//!   containing CIDR or a repeated one starts the next entry), so that it counts exactly one.
//! - Repeated members (the same CIDR or pair twice) end a run too, so each member has its own
//!   key and `stats` can list every rule from the maps.
//!
//! Rules on interfaces come interleaved: `-k` writes, per `-i` CIDR, a jump for each of its
//! interfaces, so no two neighbours differ in the CIDR alone. A packet arrives on one
//! interface, so rules on entries of the interface list no name can match both of are never
//! both matched: within a block of such rules in one chain, their order across interfaces
//! decides nothing and counts nothing, and the walk takes them interface by interface
//! (each interface's rules in their own order), where the CIDR runs appear.

use std::{
    collections::{HashMap, HashSet},
    vec::Vec,
};

use super::TooManyRules;
use crate::{
    IPPROTO_TCP, MAX_RULES_PER_FAMILY, Rule, SetMember, Target,
    addr::{self, Addr, Family},
    config::Interface,
    m,
};

/// Runs shorter than this stay rules: a set costs a lookup, a rule a few compares.
const MIN_RUN: usize = 2;

/// A compiled chain as the programs hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packed {
    /// iptables' entries, then ip6tables': each at most [`MAX_RULES_PER_FAMILY`], in walk
    /// order; the index in the workload's table of `entries[f][i]` is
    /// `f * MAX_RULES_PER_FAMILY + i`.
    pub entries: [Vec<Rule>; 2],
    pub cidrs: Vec<CidrMember>,
    pub ports: Vec<PortMember>,
}

/// A member of a CIDR set entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrMember {
    /// The entry's index in the workload's table.
    pub entry: u32,
    /// The CIDR, [`crate::addr`] form (the network's address, its mask).
    pub addr: Addr,
    pub mask: Addr,
    pub member: SetMember,
}

/// A member of a port set entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMember {
    pub entry: u16,
    pub proto: u8,
    pub port: u16,
    pub member: SetMember,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cidr,
    Port,
}

/// Packs `rules` (one [`compile`](super::compile) answer, each rule's `slot` its index), whose
/// `-i`/`-o IFACE` matches name entries of `interfaces` (the workload's interface list, entry
/// `i` the bit `1 << i`).
pub fn pack(rules: &[Rule], interfaces: &[Interface]) -> Result<Packed, TooManyRules> {
    let mut packed = Packed::default();
    for (half, family) in [Family::V4, Family::V6].into_iter().enumerate() {
        let of_family = by_interface(rules.iter().filter(|r| r.family == family as u8), interfaces);
        let mut i = 0;
        while i < of_family.len() {
            let index = half * MAX_RULES_PER_FAMILY + packed.entries[half].len();
            if let Some((width, tuples)) = tuple_run_at(&of_family[i..]) {
                // One port set entry per position of the tuples, in the tuples' order.
                for pos in 0..width {
                    let members = (0..tuples).map(|t| &of_family[i + t * width + pos]);
                    let entry = port_set(&of_family[i + pos], members, index + pos, &mut packed.ports);
                    packed.entries[half].push(entry);
                }
                i += width * tuples;
                continue;
            }
            let (run, kind) = run_at(&of_family[i..]);
            let mut entry = of_family[i];
            match kind {
                Some(Kind::Cidr) if run.len() >= MIN_RUN => {
                    entry.has = (entry.has & !m::DST) | m::DST_SET;
                    (entry.dst_addr, entry.dst_mask, entry.slot) = (addr::UNSPECIFIED, addr::UNSPECIFIED, 0);
                    packed.cidrs.extend(cidr_members(run, index as u32));
                }
                Some(Kind::Port) if run.len() >= MIN_RUN => {
                    entry = port_set(&entry, run.iter(), index, &mut packed.ports)
                }
                // A rule on its own.
                _ => {
                    packed.entries[half].push(entry);
                    i += 1;
                    continue;
                }
            }
            packed.entries[half].push(entry);
            i += run.len();
        }
        if packed.entries[half].len() > MAX_RULES_PER_FAMILY {
            return Err(TooManyRules {
                needed: packed.entries[half].len(),
                family,
            });
        }
    }
    Ok(packed)
}

/// `rules` in walk order: each run of consecutive rules of one chain on interfaces (`-i`/`-o`,
/// not negated) whose entries pairwise name no interface in common is taken interface by
/// interface (see the module's doc), in the order the interfaces first appear. A rule on an
/// entry that could name a device of one already in the run starts the next run: runs keep
/// their order, so cutting one is always exact (`-c`'s RETURNs that follow `-k`'s rules, on
/// a name of theirs, cut there).
fn by_interface<'a>(rules: impl Iterator<Item = &'a Rule>, interfaces: &[Interface]) -> Vec<Rule> {
    let on_iface = |r: &Rule| r.has & m::IFACE != 0 && r.neg & m::IFACE == 0;
    let mut walk = Vec::new();
    // The run so far, and its masks (an IFACE rule's `uid` holds its entries' bits).
    let mut run: Vec<Rule> = Vec::new();
    let mut masks: Vec<u32> = Vec::new();
    let flush = |run: &mut Vec<Rule>, masks: &mut Vec<u32>, walk: &mut Vec<Rule>| {
        for mask in masks.drain(..) {
            walk.extend(run.iter().filter(|r| r.uid == mask));
        }
        run.clear();
    };
    for r in rules {
        let joins = on_iface(r)
            && run.first().is_none_or(|f| f.chain == r.chain)
            && (masks.contains(&r.uid) || masks.iter().all(|&m| never_both(m, r.uid, interfaces)));
        if !joins {
            flush(&mut run, &mut masks, &mut walk);
        }
        if on_iface(r) {
            if !masks.contains(&r.uid) {
                masks.push(r.uid);
            }
            run.push(*r);
        } else {
            walk.push(*r);
        }
    }
    flush(&mut run, &mut masks, &mut walk);
    walk
}

/// Whether no interface can be named by an entry of `x` and one of `y` (bits of `interfaces`).
fn never_both(x: u32, y: u32, interfaces: &[Interface]) -> bool {
    let beyond = |mask: u32| mask.checked_shr(interfaces.len() as u32).unwrap_or(0) != 0;
    if beyond(x) || beyond(y) {
        // A bit no entry stands for: nothing is known of what it names.
        return false;
    }
    let named = |mask: u32| {
        interfaces
            .iter()
            .enumerate()
            .filter(move |&(i, _)| 1u32.checked_shl(i as u32).is_some_and(|bit| mask & bit != 0))
            .map(|(_, name)| name)
    };
    named(x).all(|a| named(y).all(|b| !a.overlaps(b)))
}

/// The port set entry at `index` for `members` (rules of one shape, each on its own pair, the
/// first `first`): `first` with its pair taken out; the members go into `ports`.
fn port_set<'a>(
    first: &Rule,
    members: impl Iterator<Item = &'a Rule>,
    index: usize,
    ports: &mut Vec<PortMember>,
) -> Rule {
    let mut entry = *first;
    entry.has = (entry.has & !m::DPORT) | m::PORT_SET;
    (entry.proto, entry.dport, entry.slot) = (0, 0, 0);
    ports.extend(members.map(|r| PortMember {
        entry: index as u16,
        proto: r.proto,
        port: r.dport,
        member: SetMember::new(r.slot, r.slot),
    }));
    entry
}

/// A run of *tuples* at `rules[0]`: `width` (≥ 2) consecutive rules on one protocol and port,
/// then again on another pair, `tuples` (≥ [`MIN_RUN`]) times, each position keeping one shape
/// and no pair repeated, as TPROXY mode's `-b` writes them (per port, a RELATED,ESTABLISHED
/// jump to ISTIO_DIVERT, then a jump to ISTIO_TPROXY). Packed as one port set per position,
/// in position order. Exact: a packet can only match the rules of its own pair's tuple (the
/// others name other ports), and those stay in their order, each answering from its own set
/// with at most one member; so whatever the targets do (end the walk or go on), the same
/// rules count in the same order and the same one decides.
fn tuple_run_at(rules: &[Rule]) -> Option<(usize, usize)> {
    let pair = |r: &Rule| (r.proto, r.dport);
    let first = rules.first().filter(|r| on_port(r))?;
    let width = rules
        .iter()
        .take_while(|r| on_port(r) && pair(r) == pair(first))
        .count();
    if width < 2 {
        return None;
    }
    let mut seen = HashSet::from([pair(first)]);
    let mut tuples = 1;
    while let Some(next) = rules.get(tuples * width..(tuples + 1) * width) {
        let same = next
            .iter()
            .zip(&rules[..width])
            .all(|(r, f)| shape(r, Kind::Port) == shape(f, Kind::Port));
        if !same || next.iter().any(|r| !on_port(r) || pair(r) != pair(&next[0])) || !seen.insert(pair(&next[0])) {
            break;
        }
        tuples += 1;
    }
    (tuples >= MIN_RUN).then_some((width, tuples))
}

/// The run that starts at `rules[0]` and what varies in it: it alone, or it and the rules
/// after it it packs with.
fn run_at(rules: &[Rule]) -> (&[Rule], Option<Kind>) {
    let Some(kind) = rules.first().and_then(kind) else {
        return (rules.get(..1).unwrap_or_default(), None);
    };
    let mut end = 1;
    while end < rules.len() && joins(&rules[..end], &rules[end], kind) {
        end += 1;
    }
    (&rules[..end], Some(kind))
}

/// What a rule could be packed by: its one varying field. `None` for a rule no set can hold.
fn kind(r: &Rule) -> Option<Kind> {
    let t = Target::from_u8(r.target)?;
    // MARK and the jumps go on walking after they count, each matching rule counting.
    if !matches!(
        t,
        Target::Return | Target::Redirect | Target::InRedirect | Target::DnsRedirect | Target::Divert
    ) {
        return None;
    }
    let dst = r.has & m::DST != 0 && r.neg & m::DST == 0;
    let port = on_port(r);
    match (dst, port) {
        // The DNS rules (`-d SERVER -p tcp --dport 53`) vary in the server.
        (true, _) => Some(Kind::Cidr),
        (false, true) => Some(Kind::Port),
        (false, false) => None,
    }
}

/// A rule on one `-p PROTO --dport PORT` (not negated): what a port set can hold.
fn on_port(r: &Rule) -> bool {
    r.has & m::DPORT != 0 && r.neg & m::DPORT == 0 && r.proto != 0
}

/// `r` without its slot and the field `kind` varies: equal for rules one set can hold.
fn shape(r: &Rule, kind: Kind) -> Rule {
    let mut x = *r;
    x.slot = 0;
    match kind {
        Kind::Cidr => (x.dst_addr, x.dst_mask) = (addr::UNSPECIFIED, addr::UNSPECIFIED),
        Kind::Port => (x.proto, x.dport) = (0, 0),
    }
    x
}

/// Whether `r` joins the run `run` of `kind`: the same rule but for the varying field, not a
/// repeat of a member, and for a REDIRECT a UDP flow walks past (see the module's doc), not
/// overlapping any member.
fn joins(run: &[Rule], r: &Rule, kind: Kind) -> bool {
    if shape(r, kind) != shape(&run[0], kind) || self::kind(r) != Some(kind) {
        return false;
    }
    match kind {
        Kind::Cidr => {
            let walks_past = walked_past(r);
            run.iter().all(|x| {
                let (a, b) = (cidr(x), cidr(r));
                a != b && !(walks_past && (contains(a, b) || contains(b, a)))
            })
        }
        // A pair repeated is the one overlap ports have.
        Kind::Port => run.iter().all(|x| (x.proto, x.dport) != (r.proto, r.dport)),
    }
}

/// A REDIRECT a UDP flow can match: ISTIO_REDIRECT and ISTIO_IN_REDIRECT hold one `-p tcp`
/// rule, so it comes back and walks on (`redirect_walk_chain`).
fn walked_past(r: &Rule) -> bool {
    let t = r.target;
    (t == Target::Redirect as u8 || t == Target::InRedirect as u8) && r.proto != IPPROTO_TCP
}

/// A rule's `-d` CIDR: its network's address and its mask.
fn cidr(r: &Rule) -> (Addr, Addr) {
    (addr::and(&r.dst_addr, &r.dst_mask), r.dst_mask)
}

/// Whether CIDR `outer` holds every address of `inner`.
fn contains(outer: (Addr, Addr), inner: (Addr, Addr)) -> bool {
    addr::mask_prefix(&outer.1) <= addr::mask_prefix(&inner.1) && addr::and(&inner.0, &outer.1) == outer.0
}

/// The members of a CIDR run, each answering with the earliest member that contains it:
/// looked up by each prefix of its own (at most 129), not by comparing every pair, so that a
/// list of thousands costs milliseconds.
fn cidr_members(run: &[Rule], entry: u32) -> Vec<CidrMember> {
    let mut first: HashMap<(Addr, u8), u32> = HashMap::new();
    for r in run {
        let (net, mask) = cidr(r);
        let slot = first.entry((net, addr::mask_prefix(&mask))).or_insert(r.slot);
        *slot = (*slot).min(r.slot);
    }
    run.iter()
        .map(|r| {
            let (net, mask) = cidr(r);
            let decides = (0..=addr::mask_prefix(&mask))
                .filter_map(|p| first.get(&(addr::and(&net, &addr::prefix_mask(p)), p)))
                .copied()
                .min()
                .unwrap_or(r.slot);
            CidrMember {
                entry,
                addr: net,
                mask,
                member: SetMember::new(decides, r.slot),
            }
        })
        .collect()
}

/// The rules of `packed` as [`compile`](super::compile) listed them, from its entries and
/// their members: what `stats` lists from the kernel's maps. Rules the kernel holds no
/// member for (a map entry lost) are missing, which a reader sees as a gap in the slots.
pub fn unpack(entries: &[(usize, Rule)], cidrs: &[CidrMember], ports: &[PortMember]) -> Vec<Rule> {
    let mut rules = Vec::new();
    for &(index, entry) in entries {
        if entry.has & m::DST_SET != 0 {
            rules.extend(cidrs.iter().filter(|c| c.entry as usize == index).map(|c| {
                let mut r = entry;
                r.has = (r.has & !m::DST_SET) | m::DST;
                (r.dst_addr, r.dst_mask, r.slot) = (c.addr, c.mask, c.member.own);
                r
            }));
        } else if entry.has & m::PORT_SET != 0 {
            rules.extend(ports.iter().filter(|p| p.entry as usize == index).map(|p| {
                let mut r = entry;
                r.has = (r.has & !m::PORT_SET) | m::DPORT;
                (r.proto, r.dport, r.slot) = (p.proto, p.port, p.member.own);
                r
            }));
        } else {
            rules.push(entry);
        }
    }
    rules.sort_by_key(|r| r.slot);
    rules
}

//! Walking one chain of a workload's rules, shared by the programs that implement the chains
//! (connect4/connect6: ISTIO_OUTPUT and, in TPROXY mode, mangle OUTPUT; sk_lookup:
//! ISTIO_INBOUND, nat's or in TPROXY mode mangle's, and ISTIO_TPROXY; tc ingress of a `-k`
//! device: nat PREROUTING's `-k` rules and, in TPROXY mode, mangle's ISTIO_INBOUND).
use redirect_common::{
    ChainId, ConnFacts, IPPROTO_UDP, MAX_RULES_PER_FAMILY, Rule, Target, Workload, addr::Family, m, workload_flags,
};

/// Set in the walk's `chain` byte: walk without counting (a UDP flow's later datagrams).
const NO_COUNT: u8 = 0x80;

use crate::maps::{cidr_member, count, port_member};

/// As iptables walks a chain: the first rule of `chain` that matches decides, and its counter
/// slot counts the decision. `None` when no rule matches (the chain falls through, which for
/// these chains means the connection is left alone). Only the table of the connection's
/// family is walked: iptables' for IPv4 (v4-mapped included), ip6tables' for IPv6.
#[inline(always)]
pub fn decide(
    netns_cookie: u64,
    workload: &Workload,
    chain: ChainId,
    facts: &ConnFacts,
    counting: bool,
) -> Option<Target> {
    walk(netns_cookie, workload, chain, facts, counting, false)
}

/// [`decide`], saying whether ISTIO_TPROXY's one rule matches the connection: a jump there
/// then decides (TPROXY), else the walk comes back and goes on.
#[inline(always)]
fn walk(
    netns_cookie: u64,
    workload: &Workload,
    chain: ChainId,
    facts: &ConnFacts,
    counting: bool,
    tproxy: bool,
) -> Option<Target> {
    let (half, n) = if facts.family == Family::V6 as u8 {
        (MAX_RULES_PER_FAMILY, workload.n_rules6)
    } else {
        (0, workload.n_rules)
    };
    // SAFETY: the two halves of `rules` are each a whole `[Rule; MAX_RULES_PER_FAMILY]`
    // (`MAX_RULES` is twice it), so the pointer at `half` is one to such an array, live for
    // the call as `workload` is; `facts` comes from a reference.
    let target = unsafe {
        let table = (&raw const workload.rules[half]).cast::<[Rule; MAX_RULES_PER_FAMILY]>();
        let chain = chain as u8 | if counting { 0 } else { NO_COUNT };
        let walk = Walk::new(n.min(MAX_RULES_PER_FAMILY as u32), chain, half as u32, tproxy);
        redirect_walk_chain(table, walk.0, netns_cookie, facts)
    };
    Target::from_u8(target)
}

/// The walk's scalar arguments in one word (a global function takes five arguments at most):
/// the entries in use (bits 0-7), the chain byte with [`NO_COUNT`] (8-15), the index of the
/// table's first entry in the workload's `rules` (16-23), which names its set entries, and
/// whether ISTIO_TPROXY's rule matches (bit 24). Not in the connection's facts: a copy of those
/// with it set would cost every inbound caller a frame the size of the facts, and tc ingress's
/// call chain is within a few bytes of the 512 the verifier allows it.
#[derive(Clone, Copy)]
struct Walk(u32);

impl Walk {
    const fn new(n: u32, chain: u8, first: u32, tproxy: bool) -> Self {
        Self((n & 0xff) | (chain as u32) << 8 | (first & 0xff) << 16 | (tproxy as u32) << 24)
    }

    const fn tproxy(self) -> bool {
        self.0 >> 24 & 1 != 0
    }

    const fn n(self) -> usize {
        (self.0 & 0xff) as usize
    }

    const fn chain(self) -> u8 {
        (self.0 >> 8) as u8
    }

    const fn first(self) -> u32 {
        (self.0 >> 16) & 0xff
    }
}

/// ISTIO_INBOUND's verdict, nat's, or in TPROXY mode mangle's. ISTIO_TPROXY's one rule is
/// judged first, uncounted, so that the walk knows what a jump there meets; a jump that
/// decides is then counted at that rule too.
#[inline(always)]
pub fn inbound(netns_cookie: u64, workload: &Workload, facts: &ConnFacts) -> Option<Target> {
    let tproxy = workload.flags & workload_flags::TPROXY != 0
        && decide(netns_cookie, workload, ChainId::Tproxy, facts, false) == Some(Target::Tproxy);
    let verdict = walk(netns_cookie, workload, ChainId::Inbound, facts, true, tproxy);
    if verdict == Some(Target::JumpTproxy) {
        let _ = decide(netns_cookie, workload, ChainId::Tproxy, facts, true);
        return Some(Target::Tproxy);
    }
    verdict
}

/// The walk itself, as a *global* BPF function: the verifier checks it once, on its own, for
/// any table and any connection (its arguments as the BTF types say, the pointers possibly
/// null), and a call to it costs the caller one step. Inlined, or as a static function, it is
/// verified again for every distinct state a caller reaches it in: connect6's paths (IPv4 or
/// IPv6, `0.0.0.0`/`::` resolved or not, over `lo` or not) times the rules took the verifier
/// past a million instructions, and seconds per program. It takes one family's table (a fixed
/// half of the workload's rules) so that its loop is a family's 64 entries, not both tables'.
/// `walk` ([`Walk`]) says how many are in use, which chain, and where the table starts.
/// A set entry's match on its varying field is one lookup of its members
/// (`redirect_common::chain::pack`), which also says which rule of the run to count.
/// Returns the deciding rule's `target` byte, 0 when none decides.
///
/// # Safety
///
/// Each pointer is null or points at a whole, live value of its type for the call (`table`
/// into WORKLOADS, see `maps::workload`; `facts` on the caller's stack). The verifier holds
/// every caller to that: it checks each pointer argument of a global function as memory of its
/// BTF type's size, possibly null.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn redirect_walk_chain(
    table: *const [Rule; MAX_RULES_PER_FAMILY],
    walk: u32,
    netns_cookie: u64,
    facts: *const ConnFacts,
) -> u8 {
    if table.is_null() || facts.is_null() {
        return 0;
    }
    // SAFETY: both are non-null (checked above), and by this function's contract point at
    // whole, live values of their types.
    let (table, facts) = unsafe { (&*table, &*facts) };
    let walk = Walk(walk);
    let n = walk.n();
    let counting = walk.chain() & NO_COUNT == 0;
    let chain = walk.chain() & !NO_COUNT;
    for (i, rule) in table.iter().enumerate() {
        if i >= n {
            return 0;
        }
        // ISTIO_OUTPUT_DNS's rules follow ISTIO_OUTPUT's jump to it: walked in place, they
        // decide as the chain would, and fall back into ISTIO_OUTPUT when none does.
        let in_chain =
            rule.chain == chain || (chain == ChainId::Output as u8 && rule.chain == ChainId::OutputDns as u8);
        if !in_chain || !rule.matches(facts) {
            continue;
        }
        let entry = walk.first() + i as u32;
        let slot = if rule.has & m::DST_SET != 0 {
            cidr_member(netns_cookie, entry, &facts.dst_addr)
        } else if rule.has & m::PORT_SET != 0 {
            port_member(netns_cookie, entry, facts.proto, facts.dst_port)
        } else {
            Some(rule.slot)
        };
        let Some(slot) = slot else {
            continue;
        };
        if counting {
            count(netns_cookie, slot);
        }
        // A jump to ISTIO_OUTPUT_DNS goes on into its rules. ISTIO_REDIRECT and
        // ISTIO_IN_REDIRECT hold one `-p tcp` REDIRECT each: a UDP flow jumping there matches
        // nothing and comes back to walk on. So does a jump to ISTIO_TPROXY whose one rule
        // does not match (the caller worked that out first: `Walk::tproxy`); one that
        // does decides, and the caller counts that rule.
        let t = rule.target;
        // MARK does not end iptables' walk either: a counted walk goes past it, counting each
        // one that matches; an uncounted one stops at the first, to say that one did.
        let passes = t == Target::JumpDns as u8
            || (facts.proto == IPPROTO_UDP && (t == Target::Redirect as u8 || t == Target::InRedirect as u8))
            || (t == Target::JumpTproxy as u8 && !walk.tproxy())
            || (t == Target::Mark as u8 && counting);
        if passes {
            continue;
        }
        return t;
    }
    0
}

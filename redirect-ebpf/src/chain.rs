//! Walking one chain of a workload's rules, shared by the programs that implement the chains
//! (connect4/connect6: ISTIO_OUTPUT and, in TPROXY mode, mangle OUTPUT; sk_lookup:
//! ISTIO_INBOUND, nat's or in TPROXY mode mangle's, and ISTIO_TPROXY; tc ingress of a `-k`
//! device: nat PREROUTING's `-k` rules and, in TPROXY mode, mangle's ISTIO_INBOUND).
use redirect_common::{
    ChainId, ConnFacts, IPPROTO_UDP, MAX_RULES_PER_FAMILY, Rule, Target, Workload, addr::Family, workload_flags,
};

/// Set in the walk's `chain` byte: walk without counting (a UDP flow's later datagrams).
const NO_COUNT: u8 = 0x80;

use crate::maps::count;

/// As iptables walks a chain: the first rule of `chain` that matches decides, and its counter
/// slot counts the decision. `None` when no rule matches (the chain falls through, which for
/// these chains means the connection is left alone). Only the table of the connection's
/// family is walked: iptables' for IPv4 (v4-mapped included), ip6tables' for IPv6.
#[inline(always)]
pub fn decide(workload: &Workload, chain: ChainId, facts: &ConnFacts, counting: bool) -> Option<Target> {
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
        redirect_walk_chain(table, n, workload.counter_base + half as u32, chain, facts)
    };
    Target::from_u8(target)
}

/// ISTIO_INBOUND's verdict, nat's, or in TPROXY mode mangle's. ISTIO_TPROXY's one rule is
/// judged first, uncounted, so that the walk knows what a jump there meets; a jump that
/// decides is then counted at that rule too.
#[inline(always)]
pub fn inbound(workload: &Workload, facts: &ConnFacts) -> Option<Target> {
    let tproxy = workload.flags & workload_flags::TPROXY != 0
        && decide(workload, ChainId::Tproxy, facts, false) == Some(Target::Tproxy);
    let facts = ConnFacts { tproxy, ..*facts };
    let verdict = decide(workload, ChainId::Inbound, &facts, true);
    if verdict == Some(Target::JumpTproxy) {
        let _ = decide(workload, ChainId::Tproxy, &facts, true);
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
/// half of the workload's rules) so that its loop is a family's 64 rules, not both tables'.
/// `n` ends the loop early. Returns the deciding rule's `target` byte, 0 when none decides.
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
    n: u32,
    first_slot: u32,
    chain: u8,
    facts: *const ConnFacts,
) -> u8 {
    if table.is_null() || facts.is_null() {
        return 0;
    }
    // SAFETY: both are non-null (checked above), and by this function's contract point at
    // whole, live values of their types.
    let (table, facts) = unsafe { (&*table, &*facts) };
    let n = n as usize;
    let counting = chain & NO_COUNT == 0;
    let chain = chain & !NO_COUNT;
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
        if counting {
            count(first_slot + i as u32);
        }
        // A jump to ISTIO_OUTPUT_DNS goes on into its rules. ISTIO_REDIRECT and
        // ISTIO_IN_REDIRECT hold one `-p tcp` REDIRECT each: a UDP flow jumping there matches
        // nothing and comes back to walk on. So does a jump to ISTIO_TPROXY whose one rule
        // does not match (the caller worked that out first: `ConnFacts::tproxy`); one that
        // does decides, and the caller counts that rule.
        let t = rule.target;
        // MARK does not end iptables' walk either: a counted walk goes past it, counting each
        // one that matches; an uncounted one stops at the first, to say that one did.
        let passes = t == Target::JumpDns as u8
            || (facts.proto == IPPROTO_UDP && (t == Target::Redirect as u8 || t == Target::InRedirect as u8))
            || (t == Target::JumpTproxy as u8 && !facts.tproxy)
            || (t == Target::Mark as u8 && counting);
        if passes {
            continue;
        }
        return t;
    }
    0
}

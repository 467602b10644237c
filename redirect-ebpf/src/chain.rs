//! Walking one chain of a workload's rules, shared by the programs that implement the chains
//! (connect4/connect6: ISTIO_OUTPUT, sk_lookup: ISTIO_INBOUND).
use redirect_common::{ChainId, ConnFacts, MAX_RULES, Target, Workload};

use crate::maps::count;

/// As iptables walks a chain: the first rule of `chain` that matches decides, and its counter
/// slot counts the decision. `None` when no rule matches (the chain falls through, which for
/// these chains means the connection is left alone).
#[inline(always)]
pub fn decide(workload: &Workload, chain: ChainId, facts: &ConnFacts) -> Option<Target> {
    Target::from_u8(walk(workload, chain as u8, facts))
}

/// The walk itself, as a BPF-to-BPF call rather than inlined: the verifier then leaves the
/// loop's up-to-64 exits (one per rule that can decide) inside this frame, and the caller goes
/// on from one state per returned target, instead of walking the rest of the program once per
/// exit (connect6 went past the verifier's 1M-instruction budget that way). The loop is
/// bounded by `MAX_RULES` for the verifier; `n_rules` ends it early. Returns the deciding
/// rule's `target` byte, 0 when none decides.
#[inline(never)]
fn walk(workload: &Workload, chain: u8, facts: &ConnFacts) -> u8 {
    let n = workload.n_rules as usize;
    for i in 0..MAX_RULES {
        if i >= n {
            return 0;
        }
        let rule = &workload.rules[i];
        if rule.chain != chain || !rule.matches(facts) {
            continue;
        }
        count(workload.counter_base + i as u32);
        return rule.target;
    }
    0
}

//! Walking one chain of a workload's rules, shared by the programs that implement the chains
//! (connect4: ISTIO_OUTPUT, sk_lookup: ISTIO_INBOUND).
use redirect_common::{ChainId, ConnFacts, MAX_RULES, Target, Workload};

use crate::maps::count;

/// As iptables walks a chain: the first rule of `chain` that matches decides, and its counter
/// slot counts the decision. `None` when no rule matches (the chain falls through, which for
/// these chains means the connection is left alone). The loop is bounded by `MAX_RULES` for the
/// verifier; `n_rules` ends it early.
#[inline(always)]
pub fn decide(workload: &Workload, chain: ChainId, facts: &ConnFacts) -> Option<Target> {
    let n = workload.n_rules as usize;
    for i in 0..MAX_RULES {
        if i >= n {
            return None;
        }
        let rule = &workload.rules[i];
        if rule.chain != chain as u8 || !rule.matches(facts) {
            continue;
        }
        count(workload.counter_base + i as u32);
        return Target::from_u8(rule.target);
    }
    None
}

//! Walking one chain of a workload's rules, shared by the programs that implement the chains
//! (connect4/connect6: ISTIO_OUTPUT, sk_lookup: ISTIO_INBOUND).
use redirect_common::{ChainId, ConnFacts, MAX_RULES, Target, Workload};

use crate::maps::count;

/// As iptables walks a chain: the first rule of `chain` that matches decides, and its counter
/// slot counts the decision. `None` when no rule matches (the chain falls through, which for
/// these chains means the connection is left alone).
#[inline(always)]
pub fn decide(workload: &Workload, chain: ChainId, facts: &ConnFacts) -> Option<Target> {
    Target::from_u8(redirect_walk_chain(workload, chain as u8, facts))
}

/// The walk itself, as a *global* BPF function: the verifier checks it once, on its own, for
/// any workload and any connection (its arguments as the BTF types say, the pointers possibly
/// null), and a call to it costs the caller one step. Inlined, or as a static function, it is
/// verified again for every distinct state a caller reaches it in: connect6's paths (IPv4 or
/// IPv6, `0.0.0.0`/`::` resolved or not, over `lo` or not) times 64 rules took the verifier
/// past a million instructions, and seconds per program. The loop is bounded by `MAX_RULES`;
/// `n_rules` ends it early. Returns the deciding rule's `target` byte, 0 when none decides.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn redirect_walk_chain(workload: *const Workload, chain: u8, facts: *const ConnFacts) -> u8 {
    if workload.is_null() || facts.is_null() {
        return 0;
    }
    // SAFETY: both are non-null (checked above) and, from every caller, point at a whole value
    // of their type: `workload` into WORKLOADS (see `maps::workload`), `facts` at the caller's
    // stack. The verifier checks the global function against exactly that: each pointer
    // argument is memory of its BTF type's size, possibly null.
    let (workload, facts) = unsafe { (&*workload, &*facts) };
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

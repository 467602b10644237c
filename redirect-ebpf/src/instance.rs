//! What a per-workload instance of the object knows: the namespace it serves. sk_lookup and
//! the tc programs of `-k` devices run in a namespace without a helper that names it
//! (`bpf_get_netns_cookie` is offered to neither before 6.15, nor `bpf_get_attach_cookie`),
//! so the agent loads one instance of them per workload with the cookie as a constant.
use aya_ebpf::Global;

/// The cookie of the network namespace this instance is linked to
/// (`redirect_common::globals::SK_LOOKUP_NETNS_COOKIE`): set by the agent when it loads the
/// instance for one workload, in a frozen read-only map. 0 (no namespace has it) in the
/// instance the agent loads only to verify the programs: that one decides nothing. Not checked
/// for 0, so that the verifier, which knows the constant, still walks the whole programs.
#[unsafe(no_mangle)]
pub static NETNS_COOKIE: Global<u64> = Global::new(0);

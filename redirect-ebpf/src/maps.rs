//! Maps, named for what they hold. Sizes here are defaults; the agent resizes the connection
//! maps at load time (`--max-tracked-connections`).
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use redirect_common::{LocalAddrKey, MAX_RULES, MAX_WORKLOADS, OrigDst, PendingOrigDst, TupleKey, Workload};

/// netns cookie -> that workload's chains. Written by the agent only.
#[map]
pub static WORKLOADS: HashMap<u64, Workload> = HashMap::with_max_entries(MAX_WORKLOADS, 0);

/// Addresses of each workload's network namespace (what `-o lo` reaches besides 127/8).
#[map]
pub static LOCAL_ADDRS: HashMap<LocalAddrKey, u8> = HashMap::with_max_entries(4096, 0);

/// One slot per rule per workload: `Workload::counter_base + rule index`.
#[map]
pub static RULE_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_WORKLOADS * MAX_RULES as u32, 0);

/// Socket cookie -> original destination, from connect() until the handshake completes.
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, PendingOrigDst> = LruHashMap::with_max_entries(65536, 0);

/// Connection 4-tuple (+ netns) -> original destination, while the connection lives. The
/// proxy finds it from its accepted socket's addresses.
#[map]
pub static ORIG_BY_TUPLE: LruHashMap<TupleKey, OrigDst> = LruHashMap::with_max_entries(65536, 0);

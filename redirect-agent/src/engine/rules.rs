//! A workload's rules beyond its `WORKLOADS` entry: one counter per rule (`RULE_COUNTERS`) and
//! the members of its set entries (`CIDR_SETS`, `PORT_SETS`; `chain::pack`). Written before
//! the entry that makes the workload live, removed with it.

use std::collections::{BTreeMap, HashSet};

use aya::maps::{HashMap, MapData, MapError, lpm_trie::Key, lpm_trie::LpmTrie};
use redirect_common::{
    CidrSetKey, CounterKey, MAX_RULE_COUNTERS, MAX_SET_MEMBERS, PortSetKey, SetMember,
    chain::{CidrMember, Packed, PortMember},
    maps,
};

use rustix::io::Errno;

use super::EnrollError;
use crate::error::LoadError;

/// The update flag that adds a key only if it is absent (`linux/bpf.h`).
const BPF_NOEXIST: u64 = 1;

pub(super) struct RuleMaps {
    pub(super) counters: HashMap<MapData, CounterKey, u64>,
    pub(super) cidrs: LpmTrie<MapData, CidrSetKey, SetMember>,
    pub(super) ports: HashMap<MapData, PortSetKey, SetMember>,
    /// The keys of each workload this process installed, so that removing one deletes those
    /// rather than reading through maps that hold every workload's.
    installed: BTreeMap<u64, Installed>,
}

#[derive(Default)]
struct Installed {
    counters: u32,
    /// The trie keys, as (prefix length, data): aya's `Key` is not `Hash`.
    cidrs: HashSet<(u32, CidrSetKey)>,
    ports: HashSet<PortSetKey>,
}

impl Installed {
    fn has_counter(&self, k: &CounterKey) -> bool {
        k.slot < self.counters
    }

    fn has_cidr(&self, k: &Key<CidrSetKey>) -> bool {
        self.cidrs.contains(&(k.prefix_len(), k.data()))
    }
}

/// The trie key of a CIDR member.
fn cidr_key(netns_cookie: u64, c: &CidrMember) -> Key<CidrSetKey> {
    Key::new(
        CidrSetKey::prefix_len(&c.mask),
        CidrSetKey::new(netns_cookie, c.entry, c.addr),
    )
}

fn port_key(netns_cookie: u64, p: &PortMember) -> PortSetKey {
    PortSetKey::new(netns_cookie, p.entry, p.proto, p.port)
}

impl RuleMaps {
    pub(super) fn new(
        counters: HashMap<MapData, CounterKey, u64>,
        cidrs: LpmTrie<MapData, CidrSetKey, SetMember>,
        ports: HashMap<MapData, PortSetKey, SetMember>,
    ) -> Self {
        Self {
            counters,
            cidrs,
            ports,
            installed: BTreeMap::new(),
        }
    }

    /// Writes the counters of `rules` rules (zeroed, or with `keep_counts` left as a
    /// predecessor counted them) and the members of `packed`'s sets. On an error the caller's
    /// purge removes what was written ([`RuleMaps::remove`]).
    pub(super) fn install(
        &mut self,
        netns_cookie: u64,
        rules: usize,
        packed: &Packed,
        keep_counts: bool,
    ) -> Result<(), EnrollError> {
        let installed = Installed {
            counters: rules as u32,
            cidrs: packed
                .cidrs
                .iter()
                .map(|c| {
                    let k = cidr_key(netns_cookie, c);
                    (k.prefix_len(), k.data())
                })
                .collect(),
            ports: packed.ports.iter().map(|p| port_key(netns_cookie, p)).collect(),
        };
        // Noted first: a failure part-way removes whatever of it got in.
        self.installed.insert(netns_cookie, installed);
        // BPF_NOEXIST: a handed-over workload's counters go on from where they are.
        let flags = if keep_counts { BPF_NOEXIST } else { 0 };
        for slot in 0..rules as u32 {
            match self.counters.insert(CounterKey::new(netns_cookie, slot), 0, flags) {
                Err(e) if keep_counts && errno(&e) == Some(Errno::EXIST.raw_os_error()) => {}
                r => r.map_err(full(maps::RULE_COUNTERS, rules, MAX_RULE_COUNTERS))?,
            }
        }
        for c in &packed.cidrs {
            self.cidrs
                .insert(&cidr_key(netns_cookie, c), c.member, 0)
                .map_err(full(maps::CIDR_SETS, packed.cidrs.len(), MAX_SET_MEMBERS))?;
        }
        for p in &packed.ports {
            self.ports.insert(port_key(netns_cookie, p), p.member, 0).map_err(full(
                maps::PORT_SETS,
                packed.ports.len(),
                MAX_SET_MEMBERS,
            ))?;
        }
        Ok(())
    }

    /// Removes every entry of workload `netns_cookie`: those this process installed by their
    /// keys, any other's (a predecessor's, a failed start's) by reading the maps through.
    pub(super) fn remove(&mut self, netns_cookie: u64) {
        match self.installed.remove(&netns_cookie) {
            Some(i) => {
                for slot in 0..i.counters {
                    let _ = self.counters.remove(&CounterKey::new(netns_cookie, slot));
                }
                for &(prefix_len, data) in &i.cidrs {
                    let _ = self.cidrs.remove(&Key::new(prefix_len, data));
                }
                for k in &i.ports {
                    let _ = self.ports.remove(k);
                }
            }
            None => {
                self.prune(|cookie| cookie != netns_cookie);
            }
        }
    }

    /// Reads each map through once and removes what no workload should have there: every
    /// entry of a workload this process did not install and `keep_other` says no to (one no
    /// state names, after a crash), and the entries of an installed workload that it did not
    /// write itself. Those are an adopted predecessor's for other flags (a `run` started again
    /// with other lists takes over the killed one's workload): left, a member would answer in
    /// one of this chain's set entries. Returns how many went.
    pub(super) fn prune(&mut self, keep_other: impl Fn(u64) -> bool) -> usize {
        let installed = &self.installed;
        let stale = |cookie: u64, ours: &dyn Fn(&Installed) -> bool| match installed.get(&cookie) {
            Some(i) => !ours(i),
            None => !keep_other(cookie),
        };
        let counters: Vec<CounterKey> = self
            .counters
            .keys()
            .filter_map(Result::ok)
            .filter(|k| stale(k.netns_cookie, &|i| i.has_counter(k)))
            .collect();
        let cidrs: Vec<Key<CidrSetKey>> = self
            .cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| stale(k.data().netns_cookie(), &|i| i.has_cidr(k)))
            .collect();
        let ports: Vec<PortSetKey> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| stale(k.netns_cookie, &|i| i.ports.contains(k)))
            .collect();
        let n = counters.len() + cidrs.len() + ports.len();
        for k in &counters {
            let _ = self.counters.remove(k);
        }
        for k in &cidrs {
            let _ = self.cidrs.remove(k);
        }
        for k in &ports {
            let _ = self.ports.remove(k);
        }
        n
    }
}

fn errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// A map error, as [`EnrollError::RulesFull`] when the map has no room left.
fn full(map: &'static str, needed: usize, max: u32) -> impl Fn(MapError) -> EnrollError {
    move |source| {
        let no_room = [Errno::TOOBIG, Errno::NOSPC, Errno::NOMEM].map(Errno::raw_os_error);
        match errno(&source) {
            Some(e) if no_room.contains(&e) => EnrollError::RulesFull { map, needed, max },
            _ => EnrollError::Load(LoadError::Map { map, source }),
        }
    }
}

/// Every workload's set members as the maps hold them, by netns cookie: what `stats` lists
/// their rules from. One pass over each map, however many workloads are read.
pub(crate) fn members(
    cidrs: &LpmTrie<MapData, CidrSetKey, SetMember>,
    ports: &HashMap<MapData, PortSetKey, SetMember>,
) -> BTreeMap<u64, (Vec<CidrMember>, Vec<PortMember>)> {
    let mut out: BTreeMap<u64, (Vec<CidrMember>, Vec<PortMember>)> = BTreeMap::new();
    for (k, member) in cidrs.iter().filter_map(Result::ok) {
        let d = k.data();
        // The key's length less the namespace's and the entry's bits: the CIDR's prefix.
        let prefix = k.prefix_len().saturating_sub(96).min(128) as u8;
        out.entry(d.netns_cookie()).or_default().0.push(CidrMember {
            entry: d.entry,
            addr: d.addr,
            mask: redirect_common::addr::prefix_mask(prefix),
            member,
        });
    }
    for (k, member) in ports.iter().filter_map(Result::ok) {
        out.entry(k.netns_cookie).or_default().1.push(PortMember {
            entry: k.entry,
            proto: k.proto,
            port: k.port,
            member,
        });
    }
    out
}

//! `redirect-agent stats`: a running instance's per-rule counters, read from its pins.
//!
//! Rows come from the chain the programs are evaluating (the `WORKLOADS` map, and the members
//! of its set entries in `CIDR_SETS` and `PORT_SETS`), not from the flags, so what is printed
//! is what the kernel runs.

use std::{collections::BTreeMap, fmt::Write as _};

use aya::maps::{Array, HashMap, MapData, lpm_trie::LpmTrie};
use redirect_common::{
    CounterKey, Workload,
    addr::Family,
    chain::{CidrMember, ListColumns, Names, PortMember, list_columns_named, match_text_named, unpack},
    events,
};
use serde::Serialize;

use crate::{
    engine::{
        open_typed,
        pins::{self, Mode, State},
    },
    error::LoadError,
};

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RuleRow {
    /// Whose table the chain is in: `ipv4` (iptables) or `ipv6` (ip6tables).
    #[serde(default = "ipv4")]
    pub family: String,
    /// The chain's table: `nat`, or `mangle` for TPROXY mode's inbound chains and marks.
    #[serde(default = "nat")]
    pub table: String,
    /// iptables chain name (`ISTIO_OUTPUT`, ...).
    pub chain: String,
    /// 1-based position in its chain, as `iptables -L --line-numbers` (ip6tables').
    pub rule: usize,
    /// Counter slot within the workload, as `explain` prints it.
    pub slot: usize,
    /// The rule's iptables-save matches, e.g. `-o lo -m owner ! --uid-owner 1337`.
    #[serde(rename = "match")]
    pub match_: String,
    pub target: String,
    pub connections: u64,
    /// The `iptables -L -v -n` columns, for the text view.
    #[serde(skip)]
    pub columns: Option<ListColumns>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WorkloadStats {
    pub netns_cookie: u64,
    /// The workload's id, for a node instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub rules: Vec<RuleRow>,
    /// Connections the agent made fail instead of serving (see `redirect_common::events`).
    pub events: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct InstanceStats {
    pub name: String,
    /// The first (for `run`, the only) workload's rows.
    pub rules: Vec<RuleRow>,
    /// The first workload's events.
    pub events: BTreeMap<String, u64>,
    pub workloads: Vec<WorkloadStats>,
}

fn ipv4() -> String {
    Family::V4.name().into()
}

fn nat() -> String {
    redirect_common::chain::Table::Nat.name().into()
}

/// What the kernel holds of every workload's rules besides its `WORKLOADS` entry: the
/// counters, and the set members read once for all workloads.
pub(crate) struct KernelRules<'a> {
    counters: &'a HashMap<MapData, CounterKey, u64>,
    members: BTreeMap<u64, (Vec<CidrMember>, Vec<PortMember>)>,
}

impl<'a> KernelRules<'a> {
    pub(crate) fn read(
        counters: &'a HashMap<MapData, CounterKey, u64>,
        cidrs: &LpmTrie<MapData, redirect_common::CidrSetKey, redirect_common::SetMember>,
        ports: &HashMap<MapData, redirect_common::PortSetKey, redirect_common::SetMember>,
    ) -> Self {
        Self {
            counters,
            members: crate::engine::set_members(cidrs, ports),
        }
    }
}

/// A workload's chain as the kernel runs it, rule by rule with its connections: what `stats`
/// prints and node mode's metrics expose.
/// `interfaces` names the entries of its interface list (the enrollment's record of them).
pub(crate) fn rows(
    w: &Workload,
    netns_cookie: u64,
    kernel: &KernelRules<'_>,
    interfaces: &[String],
) -> Result<Vec<RuleRow>, LoadError> {
    let mut out = Vec::new();
    let entries: Vec<(usize, redirect_common::Rule)> = w.entries().map(|(i, r)| (i, *r)).collect();
    let (cidrs, ports) = kernel
        .members
        .get(&netns_cookie)
        .map_or((&[][..], &[][..]), |(c, p)| (c.as_slice(), p.as_slice()));
    let rules = unpack(&entries, cidrs, ports);
    // ISTIO_OUTBOUND_OWNER_GROUPS' gids, as its rule lists them.
    let n = (w.n_owner_groups as usize).min(w.owner_groups.len());
    let groups: Vec<String> = w.owner_groups[..n].iter().map(u32::to_string).collect();
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    let ifaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    // Interface names are not in the kernel's copy of the chain, but in the enrollment's
    // record; without one, entries print by number.
    let names = Names {
        groups: &groups,
        ifaces: &ifaces,
    };
    // Each rule's position in its chain, as `iptables -L --line-numbers` numbers it.
    let mut position: BTreeMap<(u8, Option<u8>), usize> = BTreeMap::new();
    for r in &rules {
        let chain = r.chain_id();
        let rule = position.entry((r.family, chain.map(|c| c as u8))).or_default();
        *rule += 1;
        let connections = match kernel.counters.get(&CounterKey::new(netns_cookie, r.slot), 0) {
            Ok(n) => n,
            // A rule whose counter is gone (removed under a running stats) counted nothing
            // this process can see.
            Err(aya::maps::MapError::KeyNotFound) => 0,
            Err(source) => {
                return Err(LoadError::Map {
                    map: redirect_common::maps::RULE_COUNTERS,
                    source,
                });
            }
        };
        out.push(RuleRow {
            family: r.family_kind().map_or("?", Family::name).into(),
            table: redirect_common::chain::rule_table(r, w.flags, w.virt_ifaces)
                .name()
                .into(),
            chain: redirect_common::chain::chain_name(r).into(),
            rule: *rule,
            slot: r.slot as usize,
            match_: match_text_named(r, &names),
            target: redirect_common::chain::target_name(r),
            connections,
            columns: Some(list_columns_named(r, &names)),
        });
    }
    Ok(out)
}

fn sum(counters: &Array<MapData, u64>, slot: u32, map: &'static str) -> Result<u64, LoadError> {
    counters.get(&slot, 0).map_err(|source| LoadError::Map { map, source })
}

pub(crate) fn event_counts(w: &Workload, counters: &Array<MapData, u64>) -> Result<BTreeMap<String, u64>, LoadError> {
    let mut out = BTreeMap::new();
    for (e, name) in events::NAMES.iter().enumerate() {
        let n = sum(
            counters,
            w.event_base() + e as u32,
            redirect_common::maps::EVENT_COUNTERS,
        )?;
        out.insert((*name).to_owned(), n);
    }
    Ok(out)
}

pub fn read(name: &str) -> Result<InstanceStats, LoadError> {
    pins::validate_name(name)?;
    let dir = pins::pin_dir(name);
    if !dir.is_dir() {
        return Err(LoadError::NotRunning { name: name.into(), dir });
    }
    let workloads: HashMap<MapData, u64, Workload> = open_typed(&dir, redirect_common::maps::WORKLOADS)?;
    let counters: HashMap<MapData, CounterKey, u64> = open_typed(&dir, redirect_common::maps::RULE_COUNTERS)?;
    let cidrs = open_typed(&dir, redirect_common::maps::CIDR_SETS)?;
    let ports = open_typed(&dir, redirect_common::maps::PORT_SETS)?;
    let kernel = KernelRules::read(&counters, &cidrs, &ports);
    let events: Array<MapData, u64> = open_typed(&dir, redirect_common::maps::EVENT_COUNTERS)?;
    // A node instance names its workloads; a run instance has one, named by the instance.
    let state = State::read(name);
    let ids: BTreeMap<u64, String> = state
        .iter()
        .filter(|s| s.mode == Mode::Node)
        .flat_map(|s| s.workloads.iter().map(|w| (w.netns_cookie, w.id.clone())))
        .collect();
    let interfaces: BTreeMap<u64, Vec<String>> = state
        .iter()
        .flat_map(|s| s.workloads.iter().map(|w| (w.netns_cookie, w.interfaces.clone())))
        .collect();
    let mut all = Vec::new();
    for item in workloads.iter() {
        let (cookie, w) = item.map_err(|source| LoadError::Map {
            map: redirect_common::maps::WORKLOADS,
            source,
        })?;
        all.push(WorkloadStats {
            netns_cookie: cookie,
            id: ids.get(&cookie).cloned(),
            rules: rows(
                &w,
                cookie,
                &kernel,
                interfaces.get(&cookie).map_or(&[][..], Vec::as_slice),
            )?,
            events: event_counts(&w, &events)?,
        });
    }
    all.sort_by_key(|w| w.netns_cookie);
    Ok(InstanceStats {
        name: name.into(),
        rules: all.first().map(|w| w.rules.clone()).unwrap_or_default(),
        events: all.first().map(|w| w.events.clone()).unwrap_or_default(),
        workloads: all,
    })
}

/// `iptables -t nat -L ISTIO_OUTPUT -v -n --line-numbers` (and ip6tables' for the IPv6
/// chains), with connections for packets and the counter slot (as `explain` numbers it) in
/// front.
pub fn render_text(stats: &InstanceStats) -> String {
    let mut s = String::new();
    for w in &stats.workloads {
        let mut chain = ("", "", "");
        for row in &w.rules {
            if (row.family.as_str(), row.table.as_str(), row.chain.as_str()) != chain {
                chain = (&row.family, &row.table, &row.chain);
                let workload = w.id.as_deref().map(|id| format!("workload {id}, ")).unwrap_or_default();
                let tool = if row.family == Family::V6.name() {
                    "ip6tables"
                } else {
                    "iptables"
                };
                let _ = writeln!(
                    s,
                    "Chain {} ({tool} -t {}; instance {}, {workload}netns cookie {})",
                    row.chain, row.table, stats.name, w.netns_cookie
                );
                let header = format!(
                    "{:>4} {:>4} {:>8} {:<18} {:<4} {:<3} {:<4} {:<4} {:<18} {:<18}",
                    "slot", "num", "conns", "target", "prot", "opt", "in", "out", "source", "destination"
                );
                let _ = writeln!(s, "{}", header.trim_end());
            }
            let c = row.columns.clone().unwrap_or(ListColumns {
                prot: "?".into(),
                input: "?".into(),
                out: "?".into(),
                source: "?".into(),
                destination: "?".into(),
                extra: row.match_.clone(),
            });
            let (prot, input, out) = (c.prot, c.input, c.out);
            let (src, dst, extra) = (c.source, c.destination, c.extra);
            let line = format!(
                "{:>4} {:>4} {:>8} {:<18} {:<4} {:<3} {:<4} {:<4} {:<18} {:<18} {}",
                row.slot, row.rule, row.connections, row.target, prot, "--", input, out, src, dst, extra
            );
            let _ = writeln!(s, "{}", line.trim_end());
        }
        let failed: Vec<String> = w.events.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            s,
            "Connections failed on purpose (reset or refused): {}",
            failed.join(" ")
        );
    }
    if stats.workloads.is_empty() {
        let _ = writeln!(s, "instance {} has no workload configured", stats.name);
    }
    s
}

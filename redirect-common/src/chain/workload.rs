//! What the programs hold for a workload beyond its rules: its [`workload_flags`], its
//! interface list's `-k` entries, and the `WORKLOADS` entry itself.

use super::{Packed, group_gid};
use crate::{
    MAX_OWNER_GROUPS, MAX_RULES_PER_FAMILY, Workload,
    config::{CaptureConfig, InterceptionMode, OwnerGroups},
    workload_flags,
};

/// [`workload_flags`] for these flags.
pub fn flags(cfg: &CaptureConfig) -> u32 {
    let inbound = if cfg.inbound_ports.is_empty() {
        0
    } else {
        workload_flags::INBOUND
    };
    // `-c`'s rules match devices both ways; `-k`'s only what arrives, which sk_lookup tells
    // by `Workload::virt_ifaces` (connect4/6 need not look their route's device up for it).
    let ifaces = if cfg.exclude_interfaces.is_empty() {
        0
    } else {
        workload_flags::IFACES
    };
    let tproxy = if cfg.inbound_mode == InterceptionMode::Tproxy {
        workload_flags::TPROXY
    } else {
        0
    };
    let ambient = if cfg.ambient.is_some() {
        workload_flags::AMBIENT
    } else {
        0
    };
    inbound | ifaces | tproxy | ambient
}

/// The bits of the interface list's `-k` entries (they follow `-c`'s).
pub fn virt_entries(cfg: &CaptureConfig) -> u32 {
    virt_entry_bits(cfg).fold(0, |bits, bit| bits | bit)
}

/// Each `-k` entry's bit, in the list's order.
pub(super) fn virt_entry_bits(cfg: &CaptureConfig) -> impl Iterator<Item = u32> {
    let first = cfg.exclude_interfaces.len();
    (first..first + cfg.kube_virt_interfaces.len()).map(|i| 1u32.checked_shl(i as u32).unwrap_or(0))
}

/// How the agent serves a workload, beyond what its flags say: the [`workload_flags`] that
/// do not come from istio-iptables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Serving {
    /// Another proxy (the workload's own) listens on the capture ports.
    pub own_proxy: bool,
    /// Captured local pairs take the sk_msg fast path.
    pub fast_path: bool,
}

/// The `WORKLOADS` entry the programs run for these flags: the entries of `packed` ([`pack`]
/// of [`compile`]'s answer for the same flags), the capture ports, and the event counters of
/// `slot`.
pub fn workload(cfg: &CaptureConfig, packed: &Packed, slot: u32, serving: Serving) -> Workload {
    let mut w = Workload::empty();
    for (half, entries) in packed.entries.iter().enumerate() {
        let start = half * MAX_RULES_PER_FAMILY;
        // `pack` bounds each family's entries.
        let n = entries.len().min(MAX_RULES_PER_FAMILY);
        w.rules[start..start + n].copy_from_slice(&entries[..n]);
    }
    w.n_rules = packed.entries[0].len().min(MAX_RULES_PER_FAMILY) as u32;
    w.n_rules6 = packed.entries[1].len().min(MAX_RULES_PER_FAMILY) as u32;
    w.outbound_port = cfg.envoy_port;
    w.inbound_port = cfg.inbound_capture_port;
    w.flags = flags(cfg)
        | if serving.own_proxy {
            workload_flags::WORKLOAD_LISTENER
        } else {
            0
        }
        | if serving.fast_path {
            workload_flags::FAST_PATH
        } else {
            0
        };
    w.slot = slot;
    if cfg.inbound_mode == InterceptionMode::Tproxy {
        w.tproxy_mark = cfg.tproxy.mark;
    }
    w.virt_ifaces = virt_entries(cfg);
    if let OwnerGroups::Only(groups) = &cfg.owner_groups {
        for (i, g) in groups.iter().take(MAX_OWNER_GROUPS).enumerate() {
            w.owner_groups[i] = group_gid(g);
        }
        w.n_owner_groups = groups.len().min(MAX_OWNER_GROUPS) as u32;
    }
    w
}

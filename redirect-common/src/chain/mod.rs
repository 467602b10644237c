//! istio-iptables flags -> the rule chain, and rules -> iptables-save text.
//!
//! The order of [`compile`] is istio-iptables' `Run()` order
//! (`tools/istio-iptables/pkg/capture/run.go`). ISTIO_OUTPUT: per `-o` port RETURN, 127.0.0.6
//! RETURN, the three owner rules per UID then per GID, 127.0.0.1 RETURN, `-x` RETURNs, `-q`
//! redirects, then the `-i` include. ISTIO_INBOUND: the `-e` tunnel port RETURN, then with
//! `-b '*'` the `-d` RETURNs and a catch-all redirect, or one redirect per `-b` port.
//!
//! Both chains live in one list, ISTIO_OUTPUT first; a rule's index in it is its counter slot,
//! the number `explain` and `stats` print and the tests read.

use std::{net::Ipv4Addr, vec::Vec};

use crate::{
    ChainId, IPPROTO_TCP, IPPROTO_UDP, MAX_RULES, Rule, Target, Workload,
    config::{CaptureConfig, Include},
    m, prefix_mask, workload_flags,
};

/// Envoy's inbound passthrough source (`ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN`).
pub const INBOUND_PASSTHROUGH_SRC: Ipv4Addr = Ipv4Addr::from_bits(u32::from_be(crate::INBOUND_PASSTHROUGH_SRC_BE));
const LOCALHOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// The flags need more rules than one workload's chain holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooManyRules {
    pub needed: usize,
}

impl core::fmt::Display for TooManyRules {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "these flags need {} nat rules; redirect holds at most {MAX_RULES} per workload \
             (shorten the -i/-x CIDR or -o/-q port lists)",
            self.needed
        )
    }
}

impl std::error::Error for TooManyRules {}

struct Builder {
    rules: Vec<Rule>,
}

impl Builder {
    fn push(&mut self, r: Rule) {
        self.rules.push(r);
    }
}

fn out(target: Target) -> Rule {
    Rule::new(ChainId::Output, target)
}

fn with_dport(mut r: Rule, proto: u8, port: u16, negate: bool) -> Rule {
    r.proto = proto;
    r.has |= m::DPORT;
    r.dport = port;
    if negate {
        r.neg |= m::DPORT;
    }
    r
}

fn with_dst(mut r: Rule, addr: Ipv4Addr, prefix: u8, negate: bool) -> Rule {
    r.has |= m::DST;
    r.dst_mask = prefix_mask(prefix);
    r.dst_addr = u32::from(addr).to_be() & r.dst_mask;
    if negate {
        r.neg |= m::DST;
    }
    r
}

fn with_src(mut r: Rule, addr: Ipv4Addr, prefix: u8) -> Rule {
    r.has |= m::SRC;
    r.src_mask = prefix_mask(prefix);
    r.src_addr = u32::from(addr).to_be() & r.src_mask;
    r
}

fn out_lo(mut r: Rule) -> Rule {
    r.has |= m::OUT_LO;
    r
}

#[derive(Copy, Clone)]
enum Owner {
    Uid(u32),
    Gid(u32),
}

fn with_owner(mut r: Rule, owner: Owner, negate: bool) -> Rule {
    let bit = match owner {
        Owner::Uid(u) => {
            r.uid = u;
            m::UID
        }
        Owner::Gid(g) => {
            r.gid = g;
            m::GID
        }
    };
    r.has |= bit;
    if negate {
        r.neg |= bit;
    }
    r
}

/// The ISTIO_OUTPUT chain for these flags, in evaluation order.
pub fn compile(cfg: &CaptureConfig) -> Result<Vec<Rule>, TooManyRules> {
    let mut b = Builder { rules: Vec::new() };

    for &p in &cfg.outbound_exclude_ports {
        b.push(with_dport(out(Target::Return), IPPROTO_TCP, p, false));
        b.push(with_dport(out(Target::Return), IPPROTO_UDP, p, false));
    }

    b.push(out_lo(with_src(out(Target::Return), INBOUND_PASSTHROUGH_SRC, 32)));

    // istio-iptables skips the "app -> itself over lo" RETURN when -i names a loopback range.
    let include_has_loopback = match &cfg.outbound_cidrs {
        Include::All => false,
        Include::List(c) => c.iter().any(|c| c.addr.is_loopback()),
    };
    let owners = cfg
        .proxy_uids
        .iter()
        .map(|&u| Owner::Uid(u))
        .chain(cfg.proxy_gids.iter().map(|&g| Owner::Gid(g)));
    for owner in owners {
        // The proxy dialing its own pod through a VIP goes back to it as inbound traffic.
        let to_self = with_dst(out(Target::InRedirect), LOCALHOST, 32, true);
        let to_self = with_dport(out_lo(to_self), IPPROTO_TCP, cfg.inbound_tunnel_port, true);
        b.push(with_owner(to_self, owner, false));
        if !include_has_loopback {
            b.push(with_owner(out_lo(out(Target::Return)), owner, true));
        }
        b.push(with_owner(out(Target::Return), owner, false));
    }

    b.push(with_dst(out(Target::Return), LOCALHOST, 32, false));

    for c in &cfg.outbound_exclude_cidrs {
        b.push(with_dst(out(Target::Return), c.addr, c.prefix, false));
    }
    for &p in &cfg.outbound_ports {
        b.push(with_dport(out(Target::Redirect), IPPROTO_TCP, p, false));
    }
    match &cfg.outbound_cidrs {
        Include::All => b.push(out(Target::Redirect)),
        Include::List(cidrs) => {
            for c in cidrs {
                b.push(with_dst(out(Target::Redirect), c.addr, c.prefix, false));
            }
        }
    }

    // Written unconditionally by istio-iptables, even when -b '' leaves the chain unused.
    b.push(with_dport(
        inb(Target::Return),
        IPPROTO_TCP,
        cfg.inbound_tunnel_port,
        false,
    ));
    match &cfg.inbound_ports {
        Include::All => {
            for &p in &cfg.inbound_exclude_ports {
                b.push(with_dport(inb(Target::Return), IPPROTO_TCP, p, false));
            }
            let mut all = inb(Target::InRedirect);
            all.proto = IPPROTO_TCP;
            b.push(all);
        }
        // istio-iptables ignores -d here: only the listed ports are captured anyway.
        Include::List(ports) => {
            for &p in ports {
                b.push(with_dport(inb(Target::InRedirect), IPPROTO_TCP, p, false));
            }
        }
    }

    if b.rules.len() > MAX_RULES {
        return Err(TooManyRules { needed: b.rules.len() });
    }
    Ok(b.rules)
}

fn inb(target: Target) -> Rule {
    Rule::new(ChainId::Inbound, target)
}

/// [`workload_flags`] for these flags.
pub fn flags(cfg: &CaptureConfig) -> u32 {
    if cfg.inbound_ports.is_empty() {
        0
    } else {
        workload_flags::INBOUND
    }
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

/// The `WORKLOADS` entry the programs run for these flags: the chain `rules` ([`compile`]'s
/// answer for the same flags), the capture ports, and the counter block of `slot`.
pub fn workload(cfg: &CaptureConfig, rules: &[Rule], slot: u32, serving: Serving) -> Workload {
    debug_assert!(rules.len() <= MAX_RULES, "compile bounds the chain");
    let mut w = Workload::empty();
    let n = rules.len().min(MAX_RULES);
    w.n_rules = n as u32;
    w.rules[..n].copy_from_slice(&rules[..n]);
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
    w.counter_base = slot * MAX_RULES as u32;
    w
}

#[cfg(test)]
mod tests;
mod text;

pub use text::{ListColumns, NatLine, iptables_save, list_columns, match_text, nat_table, rule_text};

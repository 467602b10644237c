//! Every table istio-iptables writes for a set of flags (mangle, nat, raw), line by line in
//! iptables-save spelling and final chain order, with what implements each line here.
//!
//! The order is istio-iptables' `Run()` (`tools/istio-iptables/pkg/capture/run.go`); `-I CHAIN
//! N` insertions are applied where `Run()` makes them, so each chain lists its rules as the
//! kernel would hold them. The rules the programs evaluate come from [`super::compile`] (with
//! their counter slots); the rest are the jumps, targets and marks around them.

use std::{
    fmt::Write as _,
    format,
    string::{String, ToString},
    vec::Vec,
};

use super::{Names, flags, rule_text_named, slots};
use crate::{
    ChainId, Rule,
    addr::Family,
    config::{CaptureConfig, DnsCapture, InterceptionMode},
    workload_flags,
};

/// The tables istio-iptables writes, in the order iptables-save prints them.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    Mangle,
    Nat,
    Raw,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Mangle, Table::Nat, Table::Raw];

    pub fn name(self) -> &'static str {
        match self {
            Self::Mangle => "mangle",
            Self::Nat => "nat",
            Self::Raw => "raw",
        }
    }

    fn builtins(self) -> &'static [&'static str] {
        match self {
            Self::Mangle => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
            Self::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
            Self::Raw => &["PREROUTING", "OUTPUT"],
        }
    }
}

/// The table a compiled rule is istio-iptables' line of, for a workload with these
/// [`workload_flags`] and `-k` entries (`Workload::virt_ifaces`): TPROXY mode's inbound chains
/// and its OUTPUT marks are mangle's; `-k`'s PREROUTING rules are nat's in either mode.
pub fn rule_table(r: &Rule, flags: u32, virt_ifaces: u32) -> Table {
    match r.chain_id() {
        Some(ChainId::Tproxy | ChainId::MarkOutput) => Table::Mangle,
        Some(ChainId::Prerouting) if r.uid & virt_ifaces != 0 => Table::Nat,
        Some(ChainId::Inbound | ChainId::Prerouting) if flags & workload_flags::TPROXY != 0 => Table::Mangle,
        _ => Table::Nat,
    }
}

/// One line of a table istio-iptables writes, and what implements it here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableLine {
    pub table: Table,
    /// The iptables-save line (`-A CHAIN ...`).
    pub text: String,
    /// The counter slot of a rule the programs evaluate; `None` for the jumps, targets and
    /// the lines something other than a rule walk implements.
    pub slot: Option<usize>,
    /// 1-based position in its chain (`iptables -L --line-numbers`, and `stats`' `rule`).
    pub num: usize,
    /// Which program (or part of one) does what this line does.
    pub by: &'static str,
}

impl TableLine {
    /// The chain the line appends to.
    pub fn chain(&self) -> &str {
        self.text.split_whitespace().nth(1).unwrap_or("?")
    }
}

/// What implements `-k`'s jumps to ISTIO_REDIRECT.
pub(super) const VIRT_REDIRECT_BY: &str = "tc ingress on the -k device rewrites the connection to the device's address and \
                                the outbound capture port; tc egress rewrites its replies back";
/// What implements `-k`'s RETURNs.
pub(super) const VIRT_RETURN_BY: &str = "tc ingress on the -k device (sk_lookup leaves the device's connections alone)";

/// What `--drop-invalid`'s lines say. istio-iptables drops packets conntrack finds invalid
/// (out of window, mostly) because conntrack does not NAT them: under REDIRECT such a packet of
/// a captured connection reaches the port behind the proxy, where no socket has its 4-tuple,
/// and the reset that answers it kills the connection. Here nothing is NATed: a connection's
/// packets reach the socket that owns its 4-tuple (the proxy's, or the app's own connected to
/// the proxy), whose TCP answers an out-of-window segment as it would any.
pub const DROP_INVALID_BY: &str = "not needed: nothing is NATed, so an invalid (out-of-window) \
                                   segment reaches its connection's own socket, never a port behind the proxy";

/// Lines being placed as `Run()` places them: appended, or inserted at a chain position.
pub(super) struct Tables {
    lines: Vec<TableLine>,
}

impl Tables {
    pub(super) fn new() -> Self {
        Self { lines: Vec::new() }
    }

    /// A line no rule walk evaluates (no counter slot).
    pub(super) fn line(&mut self, table: Table, text: String, by: &'static str) {
        self.append(table, text, None, by);
    }

    pub(super) fn append(&mut self, table: Table, text: String, slot: Option<usize>, by: &'static str) {
        self.lines.push(TableLine {
            table,
            text,
            slot,
            num: 0,
            by,
        });
    }

    /// `-I CHAIN pos` (before the chain's `pos`th rule, after its last when it has fewer) of
    /// a rule the programs evaluate, with its counter slot.
    fn insert_slotted(&mut self, table: Table, pos: usize, text: String, slot: Option<usize>, by: &'static str) {
        let line = TableLine {
            table,
            text,
            slot,
            num: 0,
            by,
        };
        let chain = line.chain().to_string();
        let at = self
            .lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.table == table && l.chain() == chain)
            .map(|(i, _)| i)
            .nth(pos.saturating_sub(1))
            .unwrap_or(self.lines.len());
        self.lines.insert(at, line);
    }

    /// Chains in order of first appearance, their lines in order, numbered.
    pub(super) fn finish(self) -> Vec<TableLine> {
        let mut out: Vec<TableLine> = Vec::new();
        for table in Table::ALL {
            let mut chains: Vec<String> = Vec::new();
            for l in self.lines.iter().filter(|l| l.table == table) {
                if !chains.iter().any(|c| c == l.chain()) {
                    chains.push(l.chain().to_string());
                }
            }
            for chain in chains {
                let in_chain = self.lines.iter().filter(|l| l.table == table && l.chain() == chain);
                for (n, l) in in_chain.enumerate() {
                    out.push(TableLine {
                        num: n + 1,
                        ..l.clone()
                    });
                }
            }
        }
        out
    }
}

pub(super) fn connect(family: Family) -> &'static str {
    match family {
        Family::V4 => "connect4 (and connect6 for v4-mapped addresses) attached to the workload's cgroup",
        Family::V6 => "connect6 attached to the workload's cgroup",
    }
}

fn walker(chain: ChainId, family: Family) -> &'static str {
    match (chain, family) {
        (ChainId::Inbound, _) => "sk_lookup",
        (ChainId::Tproxy, _) => {
            "sk_lookup hands the SYN to the inbound capture listener; the accepted socket keeps \
                                 the connection's own addresses, as TPROXY's does"
        }
        (ChainId::MarkOutput, _) => {
            "connect4/6 (the mark a loopback connection's SYN leaves with, which sk_lookup's \
                                     -m mark reads)"
        }
        (_, Family::V4) => "connect4",
        (_, Family::V6) => "connect6",
    }
}

/// Every table of `family` for these flags. `rules` is what [`super::compile`] returned for
/// the same flags.
pub fn tables(cfg: &CaptureConfig, rules: &[Rule], family: Family) -> Vec<TableLine> {
    use Table::{Mangle, Nat};
    if let Some(ambient) = &cfg.ambient {
        return super::ambient::tables(cfg, ambient, rules, family);
    }
    let mut t = Tables::new();
    let tproxy = cfg.inbound_mode == InterceptionMode::Tproxy;
    let groups: Vec<&str> = cfg.owner_groups.groups().iter().map(|g| g.name.as_str()).collect();
    let ifaces: Vec<&str> = cfg.interface_list().map(|i| i.as_str()).collect();
    let names = Names {
        groups: &groups,
        ifaces: &ifaces,
    };
    let slotted: Vec<(usize, &Rule)> = slots(rules)
        .into_iter()
        .zip(rules)
        .filter(|(_, r)| r.family == family as u8)
        .collect();
    let compiled = |t: &mut Tables, table: Table, chain: ChainId| {
        for &(slot, r) in slotted.iter().filter(|(_, r)| r.chain_id() == Some(chain)) {
            t.append(table, rule_text_named(r, &names), Some(slot), walker(chain, family));
        }
    };

    // `-c`: compiled in pairs, PREROUTING's then OUTPUT's, as istio-iptables appends them. In
    // TPROXY mode inbound connections are judged in mangle PREROUTING, so its copy is the one
    // that counts; nat's only says where the connection would have gone.
    let virt = super::virt_entries(cfg);
    for &(slot, r) in slotted.iter().filter(|(_, r)| match r.chain_id() {
        Some(ChainId::Prerouting) => r.uid & virt == 0,
        Some(ChainId::OutputNat) => true,
        _ => false,
    }) {
        let text = rule_text_named(r, &names);
        match r.chain_id() {
            Some(ChainId::Prerouting) if tproxy => {
                t.line(
                    Nat,
                    text.clone(),
                    "counted in mangle PREROUTING's copy (sk_lookup): in TPROXY mode nat PREROUTING jumps nowhere",
                );
                t.append(Mangle, text, Some(slot), "sk_lookup (the SYN's arrival device)");
            }
            Some(ChainId::Prerouting) => t.append(Nat, text, Some(slot), "sk_lookup (the SYN's arrival device)"),
            _ => {
                if tproxy {
                    t.line(
                        Mangle,
                        text.clone(),
                        "not needed: mangle OUTPUT's own rules mark only connections over lo",
                    );
                }
                t.append(Nat, text, Some(slot), "connect4/6, sendmsg4/6 (the route's device)");
            }
        }
    }
    if cfg.drop_invalid {
        let by = DROP_INVALID_BY;
        t.line(
            Mangle,
            "-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP".into(),
            by,
        );
        t.line(Mangle, "-A ISTIO_DROP -j DROP".into(), by);
    }

    // nat ISTIO_INBOUND's tunnel-port RETURN, written in every mode (`compile` puts it first,
    // except in TPROXY mode, whose ISTIO_INBOUND is mangle's).
    let inbound: Vec<(usize, &Rule)> = slotted
        .iter()
        .copied()
        .filter(|(_, r)| r.chain_id() == Some(ChainId::Inbound))
        .collect();
    if tproxy {
        t.line(
            Nat,
            format!(
                "-A ISTIO_INBOUND -p tcp -m tcp --dport {} -j RETURN",
                cfg.inbound_tunnel_port
            ),
            "not evaluated: TPROXY mode does not jump to nat ISTIO_INBOUND (its ISTIO_INBOUND is mangle's)",
        );
    } else if let Some(&(slot, r)) = inbound.first() {
        t.append(
            Nat,
            rule_text_named(r, &names),
            Some(slot),
            walker(ChainId::Inbound, family),
        );
    }
    t.append(
        Nat,
        format!("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}", cfg.envoy_port),
        None,
        match family {
            Family::V4 => "connect4/6 rewrite the destination to 127.0.0.1",
            Family::V6 => "connect6 rewrites the destination to ::1",
        },
    );
    t.append(
        Nat,
        format!(
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            cfg.inbound_capture_port
        ),
        None,
        match family {
            Family::V4 => "connect4/6 rewrite to 127.0.0.1; sk_lookup hands the SYN to the listener",
            Family::V6 => "connect6 rewrites to ::1; sk_lookup hands the SYN to the listener",
        },
    );

    if tproxy {
        if !cfg.inbound_ports.is_empty() {
            tproxy_inbound(&mut t, cfg);
        }
        compiled(&mut t, Mangle, ChainId::Tproxy);
        compiled(&mut t, Mangle, ChainId::Inbound);
    } else if flags(cfg) & workload_flags::INBOUND != 0 {
        t.append(
            Nat,
            "-A PREROUTING -p tcp -j ISTIO_INBOUND".into(),
            None,
            "sk_lookup attached to the workload's netns (connections from other hosts)",
        );
        for &(slot, r) in inbound.iter().skip(1) {
            t.append(
                Nat,
                rule_text_named(r, &names),
                Some(slot),
                walker(ChainId::Inbound, family),
            );
        }
    }

    t.append(Nat, "-A OUTPUT -j ISTIO_OUTPUT".into(), None, connect(family));
    compiled(&mut t, Nat, ChainId::Output);
    compiled(&mut t, Nat, ChainId::OutputDns);
    if cfg.dns.enabled() {
        dns_zones(&mut t, cfg, family);
    }
    virt_rules(&mut t, cfg, &slotted, &names);
    if tproxy {
        tproxy_marks(&mut t, cfg);
        compiled(&mut t, Mangle, ChainId::MarkOutput);
        tproxy_restore(&mut t, cfg);
    }
    t.finish()
}

/// The owner matches of the proxy's ids, each UID's then each GID's, as istio-iptables writes
/// one rule per id.
fn proxy_owners(cfg: &CaptureConfig) -> impl Iterator<Item = String> + '_ {
    cfg.proxy_uids
        .iter()
        .map(|u| format!("--uid-owner {u}"))
        .chain(cfg.proxy_gids.iter().map(|g| format!("--gid-owner {g}")))
}

/// What replaces TPROXY mode's connmark save and restore.
const TPROXY_CONNMARK_BY: &str = "net.ipv4.tcp_fwmark_accept=1, set by the agent in the workload's namespace: the \
                                  app's socket accepted from the proxy's marked SYN keeps the mark, so every reply \
                                  routes back to the proxy (the fwmark rule and table the agent installs)";

/// `handleInboundPortsInclude` in TPROXY mode, around the rules [`super::compile`] holds
/// (mangle ISTIO_TPROXY's and ISTIO_INBOUND's): ISTIO_DIVERT and PREROUTING's jump.
fn tproxy_inbound(t: &mut Tables, cfg: &CaptureConfig) {
    let m = Table::Mangle;
    let by = match cfg.kube_virt_interfaces.is_empty() {
        true => "not needed: a connection's later packets reach the socket that owns its 4-tuple, marked or not",
        false => {
            "tc ingress of a -k device marks each packet of a VM's connection TPROXY took (0x52440000, which the \
             agent's `ip rule iif DEVICE` delivers locally); other connections' packets reach the socket that \
             owns their 4-tuple, marked or not"
        }
    };
    let mark = cfg.tproxy.mark;
    t.line(
        m,
        format!("-A ISTIO_DIVERT -j MARK --set-xmark {mark:#x}/0xffffffff"),
        by,
    );
    t.line(m, "-A ISTIO_DIVERT -j ACCEPT".into(), by);
    t.line(
        m,
        "-A PREROUTING -p tcp -j ISTIO_INBOUND".into(),
        match cfg.kube_virt_interfaces.is_empty() {
            true => {
                "sk_lookup attached to the workload's netns (connections from other hosts, and over lo those the \
                 namespace makes to itself)"
            }
            false => {
                "sk_lookup attached to the workload's netns (connections from other hosts, and over lo those the \
                 namespace makes to itself); tc ingress of each -k device (a VM's connections, forwarded ones \
                 too, before nat's -k rules)"
            }
        },
    );
}

/// The end of `Run()` in TPROXY mode: PREROUTING's save of the proxy's mark (mangle OUTPUT's
/// own rules are compiled).
fn tproxy_marks(t: &mut Tables, cfg: &CaptureConfig) {
    let mark = cfg.tproxy.mark;
    let save = "--nfmask 0xffffffff --ctmask 0xffffffff";
    t.line(
        Table::Mangle,
        format!("-A PREROUTING -p tcp -m mark --mark {mark:#x} -j CONNMARK --save-mark {save}"),
        TPROXY_CONNMARK_BY,
    );
}

/// mangle OUTPUT's last rule in TPROXY mode: the proxy's mark restored onto the app's replies.
fn tproxy_restore(t: &mut Tables, cfg: &CaptureConfig) {
    let mark = cfg.tproxy.mark;
    let save = "--nfmask 0xffffffff --ctmask 0xffffffff";
    t.line(
        Table::Mangle,
        format!("-A OUTPUT -p tcp -m connmark --mark {mark:#x} -j CONNMARK --restore-mark {save}"),
        TPROXY_CONNMARK_BY,
    );
}

/// `addDNSConntrackZones`: raw-table zones that keep the app's flow to the resolver apart from
/// the proxy's flow to it. Nothing here needs them (see the line's `by`).
fn dns_zones(t: &mut Tables, cfg: &CaptureConfig, family: Family) {
    let by = "not needed: sendmsg/recvmsg rewrite each socket's datagrams, no conntrack entry \
              is made or shared";
    let r = Table::Raw;
    t.line(r, "-A OUTPUT -j ISTIO_OUTPUT_DNS".into(), by);
    for owner in proxy_owners(cfg) {
        t.line(
            r,
            format!("-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -m owner {owner} -j CT --zone 1"),
            by,
        );
        t.line(
            r,
            format!("-A ISTIO_OUTPUT_DNS -p udp -m udp --sport 15053 -m owner {owner} -j CT --zone 2"),
            by,
        );
    }
    let dns: &DnsCapture = &cfg.dns;
    if dns.capture_all {
        t.line(r, "-A PREROUTING -j ISTIO_INBOUND".into(), by);
        t.line(
            r,
            "-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -j CT --zone 2".into(),
            by,
        );
        t.line(r, "-A ISTIO_INBOUND -p udp -m udp --sport 53 -j CT --zone 1".into(), by);
        return;
    }
    let servers: Vec<String> = match family {
        Family::V4 => dns.servers_v4.iter().map(|a| format!("{a}/32")).collect(),
        Family::V6 => dns.servers_v6.iter().map(|a| format!("{a}/128")).collect(),
    };
    if !servers.is_empty() {
        t.line(r, "-A PREROUTING -j ISTIO_INBOUND".into(), by);
    }
    for s in servers {
        t.line(
            r,
            format!("-A ISTIO_OUTPUT_DNS -d {s} -p udp -m udp --dport 53 -j CT --zone 2"),
            by,
        );
        t.line(
            r,
            format!("-A ISTIO_INBOUND -s {s} -p udp -m udp --sport 53 -j CT --zone 1"),
            by,
        );
    }
}

/// nat PREROUTING's `-k` rules: the RETURNs `Run()` inserts at position 1, and the jumps to
/// ISTIO_REDIRECT `handleOutboundIncludeRules` inserts above them (for `-i '*'` or per
/// included CIDR of the family). [`super::compile`] holds them in the order they end up in,
/// first in the chain; inserted at 1 last to first, they end up in that order here too.
fn virt_rules(t: &mut Tables, cfg: &CaptureConfig, slotted: &[(usize, &Rule)], names: &Names) {
    let virt = super::virt_entries(cfg);
    let rules: Vec<(usize, &Rule)> = slotted
        .iter()
        .copied()
        .filter(|(_, r)| r.chain_id() == Some(ChainId::Prerouting) && r.uid & virt != 0)
        .collect();
    for &(slot, r) in rules.iter().rev() {
        let by = match r.target_kind() {
            Some(crate::Target::Redirect) => VIRT_REDIRECT_BY,
            _ => VIRT_RETURN_BY,
        };
        t.insert_slotted(Table::Nat, 1, rule_text_named(r, names), Some(slot), by);
    }
}

/// The tables as `iptables-save` prints them (and `iptables-restore` reads them): only those
/// with a line, each with its built-in chains and the chains its lines use.
pub fn iptables_save(lines: &[TableLine]) -> String {
    let mut s = String::new();
    for table in Table::ALL {
        let of: Vec<&TableLine> = lines.iter().filter(|l| l.table == table).collect();
        if of.is_empty() {
            continue;
        }
        let _ = writeln!(s, "*{}", table.name());
        for builtin in table.builtins() {
            let _ = writeln!(s, ":{builtin} ACCEPT [0:0]");
        }
        let mut custom: Vec<&str> = Vec::new();
        for l in &of {
            let mut words = l.text.split_whitespace().skip(1);
            let chain = words.next().unwrap_or("?");
            let jump = l.text.split(" -j ").nth(1).and_then(|t| t.split_whitespace().next());
            for c in [Some(chain), jump].into_iter().flatten() {
                if c.starts_with("ISTIO_") && !custom.contains(&c) {
                    custom.push(c);
                }
            }
        }
        for c in custom {
            let _ = writeln!(s, ":{c} - [0:0]");
        }
        for l in of {
            let _ = writeln!(s, "{}", l.text);
        }
        s.push_str("COMMIT\n");
    }
    s
}

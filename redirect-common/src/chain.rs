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

use std::{fmt::Write as _, format, net::Ipv4Addr, string::String, vec::Vec};

use crate::{
    ChainId, IPPROTO_TCP, IPPROTO_UDP, MAX_RULES, Rule, Target, Workload,
    config::{CaptureConfig, Cidr, Include},
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

/// One line of the nat table istio-iptables writes, and what implements it here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatLine {
    /// The iptables-save line (`-A CHAIN ...`).
    pub text: String,
    /// The counter slot of a rule the programs evaluate; `None` for the jumps and REDIRECT
    /// targets, which are the attach points and the rewrite themselves.
    pub slot: Option<usize>,
    /// 1-based position in its chain (`iptables -L --line-numbers`, and `stats`' `rule`).
    pub num: usize,
    /// Which program (or part of one) does what this line does.
    pub by: &'static str,
}

const CHAINS: [&str; 4] = ["ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT"];

/// The nat table for these flags, chain by chain, in iptables-save's order. `rules` is what
/// [`compile`] returned for the same flags.
pub fn nat_table(cfg: &CaptureConfig, rules: &[Rule]) -> Vec<NatLine> {
    let mut lines = Vec::new();
    let fixed = |text: String, by| NatLine {
        text,
        slot: None,
        num: 1,
        by,
    };
    if flags(cfg) & workload_flags::INBOUND != 0 {
        lines.push(fixed(
            "-A PREROUTING -p tcp -j ISTIO_INBOUND".into(),
            "sk_lookup attached to the workload's netns (connections from other hosts)",
        ));
    }
    lines.push(fixed(
        "-A OUTPUT -j ISTIO_OUTPUT".into(),
        "connect4 attached to the workload's cgroup",
    ));
    for chain in [ChainId::Inbound, ChainId::Output] {
        let in_chain = rules.iter().enumerate().filter(|(_, r)| r.chain == chain as u8);
        for (n, (slot, r)) in in_chain.enumerate() {
            lines.push(NatLine {
                text: rule_text(r),
                slot: Some(slot),
                num: n + 1,
                by: match chain {
                    ChainId::Inbound => "sk_lookup",
                    ChainId::Output => "connect4",
                },
            });
        }
        if chain == ChainId::Inbound {
            lines.push(fixed(
                format!(
                    "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
                    cfg.inbound_capture_port
                ),
                "connect4 rewrites to 127.0.0.1; sk_lookup hands the SYN to the listener",
            ));
        }
    }
    lines.push(fixed(
        format!("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}", cfg.envoy_port),
        "connect4 rewrites the destination to 127.0.0.1",
    ));
    lines
}

impl NatLine {
    /// The chain the line appends to.
    pub fn chain(&self) -> &str {
        self.text.split_whitespace().nth(1).unwrap_or("?")
    }
}

/// The nat table as `iptables-save` prints it (and `iptables-restore` reads it).
pub fn iptables_save(lines: &[NatLine]) -> String {
    let mut s = String::from("*nat\n");
    for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        let _ = writeln!(s, ":{builtin} ACCEPT [0:0]");
    }
    for chain in CHAINS {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for l in lines {
        let _ = writeln!(s, "{}", l.text);
    }
    s.push_str("COMMIT\n");
    s
}

fn cidr_text(addr_be: u32, mask_be: u32) -> String {
    let prefix = u32::from_be(mask_be).leading_ones() as u8;
    Cidr {
        addr: Ipv4Addr::from(u32::from_be(addr_be)),
        prefix,
    }
    .to_string()
}

fn bang(r: &Rule, bit: u16) -> &'static str {
    if r.neg & bit != 0 { "! " } else { "" }
}

fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        other => format!("{other}"),
    }
}

/// The rule's matches as `iptables-save` prints them (without `-A CHAIN` and `-j TARGET`),
/// e.g. `-o lo -m owner ! --uid-owner 1337`.
pub fn match_text(r: &Rule) -> String {
    let mut s = String::new();
    let mut part = |t: &str| {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(t);
    };
    if r.has & m::SRC != 0 {
        part(&format!("{}-s {}", bang(r, m::SRC), cidr_text(r.src_addr, r.src_mask)));
    }
    if r.has & m::DST != 0 {
        part(&format!("{}-d {}", bang(r, m::DST), cidr_text(r.dst_addr, r.dst_mask)));
    }
    if r.has & m::OUT_LO != 0 {
        part(&format!("{}-o lo", bang(r, m::OUT_LO)));
    }
    if r.proto != 0 {
        part(&format!("-p {}", proto_name(r.proto)));
    }
    if r.has & m::DPORT != 0 {
        let p = proto_name(r.proto);
        part(&format!("-m {p} {}--dport {}", bang(r, m::DPORT), r.dport));
    }
    if r.has & (m::UID | m::GID) != 0 {
        let mut owner = String::from("-m owner");
        if r.has & m::UID != 0 {
            let _ = write!(owner, " {}--uid-owner {}", bang(r, m::UID), r.uid);
        }
        if r.has & m::GID != 0 {
            let _ = write!(owner, " {}--gid-owner {}", bang(r, m::GID), r.gid);
        }
        part(&owner);
    }
    s
}

/// The whole rule as an `iptables-save` line: `-A ISTIO_OUTPUT <matches> -j <target>`.
pub fn rule_text(r: &Rule) -> String {
    let chain = r.chain_id().map_or("?", ChainId::iptables_name);
    let target = r.target_kind().map_or("?", Target::iptables_name);
    let matches = match_text(r);
    if matches.is_empty() {
        format!("-A {chain} -j {target}")
    } else {
        format!("-A {chain} {matches} -j {target}")
    }
}

/// The columns `iptables -t nat -L CHAIN -v -n` prints for a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListColumns {
    pub prot: String,
    pub out: String,
    pub source: String,
    pub destination: String,
    pub extra: String,
}

fn list_addr(r: &Rule, bit: u16, addr: u32, mask: u32) -> String {
    if r.has & bit == 0 {
        return "0.0.0.0/0".into();
    }
    let prefix = u32::from_be(mask).leading_ones();
    let ip = Ipv4Addr::from(u32::from_be(addr));
    let text = if prefix == 32 {
        format!("{ip}")
    } else {
        format!("{ip}/{prefix}")
    };
    format!("{}{text}", if r.neg & bit != 0 { "!" } else { "" })
}

/// A rule in `iptables -L -v -n` columns.
pub fn list_columns(r: &Rule) -> ListColumns {
    let mut extra = Vec::new();
    if r.has & m::DPORT != 0 {
        let not = if r.neg & m::DPORT != 0 { "!" } else { "" };
        extra.push(format!("{} dpt:{not}{}", proto_name(r.proto), r.dport));
    }
    for (bit, what, id) in [(m::UID, "UID", r.uid), (m::GID, "GID", r.gid)] {
        if r.has & bit != 0 {
            let not = if r.neg & bit != 0 { "! " } else { "" };
            extra.push(format!("{not}owner {what} match {id}"));
        }
    }
    ListColumns {
        prot: if r.proto == 0 {
            "all".into()
        } else {
            proto_name(r.proto)
        },
        out: match (r.has & m::OUT_LO != 0, r.neg & m::OUT_LO != 0) {
            (false, _) => "*".into(),
            (true, false) => "lo".into(),
            (true, true) => "!lo".into(),
        },
        source: list_addr(r, m::SRC, r.src_addr, r.src_mask),
        destination: list_addr(r, m::DST, r.dst_addr, r.dst_mask),
        extra: extra.join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConnFacts, config};

    /// The default sidecar injection's ISTIO_OUTPUT, as quoted in the foundation issue (with
    /// the `-m tcp` that iptables-save prints for `--dport`).
    const DEFAULT_OUTPUT: &[&str] = &[
        "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ];

    #[test]
    fn default_chain_renders_as_istio_iptables_writes_it() {
        let rules = compile(&CaptureConfig::default()).unwrap();
        let text: Vec<String> = output(&rules).map(rule_text).collect();
        assert_eq!(text, DEFAULT_OUTPUT);
        let c = list_columns(&rules[1]);
        assert_eq!((c.prot.as_str(), c.out.as_str()), ("tcp", "lo"));
        assert_eq!((c.source.as_str(), c.destination.as_str()), ("0.0.0.0/0", "!127.0.0.1"));
        assert_eq!(c.extra, "tcp dpt:!15008 owner UID match 1337");
        assert_eq!(list_columns(&rules[2]).extra, "! owner UID match 1337");
    }

    fn output(rules: &[Rule]) -> impl Iterator<Item = &Rule> {
        rules.iter().filter(|r| r.chain == ChainId::Output as u8)
    }

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap()).to_be()
    }

    fn first_match(rules: &[Rule], c: &ConnFacts) -> Option<usize> {
        rules.iter().position(|r| r.matches(c))
    }

    #[test]
    fn default_chain_decides_like_the_rule_set() {
        let rules = compile(&CaptureConfig::default()).unwrap();
        let base = ConnFacts {
            proto: IPPROTO_TCP,
            dst_addr: ip("10.200.0.2"),
            dst_port: 80,
            src_addr: 0,
            out_lo: false,
            uid: 0,
            gid: 0,
        };
        let pod = ConnFacts {
            dst_addr: ip("10.200.0.1"),
            out_lo: true,
            ..base
        };
        let lo = ConnFacts {
            dst_addr: ip("127.0.0.1"),
            out_lo: true,
            ..base
        };
        let cases: &[(ConnFacts, usize)] = &[
            (base, 8),
            (ConnFacts { uid: 1337, ..base }, 3),
            (
                ConnFacts {
                    uid: 1000,
                    gid: 1337,
                    ..base
                },
                6,
            ),
            (
                ConnFacts {
                    src_addr: ip("127.0.0.6"),
                    uid: 1337,
                    ..pod
                },
                0,
            ),
            (ConnFacts { uid: 1337, ..pod }, 1),
            (
                ConnFacts {
                    uid: 1337,
                    dst_port: 15008,
                    ..pod
                },
                3,
            ),
            (
                ConnFacts {
                    uid: 1000,
                    gid: 1337,
                    ..pod
                },
                2,
            ),
            (pod, 2),
            (lo, 2),
            (ConnFacts { uid: 1337, ..lo }, 3),
            (
                ConnFacts {
                    uid: 1000,
                    gid: 1337,
                    ..lo
                },
                2,
            ),
        ];
        for (c, want) in cases {
            assert_eq!(first_match(&rules, c), Some(*want), "{c:?}");
        }
    }

    #[test]
    fn every_flag_shapes_the_chain_in_istio_order() {
        let cfg = CaptureConfig {
            proxy_uids: std::vec![1337, 1000],
            proxy_gids: std::vec![1337],
            outbound_cidrs: config::parse_cidr_include("-i", "10.0.0.0/8,172.16.0.0/12").unwrap(),
            outbound_exclude_cidrs: config::parse_cidrs("-x", "10.96.0.1/32").unwrap(),
            outbound_ports: std::vec![3306],
            outbound_exclude_ports: std::vec![5432],
            ..CaptureConfig::default()
        };
        let text: Vec<String> = output(&compile(&cfg).unwrap()).map(rule_text).collect();
        assert_eq!(text[0], "-A ISTIO_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN");
        assert_eq!(text[1], "-A ISTIO_OUTPUT -p udp -m udp --dport 5432 -j RETURN");
        assert_eq!(text[2], "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN");
        assert!(text[6].contains("--uid-owner 1000"), "{}", text[6]);
        assert_eq!(text[12], "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN");
        assert_eq!(text[13], "-A ISTIO_OUTPUT -d 10.96.0.1/32 -j RETURN");
        assert_eq!(text[14], "-A ISTIO_OUTPUT -p tcp -m tcp --dport 3306 -j ISTIO_REDIRECT");
        assert_eq!(text[15], "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT");
        assert_eq!(text[16], "-A ISTIO_OUTPUT -d 172.16.0.0/12 -j ISTIO_REDIRECT");
        assert_eq!(text.len(), 17);

        let none = CaptureConfig {
            outbound_cidrs: Include::List(Vec::new()),
            ..CaptureConfig::default()
        };
        let rules = compile(&none).unwrap();
        assert!(rules.iter().all(|r| r.target_kind() != Some(Target::Redirect)));
    }

    #[test]
    fn inbound_chain_follows_b_and_d() {
        let inbound = |cfg: &CaptureConfig| -> Vec<String> {
            compile(cfg)
                .unwrap()
                .iter()
                .filter(|r| r.chain == ChainId::Inbound as u8)
                .map(rule_text)
                .collect()
        };
        let cfg = CaptureConfig::default();
        assert_eq!(
            inbound(&cfg),
            [
                "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
                "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
                "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
                "-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
            ]
        );
        assert_eq!(flags(&cfg), workload_flags::INBOUND);
        let list = CaptureConfig {
            inbound_ports: Include::List(std::vec![9080, 8081]),
            ..CaptureConfig::default()
        };
        assert_eq!(
            inbound(&list),
            [
                "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
                "-A ISTIO_INBOUND -p tcp -m tcp --dport 9080 -j ISTIO_IN_REDIRECT",
                "-A ISTIO_INBOUND -p tcp -m tcp --dport 8081 -j ISTIO_IN_REDIRECT",
            ]
        );
        let none = CaptureConfig {
            inbound_ports: Include::List(Vec::new()),
            ..CaptureConfig::default()
        };
        assert_eq!(
            inbound(&none),
            ["-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN"]
        );
        assert_eq!(flags(&none), 0);
        let text = iptables_save(&nat_table(&none, &compile(&none).unwrap()));
        assert!(!text.contains("PREROUTING -p tcp"), "{text}");
    }

    /// The default injection's nat table as istio-iptables writes it (the reference's listing,
    /// in iptables-save order and spelling).
    #[test]
    fn default_nat_table_is_istio_iptables_output() {
        let cfg = CaptureConfig::default();
        let rules = compile(&cfg).unwrap();
        let lines = nat_table(&cfg, &rules);
        let mut want = std::vec![
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
            "-A OUTPUT -j ISTIO_OUTPUT",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
            "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        ];
        want.extend(DEFAULT_OUTPUT);
        want.push("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001");
        let got: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(got, want);
        // Slots are indices into the compiled list, whichever order the chains print in.
        for l in &lines {
            if let Some(slot) = l.slot {
                assert_eq!(rule_text(&rules[slot]), l.text);
            }
        }
        assert_eq!(lines[2].slot, Some(DEFAULT_OUTPUT.len()));
        assert_eq!(lines[8].slot, Some(0));
        let save = iptables_save(&lines);
        assert!(save.starts_with("*nat\n:PREROUTING ACCEPT [0:0]\n"), "{save}");
        assert!(save.ends_with("COMMIT\n"), "{save}");
    }

    #[test]
    fn a_workload_entry_carries_the_chain_ports_counter_block_and_serving_flags() {
        let cfg = CaptureConfig::default();
        let rules = compile(&cfg).unwrap();
        let w = workload(&cfg, &rules, 3, Serving::default());
        assert_eq!(w.rules(), &rules[..]);
        assert_eq!((w.outbound_port, w.inbound_port), (15001, 15006));
        assert_eq!(w.counter_base, 3 * MAX_RULES as u32);
        assert_eq!(w.flags, workload_flags::INBOUND);
        let own = Serving {
            own_proxy: true,
            fast_path: true,
        };
        assert_eq!(
            workload(&cfg, &rules, 0, own).flags,
            workload_flags::INBOUND | workload_flags::WORKLOAD_LISTENER | workload_flags::FAST_PATH
        );
        assert_eq!((w.cgroup_id, w.cgroup_level), (0, 0));
    }

    #[test]
    fn oversized_flags_are_refused() {
        let cidrs = (0..70).map(|i| format!("10.{i}.0.0/16")).collect::<Vec<_>>().join(",");
        let cfg = CaptureConfig {
            outbound_exclude_cidrs: config::parse_cidrs("-x", &cidrs).unwrap(),
            ..CaptureConfig::default()
        };
        assert!(compile(&cfg).unwrap_err().to_string().contains("at most 64"));
    }
}

//! istio-iptables flags -> the rule chain, and rules -> iptables-save text.
//!
//! The order of [`compile`] is istio-iptables' `Run()` order for the nat OUTPUT path
//! (`tools/istio-iptables/pkg/capture/run.go`): per `-o` port RETURN, 127.0.0.6 RETURN, the
//! three owner rules per UID then per GID, 127.0.0.1 RETURN, `-x` RETURNs, `-q` redirects,
//! then the `-i` include. A rule's index in the returned list is its counter slot.

use std::{fmt::Write as _, format, net::Ipv4Addr, string::String, vec::Vec};

use crate::{
    ChainId, IPPROTO_TCP, IPPROTO_UDP, MAX_RULES, Rule, Target,
    config::{CaptureConfig, Cidr, Include},
    m, prefix_mask,
};

/// Envoy's inbound passthrough source (`ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN`).
pub const INBOUND_PASSTHROUGH_SRC: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
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

    if b.rules.len() > MAX_RULES {
        return Err(TooManyRules { needed: b.rules.len() });
    }
    Ok(b.rules)
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
        let text: Vec<String> = rules.iter().map(rule_text).collect();
        assert_eq!(text, DEFAULT_OUTPUT);
        let c = list_columns(&rules[1]);
        assert_eq!((c.prot.as_str(), c.out.as_str()), ("tcp", "lo"));
        assert_eq!((c.source.as_str(), c.destination.as_str()), ("0.0.0.0/0", "!127.0.0.1"));
        assert_eq!(c.extra, "tcp dpt:!15008 owner UID match 1337");
        assert_eq!(list_columns(&rules[2]).extra, "! owner UID match 1337");
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
        let text: Vec<String> = compile(&cfg).unwrap().iter().map(rule_text).collect();
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
    fn oversized_flags_are_refused() {
        let cidrs = (0..70).map(|i| format!("10.{i}.0.0/16")).collect::<Vec<_>>().join(",");
        let cfg = CaptureConfig {
            outbound_exclude_cidrs: config::parse_cidrs("-x", &cidrs).unwrap(),
            ..CaptureConfig::default()
        };
        assert!(compile(&cfg).unwrap_err().to_string().contains("at most 64"));
    }
}

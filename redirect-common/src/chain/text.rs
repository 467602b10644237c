//! Rules as iptables prints them: the nat table istio-iptables writes (`explain`), each rule's
//! match text (`stats`, metrics) and the `iptables -L -v -n` columns.

use std::{fmt::Write as _, format, net::Ipv4Addr, string::String, vec::Vec};

use super::flags;
use crate::{
    ChainId, IPPROTO_TCP, IPPROTO_UDP, Rule, Target,
    config::{CaptureConfig, Cidr},
    m, workload_flags,
};

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

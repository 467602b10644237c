//! Rules as iptables prints them: the nat table istio-iptables writes (`explain`), each rule's
//! match text (`stats`, metrics) and the `iptables -L -v -n` columns.

use std::{fmt::Write as _, format, string::String, vec::Vec};

use super::flags;
use crate::{
    ChainId, IPPROTO_TCP, IPPROTO_UDP, Rule, Target,
    addr::{Addr, Family},
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

/// The nat table of `family` for these flags (what iptables-save, or ip6tables-save, prints),
/// chain by chain. `rules` is what [`compile`] returned for the same flags.
pub fn nat_table(cfg: &CaptureConfig, rules: &[Rule], family: Family) -> Vec<NatLine> {
    let connect = match family {
        Family::V4 => "connect4",
        Family::V6 => "connect6",
    };
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
        match family {
            Family::V4 => "connect4 (and connect6 for v4-mapped addresses) attached to the workload's cgroup",
            Family::V6 => "connect6 attached to the workload's cgroup",
        },
    ));
    for chain in [ChainId::Inbound, ChainId::Output] {
        let in_chain = super::slots(rules)
            .into_iter()
            .zip(rules)
            .filter(|(_, r)| r.chain == chain as u8 && r.family == family as u8);
        for (n, (slot, r)) in in_chain.enumerate() {
            lines.push(NatLine {
                text: rule_text(r),
                slot: Some(slot),
                num: n + 1,
                by: match chain {
                    ChainId::Inbound => "sk_lookup",
                    ChainId::Output => connect,
                },
            });
        }
        if chain == ChainId::Inbound {
            lines.push(fixed(
                format!(
                    "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
                    cfg.inbound_capture_port
                ),
                match family {
                    Family::V4 => "connect4/6 rewrite to 127.0.0.1; sk_lookup hands the SYN to the listener",
                    Family::V6 => "connect6 rewrites to ::1; sk_lookup hands the SYN to the listener",
                },
            ));
        }
    }
    let rewrite = match family {
        Family::V4 => "connect4/6 rewrite the destination to 127.0.0.1",
        Family::V6 => "connect6 rewrites the destination to ::1",
    };
    lines.push(fixed(
        format!("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}", cfg.envoy_port),
        rewrite,
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

fn family(r: &Rule) -> Family {
    r.family_kind().unwrap_or(Family::V4)
}

fn cidr_text(r: &Rule, addr: &Addr, mask: &Addr) -> String {
    Cidr::from_words(family(r), addr, mask).to_string()
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
        part(&format!(
            "{}-s {}",
            bang(r, m::SRC),
            cidr_text(r, &r.src_addr, &r.src_mask)
        ));
    }
    if r.has & m::DST != 0 {
        part(&format!(
            "{}-d {}",
            bang(r, m::DST),
            cidr_text(r, &r.dst_addr, &r.dst_mask)
        ));
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

/// An address column: iptables prints a host address bare, ip6tables always with its prefix.
fn list_addr(r: &Rule, bit: u16, addr: &Addr, mask: &Addr) -> String {
    let family = family(r);
    if r.has & bit == 0 {
        return match family {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
        .into();
    }
    let cidr = Cidr::from_words(family, addr, mask);
    let text = if family == Family::V4 && cidr.prefix == 32 {
        format!("{}", cidr.addr)
    } else {
        cidr.to_string()
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
        source: list_addr(r, m::SRC, &r.src_addr, &r.src_mask),
        destination: list_addr(r, m::DST, &r.dst_addr, &r.dst_mask),
        extra: extra.join(" "),
    }
}

//! Rules as iptables prints them: each rule's iptables-save line and match text (`explain`,
//! `stats`, metrics) and the `iptables -L -v -n` columns.

use std::{fmt::Write as _, format, string::String, vec::Vec};

use crate::{
    ChainId, IPPROTO_TCP, IPPROTO_UDP, Rule, Target,
    addr::{Addr, Family},
    config::Cidr,
    m,
};

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
/// e.g. `-o lo -m owner ! --uid-owner 1337`. Owner groups print as gids
/// ([`match_text_named`] with the names given).
pub fn match_text(r: &Rule) -> String {
    match_text_named(r, &Names::default())
}

/// The names a workload's rules refer to by index: its owner groups
/// (`ISTIO_OUTBOUND_OWNER_GROUPS(_EXCLUDE)`, as given) and its interface list (`-c`, then
/// `-k`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Names<'a> {
    pub groups: &'a [&'a str],
    pub ifaces: &'a [&'a str],
}

/// [`match_text`], with the workload's names: what a [`m::GROUPS`] match lists, what a
/// [`m::NAMED`] one's index names, and the interface an [`m::IFACE`] one's index names.
pub fn match_text_named(r: &Rule, names: &Names) -> String {
    let groups = names.groups;
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
    // iptables-save's order: -s, -d, then -i/-o.
    if r.has & m::IFACE != 0 {
        let dir = match r.chain_id() {
            Some(ChainId::Inbound | ChainId::Prerouting) => "-i",
            _ => "-o",
        };
        let entry = r.uid.trailing_zeros();
        match names.ifaces.get(entry as usize) {
            Some(name) => part(&format!("{}{dir} {name}", bang(r, m::IFACE))),
            // Without the names (the kernel's copy of a chain): the list entry's number.
            None => part(&format!("{}{dir} #{entry}", bang(r, m::IFACE))),
        }
    }
    if r.has & m::OUT_LO != 0 {
        let dir = match r.chain_id() {
            Some(ChainId::Inbound | ChainId::Prerouting) => "-i",
            _ => "-o",
        };
        part(&format!("{}{dir} lo", bang(r, m::OUT_LO)));
    }
    if r.proto != 0 {
        part(&format!("-p {}", proto_name(r.proto)));
    }
    if r.has & m::DPORT != 0 {
        let p = proto_name(r.proto);
        part(&format!("-m {p} {}--dport {}", bang(r, m::DPORT), r.dport));
    }
    if r.has & m::DPORTS != 0 {
        part(&format!(
            "-m multiport {}--dports {},{}",
            bang(r, m::DPORTS),
            r.dport,
            r.dport2
        ));
    }
    if r.has & m::MARK != 0 {
        let mask = match r.mark_mask {
            u32::MAX => String::new(),
            mask => format!("/{mask:#x}"),
        };
        part(&format!("-m mark {}--mark {:#x}{mask}", bang(r, m::MARK), r.mark));
    }
    if r.has & m::ESTABLISHED != 0 {
        part(&format!(
            "-m conntrack {}--ctstate RELATED,ESTABLISHED",
            bang(r, m::ESTABLISHED)
        ));
    }
    if r.has & (m::UID | m::GID) != 0 {
        let mut owner = String::from("-m owner");
        if r.has & m::UID != 0 {
            let _ = write!(owner, " {}--uid-owner {}", bang(r, m::UID), r.uid);
        }
        if r.has & m::GID != 0 {
            let named = (r.has & m::NAMED != 0).then(|| groups.get(r.uid as usize)).flatten();
            match named {
                Some(name) => {
                    let _ = write!(owner, " {}--gid-owner {name}", bang(r, m::GID));
                }
                None => {
                    let _ = write!(owner, " {}--gid-owner {}", bang(r, m::GID), r.gid);
                }
            }
        }
        part(&owner);
    }
    if r.has & m::GROUPS != 0 {
        let each: Vec<String> = groups
            .iter()
            .map(|g| format!("-m owner {}--gid-owner {g}", bang(r, m::GROUPS)))
            .collect();
        if !each.is_empty() {
            part(&each.join(" "));
        }
    }
    s
}

/// The whole rule as an `iptables-save` line: `-A ISTIO_OUTPUT <matches> -j <target>`.
pub fn rule_text(r: &Rule) -> String {
    rule_text_named(r, &Names::default())
}

/// [`rule_text`], with the workload's owner groups as given.
pub fn rule_text_named(r: &Rule, names: &Names) -> String {
    let (chain, target) = (chain_name(r), target_text(r));
    let matches = match_text_named(r, names);
    if matches.is_empty() {
        format!("-A {chain} -j {target}")
    } else {
        format!("-A {chain} {matches} -j {target}")
    }
}

/// The chain the rule is in, as its tables name it: ambient's inbound chain is ISTIO_PRERT.
pub fn chain_name(r: &Rule) -> &'static str {
    match r.chain_id() {
        Some(ChainId::Inbound) if r.has & m::AMBIENT != 0 => "ISTIO_PRERT",
        other => other.map_or("?", ChainId::iptables_name),
    }
}

/// The rule's target as `stats` and the metrics name it: iptables' name, with the port of a
/// REDIRECT (the sidecar's reach theirs through ISTIO_REDIRECT and ISTIO_IN_REDIRECT, but for
/// DNS's; ambient's each have one).
pub fn target_name(r: &Rule) -> String {
    match r.target_kind() {
        Some(Target::Redirect | Target::InRedirect | Target::DnsRedirect) if r.has & m::AMBIENT != 0 => {
            format!("REDIRECT --to-ports {}", r.dport2)
        }
        other => other.map_or("?", Target::iptables_name).into(),
    }
}

/// The rule's `-j` target with its options: [`target_name`]'s, and TPROXY's and MARK's from
/// the rule.
pub fn target_text(r: &Rule) -> String {
    match r.target_kind() {
        Some(Target::Tproxy) => format!(
            "TPROXY --on-port {} --on-ip {} --tproxy-mark {:#x}/0xffffffff",
            r.dport2,
            match family(r) {
                Family::V4 => "0.0.0.0",
                Family::V6 => "::",
            },
            r.mark
        ),
        Some(Target::Mark) => format!("MARK --set-xmark {:#x}/0xffffffff", r.mark),
        _ => target_name(r),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ColumnOf {
    In,
    Out,
}

/// The columns `iptables -t nat -L CHAIN -v -n` prints for a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListColumns {
    pub prot: String,
    /// `in`: `-i` (an inbound chain's `lo`, a PREROUTING rule's device).
    pub input: String,
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
    list_columns_named(r, &Names::default())
}

/// [`list_columns`], with the interface an [`m::IFACE`] match names (its list entry's number
/// without the names).
pub fn list_columns_named(r: &Rule, names: &Names) -> ListColumns {
    let mut extra = Vec::new();
    if r.has & m::DPORT != 0 {
        let not = if r.neg & m::DPORT != 0 { "!" } else { "" };
        extra.push(format!("{} dpt:{not}{}", proto_name(r.proto), r.dport));
    }
    if r.has & m::DPORTS != 0 {
        let not = if r.neg & m::DPORTS != 0 { "!" } else { "" };
        extra.push(format!("multiport dports {not}{},{}", r.dport, r.dport2));
    }
    if r.has & m::GROUPS != 0 {
        let not = if r.neg & m::GROUPS != 0 { "! " } else { "" };
        extra.push(format!("{not}owner GID match (owner groups)"));
    }
    if r.has & m::MARK != 0 {
        let not = if r.neg & m::MARK != 0 { "! " } else { "" };
        let mask = match r.mark_mask {
            u32::MAX => String::new(),
            mask => format!("/{mask:#x}"),
        };
        extra.push(format!("mark match {not}{:#x}{mask}", r.mark));
    }
    for (bit, what, id) in [(m::UID, "UID", r.uid), (m::GID, "GID", r.gid)] {
        if r.has & bit != 0 {
            let not = if r.neg & bit != 0 { "! " } else { "" };
            extra.push(format!("{not}owner {what} match {id}"));
        }
    }
    let inbound = matches!(r.chain_id(), Some(ChainId::Inbound | ChainId::Prerouting));
    let device = |column: ColumnOf| {
        let bang = |bit| if r.neg & bit != 0 { "!" } else { "" };
        if (column == ColumnOf::In) != inbound {
            return "*".to_owned();
        }
        if r.has & m::OUT_LO != 0 {
            return format!("{}lo", bang(m::OUT_LO));
        }
        if r.has & m::IFACE != 0 {
            let entry = r.uid.trailing_zeros();
            return match names.ifaces.get(entry as usize) {
                Some(name) => format!("{}{name}", bang(m::IFACE)),
                None => format!("{}#{entry}", bang(m::IFACE)),
            };
        }
        "*".to_owned()
    };
    ListColumns {
        prot: if r.proto == 0 {
            "all".into()
        } else {
            proto_name(r.proto)
        },
        input: device(ColumnOf::In),
        out: device(ColumnOf::Out),
        source: list_addr(r, m::SRC, &r.src_addr, &r.src_mask),
        destination: list_addr(r, m::DST, &r.dst_addr, &r.dst_mask),
        extra: extra.join(" "),
    }
}

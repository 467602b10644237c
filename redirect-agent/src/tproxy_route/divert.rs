//! TPROXY mode with `-k`: the rules that deliver a VM's TPROXYed connections locally.
//!
//! tc ingress of a `-k` device marks each packet of a VM's connection that mangle's
//! ISTIO_TPROXY took with [`VIRT_DIVERT_MARK`] (iptables' TPROXY and ISTIO_DIVERT give the
//! TPROXY mark). Per device and family, `iif DEVICE fwmark 0x52440000 lookup TABLE` sends those
//! to TPROXY's table, `local default dev lo`, and `iif DEVICE fwmark 0x52440000 prohibit` right
//! after it refuses them if that table has no route: a marked connection is never forwarded
//! to its destination around the proxy (iptables' TPROXY has assigned the SYN a socket, which
//! `ip_forward` drops).
//!
//! Per device because the socket that accepts such a connection takes its SYN's mark
//! (`tcp_fwmark_accept`): a rule without `iif` would also match the replies it sends (a local
//! socket's route lookups come from `lo`), and loop them into lo. Rules name a device, not an
//! index, so those of a device that went stay, matching nothing, until [`remove_all`].

use redirect_common::VIRT_DIVERT_MARK;

#[allow(
    clippy::wildcard_imports,
    reason = "the parent module's types, constants and imports"
)]
use super::*;

/// The lookup rule's priority; the prohibit rule's is the next. Fixed, so that the two keep
/// their order whichever is added first: before `main` (32766) and the policy rule of
/// [`super::TproxyRouting`] (TPROXY's, which the kernel places just above `main`).
const LOOKUP_PREF: u32 = 32_700;
const PROHIBIT_PREF: u32 = LOOKUP_PREF + 1;

/// One of a device's two rules.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lookup,
    Prohibit,
}

impl Kind {
    fn pref(self) -> u32 {
        match self {
            Self::Lookup => LOOKUP_PREF,
            Self::Prohibit => PROHIBIT_PREF,
        }
    }

    /// As `ip rule` shows it, for messages.
    fn command(self, family: Family, device: &str, table: u32) -> String {
        let ip = match family {
            Family::V4 => "ip",
            Family::V6 => "ip -6",
        };
        let action = match self {
            Self::Lookup => format!("lookup {table}"),
            Self::Prohibit => "prohibit".to_owned(),
        };
        format!(
            "{ip} rule pref {} iif {device} fwmark {VIRT_DIVERT_MARK:#x} {action}",
            self.pref()
        )
    }

    /// TPROXY's own rule's message ([`rule_message`]) with the device; the prohibit one
    /// without its table.
    fn message(self, family: Family, device: &str, table: u32) -> RuleMessage {
        let policy = Policy {
            priority: Some(self.pref()),
            ..Policy::tproxy(VIRT_DIVERT_MARK, table)
        };
        let mut msg = rule_message(family, &policy);
        if self == Self::Prohibit {
            msg.header.action = RuleAction::Prohibit;
            msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
            msg.attributes.retain(|a| !matches!(a, RuleAttribute::Table(_)));
        }
        msg.attributes.push(RuleAttribute::Iifname(device.to_owned()));
        msg
    }
}

/// A divert rule found in a dump: its kind, device and priority.
struct Found {
    kind: Kind,
    device: String,
    pref: u32,
}

/// The family's divert rules (the mark is the agent's own: every rule with it is one).
fn find(socket: &Socket, family: Family) -> io::Result<Vec<Found>> {
    let mut query = RuleMessage::default();
    query.header.family = family.af();
    let mut found = Vec::new();
    dump(socket, RouteNetlinkMessage::GetRule(query), |m| {
        let RouteNetlinkMessage::NewRule(r) = m else { return };
        let (mut fwmark, mut device, mut pref) = (None, None, 0);
        for a in &r.attributes {
            match a {
                RuleAttribute::FwMark(v) => fwmark = Some(*v),
                RuleAttribute::Iifname(n) => device = Some(n.clone()),
                RuleAttribute::Priority(p) => pref = *p,
                _ => {}
            }
        }
        let kind = match r.header.action {
            RuleAction::Prohibit => Kind::Prohibit,
            _ => Kind::Lookup,
        };
        if r.header.family == family.af()
            && fwmark == Some(VIRT_DIVERT_MARK)
            && let Some(device) = device
        {
            found.push(Found { kind, device, pref });
        }
    })?;
    Ok(found)
}

/// Adds `device`'s two rules in both families, each unless there already (a predecessor's, at
/// a handover). IPv6 is left out where the namespace has none.
pub fn divert_device(netns: &Netns, device: &str, table: u32) -> Result<(), TproxyRouteError> {
    let socket = open_socket(netns)?;
    for family in [Family::V4, Family::V6] {
        let found = match find(&socket, family) {
            Ok(found) => found,
            Err(e) if family == Family::V6 && is_no_ipv6(&e) => continue,
            Err(e) => return Err(netlink_error(netns, format!("listing the {} rules", family.name()), e)),
        };
        // The prohibit rule first: the lookup is never without it.
        for kind in [Kind::Prohibit, Kind::Lookup] {
            if found.iter().any(|f| f.kind == kind && f.device == device) {
                continue;
            }
            let msg = RouteNetlinkMessage::NewRule(kind.message(family, device, table));
            match request(&socket, msg, NLM_F_CREATE | NLM_F_EXCL) {
                Ok(()) => {}
                Err(e) if family == Family::V6 && is_no_ipv6(&e) => break,
                Err(e) => {
                    let what = format!("adding `{}`", kind.command(family, device, table));
                    return Err(netlink_error(netns, what, e));
                }
            }
        }
    }
    Ok(())
}

/// Deletes every device's divert rules, both families (after the programs that mark went).
/// The first failure is returned, after trying the rest.
pub fn remove_all(netns: &Netns, table: u32) -> Result<(), TproxyRouteError> {
    let socket = open_socket(netns)?;
    let mut first = None;
    for family in [Family::V4, Family::V6] {
        let found = match find(&socket, family) {
            Ok(found) => found,
            Err(e) if is_gone(&e) || (family == Family::V6 && is_no_ipv6(&e)) => continue,
            Err(e) => {
                first.get_or_insert(netlink_error(netns, format!("listing the {} rules", family.name()), e));
                continue;
            }
        };
        for f in found {
            let mut msg = f.kind.message(family, &f.device, table);
            // By the priority it has (a predecessor's may differ), with its other selectors.
            msg.attributes.retain(|a| !matches!(a, RuleAttribute::Priority(_)));
            msg.attributes.push(RuleAttribute::Priority(f.pref));
            if f.kind == Kind::Lookup {
                // A lookup rule of another table (a run with other flags) is deleted too.
                msg.attributes.retain(|a| !matches!(a, RuleAttribute::Table(_)));
                msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
            }
            match request(&socket, RouteNetlinkMessage::DelRule(msg), 0) {
                Err(e) if !is_gone(&e) => {
                    let what = format!("removing `{}`", f.kind.command(family, &f.device, table));
                    first.get_or_insert(netlink_error(netns, what, e));
                }
                _ => {}
            }
        }
    }
    first.map_or(Ok(()), Err)
}

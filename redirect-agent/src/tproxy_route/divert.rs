//! TPROXY mode with `-k`: the rule that delivers a VM's TPROXYed connections locally.
//!
//! tc ingress of a `-k` device marks each packet of a VM's connection that mangle's
//! ISTIO_TPROXY took with [`VIRT_DIVERT_MARK`] (iptables' TPROXY and ISTIO_DIVERT give the
//! TPROXY mark). `iif DEVICE fwmark 0x52440000 lookup TABLE`, per device and family, sends those
//! to TPROXY's table, `local default dev lo`. Per device because the socket that accepts such
//! a connection takes its SYN's mark (`tcp_fwmark_accept`): a rule without `iif` would also
//! match the replies it sends (a local socket's route lookups come from `lo`), and loop them
//! into lo. Rules name a device, not an index, so one for a device that goes stays harmless
//! until [`remove_all`].

use redirect_common::VIRT_DIVERT_MARK;

#[allow(
    clippy::wildcard_imports,
    reason = "the parent module's types, constants and imports"
)]
use super::*;

/// `ip rule iif DEVICE fwmark 0x52440000 lookup TABLE`, as messages name it.
fn command(family: Family, device: &str, table: u32) -> String {
    let ip = match family {
        Family::V4 => "ip",
        Family::V6 => "ip -6",
    };
    format!("{ip} rule iif {device} fwmark {VIRT_DIVERT_MARK:#x} lookup {table}")
}

/// The priorities of the family's divert rules for `table`: every device's, or `device`'s.
fn find(socket: &Socket, family: Family, table: u32, device: Option<&str>) -> io::Result<Vec<u32>> {
    let mut query = RuleMessage::default();
    query.header.family = family.af();
    let mut found = Vec::new();
    dump(socket, RouteNetlinkMessage::GetRule(query), |m| {
        let RouteNetlinkMessage::NewRule(r) = m else { return };
        let (mut fwmark, mut rule_table, mut iif, mut priority) = (None, u32::from(r.header.table), None, 0);
        for a in &r.attributes {
            match a {
                RuleAttribute::FwMark(v) => fwmark = Some(*v),
                RuleAttribute::Table(t) => rule_table = *t,
                RuleAttribute::Iifname(n) => iif = Some(n.as_str()),
                RuleAttribute::Priority(p) => priority = *p,
                _ => {}
            }
        }
        if r.header.family == family.af()
            && fwmark == Some(VIRT_DIVERT_MARK)
            && rule_table == table
            && iif.is_some()
            && device.is_none_or(|d| iif == Some(d))
        {
            found.push(priority);
        }
    })?;
    Ok(found)
}

/// Adds the divert rule for `device` in both families, unless there already (a predecessor's,
/// at a handover). IPv6 is left out where the namespace has none.
pub fn divert_device(netns: &Netns, device: &str, table: u32) -> Result<(), TproxyRouteError> {
    let socket = open_socket(netns)?;
    for family in [Family::V4, Family::V6] {
        let failed = |e| netlink_error(netns, format!("adding `{}`", command(family, device, table)), e);
        match find(&socket, family, table, Some(device)) {
            Ok(found) if !found.is_empty() => continue,
            Ok(_) => {}
            Err(e) if family == Family::V6 && is_no_ipv6(&e) => continue,
            Err(e) => return Err(failed(e)),
        }
        let mut msg = rule_message(family, VIRT_DIVERT_MARK, table, None);
        msg.attributes.push(RuleAttribute::Iifname(device.to_owned()));
        match request(&socket, RouteNetlinkMessage::NewRule(msg), NLM_F_CREATE | NLM_F_EXCL) {
            Ok(()) => {}
            Err(e) if family == Family::V6 && is_no_ipv6(&e) => {}
            Err(e) => return Err(failed(e)),
        }
    }
    Ok(())
}

/// Deletes every device's divert rule for `table`, both families, by priority (a request
/// without `iif` matches a rule with any). Best effort: failures are returned as one line.
pub fn remove_all(netns: &Netns, table: u32) -> Result<(), TproxyRouteError> {
    let socket = open_socket(netns)?;
    for family in [Family::V4, Family::V6] {
        let found = match find(&socket, family, table, None) {
            Ok(found) => found,
            Err(e) if is_gone(&e) || (family == Family::V6 && is_no_ipv6(&e)) => continue,
            Err(e) => return Err(netlink_error(netns, format!("listing the {} rules", family.name()), e)),
        };
        for priority in found {
            let msg = rule_message(family, VIRT_DIVERT_MARK, table, Some(priority));
            match request(&socket, RouteNetlinkMessage::DelRule(msg), 0) {
                Err(e) if !is_gone(&e) => {
                    return Err(netlink_error(
                        netns,
                        format!("removing the {} divert rule at priority {priority}", family.name()),
                        e,
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

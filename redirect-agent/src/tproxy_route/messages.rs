//! The netlink messages of [`super::TproxyRouting`]: the rule and route it adds and deletes,
//! the dumps that find them, and the request/answer exchange on one namespace's socket.

#[allow(
    clippy::wildcard_imports,
    reason = "the parent module's types, constants and imports"
)]
use super::*;

/// The table in a header's one byte: tables above 255 go only in the attribute (as `ip` does).
pub(super) fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

/// `fwmark MARK[/MASK] [pref PRIORITY] lookup TABLE`. The mask is left out when all ones, the
/// kernel's default for a nonzero mark, as `ip rule` does; with a priority, a deletion takes
/// the rule at that priority only.
pub(super) fn rule_message(family: Family, policy: &Policy) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = family.af();
    msg.header.action = RuleAction::ToTable;
    msg.header.table = header_table(policy.table);
    msg.attributes.push(RuleAttribute::FwMark(policy.mark));
    if policy.mask != u32::MAX {
        msg.attributes.push(RuleAttribute::FwMask(policy.mask));
    }
    msg.attributes.push(RuleAttribute::Table(policy.table));
    msg.attributes.extend(policy.priority.map(RuleAttribute::Priority));
    msg
}

/// `local default dev lo table TABLE`. As `ip route add` makes it: host scope (a local route's)
/// and the boot protocol; as `ip route del` names it: any scope (RT_SCOPE_NOWHERE is the
/// kernel's wildcard) and any protocol.
pub(super) fn route_message(family: Family, table: u32, adding: bool) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family.af();
    msg.header.destination_prefix_length = 0;
    msg.header.table = header_table(table);
    msg.header.kind = RouteType::Local;
    if adding {
        msg.header.scope = RouteScope::Host;
        msg.header.protocol = RouteProtocol::Boot;
    } else {
        msg.header.scope = RouteScope::NoWhere;
    }
    msg.attributes.push(RouteAttribute::Table(table));
    msg.attributes.push(RouteAttribute::Oif(LOOPBACK_IFINDEX));
    msg
}

/// Whether a dumped rule is the policy's `fwmark MARK[/MASK] lookup TABLE`, at the policy's
/// priority if it has one, and selects on nothing else.
pub(super) fn is_our_rule(msg: &RuleMessage, policy: &Policy) -> bool {
    let h = &msg.header;
    if h.action != RuleAction::ToTable
        || h.dst_len != 0
        || h.src_len != 0
        || h.tos != 0
        || h.flags.contains(RuleFlags::Invert)
    {
        return false;
    }
    // No FwMask is all ones (the kernel lists 0xffffffff for `fwmark MARK`: the same); no
    // Priority is 0 (the kernel leaves out only a priority of 0).
    let (mut fwmark, mut mask, mut rule_table, mut priority) = (None, u32::MAX, u32::from(h.table), 0);
    for a in &msg.attributes {
        match a {
            RuleAttribute::FwMark(m) => fwmark = Some(*m),
            RuleAttribute::FwMask(m) => mask = *m,
            RuleAttribute::Table(t) => rule_table = *t,
            RuleAttribute::Priority(p) => priority = *p,
            // What the kernel lists for every rule; all ones is "not set".
            RuleAttribute::Protocol(_) => {}
            RuleAttribute::SuppressPrefixLen(u32::MAX) | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            // Any other selector (addresses, devices, ports, uid range...) or action detail.
            _ => return false,
        }
    }
    fwmark == Some(policy.mark)
        && mask == policy.mask
        && rule_table == policy.table
        && policy.priority.is_none_or(|p| p == priority)
}

/// The priorities of the family's rules of the policy, in the kernel's order (with a priority
/// in the policy, that one only).
///
/// Listed rather than left to `NLM_F_EXCL`: a rule added without a priority gets a new one
/// (one below the second rule's), so the kernel never finds an identical rule at it and
/// would add a duplicate, as `ip rule add` does when run twice.
pub(super) fn find_rules(socket: &Socket, family: Family, policy: &Policy) -> io::Result<Vec<u32>> {
    let mut query = RuleMessage::default();
    query.header.family = family.af();
    let mut found = Vec::new();
    dump(socket, RouteNetlinkMessage::GetRule(query), |m| {
        if let RouteNetlinkMessage::NewRule(r) = m
            && r.header.family == family.af()
            && is_our_rule(r, policy)
        {
            let priority = r.attributes.iter().find_map(|a| match a {
                RuleAttribute::Priority(p) => Some(*p),
                _ => None,
            });
            found.push(priority.unwrap_or(0));
        }
    })?;
    Ok(found)
}

/// Adds the local default route; `Ok(false)` when an identical one was there.
pub(super) fn add_route(socket: &Socket, family: Family, table: u32) -> io::Result<bool> {
    let msg = RouteNetlinkMessage::NewRoute(route_message(family, table, true));
    match request(socket, msg, NLM_F_CREATE | NLM_F_EXCL) {
        Ok(()) => Ok(true),
        // EEXIST says only that the table has a default route (IPv6: of the same metric).
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            if has_local_default(socket, family, table)? {
                Ok(false)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("table {table} already has a default route other than `local` on lo"),
                ))
            }
        }
        Err(e) => Err(e),
    }
}

/// Whether the table has `local default dev lo` of the family.
pub(super) fn has_local_default(socket: &Socket, family: Family, table: u32) -> io::Result<bool> {
    let mut query = RouteMessage::default();
    query.header.address_family = family.af();
    let mut found = false;
    dump(socket, RouteNetlinkMessage::GetRoute(query), |m| {
        let RouteNetlinkMessage::NewRoute(r) = m else { return };
        let mut route_table = u32::from(r.header.table);
        let mut oif = None;
        for a in &r.attributes {
            match a {
                RouteAttribute::Table(t) => route_table = *t,
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        found |= r.header.address_family == family.af()
            && route_table == table
            && r.header.destination_prefix_length == 0
            && r.header.kind == RouteType::Local
            && oif == Some(LOOPBACK_IFINDEX);
    })?;
    Ok(found)
}

/// Deletes an entry: a rule by its selectors, and by the policy's priority when it has one.
pub(super) fn delete(socket: &Socket, item: Item, policy: &Policy) -> io::Result<()> {
    let msg = match item {
        Item::Rule(family) => RouteNetlinkMessage::DelRule(rule_message(family, policy)),
        Item::Route(family) => RouteNetlinkMessage::DelRoute(route_message(family, policy.table, false)),
    };
    request(socket, msg, 0)
}

/// Sends a request with NLM_F_ACK (and `flags`) and waits for its acknowledgement.
pub(super) fn request(socket: &Socket, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let seq = send(socket, msg, NLM_F_REQUEST | NLM_F_ACK | flags)?;
    answers(socket, seq, |_| {})
}

/// Sends a dump request and hands every message of the answer to `each`.
pub(super) fn dump(
    socket: &Socket,
    msg: RouteNetlinkMessage,
    each: impl FnMut(&RouteNetlinkMessage),
) -> io::Result<()> {
    let seq = send(socket, msg, NLM_F_REQUEST | NLM_F_DUMP)?;
    answers(socket, seq, each)
}

pub(super) fn send(socket: &Socket, msg: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = flags;
    req.header.sequence_number = seq;
    req.finalize();
    let mut bytes = vec![0u8; req.buffer_len()];
    req.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    Ok(seq)
}

/// Reads the answer to request `seq` until its acknowledgement (the kernel's error, if any)
/// or the end of its dump, handing the messages in between to `each`.
pub(super) fn answers(socket: &Socket, seq: u32, mut each: impl FnMut(&RouteNetlinkMessage)) -> io::Result<()> {
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    loop {
        buf.clear();
        socket.recv(&mut buf, 0)?;
        let mut rest = &buf[..];
        while rest.len() >= NLMSG_HDR {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink message: {e}")))?;
            // deserialize checked that the length is at least a header and within `rest`.
            let len = (msg.header.length as usize).next_multiple_of(usize::from(NLMSG_ALIGNTO));
            rest = rest.get(len..).unwrap_or_default();
            if msg.header.sequence_number != seq {
                continue;
            }
            match msg.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::Error(_) => return Ok(()),
                NetlinkPayload::Done(d) if d.code < 0 => return Err(io::Error::from_raw_os_error(-d.code)),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::InnerMessage(m) => each(&m),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_with_another_selector_or_mask_is_not_ours() {
        let tproxy = Policy::tproxy(1337, 133);
        let at = |priority| Policy {
            priority: Some(priority),
            ..tproxy
        };
        let ours = rule_message(Family::V4, &at(32765));
        assert!(!ours.attributes.iter().any(|a| matches!(a, RuleAttribute::FwMask(_))));
        assert!(is_our_rule(&ours, &tproxy));
        assert!(!is_our_rule(&ours, &Policy::tproxy(1338, 133)));
        assert!(!is_our_rule(&ours, &Policy::tproxy(1337, 134)));
        // What the kernel lists for `fwmark 1337`: the mask, all ones, is the same rule.
        let mut listed = ours.clone();
        listed.attributes.push(RuleAttribute::FwMask(u32::MAX));
        assert!(is_our_rule(&listed, &tproxy));
        let mut masked = ours.clone();
        masked.attributes.push(RuleAttribute::FwMask(0xff));
        assert!(!is_our_rule(&masked, &tproxy));
        let mut iif = ours.clone();
        iif.attributes.push(RuleAttribute::Iifname("eth0".into()));
        assert!(!is_our_rule(&iif, &tproxy));
        let mut inverted = ours;
        inverted.header.flags = RuleFlags::Invert;
        assert!(!is_our_rule(&inverted, &tproxy));
        // A table above 255 is in the attribute only.
        let big = rule_message(Family::V6, &Policy::tproxy(1, 5000));
        assert_eq!(big.header.table, 0);
        assert!(is_our_rule(&big, &Policy::tproxy(1, 5000)));
    }

    #[test]
    fn a_masked_prioritized_rule_is_ours_only_with_its_mask_and_priority() {
        let ambient = Policy::ambient();
        let msg = rule_message(Family::V6, &ambient);
        assert!(msg.attributes.contains(&RuleAttribute::FwMark(0x111)));
        assert!(msg.attributes.contains(&RuleAttribute::FwMask(0xfff)));
        assert!(msg.attributes.contains(&RuleAttribute::Priority(32764)));
        assert!(msg.attributes.contains(&RuleAttribute::Table(100)));
        assert_eq!(msg.header.table, 100);
        assert!(is_our_rule(&msg, &ambient));
        // Another mask, or none (all bits), is another rule.
        let unmasked = Policy {
            mask: u32::MAX,
            ..ambient
        };
        assert!(!is_our_rule(&msg, &Policy { mask: 0xff, ..ambient }));
        assert!(!is_our_rule(&msg, &unmasked));
        assert!(!is_our_rule(&rule_message(Family::V6, &unmasked), &ambient));
        // The policy's priority is part of the rule; without one, any priority is.
        let (elsewhere, anywhere) = (
            Policy {
                priority: Some(32765),
                ..ambient
            },
            Policy {
                priority: None,
                ..ambient
            },
        );
        assert!(!is_our_rule(&msg, &elsewhere));
        assert!(is_our_rule(&msg, &anywhere));
        assert!(!is_our_rule(&rule_message(Family::V6, &anywhere), &ambient));
    }
}

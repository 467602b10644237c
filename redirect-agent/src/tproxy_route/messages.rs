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

/// `fwmark MARK lookup TABLE` (mask all ones, the kernel's default for a nonzero mark);
/// with a priority, a deletion takes that rule only.
pub(super) fn rule_message(family: Family, mark: u32, table: u32, priority: Option<u32>) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = family.af();
    msg.header.action = RuleAction::ToTable;
    msg.header.table = header_table(table);
    msg.attributes.push(RuleAttribute::FwMark(mark));
    msg.attributes.push(RuleAttribute::Table(table));
    msg.attributes.extend(priority.map(RuleAttribute::Priority));
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

/// Whether a dumped rule is `fwmark MARK lookup TABLE` and selects on nothing else.
pub(super) fn is_our_rule(msg: &RuleMessage, mark: u32, table: u32) -> bool {
    let h = &msg.header;
    if h.action != RuleAction::ToTable
        || h.dst_len != 0
        || h.src_len != 0
        || h.tos != 0
        || h.flags.contains(RuleFlags::Invert)
    {
        return false;
    }
    let (mut fwmark, mut mask, mut rule_table) = (None, u32::MAX, u32::from(h.table));
    for a in &msg.attributes {
        match a {
            RuleAttribute::FwMark(m) => fwmark = Some(*m),
            RuleAttribute::FwMask(m) => mask = *m,
            RuleAttribute::Table(t) => rule_table = *t,
            // What the kernel lists for every rule; all ones is "not set".
            RuleAttribute::Priority(_) | RuleAttribute::Protocol(_) => {}
            RuleAttribute::SuppressPrefixLen(u32::MAX) | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            // Any other selector (addresses, devices, ports, uid range...) or action detail.
            _ => return false,
        }
    }
    fwmark == Some(mark) && mask == u32::MAX && rule_table == table
}

/// The priorities of the family's rules `fwmark MARK lookup TABLE`, in the kernel's order.
///
/// Listed rather than left to `NLM_F_EXCL`: a rule added without a priority gets a new one
/// (one below the second rule's), so the kernel never finds an identical rule at it and
/// would add a duplicate, as `ip rule add` does when run twice.
pub(super) fn find_rules(socket: &Socket, family: Family, mark: u32, table: u32) -> io::Result<Vec<u32>> {
    let mut query = RuleMessage::default();
    query.header.family = family.af();
    let mut found = Vec::new();
    dump(socket, RouteNetlinkMessage::GetRule(query), |m| {
        if let RouteNetlinkMessage::NewRule(r) = m
            && r.header.family == family.af()
            && is_our_rule(r, mark, table)
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

/// Deletes an entry: a rule by its selectors, and by its priority when given.
pub(super) fn delete(socket: &Socket, item: Item, mark: u32, table: u32, priority: Option<u32>) -> io::Result<()> {
    let msg = match item {
        Item::Rule(family) => RouteNetlinkMessage::DelRule(rule_message(family, mark, table, priority)),
        Item::Route(family) => RouteNetlinkMessage::DelRoute(route_message(family, table, false)),
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

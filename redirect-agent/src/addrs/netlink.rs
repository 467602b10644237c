//! The namespace's addresses from rtnetlink: dumps, change notifications, and the addresses
//! the agent puts on `lo` (`::6`, the node's probe sources).

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv6Addr},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_ALIGNTO, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope, CacheInfo},
    link::{LinkAttribute, LinkLayerType, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

/// A netlink message header's size: a shorter tail of a datagram holds no message.
const NLMSG_HDR: usize = 16;
/// Receive buffer: the kernel sizes a dump's datagrams to the reader's buffer, up to 32 KiB.
const RECV_BUFFER: usize = 64 * 1024;
/// `lo` is the first device of every network namespace.
pub(super) const LOOPBACK_IFINDEX: u32 = 1;

/// One address of the namespace, as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NetnsAddr {
    pub ip: IpAddr,
    pub ifindex: u32,
    /// Global scope (not host or link): an address other hosts can reach.
    pub global: bool,
}

/// A route netlink socket in the calling thread's namespace (blocking), for dumps.
pub(super) fn query_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    Ok(socket)
}

/// A non-blocking route netlink socket in the calling thread's namespace, subscribed to its
/// address and route changes of both families and its devices' (names, for `-c`).
pub(super) fn event_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.add_membership(libc::RTNLGRP_IPV4_IFADDR)?;
    socket.add_membership(libc::RTNLGRP_IPV6_IFADDR)?;
    socket.add_membership(libc::RTNLGRP_IPV4_ROUTE)?;
    socket.add_membership(libc::RTNLGRP_IPV6_ROUTE)?;
    socket.add_membership(libc::RTNLGRP_LINK)?;
    socket.set_non_blocking(true)?;
    Ok(socket)
}

/// The address an RTM_NEWADDR message gives the namespace.
fn address_of(msg: &AddressMessage) -> Option<NetnsAddr> {
    if !matches!(msg.header.family, AddressFamily::Inet | AddressFamily::Inet6) {
        return None;
    }
    let (mut local, mut address) = (None, None);
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    // IFA_LOCAL is this side of a point-to-point link; IFA_ADDRESS otherwise.
    Some(NetnsAddr {
        ip: local.or(address)?,
        ifindex: msg.header.index,
        global: msg.header.scope == AddressScope::Universe,
    })
}

#[cfg(test)]
/// Parses one datagram of RTM_NEWADDR messages, in the kernel's order. Returns true when the
/// dump is complete.
pub(super) fn parse_addrs(buf: &[u8], out: &mut Vec<NetnsAddr>) -> io::Result<bool> {
    parse_dump(buf, |m| {
        if let RouteNetlinkMessage::NewAddress(m) = m {
            out.extend(address_of(m));
        }
    })
}

/// One route of the namespace's main table: where it goes and the source it gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MainRoute {
    pub prefix: IpAddr,
    pub len: u8,
    pub oif: Option<u32>,
    pub prefsrc: Option<IpAddr>,
    pub priority: u32,
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A unicast route of the main table (the one a pod without policy routing uses).
fn main_route(m: &RouteMessage) -> Option<MainRoute> {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || m.header.kind != RouteType::Unicast {
        return None;
    }
    let unspecified = match m.header.address_family {
        AddressFamily::Inet => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let mut r = MainRoute {
        prefix: unspecified,
        len: m.header.destination_prefix_length,
        oif: None,
        prefsrc: None,
        priority: 0,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => r.prefix = ip_of(d)?,
            RouteAttribute::PrefSource(s) => r.prefsrc = ip_of(s),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            // A multipath route's device, when all its nexthops share one (`-o` then sees it
            // whichever the kernel picks); several devices leave it unknown.
            RouteAttribute::MultiPath(hops) => {
                let mut devices = hops.iter().map(|h| h.interface_index);
                let first = devices.next();
                if first.is_some() && devices.all(|d| Some(d) == first) {
                    r.oif = first;
                }
            }
            RouteAttribute::Priority(p) => r.priority = *p,
            _ => {}
        }
    }
    Some(r)
}

/// Every unicast route of the main table of both families.
pub(super) fn dump_routes(socket: &Socket) -> io::Result<Vec<MainRoute>> {
    let mut out = Vec::new();
    dump_each(socket, RouteNetlinkMessage::GetRoute(RouteMessage::default()), |m| {
        if let RouteNetlinkMessage::NewRoute(m) = m {
            out.extend(main_route(m));
        }
    })?;
    Ok(out)
}

/// Sends a dump request (AF_UNSPEC in it: both families) and hands every message of the
/// answer to `each`, until the dump is complete.
fn dump_each(
    socket: &Socket,
    request: RouteNetlinkMessage,
    mut each: impl FnMut(&RouteNetlinkMessage),
) -> io::Result<()> {
    send(socket, request, NLM_F_REQUEST | NLM_F_DUMP)?;
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    loop {
        buf.clear();
        socket.recv(&mut buf, 0)?;
        if parse_dump(&buf, &mut each)? {
            return Ok(());
        }
    }
}

/// Parses one datagram of a dump, handing each message to `each`. Returns true when the dump
/// is complete.
fn parse_dump(mut buf: &[u8], mut each: impl FnMut(&RouteNetlinkMessage)) -> io::Result<bool> {
    while buf.len() >= NLMSG_HDR {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink message: {e}")))?;
        match &msg.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => return Err(e.to_io()),
            NetlinkPayload::InnerMessage(m) => each(m),
            _ => {}
        }
        // deserialize checked that the length is at least a header and within `buf`.
        let len = (msg.header.length as usize).next_multiple_of(usize::from(NLMSG_ALIGNTO));
        buf = buf.get(len..).unwrap_or_default();
    }
    Ok(false)
}

fn send(socket: &Socket, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = flags;
    req.header.sequence_number = 1;
    req.finalize();
    let mut bytes = vec![0u8; req.buffer_len()];
    req.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    Ok(())
}

/// Every address of both families of the namespace the socket lives in, in the kernel's order
/// (by device, primary addresses first).
pub(super) fn dump(socket: &Socket) -> io::Result<Vec<NetnsAddr>> {
    let mut out = Vec::new();
    dump_each(
        socket,
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        |m| {
            if let RouteNetlinkMessage::NewAddress(m) = m {
                out.extend(address_of(m));
            }
        },
    )?;
    Ok(out)
}

/// A device of the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// Its packets carry an Ethernet header (a veth, a tap, a bridge), which tc sees before
    /// the IP header; an IP device's (a tun) start with the IP header.
    pub ether: bool,
}

/// Every device of the namespace the socket lives in.
pub(super) fn dump_links(socket: &Socket) -> io::Result<Vec<Link>> {
    let mut out = Vec::new();
    dump_each(socket, RouteNetlinkMessage::GetLink(LinkMessage::default()), |m| {
        if let RouteNetlinkMessage::NewLink(m) = m {
            let name = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            out.extend(name.map(|name| Link {
                ifindex: m.header.index,
                name,
                ether: m.header.link_layer_type == LinkLayerType::Ether,
            }));
        }
    })?;
    Ok(out)
}

/// The addresses alone, for the enroll checks.
pub(super) fn ips(addrs: &[NetnsAddr]) -> BTreeSet<IpAddr> {
    addrs.iter().map(|a| a.ip).collect()
}

/// `ip -6 addr add ADDR/128 dev lo`: what istio-iptables does for `::6` when it installs the
/// ip6tables rules (IPv6 gives `lo` only `::1`, where IPv4 has all of 127/8), so that the
/// proxy can connect to the app from it. An address already there is fine.
pub(super) fn add_to_lo(socket: &Socket, ip: Ipv6Addr) -> io::Result<()> {
    lo_address(socket, IpAddr::V6(ip), AddressScope::Universe, false, true).map(drop)
}

/// Adds `ip` (a host address: /32, /128) to `lo` with `scope` (IPv4's; an IPv6 address's
/// scope follows from the address), an IPv6 one `deprecated` if asked, or removes it:
/// whether it did. An address already there,
/// or already gone, is fine (`false`).
///
/// IPv6 ones go without duplicate address detection: until it ends (a workqueue run later,
/// even on lo) the address is tentative, and source selection passes it over, so a socket
/// dialing `::6` right after would get the pod's address as its source instead of `::6`.
pub(super) fn lo_address(
    socket: &Socket,
    ip: IpAddr,
    scope: AddressScope,
    deprecated: bool,
    add: bool,
) -> io::Result<bool> {
    let mut msg = AddressMessage::default();
    msg.header.index = LOOPBACK_IFINDEX;
    match ip {
        IpAddr::V4(_) => {
            msg.header.family = AddressFamily::Inet;
            msg.header.prefix_len = 32;
        }
        IpAddr::V6(_) => {
            msg.header.family = AddressFamily::Inet6;
            msg.header.prefix_len = 128;
            msg.header.flags = AddressHeaderFlags::Nodad;
            // IPv6 source selection looks at every device's addresses (lo's too) and has no
            // host scope for a global one: deprecated, the address is never another
            // connection's choice, and can still be bound.
            if deprecated {
                let mut lifetimes = CacheInfo::default();
                lifetimes.ifa_preferred = 0;
                lifetimes.ifa_valid = u32::MAX;
                msg.attributes.push(AddressAttribute::CacheInfo(lifetimes));
            }
        }
    }
    msg.header.scope = scope;
    msg.attributes.push(AddressAttribute::Local(ip));
    msg.attributes.push(AddressAttribute::Address(ip));
    let (request, fine) = if add {
        (
            RouteNetlinkMessage::NewAddress(msg),
            (NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, libc::EEXIST),
        )
    } else {
        (
            RouteNetlinkMessage::DelAddress(msg),
            (NLM_F_REQUEST | NLM_F_ACK, libc::EADDRNOTAVAIL),
        )
    };
    send(socket, request, fine.0)?;
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    socket.recv(&mut buf, 0)?;
    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink message: {e}")))?;
    match msg.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => {
            let err = e.to_io();
            match err.raw_os_error() {
                Some(code) if code == fine.1 => Ok(false),
                _ => Err(err),
            }
        }
        _ => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use libc::{IFA_ADDRESS, IFA_LOCAL, RTM_NEWADDR};
    use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR};

    use super::*;

    fn msg(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m
    }

    /// An ifaddrmsg (family, prefix, flags, scope, index 2) and its attributes.
    fn addr_body(family: u8, scope: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut b = vec![family, 24, 0, scope, 2, 0, 0, 0];
        for (ty, ip) in attrs {
            b.extend_from_slice(&(4 + ip.len() as u16).to_ne_bytes());
            b.extend_from_slice(&ty.to_ne_bytes());
            b.extend_from_slice(ip);
        }
        b
    }

    fn ips(v: &[NetnsAddr]) -> Vec<IpAddr> {
        v.iter().map(|a| a.ip).collect()
    }

    #[test]
    fn parses_local_over_address_and_both_families_in_order() {
        let v6: Ipv6Addr = "fd00:200:0:1::1".parse().unwrap();
        let mut buf = msg(
            RTM_NEWADDR,
            &addr_body(2, 0, &[(IFA_ADDRESS, &[10, 200, 0, 9]), (IFA_LOCAL, &[10, 200, 0, 1])]),
        );
        buf.extend(msg(RTM_NEWADDR, &addr_body(10, 0, &[(IFA_ADDRESS, &v6.octets())])));
        buf.extend(msg(RTM_NEWADDR, &addr_body(2, 254, &[(IFA_ADDRESS, &[127, 0, 0, 1])])));
        let mut out = Vec::new();
        assert!(!parse_addrs(&buf, &mut out).unwrap());
        assert_eq!(
            ips(&out),
            [
                IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)),
                IpAddr::V6(v6),
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            ]
        );
        assert_eq!(out.iter().map(|a| a.global).collect::<Vec<_>>(), [true, true, false]);
        let mut out = Vec::new();
        assert!(parse_addrs(&msg(NLMSG_DONE, &[0; 4]), &mut out).unwrap());
        assert!(parse_addrs(&msg(NLMSG_ERROR, &(-1i32).to_ne_bytes()), &mut out).is_err());
        assert!(parse_addrs(&buf[..20], &mut out).is_err());
    }

    /// A dump read from a kernel (6.x): `lo` 127.0.0.1/8, then on a veth
    /// `10.200.9.1 peer 10.200.9.2/32` (IFA_LOCAL and IFA_ADDRESS differ) and 10.200.8.1/24,
    /// each with IFA_LABEL, IFA_FLAGS and IFA_CACHEINFO; then NLMSG_DONE in its own datagram.
    #[test]
    #[cfg(target_endian = "little")]
    fn parses_a_dump_captured_from_the_kernel() {
        const ADDRS: &str = "4c0000001400020001000000873b0000020880fe01000000080001007f000001080002007f000001\
            070003006c6f0000080008008000000014000600ffffffffffffffff0be702000be70200\
            4c0000001400020001000000873b00000220800002000000080001000ac80902080002000ac80901\
            0700030076300000080008008000000014000600ffffffffffffffff0de702000de70200\
            4c0000001400020001000000873b00000218800002000000080001000ac80801080002000ac80801\
            0700030076300000080008008000000014000600ffffffffffffffff0de702000de70200";
        const DONE: &str = "140000000300020001000000873b000000000000";
        let bytes = |hex: &str| -> Vec<u8> {
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect()
        };
        let mut out = Vec::new();
        assert!(!parse_addrs(&bytes(ADDRS), &mut out).unwrap());
        assert_eq!(
            ips(&out),
            [
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V4(Ipv4Addr::new(10, 200, 9, 1)),
                IpAddr::V4(Ipv4Addr::new(10, 200, 8, 1)),
            ]
        );
        assert_eq!(out[0].ifindex, LOOPBACK_IFINDEX);
        assert!(!out[0].global && out[1].global);
        assert!(parse_addrs(&bytes(DONE), &mut out).unwrap());
        assert_eq!(out.len(), 3);
    }
}

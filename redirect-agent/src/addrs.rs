//! The workload's local addresses, kept in `LOCAL_ADDRS` from rtnetlink.
//!
//! iptables' `-o lo` is a routing fact: a destination that is one of the namespace's own
//! addresses leaves through loopback. connect4 sees no route, so the agent mirrors the
//! namespace's IPv4 addresses into a map (127/8 is checked in the program) and follows
//! RTM_NEWADDR/RTM_DELADDR. On any notification it re-reads the whole set and applies the
//! difference, which cannot drift the way applying single events can after an overrun.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::{HashMap, MapData};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NLMSG_ALIGNTO, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use redirect_common::LocalAddrKey;
use tokio::io::unix::AsyncFd;

use crate::sys::Netns;

/// A netlink message header's size: a shorter tail of a datagram holds no message.
const NLMSG_HDR: usize = 16;
/// Receive buffer: the kernel sizes a dump's datagrams to the reader's buffer, up to 32 KiB.
const RECV_BUFFER: usize = 64 * 1024;

/// A route netlink socket in the calling thread's namespace (blocking), for dumps.
fn query_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    Ok(socket)
}

/// A non-blocking route netlink socket in the calling thread's namespace, subscribed to its
/// IPv4 address changes (RTM_NEWADDR/RTM_DELADDR).
fn event_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.add_membership(libc::RTNLGRP_IPV4_IFADDR)?;
    socket.set_non_blocking(true)?;
    Ok(socket)
}

/// The address an RTM_NEWADDR message gives the namespace, if it is IPv4.
fn ipv4_of(msg: &AddressMessage) -> Option<Ipv4Addr> {
    if msg.header.family != AddressFamily::Inet {
        return None;
    }
    let (mut local, mut address) = (None, None);
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(ip)) => local = Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
            _ => {}
        }
    }
    // IFA_LOCAL is this side of a point-to-point link; IFA_ADDRESS otherwise.
    local.or(address)
}

/// Parses one datagram of RTM_NEWADDR messages. Returns true when the dump is complete.
fn parse_addrs(mut buf: &[u8], out: &mut BTreeSet<Ipv4Addr>) -> io::Result<bool> {
    while buf.len() >= NLMSG_HDR {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink message: {e}")))?;
        match &msg.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => return Err(e.to_io()),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) => out.extend(ipv4_of(m)),
            _ => {}
        }
        // deserialize checked that the length is at least a header and within `buf`.
        let len = (msg.header.length as usize).next_multiple_of(usize::from(NLMSG_ALIGNTO));
        buf = buf.get(len..).unwrap_or_default();
    }
    Ok(false)
}

/// Reads every IPv4 address of the namespace the socket lives in.
fn dump(socket: &Socket) -> io::Result<BTreeSet<Ipv4Addr>> {
    let mut get = AddressMessage::default();
    get.header.family = AddressFamily::Inet;
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetAddress(get));
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.header.sequence_number = 1;
    req.finalize();
    let mut bytes = vec![0u8; req.buffer_len()];
    req.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    let mut out = BTreeSet::new();
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    loop {
        buf.clear();
        socket.recv(&mut buf, 0)?;
        if parse_addrs(&buf, &mut out)? {
            return Ok(out);
        }
    }
}

/// The namespace's IPv4 addresses now, read once (node mode checks them before enrolling).
pub fn read(netns: &Netns) -> io::Result<BTreeSet<Ipv4Addr>> {
    let query = netns.run(query_socket)?;
    dump(&query)
}

/// Removes every address entry of the workload `netns_cookie` from both maps, whoever wrote
/// them: what unenrolling a workload (or dropping one whose namespace is gone) must leave.
pub fn remove_all(
    map: &mut HashMap<MapData, LocalAddrKey, u8>,
    owners: &mut HashMap<MapData, u32, u64>,
    netns_cookie: u64,
) {
    let keys: Vec<LocalAddrKey> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.netns_cookie == netns_cookie)
        .collect();
    for k in keys {
        let _ = map.remove(&k);
    }
    let owned: Vec<u32> = owners
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, c)| *c == netns_cookie)
        .map(|(a, _)| a)
        .collect();
    for a in owned {
        let _ = owners.remove(&a);
    }
}

/// The namespace's addresses as seen by connect4 (`LOCAL_ADDRS`: what `-o lo` reaches) and by
/// sk_lookup (`ADDR_OWNERS`: which workload a connection from another host is for).
pub struct LocalAddrs {
    map: HashMap<MapData, LocalAddrKey, u8>,
    owners: HashMap<MapData, u32, u64>,
    netns_cookie: u64,
    current: BTreeSet<Ipv4Addr>,
    /// A blocking socket in the workload's namespace, for dumps.
    query: Socket,
}

impl LocalAddrs {
    /// Reads the current set and installs it; connect4 is not attached yet, so the first
    /// connection already sees it.
    pub fn install(
        netns: &Netns,
        map: HashMap<MapData, LocalAddrKey, u8>,
        owners: HashMap<MapData, u32, u64>,
        netns_cookie: u64,
    ) -> io::Result<Self> {
        let query = netns.run(query_socket)?;
        let mut me = Self {
            map,
            owners,
            netns_cookie,
            current: BTreeSet::new(),
            query,
        };
        me.refresh()?;
        Ok(me)
    }

    pub fn addresses(&self) -> &BTreeSet<Ipv4Addr> {
        &self.current
    }

    fn key(&self, ip: Ipv4Addr) -> LocalAddrKey {
        LocalAddrKey::from_ip(self.netns_cookie, ip)
    }

    fn refresh(&mut self) -> io::Result<()> {
        let now = dump(&self.query)?;
        for ip in now.difference(&self.current) {
            self.map.insert(self.key(*ip), 1, 0).map_err(io::Error::other)?;
            // Loopback addresses are in every namespace and never reached from another host.
            if !ip.is_loopback() {
                let owner = u32::from(*ip).to_be();
                self.owners
                    .insert(owner, self.netns_cookie, 0)
                    .map_err(io::Error::other)?;
            }
            tracing::info!(%ip, "local address added");
        }
        for ip in self.current.difference(&now) {
            // Already gone is fine: the goal is absence.
            let _ = self.map.remove(&self.key(*ip));
            let _ = self.owners.remove(&u32::from(*ip).to_be());
            tracing::info!(%ip, "local address removed");
        }
        self.current = now;
        Ok(())
    }

    /// Follows address changes until the task is dropped.
    pub async fn watch(mut self, netns: Netns) -> io::Result<()> {
        let socket = netns.run(event_socket)?;
        // SAFETY: `netlink_sys::Socket` owns its descriptor (it closes it on drop, and nothing
        // else does) and `as_raw_fd` always returns that one; the AsyncFd owns the socket until
        // it drops, and this code never swaps it through `get_mut`. (netlink-sys's own
        // TokioSocket makes the same registration through tokio's deprecated `AsyncFd::new`.)
        let events = unsafe { AsyncFd::register(socket)? };
        // Changes between install() and subscribing would be missed otherwise.
        self.refresh()?;
        let mut buf = Vec::with_capacity(RECV_BUFFER);
        loop {
            let mut guard = events.readable().await?;
            // Drain everything queued; the content does not matter, the re-read does.
            loop {
                buf.clear();
                match events.get_ref().recv(&mut buf, 0) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // ENOBUFS: events were dropped; the full re-read below covers them.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                    Err(e) => return Err(e),
                }
            }
            guard.clear_ready();
            if let Err(e) = self.refresh() {
                tracing::warn!("re-reading local addresses: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
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

    fn addr_body(family: u8, attrs: &[(u16, [u8; 4])]) -> Vec<u8> {
        let mut b = vec![family, 24, 0, 0, 2, 0, 0, 0];
        for (ty, ip) in attrs {
            b.extend_from_slice(&8u16.to_ne_bytes());
            b.extend_from_slice(&ty.to_ne_bytes());
            b.extend_from_slice(ip);
        }
        b
    }

    #[test]
    fn parses_local_over_address_and_skips_ipv6() {
        let mut buf = msg(
            RTM_NEWADDR,
            &addr_body(2, &[(IFA_ADDRESS, [10, 200, 0, 9]), (IFA_LOCAL, [10, 200, 0, 1])]),
        );
        buf.extend(msg(RTM_NEWADDR, &addr_body(10, &[(IFA_ADDRESS, [1, 2, 3, 4])])));
        buf.extend(msg(RTM_NEWADDR, &addr_body(2, &[(IFA_ADDRESS, [127, 0, 0, 1])])));
        let mut out = BTreeSet::new();
        assert!(!parse_addrs(&buf, &mut out).unwrap());
        assert_eq!(
            out.into_iter().collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 200, 0, 1), Ipv4Addr::new(127, 0, 0, 1)]
        );
        let mut out = BTreeSet::new();
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
        let mut out = BTreeSet::new();
        assert!(!parse_addrs(&bytes(ADDRS), &mut out).unwrap());
        assert_eq!(
            out.iter().copied().collect::<Vec<_>>(),
            [
                Ipv4Addr::new(10, 200, 8, 1),
                Ipv4Addr::new(10, 200, 9, 1),
                Ipv4Addr::new(127, 0, 0, 1)
            ]
        );
        assert!(parse_addrs(&bytes(DONE), &mut out).unwrap());
        assert_eq!(out.len(), 3);
    }
}

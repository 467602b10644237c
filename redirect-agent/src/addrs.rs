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
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use aya::maps::{HashMap, MapData};
use redirect_common::LocalAddrKey;
use tokio::io::unix::AsyncFd;

use crate::sys::Netns;

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const IFADDRMSG: usize = 8;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;

fn netlink_socket(groups: u32, nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_RAW | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, flags, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh valid fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_nl is valid; we set family and groups.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = groups;
    // SAFETY: pointer and length describe `sa`.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses one datagram of RTM_NEWADDR messages. Returns true when the dump is complete.
fn parse_addrs(buf: &[u8], out: &mut BTreeSet<Ipv4Addr>) -> io::Result<bool> {
    let mut off = 0;
    while off + NLMSG_HDR <= buf.len() {
        let len = u32_at(buf, off) as usize;
        let ty = u16_at(buf, off + 4);
        if len < NLMSG_HDR || off + len > buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
        }
        let msg = &buf[off..off + len];
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = if msg.len() >= NLMSG_HDR + 4 {
                    -(u32_at(msg, NLMSG_HDR) as i32)
                } else {
                    0
                };
                return Err(io::Error::from_raw_os_error(errno));
            }
            RTM_NEWADDR if msg.len() >= NLMSG_HDR + IFADDRMSG && msg[NLMSG_HDR] == libc::AF_INET as u8 => {
                let (mut local, mut address) = (None, None);
                let mut a = NLMSG_HDR + IFADDRMSG;
                while a + 4 <= msg.len() {
                    let alen = u16_at(msg, a) as usize;
                    let aty = u16_at(msg, a + 2);
                    if alen < 4 || a + alen > msg.len() {
                        break;
                    }
                    if alen == 8 {
                        let ip = Ipv4Addr::new(msg[a + 4], msg[a + 5], msg[a + 6], msg[a + 7]);
                        match aty {
                            IFA_LOCAL => local = Some(ip),
                            IFA_ADDRESS => address = Some(ip),
                            _ => {}
                        }
                    }
                    a += (alen + 3) & !3;
                }
                // IFA_LOCAL is this side of a point-to-point link; IFA_ADDRESS otherwise.
                if let Some(ip) = local.or(address) {
                    out.insert(ip);
                }
            }
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

/// Reads every IPv4 address of the namespace the socket lives in.
fn dump(fd: &OwnedFd) -> io::Result<BTreeSet<Ipv4Addr>> {
    let mut req = [0u8; NLMSG_HDR + IFADDRMSG];
    req[0..4].copy_from_slice(&((NLMSG_HDR + IFADDRMSG) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETADDR.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDR] = libc::AF_INET as u8;
    // SAFETY: buffer and length are valid.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = BTreeSet::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buffer and length are valid.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if parse_addrs(&buf[..n as usize], &mut out)? {
            return Ok(out);
        }
    }
}

/// The namespace's IPv4 addresses now, read once (node mode checks them before enrolling).
pub fn read(netns: &Netns) -> io::Result<BTreeSet<Ipv4Addr>> {
    let query = netns.run(|| netlink_socket(0, false))?;
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
    query: OwnedFd,
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
        let query = netns.run(|| netlink_socket(0, false))?;
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
        LocalAddrKey {
            netns_cookie: self.netns_cookie,
            addr: u32::from(ip).to_be(),
            _pad: 0,
        }
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
        let socket = netns.run(|| netlink_socket(RTMGRP_IPV4_IFADDR, true))?;
        // SAFETY: the OwnedFd is valid, non-blocking, and owned by the AsyncFd until it drops.
        let events = unsafe { AsyncFd::register(socket)? };
        // Changes between install() and subscribing would be missed otherwise.
        self.refresh()?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut guard = events.readable().await?;
            // Drain everything queued; the content does not matter, the re-read does.
            loop {
                // SAFETY: buffer and length are valid; the socket is non-blocking.
                let n = unsafe { libc::recv(events.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n >= 0 {
                    continue;
                }
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    // ENOBUFS: events were dropped; the full re-read below covers them.
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                    _ => return Err(e),
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
}

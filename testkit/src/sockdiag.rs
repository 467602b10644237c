//! Where the kernel really connected a socket, from the kernel's socket table
//! (`NETLINK_SOCK_DIAG`: a dump of the namespace's connected TCP sockets of one family).
//!
//! getpeername is what the app sees, and under capture it names the original destination (as
//! it does behind iptables REDIRECT); the table shows where the socket is connected (the
//! capture listener when captured), which is how a test tells proxied from direct.
//!
//! Not `/proc/net/tcp`, which says the same but took milliseconds per read here (it formats the
//! host's whole table page by page). Not an exact lookup by 4-tuple either: the kernel answers
//! that like an incoming SYN, falling through to a listener lookup, which runs the agent's
//! sk_lookup program and so would count an ISTIO_INBOUND decision for a tuple that does not
//! exist.

use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `INET_DIAG_NOCOOKIE`: match the socket by its tuple alone.
const NO_COOKIE: u32 = !0;

/// `struct nlmsghdr` + `struct inet_diag_req_v2` (with its `inet_diag_sockid`).
#[repr(C)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    /// Network byte order, as the two ports.
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// The remote address of the TCP connection whose local address is `local`, from the table
/// of the calling thread's namespace (`None`: no such connection, e.g. already reset). The
/// table lists sockets by their own family: an AF_INET6 socket of an IPv4 connection is found
/// by its v4-mapped address, and its remote comes back v4-mapped.
pub fn remote_of(local: SocketAddr) -> io::Result<Option<SocketAddr>> {
    // A dump that spans several datagrams can miss a socket while the table changes under it
    // (other namespaces share the kernel's hash table): look again, a bounded number of times,
    // before saying there is none.
    for _ in 0..3 {
        if let Some(found) = dump_for(local)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// One dump of the namespace's connected sockets of `local`'s family, searched for `local`.
fn dump_for(local: SocketAddr) -> io::Result<Option<SocketAddr>> {
    // SAFETY: plain socket(2); the descriptor is checked and owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor socket(2) just returned, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let (family, src) = octets(local.ip());
    let req = Request {
        len: size_of::<Request>() as u32,
        kind: SOCK_DIAG_BY_FAMILY,
        flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        seq: 1,
        pid: 0,
        family,
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        // Connected sockets only: SYN_SENT (2), ESTABLISHED (1), CLOSE_WAIT (8). Not the
        // TIME_WAIT ones a busy namespace piles up: a reply past one datagram is resumed by
        // position in the kernel's table, and entries coming and going meanwhile can make it
        // skip one (see `remote_of`).
        states: (1 << 1) | (1 << 2) | (1 << 8),
        sport: 0,
        dport: 0,
        src: [0; 16],
        dst: [0; 16],
        ifindex: 0,
        cookie: [NO_COOKIE; 2],
    };
    send(&socket, &req)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut found = None;
    loop {
        // SAFETY: `buf` is writable for its whole length, which is what is passed.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= 16 {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
            if len < 16 || len > msgs.len() {
                return Err(io::Error::other("sock_diag: bad message length"));
            }
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let errno = -i32::from_ne_bytes(msgs[16..20].try_into().unwrap_or_default());
                    return Err(io::Error::from_raw_os_error(errno));
                }
                SOCK_DIAG_BY_FAMILY if found.is_none() => found = matching(&msgs[16..len], local.port(), &src),
                _ => {}
            }
            msgs = &msgs[len.next_multiple_of(4).min(msgs.len())..];
        }
    }
}

/// An `inet_diag_msg` (family, state, timer, retrans, then `inet_diag_sockid`): its remote
/// address when its local one is `src`:`sport`.
fn matching(msg: &[u8], sport: u16, src: &[u8; 16]) -> Option<SocketAddr> {
    let id = msg.get(4..40)?;
    if u16::from_be_bytes([id[0], id[1]]) != sport || &id[4..20] != src {
        return None;
    }
    let port = u16::from_be_bytes([id[2], id[3]]);
    let dst: [u8; 16] = id[20..36].try_into().ok()?;
    let ip = match i32::from(msg[0]) {
        libc::AF_INET => IpAddr::V4(std::net::Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3])),
        _ => IpAddr::V6(std::net::Ipv6Addr::from(dst)),
    };
    Some(SocketAddr::new(ip, port))
}

fn send(socket: &OwnedFd, req: &Request) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr_nl is valid (pid 0: the kernel).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `req` is a live, fully initialized repr(C) value (no padding: 16 + 56 bytes) of
    // the length passed; `addr` is a sockaddr_nl of the length passed.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            std::ptr::from_ref(req).cast(),
            size_of::<Request>(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn octets(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (libc::AF_INET as u8, out)
        }
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// In whatever namespace the test runs: a loopback connection is found by its local
    /// address, and nothing by one no connection has.
    #[test]
    fn finds_a_connection_by_its_tuple() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let local = s.local_addr().unwrap();
        assert_eq!(remote_of(local).unwrap(), Some(l.local_addr().unwrap()));
        let gone = SocketAddr::new(local.ip(), 1);
        assert_eq!(remote_of(gone).unwrap(), None);
    }

    #[test]
    fn the_request_is_what_the_kernel_reads() {
        assert_eq!(size_of::<Request>(), 16 + 56);
    }
}

//! Where the kernel really connected a socket, asked of the kernel's socket table by exact
//! 4-tuple (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY` without a dump: one hash lookup).
//!
//! getpeername is what the app sees, and under capture it names the original destination (as
//! it does behind iptables REDIRECT); the table shows where the socket is connected (the
//! capture listener when captured), which is how a test tells proxied from direct. Reading
//! `/proc/net/tcp` would say the same, but walks the host's whole connection hash table per
//! read: milliseconds per probe.

use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
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

/// The first of `candidates` the socket whose local address is `local` is connected to, by the
/// table of the calling thread's namespace. An AF_INET6 socket's v4-mapped addresses are
/// looked up as the IPv4 connection they are.
pub fn connected_to(local: SocketAddr, candidates: &[SocketAddr]) -> io::Result<Option<SocketAddr>> {
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
    for &remote in candidates {
        if established(&socket, local, remote)? {
            return Ok(Some(remote));
        }
    }
    Ok(None)
}

fn octets(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (libc::AF_INET as u8, out)
        }
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets()),
    }
}

/// Whether the table holds a connection `local` -> `remote`.
fn established(socket: &OwnedFd, local: SocketAddr, remote: SocketAddr) -> io::Result<bool> {
    let (family, src) = octets(local.ip());
    let (remote_family, dst) = octets(remote.ip());
    if family != remote_family {
        return Ok(false);
    }
    let req = Request {
        len: size_of::<Request>() as u32,
        kind: SOCK_DIAG_BY_FAMILY,
        flags: libc::NLM_F_REQUEST as u16,
        seq: 1,
        pid: 0,
        family,
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        states: !0,
        sport: local.port().to_be(),
        dport: remote.port().to_be(),
        src,
        dst,
        ifindex: 0,
        cookie: [NO_COOKIE; 2],
    };
    let mut addr: libc::sockaddr_nl = // SAFETY: an all-zero sockaddr_nl is valid (pid 0: the kernel).
        unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `req` is a live, fully initialized repr(C) value (no padding: 16 + 56 bytes) of
    // the length passed; `addr` is a sockaddr_nl of the length passed.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            (&raw const req).cast(),
            size_of::<Request>(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: `buf` is writable for its whole length, which is what is passed.
    let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 20 {
        return Err(io::Error::other("sock_diag: short answer"));
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    match kind {
        SOCK_DIAG_BY_FAMILY => Ok(true),
        NLMSG_ERROR => {
            let errno = -i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            match errno {
                libc::ENOENT => Ok(false),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        }
        other => Err(io::Error::other(format!("sock_diag: message type {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// In whatever namespace the test runs: a loopback connection is found under its real
    /// peer, and not under another.
    #[test]
    fn finds_a_connection_by_its_tuple() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let local = s.local_addr().unwrap();
        let other = SocketAddr::new(l.local_addr().unwrap().ip(), 1);
        assert_eq!(
            connected_to(local, &[other, l.local_addr().unwrap()]).unwrap(),
            Some(l.local_addr().unwrap())
        );
        assert_eq!(connected_to(local, &[other]).unwrap(), None);
    }

    #[test]
    fn the_request_is_what_the_kernel_reads() {
        assert_eq!(size_of::<Request>(), 16 + 56);
    }
}

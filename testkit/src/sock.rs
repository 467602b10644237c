//! Socket addresses as the kernel takes and gives them, for the probe's and the servers' own
//! system calls, in both families: the `sockaddr_in`/`sockaddr_in6` handed to bind and connect,
//! the v4-mapped form an AF_INET6 socket dials an IPv4 destination by, and the original
//! destination of an accepted connection.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, AsRawFd},
};

/// The address a probe gives connect() for `to`: with `v4_mapped`, an IPv4 destination
/// `a.b.c.d:p` becomes `[::ffff:a.b.c.d]:p` (dialed from an AF_INET6 socket); an IPv6
/// destination, or any destination without `v4_mapped`, stays as it is.
pub fn dial_addr(to: SocketAddr, v4_mapped: bool) -> SocketAddr {
    match to {
        SocketAddr::V4(v4) if v4_mapped => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into(),
        other => other,
    }
}

/// The address a socket of the given family binds for `ip` (port 0): an IPv4 address becomes
/// its v4-mapped form on an AF_INET6 socket. An IPv6 address cannot be bound by an AF_INET
/// socket (not even a v4-mapped one: AF_INET has no such form), an error.
pub fn bind_addr(ip: IpAddr, inet6: bool) -> io::Result<SocketAddr> {
    match (ip, inet6) {
        (IpAddr::V4(v4), false) => Ok(SocketAddrV4::new(v4, 0).into()),
        (IpAddr::V4(v4), true) => Ok(SocketAddrV6::new(v4.to_ipv6_mapped(), 0, 0, 0).into()),
        (IpAddr::V6(v6), true) => Ok(SocketAddrV6::new(v6, 0, 0, 0).into()),
        (IpAddr::V6(v6), false) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("an AF_INET socket cannot bind {v6}: dial an IPv6 destination or use --v4-mapped"),
        )),
    }
}

/// A `sockaddr_in` or `sockaddr_in6`, as bind(2) and connect(2) take it.
#[derive(Clone, Copy)]
pub enum RawSockAddr {
    V4(libc::sockaddr_in),
    V6(libc::sockaddr_in6),
}

impl From<SocketAddr> for RawSockAddr {
    fn from(a: SocketAddr) -> Self {
        match a {
            SocketAddr::V4(a) => Self::V4(libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            }),
            SocketAddr::V6(a) => Self::V6(libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                // Kept as given, as the kernel's own field is (std does the same both ways).
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            }),
        }
    }
}

impl RawSockAddr {
    /// AF_INET or AF_INET6: the family of the socket that binds or dials this address.
    pub fn family(&self) -> libc::c_int {
        match self {
            Self::V4(_) => libc::AF_INET,
            Self::V6(_) => libc::AF_INET6,
        }
    }

    /// Pointer and length for bind(2) and connect(2), valid while `self` is.
    pub fn as_ptr(&self) -> (*const libc::sockaddr, libc::socklen_t) {
        match self {
            Self::V4(sa) => (
                std::ptr::from_ref(sa).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            Self::V6(sa) => (
                std::ptr::from_ref(sa).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            ),
        }
    }
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// bind(2) with `addr`.
pub fn bind(fd: &impl AsFd, addr: SocketAddr) -> io::Result<()> {
    let sa = RawSockAddr::from(addr);
    let (ptr, len) = sa.as_ptr();
    // SAFETY: `ptr` and `len` describe `sa`, which lives across the call; the descriptor is
    // borrowed, so open.
    check(unsafe { libc::bind(fd.as_fd().as_raw_fd(), ptr, len) }, "bind")
}

/// connect(2) to `addr`, the error as the kernel returned it (the probe classifies its errno).
pub fn connect(fd: &impl AsFd, addr: SocketAddr) -> io::Result<()> {
    let sa = RawSockAddr::from(addr);
    let (ptr, len) = sa.as_ptr();
    // SAFETY: `ptr` and `len` describe `sa`, which lives across the call; the descriptor is
    // borrowed, so open.
    if unsafe { libc::connect(fd.as_fd().as_raw_fd(), ptr, len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An `int` socket option.
pub fn set_int_option(fd: &impl AsFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: pointer and length describe `value`, which the kernel only reads; the descriptor
    // is borrowed, so open.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc, "setsockopt")
}

/// SO_BINDTODEVICE: the socket is bound to device `name`.
pub fn bind_to_device(fd: &impl AsFd, name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`'s bytes, which the kernel only reads; the
    // descriptor is borrowed, so open.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    check(rc, "setsockopt(SO_BINDTODEVICE)")
}

/// getsockopt(2) into `buf`: the length the kernel answered.
pub fn getsockopt_bytes(fd: &impl AsFd, level: libc::c_int, name: libc::c_int, buf: &mut [u8]) -> io::Result<u32> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the buffer is `len` bytes; the kernel writes at most that many, and `len` itself
    // is a live local. The descriptor is borrowed, so open.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len)
}

/// A `sockaddr_in` or `sockaddr_in6` the kernel wrote into `buf` (by its family field; a
/// complete structure of that family, or `None`).
pub fn parse_sockaddr(buf: &[u8]) -> Option<SocketAddr> {
    let family = libc::c_int::from(u16::from_ne_bytes(buf.get(..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?);
    match family {
        libc::AF_INET if buf.len() >= std::mem::size_of::<libc::sockaddr_in>() => {
            let ip: [u8; 4] = buf[4..8].try_into().ok()?;
            Some(SocketAddrV4::new(Ipv4Addr::from(ip), port).into())
        }
        libc::AF_INET6 if buf.len() >= std::mem::size_of::<libc::sockaddr_in6>() => {
            let flowinfo = u32::from_ne_bytes(buf[4..8].try_into().ok()?);
            let ip: [u8; 16] = buf[8..24].try_into().ok()?;
            let scope_id = u32::from_ne_bytes(buf[24..28].try_into().ok()?);
            Some(SocketAddrV6::new(Ipv6Addr::from(ip), port, flowinfo, scope_id).into())
        }
        _ => None,
    }
}

/// Where an accepted connection was going before a REDIRECT (conntrack's answer) or before the
/// agent captured it (its getsockopt program's), asked as Envoy asks, by the socket's family
/// (SO_DOMAIN): `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on an AF_INET socket,
/// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` on an AF_INET6 one, also when its connection
/// is IPv4 (a v4-mapped peer on a dual-stack listener). Both with room for a
/// `sockaddr_storage`, as Envoy and rustix's `ip_original_dst` (what the kit asked before)
/// give; the answer (a `sockaddr_in` or `sockaddr_in6`) is read by the family it carries.
pub fn original_dst(socket: &impl AsFd) -> io::Result<SocketAddr> {
    let mut domain = [0u8; std::mem::size_of::<libc::c_int>()];
    getsockopt_bytes(socket, libc::SOL_SOCKET, libc::SO_DOMAIN, &mut domain)?;
    let (level, name) = match libc::c_int::from_ne_bytes(domain) {
        libc::AF_INET => (libc::SOL_IP, libc::SO_ORIGINAL_DST),
        libc::AF_INET6 => (libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("no original destination for a socket of family {other}"),
            ));
        }
    };
    let mut buf = [0u8; std::mem::size_of::<libc::sockaddr_storage>()];
    let len = getsockopt_bytes(socket, level, name, &mut buf)?;
    parse_sockaddr(&buf[..(len as usize).min(buf.len())]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the original destination answered {len} bytes that are no address"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_destination_is_dialed_v4_mapped_only_when_asked() {
        let v4: SocketAddr = "10.200.1.2:8080".parse().unwrap();
        assert_eq!(dial_addr(v4, false), v4);
        let mapped = dial_addr(v4, true);
        assert_eq!(mapped.to_string(), "[::ffff:10.200.1.2]:8080");
        assert_eq!(mapped, "[::ffff:10.200.1.2]:8080".parse::<SocketAddr>().unwrap());
        let v6: SocketAddr = "[fd00:200:0:1::2]:8080".parse().unwrap();
        assert_eq!(dial_addr(v6, true), v6);
        assert_eq!(dial_addr(v6, false), v6);
    }

    #[test]
    fn a_bind_address_takes_the_socket_family() {
        let v4: IpAddr = "127.0.0.6".parse().unwrap();
        assert_eq!(bind_addr(v4, false).unwrap().to_string(), "127.0.0.6:0");
        assert_eq!(bind_addr(v4, true).unwrap().to_string(), "[::ffff:127.0.0.6]:0");
        let v6: IpAddr = "fd00:200:0:1::1".parse().unwrap();
        assert_eq!(bind_addr(v6, true).unwrap().to_string(), "[fd00:200:0:1::1]:0");
        assert_eq!(bind_addr(v6, false).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn raw_addresses_are_in_network_order() {
        let RawSockAddr::V4(sa) = RawSockAddr::from("10.200.1.2:8080".parse::<SocketAddr>().unwrap()) else {
            panic!("not AF_INET");
        };
        assert_eq!(libc::c_int::from(sa.sin_family), libc::AF_INET);
        assert_eq!(sa.sin_port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(sa.sin_addr.s_addr.to_ne_bytes(), [10, 200, 1, 2]);

        let to: SocketAddr = "[::ffff:10.200.1.2]:15001".parse().unwrap();
        let raw = RawSockAddr::from(to);
        assert_eq!(raw.family(), libc::AF_INET6);
        assert_eq!(raw.as_ptr().1 as usize, std::mem::size_of::<libc::sockaddr_in6>());
        let RawSockAddr::V6(sa) = raw else {
            panic!("not AF_INET6")
        };
        assert_eq!(sa.sin6_port.to_ne_bytes(), 15001u16.to_be_bytes());
        assert_eq!(
            sa.sin6_addr.s6_addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 200, 1, 2]
        );
    }

    #[test]
    fn kernel_sockaddrs_parse_by_their_family() {
        let mut in4 = [0u8; 16];
        in4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        in4[2..4].copy_from_slice(&9080u16.to_be_bytes());
        in4[4..8].copy_from_slice(&[10, 200, 1, 1]);
        assert_eq!(parse_sockaddr(&in4), Some("10.200.1.1:9080".parse().unwrap()));
        assert_eq!(parse_sockaddr(&in4[..8]), None, "a truncated sockaddr_in");

        let mut in6 = [0u8; 28];
        in6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        in6[2..4].copy_from_slice(&8080u16.to_be_bytes());
        in6[8..24].copy_from_slice(&"fd00:200:0:1::2".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(parse_sockaddr(&in6).unwrap().to_string(), "[fd00:200:0:1::2]:8080");
        in6[8..24].copy_from_slice(&Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets());
        assert_eq!(parse_sockaddr(&in6).unwrap().to_string(), "[::ffff:127.0.0.1]:8080");
        assert_eq!(parse_sockaddr(&in6[..24]), None, "a truncated sockaddr_in6");

        assert_eq!(parse_sockaddr(&[0u8; 28]), None, "AF_UNSPEC");
        assert_eq!(parse_sockaddr(&[]), None);
    }
}

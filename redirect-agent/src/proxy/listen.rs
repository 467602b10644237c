//! The capture listeners and the proxy's limits.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::net::{TcpListener, TcpSocket};

use crate::sys::Netns;

/// Backlog of the capture listeners.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Which capture port a listener serves.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// `-p` (15001): outbound; upstream connects from the workload's own addresses.
    Outbound,
    /// `-z` (15006): inbound; upstream binds 127.0.0.6 (`::6` for IPv6) so ISTIO_OUTPUT's first
    /// rule lets it by.
    Inbound,
    /// 15053 over TCP (DNS capture): forwarded to the resolver the app dialed, as outbound.
    Dns,
    /// 15053 over UDP: a UDP socket, answered by the DNS forwarder (`dns.rs`).
    DnsUdp,
}

impl Side {
    pub const ALL: [Side; 4] = [Side::Outbound, Side::Inbound, Side::Dns, Side::DnsUdp];

    pub fn name(self) -> &'static str {
        match self {
            Side::Outbound => "outbound",
            Side::Inbound => "inbound",
            Side::Dns => "dns",
            Side::DnsUdp => "dns-udp",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// `-p`.
    pub outbound_port: u16,
    /// `-z`.
    pub inbound_port: u16,
    /// Where each capture port listens: [`ProxyConfig::LOOPBACK`] in a workload (where
    /// connect4/6 send what they capture), [`ProxyConfig::ANY`] behind iptables. The IPv6 ones
    /// are skipped, with a warning, where the namespace has no IPv6.
    pub listen_on: Vec<IpAddr>,
    /// `-k`: the outbound capture port listens on [`ProxyConfig::ANY`] instead, where
    /// connect4/6's connections (to loopback) and a VM's (REDIRECTed to its device's
    /// address) both reach it, as Envoy's `0.0.0.0:15001` does.
    pub outbound_on_any: bool,
    pub connect_timeout: Duration,
    pub max_connections: usize,
    /// Idle timeout and keepalive of every proxied connection.
    pub liveness: super::Liveness,
    /// DNS capture: the port the DNS proxy answers on (UDP and TCP), where the rules send it.
    pub dns_port: Option<u16>,
    /// How inbound connections are dialed to the app.
    pub inbound_dial: InboundDial,
    /// Streams may move through a pipe (`splice.rs`). Not with the fast path: sk_msg queues
    /// the bytes it hands over where splice does not read them.
    pub splice: bool,
}

/// How the proxy dials the app for an inbound connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundDial {
    /// From 127.0.0.6 (`::6`), as Envoy's inbound passthrough behind REDIRECT.
    Passthrough,
    /// TPROXY mode (`-m TPROXY`, its `--inbound-tproxy-mark`): from the client's own address
    /// (IP_TRANSPARENT), on a socket with this mark, which the namespace's policy routing
    /// sends the app's replies back by.
    Tproxy(u32),
    /// Ambient mode, as ztunnel dials: from the client's own address, on a socket with
    /// ztunnel's mark 0x539, which sock_ops turns into 0x111 at its connect; istio-cni's
    /// routing of that mark sends the app's replies back.
    Ambient,
}

impl InboundDial {
    /// The mark of a transparent dial from the client's address; `None`: from the passthrough
    /// source.
    pub fn transparent_mark(self) -> Option<u32> {
        match self {
            Self::Passthrough => None,
            Self::Tproxy(mark) => Some(mark),
            Self::Ambient => Some(redirect_common::AMBIENT_MARK),
        }
    }
}

/// Proxied connections that `nofile` descriptors hold: two each, after the reserve; at least one.
pub fn connections_fitting(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(crate::sys::RESERVED_FDS) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

impl ProxyConfig {
    /// 127.0.0.1 and `::1`: the addresses connect4 and connect6 redirect to.
    pub const LOOPBACK: [IpAddr; 2] = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
    /// 0.0.0.0 and `::`: where iptables and ip6tables REDIRECT send connections (each to the
    /// primary address of the interface the SYN arrived on, or loopback).
    pub const ANY: [IpAddr; 2] = [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)];

    /// Every (side, address) a TCP capture listener is bound to.
    pub fn listen_addrs(&self) -> Vec<(Side, SocketAddr)> {
        let mut sides = vec![(Side::Outbound, self.outbound_port), (Side::Inbound, self.inbound_port)];
        if let Some(port) = self.dns_port {
            sides.push((Side::Dns, port));
        }
        let mut out = Vec::new();
        for (side, port) in sides {
            let on: &[IpAddr] = match side {
                Side::Outbound if self.outbound_on_any => &Self::ANY,
                _ => &self.listen_on,
            };
            out.extend(on.iter().map(|ip| (side, SocketAddr::new(*ip, port))));
        }
        out
    }

    /// Every address the DNS proxy's UDP sockets are bound to.
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.dns_port
            .map(|port| self.listen_on.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
            .unwrap_or_default()
    }

    /// The capture port of `side`.
    pub fn port(&self, side: Side) -> u16 {
        match side {
            Side::Outbound => self.outbound_port,
            Side::Inbound => self.inbound_port,
            Side::Dns | Side::DnsUdp => self.dns_port.unwrap_or(redirect_common::DNS_PROXY_PORT),
        }
    }

    /// Lowers `max_connections` to what `nofile` descriptors can hold, so that the connection
    /// past the budget is reset at accept instead of left in the backlog by EMFILE.
    pub fn fit_to_descriptors(mut self, nofile: u64) -> Self {
        let fits = connections_fitting(nofile);
        if fits < self.max_connections {
            tracing::warn!(
                nofile,
                requested = self.max_connections,
                "the descriptor limit fits {fits} proxied connections (two descriptors each); later ones are reset"
            );
            self.max_connections = fits;
        }
        self
    }
}

/// Listeners bound inside the namespace, not yet listening.
pub struct Listeners {
    sockets: Vec<(Side, TcpSocket)>,
    udp: Vec<std::net::UdpSocket>,
}

/// Listening sockets, not yet served: the inbound one must be registered for sk_lookup
/// (it can enter a sockhash only once it listens) before the first SYN can reach it.
pub struct Listening {
    pub(super) listeners: Vec<(Side, TcpListener)>,
    /// The DNS proxy's UDP sockets ([`Side::DnsUdp`]).
    pub(super) udp: Vec<std::net::UdpSocket>,
}

impl Listening {
    /// Sockets already listening (made elsewhere, e.g. by `listen_in`, or handed over). Must
    /// run inside the tokio runtime.
    pub fn from_fds(fds: impl IntoIterator<Item = (Side, std::os::fd::OwnedFd)>) -> io::Result<Self> {
        let mut listeners = Vec::new();
        let mut udp = Vec::new();
        for (side, fd) in fds {
            if side == Side::DnsUdp {
                udp.push(std::net::UdpSocket::from(fd));
                continue;
            }
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            listeners.push((side, TcpListener::from_std(l)?));
        }
        Ok(Self { listeners, udp })
    }

    /// Adds the DNS proxy's UDP sockets, bound in `netns` (where the TCP listeners were made
    /// by another process that makes no UDP ones).
    pub fn with_udp(mut self, netns: &Netns, cfg: &ProxyConfig) -> io::Result<Self> {
        let addrs = cfg.udp_addrs();
        self.udp = netns.run(move || bind_udp(&addrs))?;
        Ok(self)
    }

    /// Second descriptors of the listening sockets, for handing them to another process.
    pub fn dup_fds(&self) -> io::Result<Vec<(Side, std::os::fd::OwnedFd)>> {
        use std::os::fd::AsFd as _;
        let tcp = self
            .listeners
            .iter()
            .map(|(side, l)| (*side, l.as_fd().try_clone_to_owned()));
        let udp = self.udp.iter().map(|u| (Side::DnsUdp, u.as_fd().try_clone_to_owned()));
        tcp.chain(udp).map(|(side, fd)| Ok((side, fd?))).collect()
    }

    /// The listeners of `side`, one per address family it listens on.
    pub fn of(&self, side: Side) -> impl Iterator<Item = &TcpListener> {
        self.listeners.iter().filter(move |(s, _)| *s == side).map(|(_, l)| l)
    }
}

impl Listeners {
    /// Binds inside `netns`, from a thread that enters it.
    pub fn bind(netns: &Netns, cfg: &ProxyConfig) -> io::Result<Self> {
        let cfg = cfg.clone();
        netns.run(move || Self::bind_here(&cfg))
    }

    /// Binds in the calling thread's namespace.
    pub fn bind_here(cfg: &ProxyConfig) -> io::Result<Self> {
        let mut sockets = Vec::new();
        for (side, addr) in cfg.listen_addrs() {
            // Envoy's TPROXY-mode inbound listener is transparent, as iptables' TPROXY needs:
            // here a `-k` VM's connection TPROXY takes is handed to it with its destination
            // as dialed, a forwarded one's not one of the namespace's addresses, and only a
            // transparent listener's connection may answer from such an address.
            let transparent = side == Side::Inbound && cfg.inbound_dial.transparent_mark().is_some();
            match bind(addr, transparent) {
                Ok(s) => sockets.push((side, s)),
                Err(e) if addr.is_ipv6() && no_ipv6(&e) => {
                    tracing::warn!(%addr, "no IPv6 in this namespace ({e}): listening on IPv4 only");
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("bind {addr}: {e}"))),
            }
        }
        Ok(Self {
            sockets,
            udp: bind_udp(&cfg.udp_addrs())?,
        })
    }

    /// Must run inside the tokio runtime.
    pub fn listen(self) -> io::Result<Listening> {
        let listeners = self
            .sockets
            .into_iter()
            .map(|(side, s)| Ok((side, s.listen(LISTEN_BACKLOG)?)))
            .collect::<io::Result<_>>()?;
        Ok(Listening {
            listeners,
            udp: self.udp,
        })
    }
}

/// The DNS proxy's UDP sockets on `addrs`, in the calling thread's namespace (an IPv6 one
/// skipped where the namespace has no IPv6, as the TCP listeners are).
fn bind_udp(addrs: &[SocketAddr]) -> io::Result<Vec<std::net::UdpSocket>> {
    let mut out = Vec::new();
    for &addr in addrs {
        match std::net::UdpSocket::bind(addr) {
            Ok(s) => out.push(s),
            Err(e) if addr.is_ipv6() && no_ipv6(&e) => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("bind udp {addr}: {e}"))),
        }
    }
    Ok(out)
}

/// A capture listener's socket on `addr`, IP_TRANSPARENT when asked (the agent holds
/// CAP_NET_ADMIN). An IPv6 one takes IPv6 only: IPv4 has its own listener, and a dual-stack
/// one would take the other's port.
pub fn bind(addr: SocketAddr, transparent: bool) -> io::Result<TcpSocket> {
    let s = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = TcpSocket::new_v6()?;
            socket2::SockRef::from(&s).set_only_v6(true)?;
            s
        }
    };
    match (transparent, addr) {
        (true, SocketAddr::V4(_)) => socket2::SockRef::from(&s).set_ip_transparent_v4(true)?,
        (true, SocketAddr::V6(_)) => socket2::SockRef::from(&s).set_ip_transparent_v6(true)?,
        _ => {}
    }
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    Ok(s)
}

/// The namespace (or the kernel) has no IPv6: the module is off, the namespace disabled it,
/// or `lo` has no `::1`.
pub fn no_ipv6(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL))
}

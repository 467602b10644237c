//! The capture listeners and the proxy's limits.

use std::{io, net::SocketAddrV4, time::Duration};

use tokio::net::{TcpListener, TcpSocket};

use crate::sys::Netns;

/// Backlog of the capture listeners.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Which capture port a listener serves.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// `-p` (15001): outbound; upstream connects from the workload's own addresses.
    Outbound,
    /// `-z` (15006): inbound; upstream binds 127.0.0.6 so ISTIO_OUTPUT's first rule lets it by.
    Inbound,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Outbound => "outbound",
            Side::Inbound => "inbound",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub outbound: SocketAddrV4,
    pub inbound: SocketAddrV4,
    pub connect_timeout: Duration,
    pub max_connections: usize,
}

/// Proxied connections that `nofile` descriptors hold: two each, after the reserve; at least one.
pub fn connections_fitting(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(crate::sys::RESERVED_FDS) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

impl ProxyConfig {
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
}

/// Listening sockets, not yet served: the inbound one must be registered for sk_lookup
/// (it can enter a sockhash only once it listens) before the first SYN can reach it.
pub struct Listening {
    pub(super) listeners: Vec<(Side, TcpListener)>,
}

impl Listening {
    /// Sockets already listening (made elsewhere, e.g. by `listen_in`). Must run inside the
    /// tokio runtime.
    pub fn from_fds(fds: impl IntoIterator<Item = (Side, std::os::fd::OwnedFd)>) -> io::Result<Self> {
        let listeners = fds
            .into_iter()
            .map(|(side, fd)| {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                Ok((side, TcpListener::from_std(l)?))
            })
            .collect::<io::Result<_>>()?;
        Ok(Self { listeners })
    }

    /// Second descriptors of the listening sockets, for handing them to another process.
    pub fn dup_fds(&self) -> io::Result<Vec<(Side, std::os::fd::OwnedFd)>> {
        use std::os::fd::AsFd as _;
        self.listeners
            .iter()
            .map(|(side, l)| Ok((*side, l.as_fd().try_clone_to_owned()?)))
            .collect()
    }

    pub fn get(&self, side: Side) -> Option<&TcpListener> {
        self.listeners.iter().find(|(s, _)| *s == side).map(|(_, l)| l)
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
        let bind = |addr: SocketAddrV4| -> io::Result<TcpSocket> {
            let s = TcpSocket::new_v4()?;
            s.set_reuseaddr(true)?;
            s.bind(addr.into())
                .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
            Ok(s)
        };
        Ok(Self {
            sockets: vec![
                (Side::Outbound, bind(cfg.outbound)?),
                (Side::Inbound, bind(cfg.inbound)?),
            ],
        })
    }

    /// Must run inside the tokio runtime.
    pub fn listen(self) -> io::Result<Listening> {
        let listeners = self
            .sockets
            .into_iter()
            .map(|(side, s)| Ok((side, s.listen(LISTEN_BACKLOG)?)))
            .collect::<io::Result<_>>()?;
        Ok(Listening { listeners })
    }
}

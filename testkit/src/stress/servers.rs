//! The stress routines' servers: the remote host's and the app's, each telling from the peer
//! address of every connection it accepts whether the connection came through the proxy or
//! around it (uncaptured).
//!
//! - The remote host's server (on the remote namespace's address): the proxy dials it from
//!   the pod's main address (its upstream sockets are unbound), while the load generator binds
//!   its own sockets to a second pod address ([`GENERATOR_IP`]) that nothing else uses: a peer
//!   on that address reached the remote host directly.
//! - The app's server (every address of the workload's namespace): the proxy dials it from
//!   127.0.0.6, as Envoy does; a peer on the remote host's address reached it directly.
//!
//! Protocol: the client sends a 32-byte request. `C…` (churn): the server sends it back and
//! closes first (so that TIME_WAIT falls on the servers' side, not on the ports the clients
//! churn through). `H…` (hold): the server sends it back and then echoes whatever comes until
//! the client's EOF.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::netns::NamedNetns;

/// The second address of the workload's veth the load generator binds its outbound sockets to.
pub const GENERATOR_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 11);
/// Where the proxy's connections to the app come from.
pub const INBOUND_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
pub const REMOTE_PORT: u16 = 8080;
pub const APP_PORT: u16 = 9080;
pub const REQUEST: usize = 32;
/// No connection is served longer than this (a held one included; a client that stops
/// sending is cut then).
const IO_BOUND: Duration = Duration::from_secs(600);

/// What one server accepted, by where the connections came from.
#[derive(Debug, Default)]
pub struct Tally {
    pub proxied: AtomicU64,
    pub direct: AtomicU64,
    /// From any other address: not expected at all.
    pub other: AtomicU64,
    first_uncaptured: Mutex<Option<SocketAddr>>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct TallyCounts {
    pub proxied: u64,
    /// Reached the server around the proxy: must stay 0.
    pub direct: u64,
    pub other: u64,
}

impl Tally {
    pub fn counts(&self) -> TallyCounts {
        TallyCounts {
            proxied: self.proxied.load(Ordering::Relaxed),
            direct: self.direct.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }

    /// The first peer that was not the proxy, if any.
    pub fn first_uncaptured(&self) -> Option<SocketAddr> {
        *self.first_uncaptured.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, peer: SocketAddr, proxy: IpAddr, direct: IpAddr) {
        let ip = match peer.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let counter = if ip == proxy {
            &self.proxied
        } else if ip == direct {
            &self.direct
        } else {
            &self.other
        };
        if ip != proxy {
            self.first_uncaptured
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(peer);
        }
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::ops::Sub for TallyCounts {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            proxied: self.proxied.saturating_sub(o.proxied),
            direct: self.direct.saturating_sub(o.direct),
            other: self.other.saturating_sub(o.other),
        }
    }
}

/// The two servers, on a runtime of their own (stopped on drop).
pub struct Servers {
    pub remote: Arc<Tally>,
    pub app: Arc<Tally>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Servers {
    /// The remote host's server on `remote_ip`:8080 in `remote_ns`, the app's on *:9080 in
    /// `workload_ns`. `pod_ip` is the pod's main address (where the proxy dials from),
    /// `remote_ip` the remote host's.
    pub fn start(
        remote_ns: &NamedNetns,
        workload_ns: &NamedNetns,
        pod_ip: Ipv4Addr,
        remote_ip: Ipv4Addr,
    ) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("stress-server")
            .enable_all()
            .build()?;
        let (remote, app) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
        let listen = |ns: &NamedNetns, at: SocketAddrV4| -> anyhow::Result<tokio::net::TcpListener> {
            let socket = ns.open()?.run(move || {
                let s = tokio::net::TcpSocket::new_v4()?;
                s.set_reuseaddr(true)?;
                s.bind(at.into())?;
                Ok(s)
            })?;
            let _guard = rt.enter();
            Ok(socket.listen(4096)?)
        };
        let r = listen(remote_ns, SocketAddrV4::new(remote_ip, REMOTE_PORT))?;
        let a = listen(workload_ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP_PORT))?;
        rt.spawn(serve(r, remote.clone(), pod_ip.into(), GENERATOR_IP.into()));
        rt.spawn(serve(a, app.clone(), INBOUND_SOURCE.into(), remote_ip.into()));
        Ok(Self {
            remote,
            app,
            rt: Some(rt),
        })
    }

    /// Both tallies: (remote host, app).
    pub fn counts(&self) -> (TallyCounts, TallyCounts) {
        (self.remote.counts(), self.app.counts())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, tally: Arc<Tally>, proxy: IpAddr, direct: IpAddr) {
    loop {
        let Ok((s, peer)) = listener.accept().await else {
            // Out of descriptors, most likely: let some close.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tally.count(peer, proxy, direct);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(IO_BOUND, serve_one(s)).await;
        });
    }
}

async fn serve_one(mut s: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut req = [0u8; REQUEST];
    s.read_exact(&mut req).await?;
    s.write_all(&req).await?;
    if req[0] == b'H' {
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await?;
        }
    }
    s.shutdown().await
}

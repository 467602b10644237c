//! The embedded proxy loop: listeners on the capture ports inside the workload's namespace,
//! forwarding each accepted connection to its original destination.
//!
//! Sockets are created by threads that entered the workload's namespace; tokio's own threads
//! never change namespace. The agent is outside the captured cgroup, so its upstream connects
//! are never redirected back to itself.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use redirect_common::{AGENT_SOCKET_MARK, OrigDst, Target, TupleKey, chain::INBOUND_PASSTHROUGH_SRC};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};

use crate::sys::Netns;

/// Bytes buffered per direction per connection.
const COPY_BUF: usize = 64 * 1024;
pub const LISTEN_BACKLOG: u32 = 1024;

/// The original destination of connections accepted on the capture ports.
///
/// This is the one lookup every listener uses, and the same one `cgroup/getsockopt` answers
/// `SO_ORIGINAL_DST` from (`redirect-ebpf/src/maps.rs`, `orig_dst`), so the embedded proxy and
/// a proxy behind `--proxy none` see the same destinations. The key is the connection as its
/// connecting end sees it: the accepted socket's peer is the source, its local address the
/// destination, plus the namespace.
///
/// - `ORIG_BY_TUPLE`: connections connect4 redirected (written by sock_ops when the workload's
///   end became established), and inbound ones once a capture listener in the workload's cgroup
///   accepted them.
/// - `INBOUND_PENDING`: inbound connections sk_lookup handed to the capture listener, from
///   their SYN. (sk_lookup rewrites nothing: the destination is also the accepted socket's
///   local address, but only the map says the connection was captured.)
pub struct OrigDstTable {
    established: HashMap<MapData, TupleKey, OrigDst>,
    pending: std::sync::Mutex<HashMap<MapData, TupleKey, OrigDst>>,
    netns_cookie: u64,
}

/// Where and why a connection was redirected.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub addr: SocketAddrV4,
    pub target: Option<Target>,
}

fn be(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

/// A connection's key in the maps, from the socket at one end: `local` and `peer` are that
/// socket's addresses. Seen from the connecting end, the source is `local`.
pub fn tuple_key(netns_cookie: u64, src: SocketAddrV4, dst: SocketAddrV4) -> TupleKey {
    TupleKey {
        netns_cookie,
        src_addr: be(*src.ip()),
        dst_addr: be(*dst.ip()),
        src_port: src.port(),
        dst_port: dst.port(),
        _pad: 0,
    }
}

impl OrigDstTable {
    pub fn new(
        established: HashMap<MapData, TupleKey, OrigDst>,
        pending: HashMap<MapData, TupleKey, OrigDst>,
        netns_cookie: u64,
    ) -> Self {
        Self {
            established,
            pending: std::sync::Mutex::new(pending),
            netns_cookie,
        }
    }

    /// Where a connection accepted on a capture listener was going: `peer` and `local` are
    /// the accepted socket's addresses. `None`: not captured by us (or already closed) — a
    /// connection straight to a capture port, which must not be forwarded back to it.
    pub fn lookup(&self, peer: SocketAddrV4, local: SocketAddrV4) -> Option<Destination> {
        self.find(&tuple_key(self.netns_cookie, peer, local), false)
    }

    /// [`Self::lookup`] for the embedded proxy, which reads each destination once: an entry
    /// found in `INBOUND_PENDING` is removed, because the proxy's socket is not in the
    /// workload's cgroup and no sock_ops close callback will remove it.
    fn take(&self, peer: SocketAddrV4, local: SocketAddrV4) -> Option<Destination> {
        self.find(&tuple_key(self.netns_cookie, peer, local), true)
    }

    fn find(&self, key: &TupleKey, take_pending: bool) -> Option<Destination> {
        let v = match self.established.get(key, 0) {
            Ok(v) => v,
            Err(_) => {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let v = pending.get(key, 0).ok()?;
                if take_pending {
                    let _ = pending.remove(key);
                }
                v
            }
        };
        Some(Destination {
            addr: SocketAddrV4::new(Ipv4Addr::from(u32::from_be(v.addr)), v.port),
            target: Target::from_u8(v.target),
        })
    }
}

/// Where the proxy learns an accepted connection's original destination.
pub enum OriginalDst {
    /// From redirect's own programs (the agent's embedded proxy).
    Maps(Box<OrigDstTable>),
    /// From conntrack, behind iptables REDIRECT (`redirect-agent proxy`).
    Conntrack,
}

impl OriginalDst {
    /// `listen_port`: the capture port the connection was accepted on.
    fn lookup(
        &self,
        stream: &TcpStream,
        peer: SocketAddrV4,
        local: SocketAddrV4,
        listen_port: u16,
    ) -> Option<Destination> {
        match self {
            Self::Maps(table) => table.take(peer, local),
            Self::Conntrack => {
                let addr = crate::sys::original_dst(stream).ok()?;
                // Conntrack answers a connection nobody redirected (one made straight to the
                // capture port) with its own address: nothing to forward to. A connection the
                // agent's sk_lookup handed over also has its original destination as its local
                // address (nothing was rewritten), but on its own port, not the capture port.
                let straight_to_capture_port = addr == local && local.port() == listen_port;
                (!straight_to_capture_port).then_some(Destination { addr, target: None })
            }
        }
    }
}

/// Makes the proxy's upstream sockets.
#[derive(Clone)]
pub enum Dialer {
    /// Through a thread inside the workload's namespace (the agent lives outside it).
    Netns(NetnsDialer),
    /// In the calling thread's namespace (a proxy that runs inside the workload's).
    Here,
}

impl Dialer {
    async fn socket(&self) -> io::Result<TcpSocket> {
        match self {
            Self::Netns(d) => d.socket().await,
            Self::Here => TcpSocket::new_v4(),
        }
    }
}

/// Sockets the dialer thread keeps made ahead of demand (each holds a descriptor).
pub const SPARE_SOCKETS: usize = 32;

/// Makes TCP sockets inside the workload's namespace from one long-lived thread that entered
/// it. A socket's namespace is fixed when it is made, so the thread makes them ahead of
/// demand and a connection takes a ready one: no thread hop on the connection's path (a hop
/// per connection showed in CRR profiles as futex contention and context switches).
#[derive(Clone)]
pub struct NetnsDialer {
    ready: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<io::Result<TcpSocket>>>>,
}

impl NetnsDialer {
    pub fn start(netns: &Netns) -> io::Result<Self> {
        let netns = netns.try_clone()?;
        let (tx, rx) = tokio::sync::mpsc::channel(SPARE_SOCKETS);
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new().name("netns-dialer".into()).spawn(move || {
            if let Err(e) = netns.enter_current_thread() {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            // Ends when the proxy drops the receiver.
            loop {
                let made = TcpSocket::new_v4().and_then(mark_as_agent);
                let failed = made.is_err();
                if tx.blocking_send(made).is_err() {
                    break;
                }
                if failed {
                    // Out of descriptors, most likely: hand out the error (that connection is
                    // reset) without queueing a burst of stale ones behind it.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        })?;
        ready_rx.recv().map_err(|_| io::Error::other("dialer thread died"))??;
        Ok(Self {
            ready: Arc::new(tokio::sync::Mutex::new(rx)),
        })
    }

    pub async fn socket(&self) -> io::Result<TcpSocket> {
        self.ready
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| io::Error::other("dialer thread is gone"))?
    }
}

/// Marks an upstream socket as the agent's own ([`AGENT_SOCKET_MARK`]): connect4 leaves it
/// alone even where it runs for the agent's cgroup too (node mode attaches at the cgroup
/// root). Needs CAP_NET_ADMIN, which the agent has.
fn mark_as_agent(socket: TcpSocket) -> io::Result<TcpSocket> {
    let mark: libc::c_uint = AGENT_SOCKET_MARK;
    // SAFETY: valid socket and a 4-byte option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw const mark).cast(),
            size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

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

/// Counts the proxy keeps for its logs and node mode's metrics.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    pub accepted: AtomicU64,
    /// Bytes from the connecting side to the original destination, as they are written.
    pub bytes_to_upstream: AtomicU64,
    /// Bytes back from the original destination.
    pub bytes_from_upstream: AtomicU64,
    pub forwarded: AtomicU64,
    pub no_original_dst: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub over_limit: AtomicU64,
}

/// Listeners bound inside the namespace, not yet listening.
pub struct Listeners {
    sockets: Vec<(Side, TcpSocket)>,
}

/// Listening sockets, not yet served: the inbound one must be registered for sk_lookup
/// (it can enter a sockhash only once it listens) before the first SYN can reach it.
pub struct Listening {
    listeners: Vec<(Side, TcpListener)>,
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

/// The running proxy; dropping it stops the listeners and resets open connections.
pub struct Proxy {
    tasks: JoinSet<()>,
    stop: tokio::sync::watch::Sender<bool>,
    shared: Arc<Shared>,
    pub counters: Arc<ProxyCounters>,
}

/// The embedded proxy's part of `--fast-path`: its upstream connections to the workload's own
/// app (source 127.0.0.6) join the sockhash, since sock_ops only sees the app's end.
pub struct FastPath {
    pub sockets: FastPathSockets,
    pub netns_cookie: u64,
}

/// The fast path's sockhash and sender states, for sockets the agent itself owns (the
/// embedded proxy's upstream connections, made outside the workload's cgroup, where sock_ops
/// never sees them).
pub struct FastPathSockets {
    map: aya::maps::SockHash<MapData, TupleKey>,
    senders: HashMap<MapData, TupleKey, u8>,
}

impl FastPathSockets {
    pub fn new(map: aya::maps::SockHash<MapData, TupleKey>, senders: HashMap<MapData, TupleKey, u8>) -> Self {
        Self { map, senders }
    }

    /// Enrolls a connected socket under `key` (its own view of the connection). Must happen
    /// before it sends anything: its first message decides its path for good.
    pub fn enroll(&mut self, key: TupleKey, socket: &impl std::os::fd::AsRawFd) -> Result<(), aya::maps::MapError> {
        // The state before the socket, as sock_ops does: sk_msg treats a socket without one as
        // "TCP for good".
        self.senders.insert(key, redirect_common::fast_path::UNDECIDED, 0)?;
        self.map.insert(key, socket.as_raw_fd(), 0).inspect_err(|_| {
            let _ = self.senders.remove(&key);
        })
    }

    /// Forgets a socket's sender state once it is closed (the kernel drops the socket from
    /// the sockhash itself).
    pub fn forget(&mut self, key: &TupleKey) {
        let _ = self.senders.remove(key);
    }
}

struct Shared {
    table: OriginalDst,
    fast_path: Option<std::sync::Mutex<FastPath>>,
    dialer: Dialer,
    cfg: ProxyConfig,
    limit: Arc<Semaphore>,
    counters: Arc<ProxyCounters>,
}

impl Proxy {
    /// Starts serving. Must run inside the tokio runtime.
    pub fn start(
        listening: Listening,
        table: OriginalDst,
        dialer: Dialer,
        cfg: ProxyConfig,
        fast_path: Option<FastPath>,
    ) -> io::Result<Self> {
        let counters = Arc::new(ProxyCounters::default());
        let shared = Arc::new(Shared {
            table,
            fast_path: fast_path.map(std::sync::Mutex::new),
            dialer,
            limit: Arc::new(Semaphore::new(cfg.max_connections)),
            cfg,
            counters: counters.clone(),
        });
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = JoinSet::new();
        for (side, listener) in listening.listeners {
            tracing::info!(side = side.name(), addr = %listener.local_addr()?, "proxy listening");
            tasks.spawn(accept_loop(listener, side, shared.clone(), stopped.clone()));
        }
        Ok(Self {
            tasks,
            stop,
            shared,
            counters,
        })
    }

    /// Connections being served now.
    pub fn active(&self) -> usize {
        self.shared.cfg.max_connections - self.shared.limit.available_permits()
    }

    /// Closes the listeners (what waits in their backlogs is reset), lets open connections
    /// finish for up to `grace`, then resets the rest: a connection cut short must not look
    /// complete to either side.
    pub async fn drain(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        let open = self.active();
        if open > 0 {
            tracing::info!(
                open,
                grace_ms = grace.as_millis() as u64,
                "draining proxied connections"
            );
        }
        let finished = tokio::time::timeout(grace, async { while self.tasks.join_next().await.is_some() {} }).await;
        match finished {
            Ok(()) if open > 0 => tracing::info!("drained"),
            Ok(()) => {}
            Err(_) => {
                tracing::warn!(reset = self.active(), "drain time is up; resetting what is still open");
                self.tasks.shutdown().await;
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    side: Side,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    // Under overload every accept is over the limit: one warning a second, with the count.
    let mut over_limit = Throttle::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
                        shared.counters.over_limit.fetch_add(1, Ordering::Relaxed);
                        if let Some(resets) = over_limit.hit() {
                            tracing::warn!(
                                %peer,
                                limit = shared.cfg.max_connections,
                                resets,
                                "connection limit reached; resetting"
                            );
                        }
                        reset(stream);
                        continue;
                    };
                    let shared = shared.clone();
                    conns.spawn(async move {
                        serve(stream, peer, side, &shared).await;
                        drop(permit);
                    });
                }
                // EMFILE and friends: back off instead of spinning.
                Err(e) => {
                    tracing::warn!(side = side.name(), "accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            // Only ever set to true; a dropped sender (the proxy gone) stops as well.
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Lets a repeating event through at most once a second, counting the ones held back.
#[derive(Default)]
struct Throttle {
    last: Option<std::time::Instant>,
    held: u64,
}

impl Throttle {
    /// `Some(n)`: report now, `n` events since the last report (this one included).
    fn hit(&mut self) -> Option<u64> {
        self.held += 1;
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

/// Closes with RST, so the workload sees a failure at once instead of a clean EOF or a hang.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(client: TcpStream, peer: SocketAddr, side: Side, shared: &Shared) {
    let (SocketAddr::V4(peer4), Ok(SocketAddr::V4(local))) = (peer, client.local_addr()) else {
        tracing::warn!(%peer, "not an IPv4 connection; resetting");
        return reset(client);
    };
    let listen_port = match side {
        Side::Outbound => shared.cfg.outbound.port(),
        Side::Inbound => shared.cfg.inbound.port(),
    };
    let Some(dst) = shared.table.lookup(&client, peer4, local, listen_port) else {
        shared.counters.no_original_dst.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, %local, "no original destination recorded for this connection; resetting");
        return reset(client);
    };
    let upstream = match connect_upstream(dst.addr, side, shared).await {
        Ok(s) => s,
        Err(e) => {
            shared.counters.upstream_failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, dst = %dst.addr, "upstream connect failed: {e}; resetting");
            return reset(client);
        }
    };
    shared.counters.forwarded.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, dst = %dst.addr, side = side.name(), "forwarding");
    // Before the first byte is written to it.
    let _enrolled = (side == Side::Inbound)
        .then(|| shared.fast_path.as_ref().and_then(|f| Enrolled::new(f, &upstream)))
        .flatten();
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // An error on either side, or the task aborted at the end of a drain, resets both: an
    // abort passed on as a clean close would make a cut stream look complete.
    let mut guard = ResetUnlessDone {
        streams: [&client, &upstream],
        done: false,
    };
    // Half-close is carried across: EOF on one side shuts down writing on the other, and the
    // other direction keeps flowing until it ends too.
    let counters = &shared.counters;
    match tokio::try_join!(
        pump(&client, &upstream, &counters.bytes_to_upstream),
        pump(&upstream, &client, &counters.bytes_from_upstream)
    ) {
        Ok((up, down)) => {
            guard.done = true;
            tracing::debug!(%peer, dst = %dst.addr, up, down, "closed");
        }
        Err(e) => tracing::debug!(%peer, dst = %dst.addr, "copy ended: {e}"),
    }
}

/// An upstream socket in the fast path's sockhash; its sender state is forgotten when the
/// connection ends.
struct Enrolled<'a> {
    fast_path: &'a std::sync::Mutex<FastPath>,
    key: TupleKey,
}

impl<'a> Enrolled<'a> {
    fn new(fast_path: &'a std::sync::Mutex<FastPath>, socket: &TcpStream) -> Option<Self> {
        let (Ok(SocketAddr::V4(local)), Ok(SocketAddr::V4(peer))) = (socket.local_addr(), socket.peer_addr()) else {
            return None;
        };
        let mut f = fast_path.lock().unwrap_or_else(|e| e.into_inner());
        let key = tuple_key(f.netns_cookie, local, peer);
        match f.sockets.enroll(key, socket) {
            Ok(()) => Some(Self { fast_path, key }),
            Err(e) => {
                // Not fatal: this connection keeps TCP.
                tracing::debug!(%local, %peer, "fast path: not enrolled: {e}");
                None
            }
        }
    }
}

impl Drop for Enrolled<'_> {
    fn drop(&mut self) {
        let mut f = self.fast_path.lock().unwrap_or_else(|e| e.into_inner());
        f.sockets.forget(&self.key);
    }
}

struct ResetUnlessDone<'a> {
    streams: [&'a TcpStream; 2],
    done: bool,
}

impl Drop for ResetUnlessDone<'_> {
    fn drop(&mut self) {
        if !self.done {
            for s in self.streams {
                let _ = s.set_zero_linger();
            }
        }
    }
}

/// Copies `from` to `to` until EOF, then shuts down writing on `to`. The buffer is taken only
/// once `from` is readable and given back whenever a read drains it, so an idle connection
/// holds no buffer: a proxy holding ten thousand quiet connections should not hold 1.3 GB.
async fn pump(from: &TcpStream, to: &TcpStream, bytes: &AtomicU64) -> io::Result<u64> {
    let mut total = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        from.readable().await?;
        buf.reserve_exact(COPY_BUF);
        match from.try_read_buf(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        let drained = buf.len() < COPY_BUF;
        write_all(to, &buf).await?;
        total += buf.len() as u64;
        bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        if drained {
            buf = Vec::new();
        } else {
            buf.clear();
        }
    }
    // SAFETY: a valid, open socket; SHUT_WR on a connection the peer already closed only
    // returns ENOTCONN, which changes nothing here.
    unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
    Ok(total)
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn connect_upstream(dst: SocketAddrV4, side: Side, shared: &Shared) -> io::Result<TcpStream> {
    let socket = shared.dialer.socket().await?;
    if side == Side::Inbound {
        socket.bind(SocketAddrV4::new(INBOUND_PASSTHROUGH_SRC, 0).into())?;
    }
    tokio::time::timeout(shared.cfg.connect_timeout, socket.connect(dst.into()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_connections: usize) -> ProxyConfig {
        ProxyConfig {
            outbound: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001),
            inbound: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15006),
            connect_timeout: Duration::from_secs(1),
            max_connections,
        }
    }

    #[test]
    fn a_throttle_reports_the_first_event_then_counts() {
        let mut t = Throttle::default();
        assert_eq!(t.hit(), Some(1));
        assert_eq!(t.hit(), None);
        assert_eq!(t.hit(), None);
        t.last = Some(std::time::Instant::now() - Duration::from_secs(2));
        assert_eq!(t.hit(), Some(3));
    }

    #[test]
    fn the_connection_budget_fits_the_descriptor_limit() {
        let reserved = crate::sys::RESERVED_FDS;
        assert_eq!(
            cfg(16384).fit_to_descriptors(20_000).max_connections,
            (20_000 - reserved as usize) / 2
        );
        assert_eq!(cfg(100).fit_to_descriptors(20_000).max_connections, 100);
        // A limit below the reserve still serves one connection rather than none.
        assert_eq!(cfg(100).fit_to_descriptors(10).max_connections, 1);
    }
}

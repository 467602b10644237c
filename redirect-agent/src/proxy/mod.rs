//! The embedded proxy loop: listeners on the capture ports inside the workload's namespace,
//! forwarding each accepted connection to its original destination.
//!
//! Sockets are created by threads that entered the workload's namespace; tokio's own threads
//! never change namespace. The agent is outside the captured cgroup, so its upstream connects
//! are never redirected back to itself.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use redirect_common::chain::{INBOUND_PASSTHROUGH_SRC, INBOUND_PASSTHROUGH_SRC6};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};

mod budget;
mod cgroup_dialer;
mod dialer;
mod dns;
mod fast_path;
mod listen;
mod orig_dst;
mod relay;
mod splice;
mod throttle;
mod trim;

pub use budget::Budget;
pub use cgroup_dialer::{CgroupDialer, ChildSpec};
pub use dialer::{AgentSockets, Dialer, NetnsDialer, SPARE_SOCKETS};
pub use dns::{DnsUpstream, SOCKETS_PER_FAMILY as DNS_SOCKETS_PER_FAMILY};
use fast_path::Enrolled;
pub use fast_path::{FastPath, FastPathSockets};
pub use listen::{InboundDial, LISTEN_BACKLOG, Listeners, Listening, ProxyConfig, Side, connections_fitting, no_ipv6};
pub use orig_dst::{OrigDstTable, OriginalDst};
use relay::{Ended, relay};
pub use relay::{Keepalive, Liveness};
use throttle::{Noise, Throttles};
pub use trim::one_arena;

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
    /// Reset at accept: the proxy's own `--max-proxy-connections` were in use.
    pub over_limit: AtomicU64,
    /// Reset at accept: the connection budget the process's proxies share was spent.
    pub over_budget: AtomicU64,
    /// Connections closed after the idle timeout.
    pub idle_closed: AtomicU64,
    /// Directions of a stream that took a pipe (`splice.rs`), whether or not they kept it.
    pub spliced: AtomicU64,
}

/// The running proxy; dropping it stops the listeners and resets open connections.
pub struct Proxy {
    tasks: JoinSet<()>,
    stop: tokio::sync::watch::Sender<bool>,
    shared: Arc<Shared>,
    pub counters: Arc<ProxyCounters>,
}

struct Shared {
    table: OriginalDst,
    fast_path: Option<std::sync::Mutex<FastPath>>,
    dialer: Dialer,
    cfg: ProxyConfig,
    limit: Arc<Semaphore>,
    /// Shared with every other proxy of the process.
    budget: Budget,
    counters: Arc<ProxyCounters>,
    /// Per-connection log lines, throttled.
    noise: Throttles,
}

impl Proxy {
    /// Starts serving. Must run inside the tokio runtime. A connection needs a share of
    /// `budget` on top of one of the proxy's own `cfg.max_connections`. `dns`: where the DNS
    /// sockets of `listening` (if any) send their queries.
    pub fn start(
        listening: Listening,
        table: OriginalDst,
        dialer: Dialer,
        cfg: ProxyConfig,
        fast_path: Option<FastPath>,
        budget: Budget,
        dns: Option<DnsUpstream>,
    ) -> io::Result<Self> {
        let counters = Arc::new(ProxyCounters::default());
        let shared = Arc::new(Shared {
            table,
            fast_path: fast_path.map(std::sync::Mutex::new),
            dialer,
            limit: Arc::new(Semaphore::new(cfg.max_connections)),
            budget,
            cfg,
            counters: counters.clone(),
            noise: Throttles::new(),
        });
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = JoinSet::new();
        for (side, listener) in listening.listeners {
            // Accepted sockets inherit keepalive from their listener: set once here, it costs
            // no syscall per connection.
            if let Some(k) = shared.cfg.liveness.keepalive {
                k.apply(&listener)?;
            }
            tracing::info!(side = side.name(), addr = %listener.local_addr()?, "proxy listening");
            tasks.spawn(accept_loop(listener, side, shared.clone(), stopped.clone()));
        }
        if let Some(upstream) = dns
            && !listening.udp.is_empty()
        {
            for u in &listening.udp {
                tracing::info!(side = Side::DnsUdp.name(), addr = %u.local_addr()?, "proxy listening");
            }
            let stopped = stopped.clone();
            let udp = listening.udp;
            tasks.spawn(async move {
                if let Err(e) = dns::serve(udp, upstream, stopped).await {
                    tracing::error!("the DNS proxy stopped: {e}");
                }
            });
        }
        tasks.spawn(housekeeping(shared.clone(), stopped));
        Ok(Self {
            tasks,
            stop,
            shared,
            counters,
        })
    }

    /// Connections being served now.
    pub fn active(&self) -> usize {
        self.shared.active()
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
    // Accepted sockets inherit TCP_NODELAY from their listener (the child is a copy of it):
    // set once here rather than once per connection.
    let _ = socket2::SockRef::from(&listener).set_tcp_nodelay(true);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    // Reset at once, never left waiting: the client sees the refusal.
                    let Some(permits) = shared.admit(peer) else {
                        reset(stream);
                        continue;
                    };
                    let shared = shared.clone();
                    conns.spawn(async move {
                        serve(stream, peer, side, &shared).await;
                        drop(permits);
                    });
                }
                // EMFILE and friends (descriptors the budget does not know of, such as another
                // process's on ENFILE): back off instead of spinning, and accept again after.
                Err(e) => {
                    if let Some(count) = shared.noise.hit(Noise::AcceptFailed) {
                        tracing::warn!(side = side.name(), count, "accept failed: {e}");
                    }
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

/// Once a second: the throttled log lines' counts while something is held back (and whatever
/// is left when the proxy stops), and memory given back after connections ended.
async fn housekeeping(shared: Arc<Shared>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Throttles::PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmer = trim::Trimmer::default();
    let mut active_before = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                shared.noise.summarize(false, shared.cfg.max_connections, shared.budget.size());
                let active = shared.active();
                let ended = shared.counters.accepted.load(Ordering::Relaxed).saturating_sub(active as u64);
                trimmer.tick(ended, active, active_before);
                active_before = active;
            }
            _ = stopped.changed() => break,
        }
    }
    shared
        .noise
        .summarize(true, shared.cfg.max_connections, shared.budget.size());
}

impl Shared {
    /// Connections being served now.
    fn active(&self) -> usize {
        self.cfg.max_connections - self.limit.available_permits()
    }

    /// A connection's shares of the proxy's own limit and of the process's budget, held while
    /// it is served; `None` (counted and logged): it is over one of them.
    fn admit(&self, peer: SocketAddr) -> Option<[OwnedSemaphorePermit; 2]> {
        let Ok(own) = self.limit.clone().try_acquire_owned() else {
            self.counters.over_limit.fetch_add(1, Ordering::Relaxed);
            // Under overload every accept is over the limit.
            if let Some(count) = self.noise.hit(Noise::OverLimit) {
                tracing::warn!(
                    %peer,
                    limit = self.cfg.max_connections,
                    count,
                    "connection limit reached; resetting"
                );
            }
            return None;
        };
        let Some(shared) = self.budget.take() else {
            self.counters.over_budget.fetch_add(1, Ordering::Relaxed);
            if let Some(count) = self.noise.hit(Noise::OverBudget) {
                tracing::warn!(
                    %peer,
                    budget = self.budget.size(),
                    count,
                    "the node's connection budget is spent; resetting"
                );
            }
            return None;
        };
        Some([own, shared])
    }
}

/// Closes with RST, so the workload sees a failure at once instead of a clean EOF or a hang.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(client: TcpStream, peer: SocketAddr, side: Side, shared: &Shared) {
    let Ok(local) = client.local_addr() else {
        return reset(client);
    };
    let listen_port = shared.cfg.port(side);
    let Some(dst) = shared.table.lookup(&client, peer, local, listen_port) else {
        shared.counters.no_original_dst.fetch_add(1, Ordering::Relaxed);
        // A client dialling a capture port straight, in a loop, is a line a second.
        if let Some(count) = shared.noise.hit(Noise::NoOriginalDst) {
            tracing::warn!(
                %peer,
                %local,
                count,
                "no original destination recorded for this connection; resetting"
            );
        }
        return reset(client);
    };
    let upstream = match connect_upstream(dst.addr, peer, side, shared).await {
        Ok(s) => s,
        Err(e) => {
            shared.counters.upstream_failed.fetch_add(1, Ordering::Relaxed);
            if let Some(count) = shared.noise.hit(Noise::UpstreamFailed) {
                tracing::info!(%peer, dst = %dst.addr, count, "upstream connect failed: {e}; resetting");
            }
            return reset(client);
        }
    };
    shared.counters.forwarded.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, dst = %dst.addr, side = side.name(), "forwarding");
    // Before the first byte is written to it.
    let _enrolled = (side == Side::Inbound)
        .then(|| shared.fast_path.as_ref().and_then(|f| Enrolled::new(f, &upstream)))
        .flatten();
    // The client's is its listener's (`accept_loop`).
    let _ = upstream.set_nodelay(true);
    // An error on either side, or the task aborted at the end of a drain, resets both: an
    // abort passed on as a clean close would make a cut stream look complete.
    let mut guard = ResetUnlessDone {
        streams: [&client, &upstream],
        done: false,
    };
    // Half-close is carried across: EOF on one side shuts down writing on the other, and the
    // other direction keeps flowing until it ends too.
    let pipes = shared.cfg.splice.then_some(&shared.budget);
    match relay(
        &client,
        &upstream,
        shared.cfg.liveness.idle_timeout,
        &shared.counters,
        pipes,
    )
    .await
    {
        Ended::Done { up, down } => {
            guard.done = true;
            tracing::debug!(%peer, dst = %dst.addr, up, down, "closed");
        }
        // As Envoy's TCP proxy does at its idle timeout: both sides closed (FIN), since every
        // byte read was delivered; one that could not be is a cut stream, reset.
        Ended::Idle { stalled } => {
            shared.counters.idle_closed.fetch_add(1, Ordering::Relaxed);
            guard.done = !stalled;
            tracing::debug!(%peer, dst = %dst.addr, stalled, "idle timeout; closing");
        }
        Ended::Failed(e) => tracing::debug!(%peer, dst = %dst.addr, "copy ended: {e}"),
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

async fn connect_upstream(dst: SocketAddr, peer: SocketAddr, side: Side, shared: &Shared) -> io::Result<TcpStream> {
    let socket = shared
        .dialer
        .socket(dst.is_ipv6(), shared.cfg.liveness.keepalive)
        .await?;
    let dial = shared.cfg.inbound_dial;
    match (side, dial.transparent_mark()) {
        // As Envoy's original_src filter in TPROXY mode, and as ztunnel: the app sees the
        // client.
        (Side::Inbound, Some(mark)) => transparent_from(&socket, peer, mark)?,
        // The agent's own mark is 0x539, TPROXY's default: its `ip rule` would route the
        // socket into lo whatever it dials. Envoy's outbound sockets carry no mark there.
        // (Ambient's rule routes 0x111: the agent's sockets keep ztunnel's 0x539.)
        (_, Some(mark)) if dial == InboundDial::Tproxy(mark) && mark == redirect_common::AGENT_SOCKET_MARK => {
            socket2::SockRef::from(&socket).set_mark(0)?;
        }
        (Side::Inbound, None) => {
            let src = match dst {
                SocketAddr::V4(_) => IpAddr::V4(INBOUND_PASSTHROUGH_SRC),
                SocketAddr::V6(_) => IpAddr::V6(INBOUND_PASSTHROUGH_SRC6),
            };
            socket.bind(SocketAddr::new(src, 0))?;
        }
        _ => {}
    }
    tokio::time::timeout(shared.cfg.connect_timeout, socket.connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Binds an inbound upstream socket to the client's address (any port), which is not one of
/// the namespace's: IP_TRANSPARENT allows it (the agent holds CAP_NET_ADMIN), and the mark
/// routes the app's replies to it back through `lo` (the `ip rule fwmark MARK` the agent
/// installs with TPROXY mode; ambient's 0x111, which sock_ops gives ztunnel's 0x539 at the
/// connect). The mark replaces the agent's own (`AGENT_SOCKET_MARK`), which connect4/6 do not
/// go by.
fn transparent_from(socket: &tokio::net::TcpSocket, client: SocketAddr, mark: u32) -> io::Result<()> {
    let s = socket2::SockRef::from(socket);
    match client {
        SocketAddr::V4(_) => s.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => s.set_ip_transparent_v6(true)?,
    }
    s.set_mark(mark)?;
    socket.bind(SocketAddr::new(client.ip(), 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_connections: usize) -> ProxyConfig {
        ProxyConfig {
            outbound_port: 15001,
            inbound_port: 15006,
            listen_on: ProxyConfig::LOOPBACK.to_vec(),
            outbound_on_any: false,
            connect_timeout: Duration::from_secs(1),
            max_connections,
            liveness: Liveness {
                idle_timeout: Some(Liveness::DEFAULT_IDLE_TIMEOUT),
                keepalive: Some(Keepalive::DEFAULT),
            },
            dns_port: None,
            inbound_dial: InboundDial::Passthrough,
            splice: true,
        }
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

    #[test]
    fn each_capture_port_listens_on_each_address() {
        let addrs: Vec<String> = cfg(1)
            .listen_addrs()
            .iter()
            .map(|(s, a)| format!("{} {a}", s.name()))
            .collect();
        assert_eq!(
            addrs,
            [
                "outbound 127.0.0.1:15001",
                "outbound [::1]:15001",
                "inbound 127.0.0.1:15006",
                "inbound [::1]:15006"
            ]
        );
    }
}

//! The proxy's upstream sockets, made inside the workload's namespace.

use std::{
    io,
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use aya::maps::{MapData, SkStorage};
use redirect_common::AGENT_SOCKET_MARK;
use tokio::net::TcpSocket;

use super::{Keepalive, cgroup_dialer::CgroupDialer};
use crate::sys::Netns;

/// Makes the proxy's upstream sockets.
#[derive(Clone)]
pub enum Dialer {
    /// Through a child process inside the workload's cgroup and namespace, as a sidecar's
    /// sockets are made (`cgroup_dialer.rs`).
    Cgroup(CgroupDialer),
    /// Through a thread inside the workload's namespace: the agent's own cgroup (a workload
    /// enrolled without one).
    Netns(NetnsDialer),
    /// In the calling thread's namespace (a proxy that runs inside the workload's).
    Here,
}

impl Dialer {
    /// A socket for an upstream connection of the family of the original destination: IPv4
    /// (also for a v4-mapped connect, which was IPv4 on the wire) or IPv6.
    /// `keepalive`: for [`Dialer::Here`]; a [`NetnsDialer`]'s threads set their own.
    pub(super) async fn socket(&self, v6: bool, keepalive: Option<Keepalive>) -> io::Result<TcpSocket> {
        let made = match self {
            Self::Cgroup(d) => return d.socket(v6).await,
            Self::Netns(d) => return d.socket(v6).await,
            Self::Here if v6 => TcpSocket::new_v6()?,
            Self::Here => TcpSocket::new_v4()?,
        };
        if let Some(k) = keepalive {
            k.apply(&made)?;
        }
        Ok(made)
    }
}

/// Sockets each of the dialer's threads keeps made ahead of demand (each holds a descriptor).
pub const SPARE_SOCKETS: usize = 32;
/// The thread refills the queue once this many were taken: one wakeup (and, for the dialer
/// child, a couple of requests) per batch of connections. Refilled slot by slot, as each
/// connection freed one, it woke once per connection: a futex wake, a context switch, and a
/// request and answer to the child each time (strace of CRR: 2.3 futex calls, one send and
/// one recvmsg per connection).
const REFILL_AT: usize = SPARE_SOCKETS / 2;
/// How long the thread sleeps at most between looks at the queue, should a wakeup be missed.
const PARK: Duration = Duration::from_millis(100);

/// Makes TCP sockets inside the workload's namespace from long-lived threads that entered
/// it, one per address family. A socket's namespace is fixed when it is made, so a thread
/// makes them ahead of demand and a connection takes a ready one: no thread hop on the
/// connection's path (a hop per connection showed in CRR profiles as futex contention and
/// context switches). The IPv6 thread starts with the first IPv6 connection: most workloads
/// never make one, and a namespace without IPv6 would only ever hand it errors.
#[derive(Clone)]
pub struct NetnsDialer {
    v4: Pool,
    v6: Arc<tokio::sync::OnceCell<Pool>>,
    netns: Arc<Netns>,
    agent: AgentSockets,
    keepalive: Option<Keepalive>,
}

/// `AGENT_SOCKETS`: the upstream sockets connect4/6 must leave alone. Each socket gets its
/// storage there as it is made, before any connect; the kernel frees it with the socket.
/// Shared by a workload's two dialer threads.
#[derive(Clone)]
pub struct AgentSockets(Arc<Mutex<SkStorage<MapData, u8>>>);

impl AgentSockets {
    pub fn new(map: SkStorage<MapData, u8>) -> Self {
        Self(Arc::new(Mutex::new(map)))
    }

    pub(crate) fn register(&self, socket: &impl std::os::fd::AsRawFd) -> io::Result<()> {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(socket, 1, 0)
            .map_err(|e| io::Error::other(format!("AGENT_SOCKETS: {e}")))
    }
}

/// One thread's queue of ready sockets.
#[derive(Clone)]
pub(super) struct Pool {
    ready: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<io::Result<TcpSocket>>>>,
    /// The thread that fills it, woken once a batch's worth was taken.
    filler: std::thread::Thread,
}

impl NetnsDialer {
    /// `keepalive`: set on every socket made (before it connects), off the connection's path.
    pub fn start(netns: &Netns, agent: AgentSockets, keepalive: Option<Keepalive>) -> io::Result<Self> {
        Ok(Self {
            v4: Pool::start(netns, false, agent.clone(), keepalive)?,
            v6: Arc::default(),
            netns: Arc::new(netns.try_clone()?),
            agent,
            keepalive,
        })
    }

    pub async fn socket(&self, v6: bool) -> io::Result<TcpSocket> {
        if !v6 {
            return self.v4.take().await;
        }
        let pool = self
            .v6
            .get_or_try_init(|| {
                let (netns, agent, keepalive) = (self.netns.clone(), self.agent.clone(), self.keepalive);
                async move {
                    tokio::task::spawn_blocking(move || Pool::start(&netns, true, agent, keepalive))
                        .await
                        .map_err(io::Error::other)?
                }
            })
            .await?;
        pool.take().await
    }
}

impl Pool {
    /// A thread that entered `netns` and makes sockets there, one at a time.
    fn start(netns: &Netns, v6: bool, agent: AgentSockets, keepalive: Option<Keepalive>) -> io::Result<Self> {
        let netns = netns.try_clone()?;
        Self::spawn_with(
            if v6 { "netns-dialer6" } else { "netns-dialer" },
            move || netns.enter_current_thread(),
            move |_| {
                let made = if v6 { TcpSocket::new_v6() } else { TcpSocket::new_v4() };
                let made = made.and_then(mark_as_agent).and_then(|s| {
                    keepalive.map_or(Ok(()), |k| k.apply(&s))?;
                    agent.register(&s)?;
                    Ok(s)
                });
                Some(vec![made])
            },
        )
    }

    /// A thread that fills the queue with what `make` returns, given the room left in the
    /// queue, then sleeps until [`REFILL_AT`] sockets were taken; `make` returning `None` ends
    /// it, as does the pool's receiver going. After an error or an empty batch it pauses
    /// briefly.
    pub(super) fn spawn(
        name: &str,
        make: impl FnMut(usize) -> Option<Vec<io::Result<TcpSocket>>> + Send + 'static,
    ) -> io::Result<Self> {
        Self::spawn_with(name, || Ok(()), make)
    }

    /// [`Pool::spawn`], after `setup` succeeded on the thread (its error is returned).
    fn spawn_with(
        name: &str,
        setup: impl FnOnce() -> io::Result<()> + Send + 'static,
        mut make: impl FnMut(usize) -> Option<Vec<io::Result<TcpSocket>>> + Send + 'static,
    ) -> io::Result<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(SPARE_SOCKETS);
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            if let Err(e) = setup() {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            // Ends when the proxy drops the receiver.
            loop {
                while tx.capacity() > 0 {
                    let Some(batch) = make(tx.capacity()) else {
                        return;
                    };
                    let failed = batch.is_empty() || batch.iter().any(Result::is_err);
                    for made in batch {
                        if tx.blocking_send(made).is_err() {
                            return;
                        }
                    }
                    if failed {
                        // Out of descriptors, most likely (or no IPv6 here, or the dialer
                        // process gone): hand out the error (that connection is reset)
                        // without queueing a burst of stale ones behind it.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                while tx.capacity() < REFILL_AT {
                    if tx.is_closed() {
                        return;
                    }
                    std::thread::park_timeout(PARK);
                }
            }
        })?;
        ready_rx.recv().map_err(|_| io::Error::other("dialer thread died"))??;
        Ok(Self {
            ready: Arc::new(tokio::sync::Mutex::new(rx)),
            filler: thread.thread().clone(),
        })
    }

    pub(super) async fn take(&self) -> io::Result<TcpSocket> {
        let mut ready = self.ready.lock().await;
        let taken = ready.recv().await;
        // Only once a batch's worth is gone: an unpark of a parked thread is a futex wake.
        if ready.len() + REFILL_AT <= SPARE_SOCKETS {
            self.filler.unpark();
        }
        taken.ok_or_else(|| io::Error::other("dialer thread is gone"))?
    }
}

/// Marks an upstream socket as the agent's own ([`AGENT_SOCKET_MARK`]), for the node's own
/// rules; capture tells the agent's sockets by [`AgentSockets`]. Needs CAP_NET_ADMIN, which
/// the agent has.
pub(super) fn mark_as_agent(socket: TcpSocket) -> io::Result<TcpSocket> {
    socket2::SockRef::from(&socket).set_mark(AGENT_SOCKET_MARK)?;
    Ok(socket)
}

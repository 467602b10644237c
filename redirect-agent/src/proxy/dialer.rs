//! The proxy's upstream sockets, made inside the workload's namespace.

use std::{
    io,
    sync::{Arc, mpsc},
    time::Duration,
};

use redirect_common::AGENT_SOCKET_MARK;
use tokio::net::TcpSocket;

use crate::sys::Netns;

/// Makes the proxy's upstream sockets.
#[derive(Clone)]
pub enum Dialer {
    /// Through a thread inside the workload's namespace (the agent lives outside it).
    Netns(NetnsDialer),
    /// In the calling thread's namespace (a proxy that runs inside the workload's).
    Here,
}

impl Dialer {
    pub(super) async fn socket(&self) -> io::Result<TcpSocket> {
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
    socket2::SockRef::from(&socket).set_mark(AGENT_SOCKET_MARK)?;
    Ok(socket)
}

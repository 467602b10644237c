//! The embedded proxy's part of `--fast-path`.

use aya::maps::{HashMap, MapData};
use redirect_common::TupleKey;
use tokio::net::TcpStream;

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

    /// A sender's state ([`redirect_common::fast_path`]): how its first message went.
    pub fn state(&self, key: &TupleKey) -> Result<u8, aya::maps::MapError> {
        self.senders.get(key, 0)
    }

    /// Forgets a socket's sender state once it is closed (the kernel drops the socket from
    /// the sockhash itself).
    pub fn forget(&mut self, key: &TupleKey) {
        let _ = self.senders.remove(key);
    }
}

/// An upstream socket in the fast path's sockhash; its sender state is forgotten when the
/// connection ends.
pub(super) struct Enrolled<'a> {
    fast_path: &'a std::sync::Mutex<FastPath>,
    key: TupleKey,
}

impl<'a> Enrolled<'a> {
    pub(super) fn new(fast_path: &'a std::sync::Mutex<FastPath>, socket: &TcpStream) -> Option<Self> {
        let (Ok(local), Ok(peer)) = (socket.local_addr(), socket.peer_addr()) else {
            return None;
        };
        let mut f = fast_path.lock().unwrap_or_else(|e| e.into_inner());
        // Its own view of the connection: the local end is the source.
        let key = TupleKey::from_addrs(f.netns_cookie, local, peer);
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

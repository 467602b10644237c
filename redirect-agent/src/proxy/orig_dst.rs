//! Where an accepted connection was going: the programs' maps (embedded proxy) or conntrack
//! (`redirect-agent proxy`, behind iptables).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use redirect_common::{OrigDst, Target, TupleKey, addr};
use tokio::net::TcpStream;

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
///   local address, but only the map says the connection was captured.) Also where sk_lookup
///   learns that a segment belongs to a connection it judged already (see [`Self::ended`]).
pub struct OrigDstTable {
    established: HashMap<MapData, TupleKey, OrigDst>,
    pending: Mutex<HashMap<MapData, TupleKey, OrigDst>>,
    netns_cookie: u64,
    /// `INBOUND_PENDING` records of connections that ended, with when each may go: first in,
    /// first due, since every one waits [`LINGER`].
    ended: Mutex<VecDeque<(Instant, TupleKey)>>,
}

/// How long a proxied connection's `INBOUND_PENDING` record outlives it. A segment of the
/// connection can reach the namespace after the proxy's socket is gone (sent before the close
/// but delayed in another CPU's backlog, as under load): it finds no socket, so sk_lookup runs
/// for it. While the record lasts, sk_lookup takes it for what it is, a packet of a connection
/// judged already: handed to the listener (which answers with a reset, as the capture port
/// does behind iptables) and not counted, as conntrack's entry keeps it out of nat. Without
/// the record, it would be judged and counted as a new connection and leave a record nobody
/// takes. Reordering lasts milliseconds; conntrack keeps a closed entry far longer, but a
/// longer linger would fill the LRU with the records of short connections.
pub const LINGER: Duration = Duration::from_secs(1);

/// Where and why a connection was redirected.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// IPv4 for a v4-mapped connection (the family on the wire).
    pub addr: SocketAddr,
    pub target: Option<Target>,
    /// Found in `INBOUND_PENDING`, which the proxy cleans up after the connection.
    pending: bool,
}

impl OrigDstTable {
    pub fn new(
        established: HashMap<MapData, TupleKey, OrigDst>,
        pending: HashMap<MapData, TupleKey, OrigDst>,
        netns_cookie: u64,
    ) -> Self {
        Self {
            established,
            pending: Mutex::new(pending),
            netns_cookie,
            ended: Mutex::new(VecDeque::new()),
        }
    }

    /// Where a connection accepted on a capture listener was going: `peer` and `local` are
    /// the accepted socket's addresses. `None`: not captured by us (or already closed) — a
    /// connection straight to a capture port, which must not be forwarded back to it.
    ///
    /// An `INBOUND_PENDING` record stays while the connection is served: the proxy's socket is
    /// not in the workload's cgroup, so no sock_ops callback moves or removes it, and the
    /// proxy removes it after the connection's end ([`Self::ended`]).
    fn find(&self, peer: SocketAddr, local: SocketAddr) -> Option<Destination> {
        let key = TupleKey::from_addrs(self.netns_cookie, peer, local);
        let (v, pending) = match self.established.get(&key, 0) {
            Ok(v) => (v, false),
            Err(_) => (self.lock_pending().get(&key, 0).ok()?, true),
        };
        Some(Destination {
            addr: SocketAddr::new(addr::to_ip(&v.addr), v.port),
            target: Target::from_u8(v.target),
            pending,
        })
    }

    /// The connection accepted with these addresses is over (served, or reset at accept): its
    /// `INBOUND_PENDING` record, if any, goes once it has outlived it by [`LINGER`].
    fn ended(&self, peer: SocketAddr, local: SocketAddr) {
        let key = TupleKey::from_addrs(self.netns_cookie, peer, local);
        self.lock_ended().push_back((Instant::now() + LINGER, key));
    }

    /// Removes the records of ended connections that are due (all of them with `all`, when
    /// the proxy stops).
    fn forget_ended(&self, all: bool) {
        let now = Instant::now();
        let due: Vec<TupleKey> = {
            let mut ended = self.lock_ended();
            let n = if all {
                ended.len()
            } else {
                ended.partition_point(|(at, _)| *at <= now)
            };
            ended.drain(..n).map(|(_, k)| k).collect()
        };
        if due.is_empty() {
            return;
        }
        let mut pending = self.lock_pending();
        for key in &due {
            // Gone already when the listener closed and the engine forgot its records.
            let _ = pending.remove(key);
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, TupleKey, OrigDst>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_ended(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, TupleKey)>> {
        self.ended.lock().unwrap_or_else(|e| e.into_inner())
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
    pub(super) fn lookup(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        listen_port: u16,
    ) -> Option<Destination> {
        match self {
            Self::Maps(table) => table.find(peer, local),
            Self::Conntrack => {
                let addr = crate::sys::original_dst(stream, local).ok()?;
                // Conntrack answers a connection nobody redirected (one made straight to the
                // capture port) with its own address: nothing to forward to. A connection the
                // agent's sk_lookup handed over also has its original destination as its local
                // address (nothing was rewritten), but on its own port, not the capture port.
                let straight_to_capture_port = addr == local && local.port() == listen_port;
                (!straight_to_capture_port).then_some(Destination {
                    addr,
                    target: None,
                    pending: false,
                })
            }
        }
    }

    /// A connection accepted with these addresses is over; `dst`: what [`Self::lookup`] found
    /// for it (`None` when it was never looked up, as for one reset at accept).
    pub(super) fn ended(&self, peer: SocketAddr, local: SocketAddr, dst: Option<&Destination>) {
        if let Self::Maps(table) = self
            && dst.is_none_or(|d| d.pending)
        {
            table.ended(peer, local);
        }
    }

    /// Removes the records of ended connections that are due; all of them with `all`.
    pub(super) fn forget_ended(&self, all: bool) {
        if let Self::Maps(table) = self {
            table.forget_ended(all);
        }
    }
}

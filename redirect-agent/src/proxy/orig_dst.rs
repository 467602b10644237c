//! Where an accepted connection was going: the programs' maps (embedded proxy) or conntrack
//! (`redirect-agent proxy`, behind iptables).

use std::net::SocketAddr;

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
///   local address, but only the map says the connection was captured.)
pub struct OrigDstTable {
    established: HashMap<MapData, TupleKey, OrigDst>,
    pending: std::sync::Mutex<HashMap<MapData, TupleKey, OrigDst>>,
    netns_cookie: u64,
}

/// Where and why a connection was redirected.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// IPv4 for a v4-mapped connection (the family on the wire).
    pub addr: SocketAddr,
    pub target: Option<Target>,
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
    ///
    /// The embedded proxy reads each destination once: an entry found in `INBOUND_PENDING` is
    /// removed, because the proxy's socket is not in the workload's cgroup and no sock_ops
    /// close callback will remove it.
    fn take(&self, peer: SocketAddr, local: SocketAddr) -> Option<Destination> {
        let key = TupleKey::from_addrs(self.netns_cookie, peer, local);
        let v = match self.established.get(&key, 0) {
            Ok(v) => v,
            Err(_) => {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let v = pending.get(&key, 0).ok()?;
                let _ = pending.remove(&key);
                v
            }
        };
        Some(Destination {
            addr: SocketAddr::new(addr::to_ip(&v.addr), v.port),
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
    pub(super) fn lookup(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        listen_port: u16,
    ) -> Option<Destination> {
        match self {
            Self::Maps(table) => table.take(peer, local),
            Self::Conntrack => {
                let addr = crate::sys::original_dst(stream, local).ok()?;
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

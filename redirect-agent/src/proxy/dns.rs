//! The embedded proxy's DNS over UDP: what istio-agent does on 15053 for names it does not own.
//! Each captured query is sent on to a resolver of the workload's resolv.conf under a fresh
//! transaction id, and the answer goes back to the client under its own id, from the socket it
//! asked (127.0.0.1:15053 or `[::1]:15053`; recvmsg4/6 then name the resolver the app asked).
//! DNS over TCP takes the proxy's TCP path to the resolver the app dialed (`Side::Dns`).
//!
//! The upstream sockets are the agent's (in `AGENT_SOCKETS`), so the capture hooks leave them
//! alone, as the owner rules leave istio-agent's.

use std::{
    collections::HashMap,
    io,
    net::{SocketAddr, UdpSocket as StdUdpSocket},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::UdpSocket;

/// How long a query waits for its resolver; later answers are dropped (the client retries, as
/// it would after a lost datagram).
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Queries awaiting an answer at once; one past it is dropped.
const MAX_PENDING: usize = 4096;
/// Largest DNS message over UDP with EDNS(0).
const MAX_MESSAGE: usize = 65_535;

/// Where the forwarder sends queries, and the sockets it sends them from.
pub struct DnsUpstream {
    /// The resolvers of the workload's resolv.conf, in its order: the first of the family a
    /// socket exists for is asked.
    pub servers: Vec<SocketAddr>,
    /// An unbound UDP socket per family, made in the workload's namespace and registered in
    /// `AGENT_SOCKETS`.
    pub v4: Option<StdUdpSocket>,
    pub v6: Option<StdUdpSocket>,
}

impl DnsUpstream {
    /// An upstream socket per family of `servers`, made inside `netns` and registered in
    /// `AGENT_SOCKETS` before it sends anything.
    pub fn make(
        netns: &crate::sys::Netns,
        servers: &[std::net::IpAddr],
        agent: &super::AgentSockets,
    ) -> io::Result<Self> {
        let servers: Vec<SocketAddr> = servers.iter().map(|ip| SocketAddr::new(*ip, 53)).collect();
        let want = |v6: bool| servers.iter().any(|s| s.is_ipv6() == v6);
        let (want4, want6) = (want(false), want(true));
        let (v4, v6) = netns.run(move || {
            let any = |v6: bool| -> io::Result<Option<StdUdpSocket>> {
                let bind: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("an address");
                Ok(Some(StdUdpSocket::bind(bind)?))
            };
            Ok((
                if want4 { any(false)? } else { None },
                if want6 { any(true)? } else { None },
            ))
        })?;
        for s in v4.iter().chain(v6.iter()) {
            agent.register(s)?;
        }
        Ok(Self { servers, v4, v6 })
    }
}

/// A query sent on: who asked, under which id, on which of the proxy's sockets.
struct Pending {
    client: SocketAddr,
    id: [u8; 2],
    listener: usize,
    at: Instant,
}

#[derive(Default)]
struct Table {
    pending: HashMap<u16, Pending>,
    next: u16,
}

impl Table {
    /// A transaction id no pending query holds, for `p`; `None` when the table is full.
    fn add(&mut self, p: Pending) -> Option<u16> {
        self.expire(p.at);
        if self.pending.len() >= MAX_PENDING {
            return None;
        }
        loop {
            self.next = self.next.wrapping_add(1);
            if !self.pending.contains_key(&self.next) {
                self.pending.insert(self.next, p);
                return Some(self.next);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        self.pending.retain(|_, p| now.duration_since(p.at) < ANSWER_WITHIN);
    }
}

/// Answers on `listeners` until `stopped`. Queries without a resolver to go to are dropped
/// (and logged once); a malformed one (shorter than a DNS header) too.
pub(super) async fn serve(
    listeners: Vec<StdUdpSocket>,
    upstream: DnsUpstream,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    let listeners: Vec<Arc<UdpSocket>> = listeners
        .into_iter()
        .map(|s| {
            s.set_nonblocking(true)?;
            Ok(Arc::new(UdpSocket::from_std(s)?))
        })
        .collect::<io::Result<_>>()?;
    let table = Arc::new(Mutex::new(Table::default()));
    let mut tasks = tokio::task::JoinSet::new();
    // (IPv6?, socket, the first resolver of that family).
    let mut ways = Vec::new();
    for (v6, sock) in [(false, upstream.v4), (true, upstream.v6)] {
        let (Some(sock), Some(server)) = (sock, upstream.servers.iter().copied().find(|s| s.is_ipv6() == v6)) else {
            continue;
        };
        sock.set_nonblocking(true)?;
        let sock = Arc::new(UdpSocket::from_std(sock)?);
        tasks.spawn(answers(sock.clone(), server, listeners.clone(), table.clone()));
        ways.push((v6, sock, server));
    }
    for (i, l) in listeners.iter().enumerate() {
        // A listener's queries go to a resolver of its own family, else of the other (a
        // resolv.conf of IPv6 resolvers still answers 127.0.0.1).
        let v6 = l.local_addr()?.is_ipv6();
        let way = ways.iter().find(|w| w.0 == v6).or_else(|| ways.first());
        if let Some((_, sock, server)) = way {
            tasks.spawn(queries(l.clone(), i, sock.clone(), *server, table.clone()));
        }
    }
    if tasks.is_empty() {
        tracing::warn!("no resolver to forward DNS to (resolv.conf named none): UDP queries go unanswered");
    }
    tokio::select! {
        _ = stopped.changed() => {}
        Some(_) = tasks.join_next() => {}
    }
    Ok(())
}

/// Queries arriving on one of the proxy's sockets, sent on to `server`.
async fn queries(
    listener: Arc<UdpSocket>,
    index: usize,
    upstream: Arc<UdpSocket>,
    server: SocketAddr,
    table: Arc<Mutex<Table>>,
) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok((n, client)) = listener.recv_from(&mut buf).await else {
            continue;
        };
        if n < 12 {
            continue;
        }
        let pending = Pending {
            client,
            id: [buf[0], buf[1]],
            listener: index,
            at: Instant::now(),
        };
        let Some(id) = table.lock().unwrap_or_else(|e| e.into_inner()).add(pending) else {
            tracing::debug!(%client, "too many DNS queries awaiting an answer; dropped");
            continue;
        };
        buf[..2].copy_from_slice(&id.to_be_bytes());
        if let Err(e) = upstream.send_to(&buf[..n], server).await {
            tracing::debug!(%server, "DNS query not sent on: {e}");
        }
    }
}

/// Answers from `server`, back to whoever asked under the id they carry.
async fn answers(
    upstream: Arc<UdpSocket>,
    server: SocketAddr,
    listeners: Vec<Arc<UdpSocket>>,
    table: Arc<Mutex<Table>>,
) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok((n, from)) = upstream.recv_from(&mut buf).await else {
            continue;
        };
        if from != server || n < 12 {
            continue;
        }
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        let Some(p) = table.lock().unwrap_or_else(|e| e.into_inner()).pending.remove(&id) else {
            continue;
        };
        buf[..2].copy_from_slice(&p.id);
        if let Some(l) = listeners.get(p.listener) {
            let _ = l.send_to(&buf[..n], p.client).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_while_pending_and_expire() {
        let mut t = Table::default();
        let p = |at| Pending {
            client: "127.0.0.1:1".parse().unwrap(),
            id: [0, 1],
            listener: 0,
            at,
        };
        let now = Instant::now();
        let a = t.add(p(now)).unwrap();
        let b = t.add(p(now)).unwrap();
        assert_ne!(a, b);
        t.expire(now + ANSWER_WITHIN);
        assert!(t.pending.is_empty(), "answers later than the bound are dropped");
    }
}

//! The embedded proxy's DNS over UDP: what istio-agent does on 15053 for names it does not own.
//! Each captured query is sent on to the workload's resolv.conf resolvers, in order (the next
//! after 1.5 s without an answer; SERVFAIL past the last), from a random one of several sockets
//! under a random transaction id; an answer counts only from the resolver asked, to the question
//! asked. It goes back to the client under its own id, from the socket it asked (127.0.0.1:15053
//! or `[::1]:15053`; recvmsg4/6 then name the resolver the app asked).
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

/// How long a query waits for one resolver before it is asked of the next (or, past the last,
/// answered SERVFAIL).
const ATTEMPT: Duration = Duration::from_millis(1500);
/// Queries awaiting an answer at once; one past it is dropped.
const MAX_PENDING: usize = 4096;
/// Largest DNS message over UDP with EDNS(0).
const MAX_MESSAGE: usize = 65_535;
/// Upstream sockets per family: a query goes out from one picked at random, so that an answer
/// must guess the port as well as the (random) id, as against a stub resolver's own query.
pub const SOCKETS_PER_FAMILY: usize = 8;

/// Where the forwarder sends queries, and the sockets it sends them from.
pub struct DnsUpstream {
    /// The resolvers of the workload's resolv.conf, in its order: asked one after another.
    pub servers: Vec<SocketAddr>,
    /// Unbound UDP sockets per family, made in the workload's namespace and registered in
    /// `AGENT_SOCKETS`.
    pub v4: Vec<StdUdpSocket>,
    pub v6: Vec<StdUdpSocket>,
}

impl DnsUpstream {
    /// Upstream sockets for each family of `servers`, made inside `netns` and registered in
    /// `AGENT_SOCKETS` before they send anything.
    pub fn make(
        netns: &crate::sys::Netns,
        servers: &[std::net::IpAddr],
        agent: &super::AgentSockets,
    ) -> io::Result<Self> {
        let servers: Vec<SocketAddr> = servers.iter().map(|ip| SocketAddr::new(*ip, 53)).collect();
        let want = |v6: bool| servers.iter().any(|s| s.is_ipv6() == v6);
        let (want4, want6) = (want(false), want(true));
        let (v4, v6) = netns.run(move || {
            let make = |v6: bool, want: bool| -> io::Result<Vec<StdUdpSocket>> {
                let bind: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("an address");
                (0..if want { SOCKETS_PER_FAMILY } else { 0 })
                    .map(|_| StdUdpSocket::bind(bind))
                    .collect()
            };
            Ok((make(false, want4)?, make(true, want6)?))
        })?;
        for s in v4.iter().chain(v6.iter()) {
            agent.register(s)?;
        }
        Ok(Self { servers, v4, v6 })
    }
}

/// A query on its way: who asked, under which id, on which of the proxy's sockets, the query
/// itself (to ask the next resolver, and to tell its answer by the question), and the resolver
/// asked now.
struct Pending {
    client: SocketAddr,
    id: [u8; 2],
    listener: usize,
    query: Vec<u8>,
    server: usize,
    at: Instant,
}

/// The queries on their way, by (upstream socket, transaction id).
struct Table {
    pending: HashMap<(usize, u16), Pending>,
    random: std::hash::RandomState,
    count: u64,
}

impl Table {
    fn new() -> Self {
        Self {
            pending: HashMap::new(),
            random: std::hash::RandomState::new(),
            count: 0,
        }
    }

    /// An unpredictable number (SipHash under the process's random keys, of a counter).
    fn random(&mut self) -> u64 {
        use std::hash::BuildHasher as _;
        self.count += 1;
        self.random.hash_one(self.count)
    }
}

/// The question of a DNS message (from after the header to the end of its first question),
/// or `None` for something that is no query.
fn question(msg: &[u8]) -> Option<&[u8]> {
    let mut at = 12;
    loop {
        let len = usize::from(*msg.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        at += len;
    }
    msg.get(12..at + 4)
}

/// SERVFAIL for `query`: its id and question, no records; what istio-agent answers when no
/// upstream does.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let q = question(query)?;
    let mut out = Vec::with_capacity(12 + q.len());
    out.extend_from_slice(&query[..2]);
    out.extend_from_slice(&[0x80 | (query[2] & 0x79), 0x80 | 2]);
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(q);
    Some(out)
}

/// The forwarder's sockets and state, shared by its tasks.
struct Forwarder {
    listeners: Vec<Arc<UdpSocket>>,
    /// Every upstream socket, with whether it is IPv6.
    upstream: Vec<(bool, Arc<UdpSocket>)>,
    servers: Vec<SocketAddr>,
    table: Mutex<Table>,
}

impl Forwarder {
    /// Sends `p`'s query to resolver `p.server` from a random socket of its family under a
    /// random id; `false` when no socket of that family exists.
    async fn send(&self, mut p: Pending) -> bool {
        let server = self.servers[p.server];
        let (socket, id) = {
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            if t.pending.len() >= MAX_PENDING {
                return false;
            }
            let family: Vec<usize> = (0..self.upstream.len())
                .filter(|&i| self.upstream[i].0 == server.is_ipv6())
                .collect();
            if family.is_empty() {
                return false;
            }
            let r = t.random();
            let socket = family[(r >> 16) as usize % family.len()];
            let mut id = r as u16;
            while t.pending.contains_key(&(socket, id)) {
                id = id.wrapping_add(1);
            }
            p.query[..2].copy_from_slice(&id.to_be_bytes());
            p.at = Instant::now();
            let query = p.query.clone();
            t.pending.insert((socket, id), p);
            (socket, query)
        };
        let _ = self.upstream[socket].1.send_to(&id, server).await;
        true
    }

    /// Queries arriving on listener `index`.
    async fn queries(self: Arc<Self>, index: usize) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let Ok((n, client)) = self.listeners[index].recv_from(&mut buf).await else {
                continue;
            };
            if question(&buf[..n]).is_none() {
                continue;
            }
            let p = Pending {
                client,
                id: [buf[0], buf[1]],
                listener: index,
                query: buf[..n].to_vec(),
                server: 0,
                at: Instant::now(),
            };
            self.clone().ask(p).await;
        }
    }

    /// Asks resolver `p.server` or the next that has sockets of its family; past the last,
    /// answers SERVFAIL.
    async fn ask(self: Arc<Self>, mut p: Pending) {
        while p.server < self.servers.len() {
            let has_sockets = self
                .upstream
                .iter()
                .any(|(v6, _)| *v6 == self.servers[p.server].is_ipv6());
            if has_sockets {
                self.send(p).await;
                return;
            }
            p.server += 1;
        }
        let mut query = p.query;
        query[..2].copy_from_slice(&p.id);
        if let Some(reply) = servfail(&query) {
            let _ = self.listeners[p.listener].send_to(&reply, p.client).await;
        }
    }

    /// Answers on upstream socket `index`: from the resolver asked, to the question asked,
    /// back to the client under its own id.
    async fn answers(self: Arc<Self>, index: usize) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let Ok((n, from)) = self.upstream[index].1.recv_from(&mut buf).await else {
                continue;
            };
            if n < 12 {
                continue;
            }
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            let p = {
                let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
                let Some(p) = t.pending.get(&(index, id)) else { continue };
                if self.servers[p.server] != from || question(&buf[..n]) != question(&p.query) {
                    continue;
                }
                t.pending.remove(&(index, id)).expect("just found")
            };
            buf[..2].copy_from_slice(&p.id);
            let _ = self.listeners[p.listener].send_to(&buf[..n], p.client).await;
        }
    }

    /// Every quarter second: a query its resolver left unanswered for [`ATTEMPT`] goes to the
    /// next resolver.
    async fn retries(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let now = Instant::now();
            let late: Vec<Pending> = {
                let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
                let keys: Vec<(usize, u16)> = t
                    .pending
                    .iter()
                    .filter(|(_, p)| now.duration_since(p.at) >= ATTEMPT)
                    .map(|(k, _)| *k)
                    .collect();
                keys.iter().filter_map(|k| t.pending.remove(k)).collect()
            };
            for mut p in late {
                p.server += 1;
                self.clone().ask(p).await;
            }
        }
    }
}

/// Answers on `listeners` until `stopped`.
pub(super) async fn serve(
    listeners: Vec<StdUdpSocket>,
    upstream: DnsUpstream,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    let tokio = |s: StdUdpSocket| -> io::Result<Arc<UdpSocket>> {
        s.set_nonblocking(true)?;
        Ok(Arc::new(UdpSocket::from_std(s)?))
    };
    let listeners = listeners.into_iter().map(tokio).collect::<io::Result<Vec<_>>>()?;
    let mut sockets = Vec::new();
    for (v6, list) in [(false, upstream.v4), (true, upstream.v6)] {
        for s in list {
            sockets.push((v6, tokio(s)?));
        }
    }
    if upstream.servers.is_empty() {
        tracing::warn!("no resolver to forward DNS to (resolv.conf named none): queries get SERVFAIL");
    }
    let f = Arc::new(Forwarder {
        listeners,
        upstream: sockets,
        servers: upstream.servers,
        table: Mutex::new(Table::new()),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..f.listeners.len() {
        tasks.spawn(f.clone().queries(i));
    }
    for i in 0..f.upstream.len() {
        tasks.spawn(f.clone().answers(i));
    }
    tasks.spawn(f.clone().retries());
    let _ = stopped.changed().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query() -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x03svc\x04test\x00\x00\x01\x00\x01");
        q
    }

    #[test]
    fn a_query_is_told_by_its_question_and_answered_servfail_by_its_id() {
        let q = query();
        assert_eq!(question(&q), Some(&q[12..]));
        assert_eq!(question(&q[..14]), None);
        let r = servfail(&q).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 2, "SERVFAIL");
        assert_eq!(question(&r), question(&q));
    }

    #[test]
    fn ids_are_not_a_sequence() {
        let mut t = Table::new();
        let ids: Vec<u16> = (0..4).map(|_| t.random() as u16).collect();
        assert!(ids.windows(2).any(|w| w[1] != w[0].wrapping_add(1)), "{ids:?}");
    }
}

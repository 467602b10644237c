//! Node mode's Prometheus endpoint: per-rule counters per workload, the embedded proxy's
//! connections and bytes, and map occupancy, as text exposition format 0.0.4.
//!
//! A dozen lines of HTTP/1.1 rather than an HTTP stack: it serves two paths to a scraper and
//! a kubelet probe, closes every connection after one answer, and bounds what it reads.
//!
//! Anyone on the node can connect to it, so it bounds what they can hold: at most
//! [`MAX_CONNECTIONS`] clients at once, each cut if its request is not in within
//! [`REQUEST_WITHIN`] or its answer not taken within [`CONNECTION_WITHIN`]. A client past the
//! bound takes the place of the oldest one that has not sent its request (else the oldest):
//! a flood of idle connections only ever cuts idle connections, and a probe, which asks at
//! once, is answered.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use redirect_common::{FamilyKey, LocalAddrKey, OrigDst, PendingOrigDst, TupleKey, Workload, addr::Addr, maps};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::stats::RuleRow;

/// Takes a snapshot of the node; called off the runtime's threads (it reads maps a syscall
/// per key).
pub type Snapshotter = Arc<dyn Fn() -> Snapshot + Send + Sync>;

pub struct ProxySnapshot {
    pub active: u64,
    pub accepted: u64,
    pub forwarded: u64,
    pub no_original_dst: u64,
    pub upstream_failed: u64,
    pub over_limit: u64,
    pub over_budget: u64,
    pub bytes_to_upstream: u64,
    pub bytes_from_upstream: u64,
    pub spliced: u64,
}

pub struct WorkloadSnapshot {
    pub id: String,
    /// Its Kubernetes pod, if enrolled with one: every sample of the workload names it too.
    pub pod: Option<redirect_api::PodRef>,
    /// Each rule of its chains, in order, with its connections.
    pub rules: Vec<RuleRow>,
    pub events: std::collections::BTreeMap<String, u64>,
    pub proxy: Option<ProxySnapshot>,
}

pub struct MapOccupancy {
    pub name: &'static str,
    pub entries: u64,
    pub max_entries: u32,
}

/// The agent's descriptors and the connection budget its proxies share.
pub struct BudgetSnapshot {
    pub nofile: u64,
    pub reserved: u64,
    pub connections: u64,
    pub active: u64,
}

pub struct Snapshot {
    pub workloads: Vec<WorkloadSnapshot>,
    pub maps: Vec<MapOccupancy>,
    pub budget: BudgetSnapshot,
    pub uptime: Duration,
}

/// Entries of the hash maps and the CIDR sets' trie (one syscall per key: a scrape of full 65536-entry maps costs tens
/// of milliseconds, which is why it is not done more often than Prometheus asks).
pub fn map_occupancy(pin_dir: &Path) -> Vec<MapOccupancy> {
    fn count<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &'static str) -> Option<MapOccupancy> {
        let data = MapData::from_pin(pin_dir.join(name)).ok()?;
        let max_entries = data.info().ok()?.max_entries();
        let map: HashMap<MapData, K, V> = HashMap::try_from(aya::maps::Map::from_map_data(data).ok()?).ok()?;
        Some(MapOccupancy {
            name,
            entries: map.keys().filter(Result::is_ok).count() as u64,
            max_entries,
        })
    }
    [
        count::<u64, Workload>(pin_dir, maps::WORKLOADS),
        count::<LocalAddrKey, u8>(pin_dir, maps::LOCAL_ADDRS),
        count::<FamilyKey, Addr>(pin_dir, maps::POD_ADDRS),
        count::<u64, PendingOrigDst>(pin_dir, maps::ORIG_BY_COOKIE),
        count::<TupleKey, OrigDst>(pin_dir, maps::ORIG_BY_TUPLE),
        count::<TupleKey, OrigDst>(pin_dir, maps::INBOUND_PENDING),
        count::<TupleKey, u8>(pin_dir, maps::FAST_PATH_SENDERS),
        count::<u64, OrigDst>(pin_dir, maps::UDP_ORIG),
        count::<redirect_common::UdpFlowKey, u64>(pin_dir, maps::UDP_FLOWS),
        count::<redirect_common::IfaceKey, u32>(pin_dir, maps::IFACES),
        count::<redirect_common::ProbeSnatKey, redirect_common::ProbeSnat>(pin_dir, maps::PROBE_SNAT),
        // The node-wide pools of the workloads' rule lists: an enroll past either is refused.
        count::<redirect_common::CounterKey, u64>(pin_dir, maps::RULE_COUNTERS),
        count::<redirect_common::PortSetKey, redirect_common::SetMember>(pin_dir, maps::PORT_SETS),
        cidr_sets(pin_dir),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// `CIDR_SETS`' occupancy: an LPM trie, read through its keys as the hash maps are.
fn cidr_sets(pin_dir: &Path) -> Option<MapOccupancy> {
    use aya::maps::lpm_trie::LpmTrie;
    use redirect_common::{CidrSetKey, SetMember};
    let data = MapData::from_pin(pin_dir.join(maps::CIDR_SETS)).ok()?;
    let max_entries = data.info().ok()?.max_entries();
    let trie: LpmTrie<MapData, CidrSetKey, SetMember> =
        LpmTrie::try_from(aya::maps::Map::from_map_data(data).ok()?).ok()?;
    Some(MapOccupancy {
        name: maps::CIDR_SETS,
        entries: trie.keys().filter(Result::is_ok).count() as u64,
        max_entries,
    })
}

/// A label value, escaped as the exposition format requires.
fn label(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

/// One metric family: its header, then one sample per (labels, value); labels are written as
/// they go between the braces, none for an empty string.
fn family<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, V)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// A workload's sample labels: `workload="ID"`, then `more` (`,key="value"…`, or empty), then
/// its pod's. The pod's go last so that the labels before them read as they did before pods
/// were known (dashboards and tests matching that prefix keep working).
fn workload(w: &WorkloadSnapshot, more: &str) -> String {
    let mut labels = format!("workload=\"{}\"{more}", label(&w.id));
    if let Some(pod) = &w.pod {
        let _ = write!(
            labels,
            ",namespace=\"{}\",pod=\"{}\"",
            label(&pod.namespace),
            label(&pod.name)
        );
    }
    labels
}

/// A workload's rules as samples, labelled as `stats` lists them.
fn rule_samples(w: &WorkloadSnapshot) -> impl Iterator<Item = (String, u64)> + '_ {
    w.rules.iter().map(move |r| {
        let rule = format!(
            ",family=\"{}\",table=\"{}\",chain=\"{}\",rule=\"{}\",target=\"{}\",match=\"{}\"",
            r.family,
            r.table,
            r.chain,
            r.rule,
            r.target,
            label(&r.match_),
        );
        (workload(w, &rule), r.connections)
    })
}

pub fn render(s: &Snapshot) -> String {
    let mut o = String::new();
    let proxies: Vec<(&WorkloadSnapshot, &ProxySnapshot)> = s
        .workloads
        .iter()
        .filter_map(|w| Some((w, w.proxy.as_ref()?)))
        .collect();
    // One sample per proxy, or one per (label value, count) pair of each proxy.
    let per_proxy = |f: fn(&ProxySnapshot) -> u64| proxies.iter().map(move |(w, p)| (workload(w, ""), f(p)));
    let per_proxy_by = |key: &'static str, f: fn(&ProxySnapshot) -> Vec<(&'static str, u64)>| {
        proxies.iter().flat_map(move |(w, p)| {
            f(p).into_iter()
                .map(move |(v, n)| (workload(w, &format!(",{key}=\"{v}\"")), n))
        })
    };
    family(
        &mut o,
        "redirect_build_info",
        "gauge",
        "Always 1: the agent's version, as a label (which release each node runs during a rollout).",
        [(format!("version=\"{}\"", label(env!("CARGO_PKG_VERSION"))), 1)],
    );
    family(
        &mut o,
        "redirect_workloads",
        "gauge",
        "Workloads enrolled.",
        [(String::new(), s.workloads.len())],
    );
    family(
        &mut o,
        "redirect_rule_connections_total",
        "counter",
        "Connections each rule of a workload's chains decided (the rule's iptables packet counter, counted once per \
         connection).",
        s.workloads.iter().flat_map(rule_samples),
    );
    family(
        &mut o,
        "redirect_events_total",
        "counter",
        "Connections the programs could not serve as the rules say (made to fail visibly), and fast path events.",
        s.workloads.iter().flat_map(|w| {
            w.events
                .iter()
                .map(|(e, n)| (workload(w, &format!(",event=\"{e}\"")), *n))
        }),
    );
    family(
        &mut o,
        "redirect_proxy_connections_active",
        "gauge",
        "Connections the embedded proxy is serving.",
        per_proxy(|p| p.active),
    );
    family(
        &mut o,
        "redirect_proxy_connections_total",
        "counter",
        "Connections the embedded proxy accepted.",
        per_proxy(|p| p.accepted),
    );
    family(
        &mut o,
        "redirect_proxy_connections_failed_total",
        "counter",
        "Connections the embedded proxy reset, by reason.",
        per_proxy_by("reason", |p| {
            vec![
                ("no_original_dst", p.no_original_dst),
                ("upstream_connect", p.upstream_failed),
                ("over_limit", p.over_limit),
                ("over_budget", p.over_budget),
            ]
        }),
    );
    family(
        &mut o,
        "redirect_proxy_upstream_connections_total",
        "counter",
        "Connections the embedded proxy forwarded to their original destination.",
        per_proxy(|p| p.forwarded),
    );
    family(
        &mut o,
        "redirect_proxy_bytes_total",
        "counter",
        "Bytes the embedded proxy copied, by direction (to_upstream: from the connecting side to the original \
         destination).",
        per_proxy_by("direction", |p| {
            vec![
                ("to_upstream", p.bytes_to_upstream),
                ("from_upstream", p.bytes_from_upstream),
            ]
        }),
    );
    family(
        &mut o,
        "redirect_proxy_spliced_directions_total",
        "counter",
        "Directions of proxied connections that streamed and took a pipe (--relay splice); one whose \
         segments prove small gives it back and copies on.",
        per_proxy(|p| p.spliced),
    );
    let b = &s.budget;
    family(
        &mut o,
        "redirect_proxy_budget_connections",
        "gauge",
        "Proxied connections all workloads' proxies may hold together: the descriptor limit less the reserve, two \
         descriptors each. Past it, connections are reset (reason=\"over_budget\").",
        [(String::new(), b.connections)],
    );
    family(
        &mut o,
        "redirect_proxy_budget_connections_active",
        "gauge",
        "Proxied connections held now against that budget, with the pipes of spliced directions (two descriptors \
         each too).",
        [(String::new(), b.active)],
    );
    family(
        &mut o,
        "redirect_descriptors_limit",
        "gauge",
        "The agent's descriptor limit (RLIMIT_NOFILE).",
        [(String::new(), b.nofile)],
    );
    family(
        &mut o,
        "redirect_descriptors_reserved",
        "gauge",
        "Descriptors kept from proxied connections for the control plane and the workloads' listeners, maps and \
         dialers.",
        [(String::new(), b.reserved)],
    );
    let per_map = |f: fn(&MapOccupancy) -> u64| s.maps.iter().map(move |m| (format!("map=\"{}\"", m.name), f(m)));
    family(
        &mut o,
        "redirect_map_entries",
        "gauge",
        "Entries in each eBPF hash map.",
        per_map(|m| m.entries),
    );
    family(
        &mut o,
        "redirect_map_max_entries",
        "gauge",
        "Capacity of each eBPF hash map.",
        per_map(|m| u64::from(m.max_entries)),
    );
    family(
        &mut o,
        "redirect_agent_uptime_seconds",
        "gauge",
        "Seconds since this agent process started serving.",
        [(String::new(), format!("{:.3}", s.uptime.as_secs_f64()))],
    );
    o
}

/// The endpoint's socket. Without `reuseport` it is this process's alone: a second agent on
/// the port is refused (with SO_REUSEPORT the kernel would spread the scrapes over both), and a
/// successor is handed its predecessor's listener instead. With it: only to join an agent of
/// the release before, which bound with SO_REUSEPORT, when it hands over.
pub fn bind(addr: SocketAddr, reuseport: bool) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // SO_REUSEADDR (not REUSEPORT): a restart binds past its predecessor's TIME_WAITs.
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(reuseport)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// Clients served at once (the engine's descriptor reserve counts them).
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request: a probe or a scraper sends it at once.
pub const REQUEST_WITHIN: Duration = Duration::from_secs(2);
/// A connection's whole life, its answer taken included.
pub const CONNECTION_WITHIN: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` and `GET /ready` (200 while this process serves the node, 503 once
/// it is handing over or stopping).
pub fn serve(listener: TcpListener, snapshot: Snapshotter, ready: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics endpoint listening");
    }
    tokio::spawn(async move {
        let mut clients = Clients::default();
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // Out of descriptors (beyond this endpoint's share) or a connection aborted
                // before it was taken: back off instead of spinning, then accept again.
                Err(e) => {
                    tracing::debug!("metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            clients.make_room().await;
            let (snapshot, ready) = (snapshot.clone(), ready.clone());
            let asked = Arc::new(AtomicBool::new(false));
            let said = asked.clone();
            let task = tokio::spawn(async move {
                let _ = tokio::time::timeout(CONNECTION_WITHIN, answer(stream, snapshot, ready, &said)).await;
            });
            clients.0.push_back(Client { task, asked });
        }
    })
}

/// A client being served.
struct Client {
    task: tokio::task::JoinHandle<()>,
    /// Its request is in: it is being answered.
    asked: Arc<AtomicBool>,
}

/// The clients being served, oldest first.
#[derive(Default)]
struct Clients(VecDeque<Client>);

impl Clients {
    /// Room for one more: the ones done are forgotten; at [`MAX_CONNECTIONS`], the oldest
    /// that has not sent its request (else the oldest) is cut, and its socket closed before
    /// this returns.
    async fn make_room(&mut self) {
        self.0.retain(|c| !c.task.is_finished());
        if self.0.len() < MAX_CONNECTIONS {
            return;
        }
        let idle = self.0.iter().position(|c| !c.asked.load(Ordering::Relaxed));
        if let Some(cut) = self.0.remove(idle.unwrap_or(0)) {
            cut.task.abort();
            // Returns once the task (and so its stream) is dropped.
            let _ = cut.task.await;
        }
    }
}

async fn answer(
    mut stream: TcpStream,
    snapshot: Snapshotter,
    ready: Arc<AtomicBool>,
    asked: &AtomicBool,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() > 8192 {
                return Ok(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(true)
    };
    // A slow or idle client is cut.
    if !tokio::time::timeout(REQUEST_WITHIN, read_head)
        .await
        .unwrap_or(Ok(false))?
    {
        return Ok(());
    }
    asked.store(true, Ordering::Relaxed);
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => {
            // Counting map entries is a syscall per key: off the runtime's threads.
            let snapshot = tokio::task::spawn_blocking(move || snapshot()).await;
            match snapshot {
                Ok(s) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(&s)),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "snapshot failed\n".to_owned(),
                ),
            }
        }
        ("GET", "/ready") if ready.load(Ordering::Relaxed) => ("200 OK", "text/plain", "ready\n".to_owned()),
        ("GET", "/ready") => ("503 Service Unavailable", "text/plain", "not serving\n".to_owned()),
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics or /ready\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_owned()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests;

//! `redirect-agent node`: one agent for every meshed workload of a node.
//!
//! The programs are attached once, at the cgroup v2 root (or a configured parent), and decide
//! per connection from the workload its network namespace names (`WORKLOADS`, keyed by netns
//! cookie): a namespace that is not enrolled is never touched. Workloads are enrolled and
//! removed over a Unix socket ([`redirect_api`]); each gets its counter block, its sk_lookup
//! link and, with the embedded proxy, listeners opened inside its namespace.
//!
//! Restart without loss. Maps, links and programs are pinned under `/sys/fs/bpf/redirect/<name>/`, so
//! the kernel side keeps capturing while no agent runs, and what the programs know (original
//! destinations of open connections, counters) survives the process. A new process:
//! - asks a running predecessor over the socket to hand over: it receives every workload with
//!   its namespace and its listening sockets (SCM_RIGHTS), so connections queued or arriving
//!   meanwhile wait in the same accept queues, and the predecessor stops accepting and lets
//!   its open connections finish before it exits (`--drain-timeout-ms`);
//! - or, with no predecessor (it crashed or was stopped), adopts the pins and the state file
//!   and opens the listeners again; in between, captured connections are refused (fail fast),
//!   as with istio-iptables while the sidecar is down;
//! - loads the programs against the pinned maps and moves every pinned link to them with
//!   `BPF_LINK_UPDATE`, so an upgraded agent runs its own programs without a detached moment.
//!
//! Stopping the agent leaves the pins (that is what a restart adopts); `redirect-agent
//! cleanup` removes them and so releases every workload.

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues, SockHash};
use clap::Parser as _;
use redirect_api::{ApiError, ErrorKind, HandoverWorkload, Request, Response, WorkloadInfo};
use redirect_common::{
    LocalAddrKey, MAX_RULES, MAX_WORKLOADS, OrigDst, TupleKey, Workload, chain,
    config::{CaptureConfig, Include},
    events, maps, programs,
};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

use crate::{
    addrs::{self, LocalAddrs},
    adopt,
    flags::CaptureFlags,
    links::{self, AttachType},
    loader::{self, InboundListener, NodeObject},
    proxy::{Dialer, Listeners, Listening, NetnsDialer, OrigDstTable, OriginalDst, Proxy, ProxyConfig, Side},
    run::ProxyMode,
    sys::{self, Netns, PIN_ROOT, RUN_DIR},
};

#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub name: String,
    /// Where the cgroup programs attach (default: the cgroup v2 root).
    pub cgroup_parent: Option<PathBuf>,
    pub socket: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub max_tracked_connections: u32,
    pub max_proxy_connections: usize,
    pub connect_timeout: Duration,
    pub drain: Duration,
    /// Offer the fast path to workloads that ask for it.
    pub fast_path: bool,
}

/// What a running node agent publishes in `/run/redirect/<name>.node.json`, and what a
/// successor adopts when no agent hands over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub pid: u32,
    /// The shared types' layout: pinned maps are reused only by an agent that reads them the
    /// same way.
    pub layout: String,
    pub cgroup_parent: PathBuf,
    pub socket: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub programs: BTreeMap<String, u32>,
    pub workloads: Vec<WorkloadInfo>,
}

impl NodeState {
    /// Instance `name`'s state file, if it has a readable one.
    pub fn read(name: &str) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(state_path(name)).ok()?).ok()
    }
}

pub fn state_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.node.json"))
}

fn lock_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.lock"))
}

fn links_dir(name: &str) -> PathBuf {
    loader::pin_dir(name).join("links")
}

/// Sizes of everything the programs and the agent exchange through pinned maps.
pub fn layout() -> String {
    use std::mem::size_of;
    format!(
        "workload{}-rules{}-workloads{}-events{}-tuple{}-orig{}-pending{}-addr{}",
        size_of::<Workload>(),
        MAX_RULES,
        MAX_WORKLOADS,
        events::PER_WORKLOAD,
        size_of::<TupleKey>(),
        size_of::<OrigDst>(),
        size_of::<redirect_common::PendingOrigDst>(),
        size_of::<LocalAddrKey>(),
    )
}

/// The cgroup programs, in attach order: sock_ops first so that every socket connect4
/// redirects is tracked, getsockopt before connect4 so a captured connection can ask.
const CGROUP_LINKS: [(&str, AttachType); 3] = [
    (programs::SOCK_OPS, AttachType::SockOps),
    (programs::GETSOCKOPT, AttachType::Getsockopt),
    (programs::CONNECT4, AttachType::Connect4),
];

/// The istio-iptables flags of an enroll request, parsed by the same clap definition as
/// `run`'s.
#[derive(clap::Parser, Debug)]
#[command(
    name = "enroll",
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct FlagsOnly {
    #[command(flatten)]
    capture: CaptureFlags,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Invalid, message)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorKind::Internal, e.to_string())
}

/// Parses and checks a workload's flags as `run` does.
pub fn parse_capture(args: &[String]) -> Result<CaptureConfig, ApiError> {
    let parsed = FlagsOnly::try_parse_from(args).map_err(|e| {
        let text = e.render().to_string();
        invalid(
            text.lines()
                .next()
                .unwrap_or("invalid flags")
                .trim_start_matches("error: ")
                .trim()
                .to_owned(),
        )
    })?;
    let capture = parsed.capture.to_config().map_err(|e| invalid(e.to_string()))?;
    if capture.envoy_port == capture.inbound_capture_port {
        return Err(invalid(
            crate::error::FlagError::SamePort(capture.envoy_port).to_string(),
        ));
    }
    if matches!(capture.inbound_ports, Include::List(_)) && !capture.inbound_exclude_ports.is_empty() {
        tracing::warn!(
            excluded = ?capture.inbound_exclude_ports,
            "-d only applies with -b '*' (as in istio-iptables): ignored, only the -b ports are captured"
        );
    }
    Ok(capture)
}

fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The maps the node itself reads and writes (each workload's proxy and address watcher
/// open their own descriptors of the same pins).
struct NodeMaps {
    workloads: HashMap<MapData, u64, Workload>,
    counters: PerCpuArray<MapData, u64>,
    events: PerCpuArray<MapData, u64>,
    local: HashMap<MapData, LocalAddrKey, u8>,
    owners: HashMap<MapData, u32, u64>,
    listeners: SockHash<MapData, u64>,
}

/// One enrolled workload, live.
struct Enrolled {
    info: WorkloadInfo,
    netns: Netns,
    /// Its sk_lookup link (pinned too).
    _sk_lookup: OwnedFd,
    proxy: Option<Proxy>,
    /// Second descriptors of the proxy's listeners, for a handover.
    listener_fds: Vec<(Side, OwnedFd)>,
    _watcher: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Descriptors a predecessor handed over for one workload.
struct HandedOver {
    netns: OwnedFd,
    listeners: Vec<(Side, OwnedFd)>,
}

pub struct Node {
    opts: NodeOptions,
    object: NodeObject,
    maps: NodeMaps,
    workloads: BTreeMap<String, Enrolled>,
    cgroup_parent: PathBuf,
    host_netns_cookie: u64,
    /// The cgroup links; dropping a descriptor does not detach a pinned link.
    _cgroup_links: Vec<OwnedFd>,
    started: Instant,
    /// Set once a successor has the workloads: from then on this process must change
    /// nothing, or the successor would not know of it.
    handed_over: bool,
}

impl Node {
    fn pin_dir(&self) -> PathBuf {
        loader::pin_dir(&self.opts.name)
    }

    fn sk_lookup_pin(&self, netns_cookie: u64) -> PathBuf {
        links_dir(&self.opts.name).join(format!("sk_lookup-{netns_cookie}"))
    }

    pub fn workloads(&self) -> Vec<WorkloadInfo> {
        self.workloads.values().map(|w| w.info.clone()).collect()
    }

    fn state(&self) -> NodeState {
        let programs = loader::programs_for(self.opts.fast_path)
            .filter_map(|p| Some((p.to_owned(), self.object.program_id(p).ok()?)))
            .collect();
        NodeState {
            name: self.opts.name.clone(),
            pid: std::process::id(),
            layout: layout(),
            cgroup_parent: self.cgroup_parent.clone(),
            socket: self.opts.socket.clone(),
            metrics: self.opts.metrics,
            programs,
            workloads: self.workloads(),
        }
    }

    /// Written after every change: what a successor adopts if this process dies.
    fn persist(&self) {
        if let Err(e) = write_json(&state_path(&self.opts.name), &self.state()) {
            tracing::error!("writing node state: {e}; a restart after a crash may not find every workload");
        }
    }

    fn free_slot(&self) -> Option<u32> {
        (0..MAX_WORKLOADS).find(|s| self.workloads.values().all(|w| w.info.slot != *s))
    }

    fn zero_counters(&mut self, slot: u32) -> Result<(), ApiError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| internal(e))?;
        let zeros = || PerCpuValues::try_from(vec![0u64; cpus]).map_err(internal);
        for i in 0..MAX_RULES as u32 {
            self.maps
                .counters
                .set(slot * MAX_RULES as u32 + i, zeros()?, 0)
                .map_err(internal)?;
        }
        for e in 0..events::PER_WORKLOAD {
            self.maps
                .events
                .set(slot * events::PER_WORKLOAD + e, zeros()?, 0)
                .map_err(internal)?;
        }
        Ok(())
    }

    /// Everything a workload may have left in the maps and pins, removed whoever wrote it:
    /// the undo of a failed enroll, unenroll itself, and the end of a stale workload.
    fn purge(&mut self, netns_cookie: u64) {
        // First, so that no new connection is captured while the rest goes.
        let _ = self.maps.workloads.remove(&netns_cookie);
        let _ = links::unpin(&self.sk_lookup_pin(netns_cookie));
        addrs::remove_all(&mut self.maps.local, &mut self.maps.owners, netns_cookie);
        let _ = self.maps.listeners.remove(&netns_cookie);
    }

    fn enroll(&mut self, req: redirect_api::Enroll) -> Result<WorkloadInfo, ApiError> {
        if !valid_id(&req.id) {
            return Err(invalid(format!(
                "workload id '{}' is invalid: expected 1-128 characters of A-Z a-z 0-9 _ - .",
                req.id
            )));
        }
        if self.workloads.contains_key(&req.id) {
            return Err(ApiError::new(
                ErrorKind::Exists,
                format!("workload '{}' is already enrolled; unenroll it first", req.id),
            ));
        }
        let netns = Netns::open(&req.netns).map_err(|e| invalid(e.to_string()))?;
        let info = self.check(&req, &netns)?;
        let cookie = info.netns_cookie;
        match self.start_workload(info, netns, None) {
            Ok(w) => {
                let info = w.info.clone();
                tracing::info!(id = %info.id, netns = %info.netns.display(), netns_cookie = cookie, slot = info.slot, "enrolled");
                self.workloads.insert(info.id.clone(), w);
                self.persist();
                Ok(info)
            }
            Err(e) => {
                self.purge(cookie);
                Err(e)
            }
        }
    }

    /// Every check of an enroll request, before anything changes.
    fn check(&self, req: &redirect_api::Enroll, netns: &Netns) -> Result<WorkloadInfo, ApiError> {
        let proxy = ProxyMode::parse(&req.proxy)
            .ok_or_else(|| invalid(format!("--proxy '{}' is invalid: expected embedded or none", req.proxy)))?;
        let capture = parse_capture(&req.args)?;
        chain::compile(&capture).map_err(|e| invalid(e.to_string()))?;
        if req.fast_path && !self.opts.fast_path {
            return Err(invalid(
                "--fast-path: this node agent does not offer the fast path (start it with --fast-path)",
            ));
        }
        let cookie = netns
            .cookie()
            .map_err(|e| internal(format!("netns cookie of {}: {e}", req.netns.display())))?;
        if cookie == self.host_netns_cookie {
            return Err(invalid(format!(
                "{} is the node's own network namespace: enrolling it would capture the node itself (expected a \
                 workload's namespace)",
                req.netns.display()
            )));
        }
        if let Some(w) = self.workloads.values().find(|w| w.info.netns_cookie == cookie) {
            return Err(ApiError::new(
                ErrorKind::Exists,
                format!(
                    "network namespace {} is already enrolled as workload '{}'",
                    req.netns.display(),
                    w.info.id
                ),
            ));
        }
        if let Some(other) = captured_elsewhere(cookie, &self.opts.name) {
            return Err(ApiError::new(
                ErrorKind::Exists,
                format!(
                    "network namespace {} is already captured by {other}",
                    req.netns.display()
                ),
            ));
        }
        if let Some(cg) = &req.cgroup {
            sys::open_cgroup2_dir(cg).map_err(|e| invalid(e.to_string()))?;
            let (c, parent) = (cg.canonicalize(), self.cgroup_parent.canonicalize());
            if !matches!((&c, &parent), (Ok(c), Ok(p)) if c.starts_with(p)) {
                return Err(invalid(format!(
                    "cgroup {} is not under the agent's attach point {}: the programs would never see its processes",
                    cg.display(),
                    self.cgroup_parent.display()
                )));
            }
        }
        let addresses =
            addrs::read(netns).map_err(|e| internal(format!("addresses of {}: {e}", req.netns.display())))?;
        for ip in addresses.iter().filter(|ip| !ip.is_loopback()) {
            let owner = self.maps.owners.get(&u32::from(*ip).to_be(), 0).ok();
            if let Some(other) = owner.and_then(|c| self.workloads.values().find(|w| w.info.netns_cookie == c)) {
                return Err(ApiError::new(
                    ErrorKind::Exists,
                    format!(
                        "address {ip} of {} is already held by workload '{}': workload addresses on a node must be unique",
                        req.netns.display(),
                        other.info.id
                    ),
                ));
            }
        }
        let slot = self.free_slot().ok_or_else(|| {
            invalid(format!(
                "{MAX_WORKLOADS} workloads are enrolled, the most one node agent serves"
            ))
        })?;
        Ok(WorkloadInfo {
            id: req.id.clone(),
            netns: req.netns.clone(),
            netns_cookie: cookie,
            cgroup: req.cgroup.clone(),
            proxy: proxy.as_str().to_owned(),
            args: req.args.clone(),
            fast_path: req.fast_path,
            slot,
            addresses: addresses.iter().map(ToString::to_string).collect(),
        })
    }

    /// Makes a checked workload live (new, adopted or handed over). The `WORKLOADS` entry
    /// goes in last: until then no connection is captured, so a failure part-way changes
    /// nothing a connection could see, and the caller's [`Node::purge`] removes the rest.
    fn start_workload(
        &mut self,
        mut info: WorkloadInfo,
        netns: Netns,
        handed: Option<Vec<(Side, OwnedFd)>>,
    ) -> Result<Enrolled, ApiError> {
        let capture = parse_capture(&info.args)?;
        let rules = chain::compile(&capture).map_err(|e| invalid(e.to_string()))?;
        let cookie = info.netns_cookie;
        let pin_dir = self.pin_dir();
        let embedded = ProxyMode::parse(&info.proxy) == Some(ProxyMode::Embedded);
        let (cgroup_id, cgroup_level) = match &info.cgroup {
            Some(cg) => sys::cgroup_identity(cg).map_err(|e| invalid(e.to_string()))?,
            None => (0, 0),
        };
        let adopted = handed.is_some() || self.maps.workloads.get(&cookie, 0).is_ok();
        if !adopted {
            self.zero_counters(info.slot)?;
        }

        // The proxy, listening before anything is captured.
        let mut inbound = InboundListener::new(open_map(&pin_dir, maps::INBOUND_LISTENERS)?, cookie);
        let (proxy, listener_fds) = if embedded {
            let cfg = ProxyConfig {
                outbound: SocketAddrV4::new(Ipv4Addr::LOCALHOST, capture.envoy_port),
                inbound: SocketAddrV4::new(Ipv4Addr::LOCALHOST, capture.inbound_capture_port),
                connect_timeout: self.opts.connect_timeout,
                max_connections: self.opts.max_proxy_connections,
            };
            let listening = match handed {
                Some(fds) => Listening::from_fds(fds),
                None => Listeners::bind(&netns, &cfg).and_then(Listeners::listen),
            }
            .map_err(|e| internal(format!("proxy listeners in {}: {e}", info.netns.display())))?;
            if let Some(l) = listening.get(Side::Inbound) {
                inbound.register(l).map_err(internal)?;
            }
            let fds = listening.dup_fds().map_err(internal)?;
            let table = OriginalDst::Maps(Box::new(OrigDstTable::new(
                open_map(&pin_dir, maps::ORIG_BY_TUPLE)?,
                open_map(&pin_dir, maps::INBOUND_PENDING)?,
                cookie,
            )));
            let dialer = Dialer::Netns(NetnsDialer::start(&netns).map_err(internal)?);
            let proxy = Proxy::start(listening, table, dialer, cfg, None).map_err(internal)?;
            (Some(proxy), fds)
        } else {
            if !capture.inbound_ports.is_empty() {
                match adopt::existing_listener(&netns, capture.inbound_capture_port) {
                    Ok(Some((fd, pid))) => {
                        inbound.register(&fd).map_err(internal)?;
                        tracing::info!(id = %info.id, pid, "the workload's inbound capture listener registered");
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(id = %info.id, "looking for an inbound capture listener: {e}"),
                }
            }
            (None, Vec::new())
        };

        // Its addresses: what `-o lo` reaches, and which workload sk_lookup serves.
        let local = LocalAddrs::install(
            &netns,
            open_map(&pin_dir, maps::LOCAL_ADDRS)?,
            open_map(&pin_dir, maps::ADDR_OWNERS)?,
            cookie,
        )
        .map_err(|e| internal(format!("addresses of {}: {e}", info.netns.display())))?;
        info.addresses = local.addresses().iter().map(ToString::to_string).collect();
        let watch_ns = netns.try_clone().map_err(internal)?;
        let id = info.id.clone();
        let watcher = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = local.watch(watch_ns).await {
                tracing::error!(%id, "local address watcher stopped: {e}; -o lo decisions may be stale");
            }
        }));

        // sk_lookup on its namespace: the pinned link of an adopted workload, else a new one.
        let pin = self.sk_lookup_pin(cookie);
        let sk_lookup = match links::open_pinned(&pin) {
            Ok(link) => {
                links::update(
                    link.as_fd(),
                    self.object.program_fd(programs::SK_LOOKUP).map_err(internal)?,
                )
                .map_err(|e| internal(format!("moving {} to this agent's program: {e}", pin.display())))?;
                link
            }
            Err(_) => {
                let link = links::create(
                    self.object.program_fd(programs::SK_LOOKUP).map_err(internal)?,
                    netns.as_fd(),
                    AttachType::SkLookup,
                )
                .map_err(|e| {
                    internal(format!(
                        "attaching sk_lookup to {}: {e} (sk_lookup links need kernel 5.9+)",
                        info.netns.display()
                    ))
                })?;
                links::pin(link.as_fd(), &pin).map_err(internal)?;
                link
            }
        };

        let serving = chain::Serving {
            own_proxy: !embedded,
            // sock_ops runs for the agent's own sockets too (attached at the root), so it
            // enrolls the proxy's ends itself: no listeners in the workload's cgroup needed.
            fast_path: info.fast_path && self.opts.fast_path,
        };
        let mut w = chain::workload(&capture, &rules, info.slot, serving);
        w.cgroup_id = cgroup_id;
        w.cgroup_level = cgroup_level;
        self.maps.workloads.insert(cookie, w, 0).map_err(internal)?;
        Ok(Enrolled {
            info,
            netns,
            _sk_lookup: sk_lookup,
            proxy,
            listener_fds,
            _watcher: watcher,
        })
    }

    /// Removes a workload: captured no more from this moment; its proxy's open connections
    /// may finish for `--drain-timeout-ms`.
    fn unenroll(&mut self, id: Option<String>, netns: Option<PathBuf>) -> Result<String, ApiError> {
        let id = match (id, netns) {
            (Some(id), _) => id,
            (None, Some(path)) => {
                let cookie = Netns::open(&path)
                    .map_err(|e| invalid(e.to_string()))?
                    .cookie()
                    .map_err(internal)?;
                self.workloads
                    .values()
                    .find(|w| w.info.netns_cookie == cookie)
                    .map(|w| w.info.id.clone())
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorKind::NotFound,
                            format!("no workload is enrolled for {}", path.display()),
                        )
                    })?
            }
            (None, None) => return Err(invalid("unenroll needs an id or a network namespace")),
        };
        let w = self
            .workloads
            .remove(&id)
            .ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("no workload '{id}' is enrolled")))?;
        self.purge(w.info.netns_cookie);
        self.persist();
        tracing::info!(%id, "unenrolled");
        if let Some(proxy) = w.proxy {
            let grace = self.opts.drain;
            tokio::spawn(proxy.drain(grace));
        }
        drop(w.netns);
        Ok(id)
    }

    /// Workloads found in the maps or the state file that no live namespace backs any more,
    /// or that cannot be started again, are released rather than left half-served.
    fn restore(&mut self, infos: Vec<WorkloadInfo>, mut handed: BTreeMap<String, HandedOver>) {
        for info in infos {
            let cookie = info.netns_cookie;
            let from_peer = handed.remove(&info.id);
            let netns = match &from_peer {
                Some(h) => h
                    .netns
                    .try_clone()
                    .map_err(|e| e.to_string())
                    .and_then(|fd| Netns::from_fd(fd, &info.netns).map_err(|e| e.to_string())),
                None => Netns::open(&info.netns).map_err(|e| e.to_string()),
            };
            let netns = match netns {
                Ok(ns) if ns.cookie().ok() == Some(cookie) => ns,
                Ok(_) => {
                    tracing::warn!(id = %info.id, netns = %info.netns.display(), "namespace is gone (its path names another now); releasing the workload");
                    self.purge(cookie);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(id = %info.id, "namespace is gone ({e}); releasing the workload");
                    self.purge(cookie);
                    continue;
                }
            };
            let id = info.id.clone();
            match self.start_workload(info, netns, from_peer.map(|h| h.listeners)) {
                Ok(w) => {
                    tracing::info!(%id, netns_cookie = cookie, "workload adopted");
                    self.workloads.insert(id, w);
                }
                Err(e) => {
                    tracing::error!(%id, "cannot serve the workload again: {e}; releasing it");
                    self.purge(cookie);
                }
            }
        }
        // Entries no state names (a state file lost with a crash): release them.
        let known: Vec<u64> = self.workloads.values().map(|w| w.info.netns_cookie).collect();
        let stale: Vec<u64> = self
            .maps
            .workloads
            .keys()
            .filter_map(Result::ok)
            .filter(|c| !known.contains(c))
            .collect();
        for cookie in stale {
            tracing::warn!(
                netns_cookie = cookie,
                "a workload in the pinned maps has no state; releasing it"
            );
            self.purge(cookie);
        }
        // sk_lookup pins of namespaces nobody serves.
        if let Ok(dir) = std::fs::read_dir(links_dir(&self.opts.name)) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(c) = name.strip_prefix("sk_lookup-").and_then(|c| c.parse::<u64>().ok())
                    && !known.contains(&c)
                {
                    let _ = links::unpin(&e.path());
                }
            }
        }
    }

    /// For the metrics endpoint.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let mut workloads = Vec::new();
        for w in self.workloads.values() {
            let Ok(wl) = self.maps.workloads.get(&w.info.netns_cookie, 0) else {
                continue;
            };
            // Same rows as `stats`; a counter that cannot be read leaves the workload out of
            // this scrape rather than showing it as zero.
            let (Ok(rules), Ok(events)) = (
                crate::stats::rows(&wl, &self.maps.counters),
                crate::stats::event_counts(&wl, &self.maps.events),
            ) else {
                continue;
            };
            let proxy = w.proxy.as_ref().map(|p| {
                let c = &p.counters;
                crate::metrics::ProxySnapshot {
                    active: p.active() as u64,
                    accepted: c.accepted.load(Relaxed),
                    forwarded: c.forwarded.load(Relaxed),
                    no_original_dst: c.no_original_dst.load(Relaxed),
                    upstream_failed: c.upstream_failed.load(Relaxed),
                    over_limit: c.over_limit.load(Relaxed),
                    bytes_to_upstream: c.bytes_to_upstream.load(Relaxed),
                    bytes_from_upstream: c.bytes_from_upstream.load(Relaxed),
                }
            });
            workloads.push(crate::metrics::WorkloadSnapshot {
                id: w.info.id.clone(),
                rules,
                events,
                proxy,
            });
        }
        crate::metrics::Snapshot {
            workloads,
            maps: crate::metrics::map_occupancy(&self.pin_dir()),
            uptime: self.started.elapsed(),
        }
    }
}

/// Another live instance that captures the namespace `netns_cookie`, named for an error:
/// two sets of programs deciding one namespace's connections would redirect them twice.
pub fn captured_elsewhere(netns_cookie: u64, except: &str) -> Option<String> {
    let alive = |pid: u32| {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    };
    for entry in std::fs::read_dir(RUN_DIR).ok()?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(bytes) = std::fs::read(&path) else { continue };
        if let Some(node) = name.strip_suffix(".node.json") {
            let Ok(state) = serde_json::from_slice::<NodeState>(&bytes) else {
                continue;
            };
            if node != except
                && alive(state.pid)
                && let Some(w) = state.workloads.iter().find(|w| w.netns_cookie == netns_cookie)
            {
                return Some(format!(
                    "node agent '{node}' (pid {}) as workload '{}'",
                    state.pid, w.id
                ));
            }
        } else if let Some(run) = name.strip_suffix(".json") {
            let Ok(state) = serde_json::from_slice::<loader::InstanceState>(&bytes) else {
                continue;
            };
            if run != except && alive(state.pid) && state.netns_cookie == netns_cookie {
                return Some(format!("`run` instance '{run}' (pid {})", state.pid));
            }
        }
    }
    None
}

fn open_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<T, ApiError> {
    loader::open_typed(dir, name).map_err(internal)
}

fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut f, value)?;
    f.write_all(b"\n")?;
    std::fs::rename(tmp, path)
}

/// Pinned maps are reused only by an agent that reads them the same way (the layout the
/// state records), and keep the size they were made with. A different `--max-tracked-connections`
/// is said and ignored; a different `--fast-path` is refused, since the fast-path maps would
/// have one slot (or hold memory nobody uses). Checked before a handover is asked for, so a
/// refused start leaves the running agent serving.
fn check_pins(opts: &NodeOptions) -> anyhow::Result<()> {
    let dir = loader::pin_dir(&opts.name);
    if dir.exists()
        && let Some(state) = NodeState::read(&opts.name)
        && state.layout != layout()
    {
        anyhow::bail!(
            "the maps pinned at {} have layout {} but this agent's is {}: run `redirect-agent cleanup --name {}` \
             (it releases every workload), then start again",
            dir.display(),
            state.layout,
            layout(),
            opts.name
        );
    }
    let size = |name: &str| {
        aya::maps::MapData::from_pin(dir.join(name))
            .ok()
            .and_then(|m| m.info().ok())
            .map(|i| i.max_entries())
    };
    if let Some(n) = size(maps::FAST_PATH_SOCKETS)
        && (n > 1) != opts.fast_path
    {
        anyhow::bail!(
            "the pinned maps of '{}' were made with --fast-path {}: start with the same setting, or run \
             `redirect-agent cleanup --name {}` first (it releases every workload)",
            opts.name,
            if n > 1 { "on" } else { "off" },
            opts.name
        );
    }
    if let Some(n) = size(maps::ORIG_BY_TUPLE)
        && n != opts.max_tracked_connections
    {
        tracing::warn!(
            pinned = n,
            asked = opts.max_tracked_connections,
            "the pinned maps keep their size; --max-tracked-connections takes effect after a cleanup"
        );
    }
    Ok(())
}

/// The node's lock: one agent per name holds it at a time; a handover passes it on.
struct Lock(#[allow(dead_code, reason = "held for its flock")] File);

impl Lock {
    /// Waits up to `within` (a predecessor releases it right after a handover).
    fn take(name: &str, within: Duration) -> anyhow::Result<Self> {
        std::fs::create_dir_all(RUN_DIR).with_context(|| format!("create {RUN_DIR}"))?;
        let path = lock_path(name);
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let deadline = Instant::now() + within;
        loop {
            // SAFETY: valid fd; non-blocking exclusive lock, released when the file closes.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self(f));
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "instance '{name}' is held by another agent (lock {} is taken and nothing answered a handover on \
                     its socket); stop it, or give this one another --name",
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What a predecessor handed over: its workloads, their descriptors by workload id, and the
/// connection on which this process confirms it serves them.
struct Handover {
    infos: Vec<WorkloadInfo>,
    handed: BTreeMap<String, HandedOver>,
    predecessor: std::os::unix::net::UnixStream,
}

/// Tells the predecessor that this process serves the workloads now, and waits for it to
/// stop serving them (its answer comes once it has).
fn confirm_takeover(predecessor: &std::os::unix::net::UnixStream) -> anyhow::Result<()> {
    (&*predecessor)
        .write_all(b"serving\n")
        .context("confirming the handover")?;
    let bye = redirect_api::read_line(predecessor).context("waiting for the predecessor to stop")?;
    anyhow::ensure!(
        bye == b"bye",
        "the predecessor answered {:?} to the takeover",
        String::from_utf8_lossy(&bye)
    );
    Ok(())
}

/// Asks a running predecessor to hand over. `None`: nobody answers on the socket.
fn receive_handover(socket: &Path) -> anyhow::Result<Option<Handover>> {
    let stream = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    let timeout = Some(Duration::from_secs(30));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let mut line = serde_json::to_vec(&Request::Handover)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let answer: Response = serde_json::from_slice(&redirect_api::read_line(&stream)?)?;
    let list = match answer {
        Response::Handover(list) => list,
        Response::Error(e) => anyhow::bail!("the running agent refused to hand over: {e}"),
        other => anyhow::bail!("unexpected answer to a handover: {other:?}"),
    };
    // Descriptors only after this: nothing of them can sit unread behind the answer.
    (&stream).write_all(b"ready\n")?;
    let mut infos = Vec::new();
    let mut handed = BTreeMap::new();
    for HandoverWorkload { info, fds: names } in list {
        let fds = sys::recv_fds(&stream).with_context(|| format!("descriptors of workload {}", info.id))?;
        anyhow::ensure!(
            fds.len() == names.len(),
            "workload {}: {} descriptors for {names:?}",
            info.id,
            fds.len()
        );
        let mut netns = None;
        let mut listeners = Vec::new();
        for (name, fd) in names.iter().zip(fds) {
            match name.as_str() {
                "netns" => netns = Some(fd),
                "outbound" => listeners.push((Side::Outbound, fd)),
                "inbound" => listeners.push((Side::Inbound, fd)),
                other => anyhow::bail!("unknown descriptor '{other}' in a handover"),
            }
        }
        let netns = netns.with_context(|| format!("workload {}: no namespace in the handover", info.id))?;
        handed.insert(info.id.clone(), HandedOver { netns, listeners });
        infos.push(info);
    }
    Ok(Some(Handover {
        infos,
        handed,
        predecessor: stream,
    }))
}

/// The predecessor's side: the answer, then (once the successor is ready for them) each
/// workload's descriptors, then its word that it serves them. Until that word this process
/// keeps serving (both accept from the same queues meanwhile), so a successor that fails to
/// start costs nothing: `Ok(false)`, and this process goes on.
fn send_handover(stream: std::os::unix::net::UnixStream, node: &Node) -> std::io::Result<bool> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let list: Vec<HandoverWorkload> = node
        .workloads
        .values()
        .map(|w| {
            let mut fds = vec!["netns".to_owned()];
            fds.extend(w.listener_fds.iter().map(|(s, _)| s.name().to_owned()));
            HandoverWorkload {
                info: w.info.clone(),
                fds,
            }
        })
        .collect();
    let mut line = serde_json::to_vec(&Response::Handover(list))?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    if redirect_api::read_line(&stream)? != b"ready" {
        return Err(std::io::Error::other("successor did not confirm"));
    }
    for w in node.workloads.values() {
        let mut fds = vec![w.netns.as_fd()];
        fds.extend(w.listener_fds.iter().map(|(_, fd)| fd.as_fd()));
        sys::send_fds(&stream, &fds)?;
    }
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    match redirect_api::read_line(&stream) {
        Ok(word) if word == b"serving" => {
            (&stream).write_all(b"bye\n")?;
            Ok(true)
        }
        Ok(other) => {
            tracing::error!(answer = %String::from_utf8_lossy(&other), "the successor did not take over; serving on");
            Ok(false)
        }
        Err(e) => {
            tracing::error!("the successor did not take over ({e}); serving on");
            Ok(false)
        }
    }
}

/// How the serving loop ended.
enum Ended {
    Signal,
    HandedOver,
}

pub async fn run(opts: NodeOptions, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    sys::require_privileges("redirect-agent node")?;
    crate::features::require_all()?;
    loader::validate_name(&opts.name)?;
    sys::ensure_bpffs()?;
    let cgroup_parent = match &opts.cgroup_parent {
        Some(p) => p.clone(),
        None => sys::cgroup2_root()?,
    };
    let cgroup = sys::open_cgroup2_dir(&cgroup_parent)?;
    // Bound before anything changes, so that a bad address is refused like every other bad
    // value. SO_REUSEPORT: during a handover the predecessor still holds the port.
    let metrics_listener = match opts.metrics {
        Some(addr) => {
            Some(crate::metrics::bind(addr).with_context(|| format!("metrics address {addr} cannot be bound"))?)
        }
        None => None,
    };

    // A live predecessor hands over; otherwise its pins and state are adopted.
    check_pins(&opts)?;
    // The predecessor holds the lock until it has stopped serving, which it does once this
    // process confirms it serves (below); without a handover, a held lock is an agent that
    // does not answer on this socket, and waiting will not help.
    let handover = tokio::task::block_in_place(|| receive_handover(&opts.socket))?;
    let mut lock = match handover {
        Some(_) => None,
        None => Some(tokio::task::block_in_place(|| Lock::take(&opts.name, Duration::ZERO))?),
    };
    let pin_dir = loader::pin_dir(&opts.name);
    let mut predecessor = None;
    let (infos, handed) = match handover {
        Some(h) => {
            tracing::info!(workloads = h.infos.len(), "a running agent hands over");
            predecessor = Some(h.predecessor);
            (h.infos, h.handed)
        }
        None => match std::fs::read(state_path(&opts.name)) {
            Ok(bytes) if pin_dir.exists() => {
                let state: NodeState = serde_json::from_slice(&bytes).context("reading the node state file")?;
                if state.cgroup_parent != cgroup_parent {
                    anyhow::bail!(
                        "the pinned programs of '{}' are attached at {}, not {}: run `redirect-agent cleanup --name {}` \
                         to move them",
                        opts.name,
                        state.cgroup_parent.display(),
                        cgroup_parent.display(),
                        opts.name
                    );
                }
                tracing::info!(
                    workloads = state.workloads.len(),
                    "adopting the pins of a stopped agent"
                );
                (state.workloads, BTreeMap::new())
            }
            _ => {
                if pin_dir.exists() {
                    tracing::warn!(dir = %pin_dir.display(), "pins without a state file; removing them");
                    std::fs::remove_dir_all(&pin_dir).with_context(|| format!("remove {}", pin_dir.display()))?;
                }
                (Vec::new(), BTreeMap::new())
            }
        },
    };
    std::fs::create_dir_all(links_dir(&opts.name))
        .with_context(|| format!("create {}", links_dir(&opts.name).display()))?;

    // Every workload's proxy draws on this process's descriptors: room for all of them at
    // their limit if the system allows, and a word when it does not (past it, accepts wait
    // for descriptors to free up).
    let wanted = opts.max_proxy_connections.saturating_mul(MAX_WORKLOADS as usize);
    let fits = crate::proxy::connections_fitting(sys::raise_nofile_limit(wanted));
    if fits < wanted {
        tracing::warn!(
            fits,
            wanted,
            "the descriptor limit fits {fits} proxied connections across all workloads, fewer than \
             {MAX_WORKLOADS} workloads x --max-proxy-connections"
        );
    }
    let mut object = NodeObject::load(&pin_dir, opts.max_tracked_connections, opts.fast_path)?;
    let mut cgroup_links = Vec::new();
    for (prog, attach_type) in CGROUP_LINKS {
        let pin = links_dir(&opts.name).join(prog);
        let fd = object.program_fd(prog)?;
        let link = match links::open_pinned(&pin) {
            Ok(link) => {
                links::update(link.as_fd(), fd)
                    .with_context(|| format!("moving {} to this agent's program", pin.display()))?;
                link
            }
            Err(_) => {
                let link = links::create(fd, cgroup.as_fd(), attach_type)
                    .with_context(|| format!("attaching {prog} to cgroup {}", cgroup_parent.display()))?;
                links::pin(link.as_fd(), &pin)?;
                link
            }
        };
        cgroup_links.push(link);
    }
    if opts.fast_path {
        // Before any workload is served: sockets take the sockhash's programs when they join.
        object.attach_fast_path()?;
    }
    let maps = NodeMaps {
        workloads: object.take(maps::WORKLOADS)?,
        counters: object.take(maps::RULE_COUNTERS)?,
        events: object.take(maps::EVENT_COUNTERS)?,
        local: object.take(maps::LOCAL_ADDRS)?,
        owners: object.take(maps::ADDR_OWNERS)?,
        listeners: object.take(maps::INBOUND_LISTENERS)?,
    };
    let mut node = Node {
        host_netns_cookie: sys::current_netns_cookie().context("the agent's own netns cookie")?,
        opts: opts.clone(),
        object,
        maps,
        workloads: BTreeMap::new(),
        cgroup_parent: cgroup_parent.clone(),
        _cgroup_links: cgroup_links,
        started: Instant::now(),
        handed_over: false,
    };
    node.restore(infos, handed);
    node.object
        .pin_programs(&loader::pin_dir(&opts.name).join("programs"))?;
    if let Some(p) = predecessor {
        tokio::task::block_in_place(|| confirm_takeover(&p))?;
        lock = Some(tokio::task::block_in_place(|| {
            Lock::take(&opts.name, Duration::from_secs(30))
        })?);
        tracing::info!("a running agent handed over");
    }
    node.persist();

    // The predecessor closed its socket before handing over; a crashed one left the file.
    let _ = std::fs::remove_file(&opts.socket);
    if let Some(dir) = opts.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let api = UnixListener::bind(&opts.socket).with_context(|| format!("bind {}", opts.socket.display()))?;
    std::fs::set_permissions(&opts.socket, std::fs::Permissions::from_mode(0o600))?;
    let node = Arc::new(tokio::sync::Mutex::new(node));
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let metrics = metrics_listener.map(|l| AbortOnDrop(crate::metrics::serve(l, node.clone(), ready.clone())));
    tracing::info!(
        name = %opts.name,
        cgroup = %cgroup_parent.display(),
        socket = %opts.socket.display(),
        workloads = node.lock().await.workloads.len(),
        "node agent ready"
    );

    let ended = tokio::select! {
        _ = shutdown => Ended::Signal,
        r = serve_api(&api, node.clone()) => r,
    };
    // Not ready from here: a successor (or nobody) serves new connections.
    ready.store(false, std::sync::atomic::Ordering::Relaxed);
    drop(api);
    let mut node = node.lock().await;
    if matches!(ended, Ended::Signal) {
        let _ = std::fs::remove_file(&opts.socket);
    }
    drop(lock);
    let proxies: Vec<Proxy> = std::mem::take(&mut node.workloads)
        .into_values()
        .filter_map(|w| w.proxy)
        .collect();
    drop(node);
    drop(metrics);
    match ended {
        Ended::HandedOver => tracing::info!("handed over; finishing open connections"),
        Ended::Signal => tracing::info!(
            "stopping; the pins stay (workloads remain captured, refused until an agent serves them): \
             `redirect-agent cleanup` releases them"
        ),
    }
    let drains: Vec<_> = proxies.into_iter().map(|p| p.drain(opts.drain)).collect();
    for d in drains {
        d.await;
    }
    Ok(())
}

/// Serves API connections until one of them is a completed handover.
async fn serve_api(api: &UnixListener, node: Arc<tokio::sync::Mutex<Node>>) -> Ended {
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            accepted = api.accept() => match accepted {
                Ok((stream, _)) => {
                    let node = node.clone();
                    let done = done_tx.clone();
                    tokio::spawn(async move {
                        if handle(stream, node).await {
                            let _ = done.send(()).await;
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = done_rx.recv() => return Ended::HandedOver,
        }
    }
}

/// One request. `true`: it was a handover, and this agent must stop serving.
async fn handle(stream: tokio::net::UnixStream, node: Arc<tokio::sync::Mutex<Node>>) -> bool {
    let Ok(std) = stream.into_std() else { return false };
    let node_for_blocking = node.clone();
    // The API is tiny and rare: a blocking exchange on a worker thread keeps it simple, with
    // timeouts so that a stuck client cannot hold the node's lock.
    let outcome = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        std.set_nonblocking(false)?;
        std.set_read_timeout(Some(Duration::from_secs(10)))?;
        std.set_write_timeout(Some(Duration::from_secs(10)))?;
        let line = redirect_api::read_line(&std)?;
        let request: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                reply(&std, &Response::Error(invalid(format!("unreadable request: {e}"))))?;
                return Ok(false);
            }
        };
        let rt = tokio::runtime::Handle::current();
        let mut node = rt.block_on(node_for_blocking.lock());
        if node.handed_over {
            let e = ApiError::new(
                ErrorKind::Unavailable,
                "this agent has handed the node over to a new process; retry (its socket takes over)",
            );
            reply(&std, &Response::Error(e))?;
            return Ok(false);
        }
        let response = match request {
            Request::Enroll(req) => node.enroll(req).map(Response::Enrolled),
            Request::Unenroll { id, netns } => node.unenroll(id, netns).map(|id| Response::Unenrolled { id }),
            Request::List => Ok(Response::Workloads(node.workloads())),
            Request::Handover => {
                node.handed_over = send_handover(std, &node)?;
                return Ok(node.handed_over);
            }
        };
        reply(&std, &response.unwrap_or_else(Response::Error))?;
        Ok(false)
    })
    .await;
    match outcome {
        Ok(Ok(handed_over)) => handed_over,
        // A client that connects and leaves (a liveness check) is not worth a warning.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!("control connection closed without a request");
            false
        }
        Ok(Err(e)) => {
            tracing::warn!("control request: {e}");
            false
        }
        Err(e) => {
            tracing::error!("control request handler failed: {e}");
            false
        }
    }
}

fn reply(stream: &std::os::unix::net::UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response)?;
    line.push(b'\n');
    (&*stream).write_all(&line)
}

/// `redirect-agent cleanup`: every pin, link and state file of an instance whose agent is
/// not running. What a pinned link kept attached detaches once its pin is gone.
pub fn cleanup(name: &str) -> anyhow::Result<Vec<PathBuf>> {
    sys::require_privileges("redirect-agent cleanup")?;
    loader::validate_name(name)?;
    let lock = lock_path(name);
    let state = NodeState::read(name);
    if let Ok(f) = File::options().write(true).open(&lock) {
        // SAFETY: valid fd; a non-blocking try, released at once by closing.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = state.map(|s| format!(" (pid {})", s.pid)).unwrap_or_default();
            anyhow::bail!("instance '{name}' is running{pid}: stop it first, then run cleanup");
        }
    }
    let mut removed = Vec::new();
    let socket = state
        .map(|s| s.socket)
        .unwrap_or_else(|| redirect_api::default_socket(name));
    for path in [
        loader::pin_dir(name),
        state_path(name),
        loader::state_path(name),
        socket,
        lock,
    ] {
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match gone {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::anyhow!("remove {}: {e}", path.display())),
        }
    }
    // The shared root goes when it is empty.
    let _ = std::fs::remove_dir(PIN_ROOT);
    Ok(removed)
}

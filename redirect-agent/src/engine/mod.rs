//! The engine: one owner for a set of workloads and for the programs, maps, pins and links
//! that serve them. `run` is the engine with one workload enrolled from its flags; `node` is the
//! same engine with a control socket in front. Both pin their links (`run` unless
//! `--fail-open`), so that capture outlives a killed process and a restart takes it over.
//!
//! The order of everything is the engine's, once, for both:
//! 1. [`Engine::start`]: load and verify the programs against the instance's pinned maps,
//!    attach the fast path to its sockhash, then the cgroup programs (sock_ops first, so every
//!    socket connect4 redirects is tracked; getsockopt before connect4, so a captured
//!    connection can ask for its destination). With no workload in `WORKLOADS`, they decide
//!    nothing yet.
//! 2. [`Engine::enroll`]: the workload's proxy listens, its addresses and listener are in the
//!    maps and its sk_lookup link is made; its `WORKLOADS` entry goes in last, so until then
//!    no connection is captured and a failure part-way is undone whole.
//! 3. [`Engine::stop`]: an instance that keeps nothing detaches first (new connections
//!    go direct, as with the rules removed) and removes its pins, then every proxy drains.
//!    One that keeps its pins leaves the kernel side capturing for its successor.

mod admit;
pub mod budget;
mod error;
pub(crate) mod fast_path_probe;
pub(crate) mod gone;
pub(crate) mod handover;
mod links;
mod object;
mod peer;
pub mod pending;
pub mod pins;
mod release;
mod restore;
mod rules;
mod virt;

pub(crate) use rules::members as set_members;
mod workload;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData, SockHash};
pub(crate) use error::EnrollError;
pub(crate) use object::{ProgramReport, open_typed, verifier_report};
pub(crate) use peer::{authenticate as peer_check, successor_serves};
use redirect_api::WorkloadInfo;
use redirect_common::{FamilyKey, Workload, maps, programs};
pub(crate) use virt::cleanup as cleanup_virt;
pub(crate) use workload::Request;

/// The workloads a node plans for when `--max-workloads` is left out: the descriptor limit,
/// raised as far as the system allows for all `MAX_WORKLOADS` at their most (as
/// [`Engine::new`] would), shared half and half with proxied connections
/// ([`budget::fitting_workloads`]).
pub(crate) fn fitting_workloads(sizing: &Sizing) -> usize {
    let nofile = raise_nofile_for(sizing, redirect_common::MAX_WORKLOADS as usize);
    budget::fitting_workloads(nofile, budget::open_now() + 64)
}

/// Raises RLIMIT_NOFILE towards room for `workloads` proxies at their limit and the reserve
/// beside them, as far as the system allows (the descriptors open now, and 64 more, stand in
/// for those the programs will hold: the plan counts them once loaded). Returns the limit.
fn raise_nofile_for(sizing: &Sizing, workloads: usize) -> u64 {
    let wanted = sizing.max_proxy_connections.saturating_mul(workloads) as u64;
    sys::raise_nofile_to(
        wanted
            .saturating_mul(2)
            .saturating_add(budget::reserve(budget::open_now() + 64, workloads)),
    )
}

use self::{
    links::AttachType,
    object::Object,
    pins::{Lock, Mode, State},
    workload::Enrolled,
};
use crate::{addrs::AddrMaps, error::LoadError, proxy::ProxyCounters, sys};

/// How the engine serves: what differs between `run` and `node` is said here, not coded twice.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub name: String,
    pub mode: Mode,
    /// The cgroup v2 directory the cgroup programs attach to: every workload's processes are
    /// under it.
    pub attach: PathBuf,
    /// The control socket and metrics endpoint, recorded in the state for other commands.
    pub socket: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub sizing: Sizing,
    /// Workloads the descriptor budget is planned for, and the most that may be enrolled.
    pub max_workloads: usize,
    /// Whether a workload may be the agent's own network namespace: only for `run
    /// --host-netns`, which asks for it; never for a node.
    pub allow_host_netns: bool,
    /// Pin the links, so that capture outlives the process: a killed agent's workloads are
    /// refused (RST) until a successor serves them, never let through around the proxy.
    /// Always for a node; for `run` unless `--fail-open`.
    pub keep_links: bool,
    /// This start takes over the pins of a `run` of the same name that was killed: a failure
    /// then leaves them as they were (capturing) instead of removing them.
    pub adopting: bool,
}

/// What the engine is sized and timed for: the same flags for `run` and `node`, each with its
/// own defaults.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizing {
    /// Entries of the original-destination maps (LRU), shared by all workloads.
    pub max_tracked_connections: u32,
    /// Connections each embedded proxy serves at once; more are reset.
    pub max_proxy_connections: usize,
    pub connect_timeout: Duration,
    /// How long open proxied connections may finish after a stop or an unenroll.
    pub drain: Duration,
    /// Load the fast path's programs and size its maps; workloads that ask get it.
    pub fast_path: bool,
    /// Idle timeout and keepalive of the embedded proxies' connections.
    pub liveness: crate::proxy::Liveness,
    /// How the embedded proxies move a stream's bytes (`--relay`).
    pub relay: crate::flags::Relay,
    /// How long a successor may take, from the descriptors to its word that it serves (it
    /// loads and verifies its programs meanwhile), before this process serves on.
    pub handover_within: Duration,
}

/// The maps the engine reads and writes itself (each workload's proxy and address watcher
/// open their own descriptors of the same pins).
struct Maps {
    workloads: HashMap<MapData, u64, Workload>,
    rules: rules::RuleMaps,
    events: Array<MapData, u64>,
    addrs: AddrMaps,
    listeners: SockHash<MapData, FamilyKey>,
}

/// The cgroup programs, in attach order: sock_ops first so that every socket connect4/6
/// redirect is tracked, getsockopt, getpeername and recvmsg before them so a captured
/// connection (or DNS query) can ask and be answered, sendmsg with connect.
const CGROUP_LINKS: [(&str, AttachType); 10] = [
    (programs::SOCK_OPS, AttachType::SockOps),
    (programs::GETSOCKOPT, AttachType::Getsockopt),
    (programs::GETPEERNAME4, AttachType::Getpeername4),
    (programs::GETPEERNAME6, AttachType::Getpeername6),
    (programs::RECVMSG4, AttachType::Recvmsg4),
    (programs::RECVMSG6, AttachType::Recvmsg6),
    (programs::CONNECT4, AttachType::Connect4),
    (programs::CONNECT6, AttachType::Connect6),
    (programs::SENDMSG4, AttachType::Sendmsg4),
    (programs::SENDMSG6, AttachType::Sendmsg6),
];

pub(crate) struct Engine {
    settings: Settings,
    object: Object,
    maps: Maps,
    workloads: BTreeMap<String, Enrolled>,
    host_netns_cookie: u64,
    /// The agent's own process is under the attach point, so sock_ops sees the embedded
    /// proxies' sockets (node mode at the root). Otherwise the fast path needs the proxy's
    /// listeners made inside the workload's cgroup, and the proxy enrolls its upstream ends.
    agent_under_attach: bool,
    /// The descriptor limit, what the control plane and the workloads keep of it, and the
    /// connection budget every workload's proxy shares (on top of its own
    /// `--max-proxy-connections`).
    plan: budget::Plan,
    /// The cgroup links. Dropping a descriptor detaches an unpinned link, not a pinned one.
    cgroup_links: Vec<OwnedFd>,
    started: Instant,
    /// Set once a successor has the workloads: from then on this process must change
    /// nothing, or the successor would not know of it.
    handed_over: bool,
    /// A handover is under way: workloads do not change until it ends.
    handing_over: bool,
    lock: Option<Lock>,
    /// Set by [`Engine::stop`] once an instance that keeps nothing has removed its pins.
    removed: bool,
    /// What the instance's maps take in the kernel, in bytes ([`Engine::kernel_memory`]).
    kernel_memory: u64,
    /// Workloads a predecessor served that this process could not serve again: still
    /// captured (refused), kept in the state and retried ([`Engine::retry_unserved`]).
    unserved: BTreeMap<String, WorkloadInfo>,
}

impl Engine {
    /// Loads and attaches everything that serves workloads, before any is enrolled. An
    /// instance that keeps its pins reuses the maps and moves the pinned links to this
    /// process's programs (`BPF_LINK_UPDATE`: no connection sees neither); one that keeps
    /// nothing starts from none (the caller removed any leftovers under the lock).
    pub(crate) fn start(settings: Settings, lock: Option<Lock>) -> Result<Self, LoadError> {
        let (mode, name, adopting) = (settings.mode, settings.name.clone(), settings.adopting);
        match Self::load_and_attach(settings) {
            Ok(mut engine) => {
                engine.lock = lock;
                Ok(engine)
            }
            Err(e) => {
                // The links made so far closed with their descriptors; what aya pinned stays
                // unless removed, and a run must leave what it found: nothing, or the pins of
                // a killed predecessor, still capturing.
                if mode == Mode::Run && !adopting {
                    drop(pins::remove_all(&name));
                    if let Some(lock) = lock {
                        lock.remove();
                    }
                }
                Err(e)
            }
        }
    }

    fn load_and_attach(settings: Settings) -> Result<Self, LoadError> {
        let pin_dir = pins::pin_dir(&settings.name);
        let persist = settings.keep_links;
        pins::make_dirs(&settings.name, persist)?;
        // The address -> workload map of agents before sk_lookup knew its namespace: nothing
        // reads it any more (a predecessor's programs hold their own descriptor of it).
        let _ = std::fs::remove_file(pin_dir.join("ADDR_OWNERS"));
        let cgroup = sys::open_cgroup2_dir(&settings.attach)?;

        // Every workload's proxy draws on this process's descriptors: room for all of them at
        // their limit if the system allows.
        let nofile = raise_nofile_for(&settings.sizing, settings.max_workloads);
        let wanted = settings
            .sizing
            .max_proxy_connections
            .saturating_mul(settings.max_workloads);

        let mut object = Object::load(
            &pin_dir,
            settings.sizing.max_tracked_connections,
            settings.sizing.fast_path,
        )?;
        if settings.sizing.fast_path {
            object.attach_fast_path()?;
        }
        let mut cgroup_links = Vec::new();
        for (prog, attach_type) in CGROUP_LINKS {
            let pin = pins::links_dir(&settings.name).join(prog);
            let link = links::attach(
                object.program_fd(prog)?,
                cgroup.as_fd(),
                attach_type,
                persist.then_some(pin.as_path()),
            )
            .map_err(|source| LoadError::Link {
                what: format!("attaching {prog} to cgroup {}", settings.attach.display()),
                source,
            })?;
            cgroup_links.push(link);
        }
        let maps = Maps {
            workloads: object.take(maps::WORKLOADS)?,
            rules: rules::RuleMaps::new(
                object.take(maps::RULE_COUNTERS)?,
                object.take(maps::CIDR_SETS)?,
                object.take(maps::PORT_SETS)?,
            ),
            events: object.take(maps::EVENT_COUNTERS)?,
            addrs: AddrMaps {
                local: object.take(maps::LOCAL_ADDRS)?,
                pods: object.take(maps::POD_ADDRS)?,
                routes: object.take(maps::ROUTE_SOURCES)?,
                ifaces: object.take(maps::IFACES)?,
                probe_snat: object.take(maps::PROBE_SNAT)?,
            },
            listeners: object.take(maps::INBOUND_LISTENERS)?,
        };
        let kernel_memory: u64 = maps::ALL
            .iter()
            .filter_map(|m| aya::maps::MapInfo::from_pin(pin_dir.join(m)).ok())
            .filter_map(|info| info.fd().ok())
            .filter_map(|fd| sys::memlock(fd.as_fd()))
            .sum();
        let host_netns_cookie = sys::current_netns_cookie()
            .map_err(|e| LoadError::Sys(crate::error::SysError::Io("the agent's own netns cookie".into(), e)))?;
        let plan = budget::Plan::new(nofile, budget::open_now(), settings.max_workloads);
        let fits = plan.budget.size();
        tracing::info!(
            nofile,
            reserved = plan.reserved,
            per_workload = budget::PER_WORKLOAD,
            workloads = settings.max_workloads,
            connections = fits,
            "descriptor budget: {fits} proxied connections across all workloads; the rest is kept for the control \
             plane and {} workloads' listeners, maps and dialers",
            settings.max_workloads
        );
        if nofile < plan.reserved + 2 {
            tracing::warn!(
                nofile,
                reserved = plan.reserved,
                "the descriptor limit does not cover what the control plane and the workloads keep: every proxy \
                 shares one connection; raise the limit or lower --max-workloads"
            );
        } else if fits < wanted {
            tracing::warn!(
                fits,
                wanted,
                "the descriptor limit fits {fits} proxied connections across all workloads, fewer than {} \
                 workload(s) x --max-proxy-connections: connections past it are reset",
                settings.max_workloads
            );
        }
        Ok(Self {
            agent_under_attach: sys::process_under_cgroup(&settings.attach),
            settings,
            object,
            maps,
            workloads: BTreeMap::new(),
            host_netns_cookie,
            plan,
            cgroup_links,
            started: Instant::now(),
            handed_over: false,
            handing_over: false,
            lock: None,
            removed: false,
            kernel_memory,
            unserved: BTreeMap::new(),
        })
    }

    /// Kernel memory the instance's maps take, as the kernel counts it (`memlock`), when they
    /// were loaded. Said at start, not left silent: the original-destination maps take about
    /// 580 bytes per tracked connection (TCP or UDP), which `--max-tracked-connections` multiplies.
    pub(crate) fn kernel_memory(&self) -> u64 {
        self.kernel_memory
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The descriptor limit, the reserve and the connection budget the proxies share.
    pub(crate) fn plan(&self) -> &budget::Plan {
        &self.plan
    }

    /// The lock, once a predecessor that handed over has let go of it.
    pub(crate) fn hold(&mut self, lock: Lock) {
        self.lock = Some(lock);
    }

    pub(crate) fn workloads(&self) -> Vec<WorkloadInfo> {
        self.workloads.values().map(|w| w.info.clone()).collect()
    }

    /// A second descriptor of the network namespace workload `id` is served in (the one
    /// its cookie was read from), for a proxy that serves it from outside (ztunnel);
    /// `None` if no such workload is served.
    pub(crate) fn netns_of(&self, id: &str) -> Option<std::io::Result<OwnedFd>> {
        self.workloads.get(id).map(|w| w.netns.as_fd().try_clone_to_owned())
    }

    /// Whether workload `id` is served with ambient's rules (`--mode ambient`).
    pub(crate) fn is_ambient(&self, id: &str) -> bool {
        self.workloads.get(id).is_some_and(|w| w.ambient)
    }

    pub(crate) fn handed_over(&self) -> bool {
        self.handed_over
    }

    pub(crate) fn handing_over(&self) -> bool {
        self.handing_over
    }

    /// Serves again after a successor that was handed everything did not serve: this process
    /// holds the lock again, every link runs its programs, and the state names it.
    pub(crate) fn resume(&mut self, lock: Lock) -> Result<(), LoadError> {
        self.lock = Some(lock);
        self.handed_over = false;
        self.handing_over = false;
        self.reclaim()?;
        self.persist();
        Ok(())
    }

    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The state this process publishes.
    fn state(&self) -> State {
        State {
            name: self.settings.name.clone(),
            pid: std::process::id(),
            mode: self.settings.mode,
            layout: pins::layout(),
            cgroup_parent: self.settings.attach.clone(),
            socket: self.settings.socket.clone(),
            metrics: self.settings.metrics,
            programs: self.object.program_ids(),
            // The unserved too: a restart retries them, and must not take them for
            // leftovers no state names.
            workloads: self
                .workloads()
                .into_iter()
                .chain(self.unserved.values().cloned())
                .collect(),
        }
    }

    /// Writes the state: after every change, and once the instance serves. What a successor
    /// adopts if this process dies, and what `stats`, `list` and the tests read.
    pub(crate) fn persist(&self) {
        if let Err(e) = self.state().write() {
            tracing::error!(
                "writing {}: {e}; a restart after a crash may not find every workload",
                pins::state_path(&self.settings.name).display()
            );
        }
    }

    /// For an instance that keeps its pins: pins this process's programs in place of a
    /// predecessor's, once every link runs them.
    pub(crate) fn pin_programs(&mut self) -> Result<(), LoadError> {
        if self.settings.mode == Mode::Node {
            self.object.pin_programs(&pins::programs_dir(&self.settings.name))?;
        }
        Ok(())
    }

    /// Each workload's chain as the kernel runs it, with its proxy's counters: what the
    /// metrics endpoint shows.
    pub(crate) fn views(&self) -> Vec<View<'_>> {
        self.workloads
            .values()
            .filter_map(|w| {
                Some(View {
                    info: &w.info,
                    entry: self.maps.workloads.get(&w.info.netns_cookie, 0).ok()?,
                    proxy: w.proxy.as_ref().map(|p| (p.active(), &*p.counters)),
                })
            })
            .collect()
    }

    /// The rule counters and set members, and the event counters, for [`View`]s.
    pub(crate) fn counters(&self) -> (crate::stats::KernelRules<'_>, &Array<MapData, u64>) {
        let r = &self.maps.rules;
        (
            crate::stats::KernelRules::read(&r.counters, &r.cidrs, &r.ports),
            &self.maps.events,
        )
    }

    /// Stops serving. An instance that keeps nothing detaches everything first, so that new
    /// connections go direct while the proxies drain, and removes its pins, state and lock;
    /// one that keeps its pins only lets go of its lock. What is returned drains the proxies.
    pub(crate) fn stop(&mut self) -> Draining {
        let keeps_nothing = self.settings.mode == Mode::Run;
        let mut proxies = Vec::new();
        let mut routing = Vec::new();
        let mut virt = Vec::new();
        for w in std::mem::take(&mut self.workloads).into_values() {
            proxies.extend(w.proxy);
            // An instance that keeps its pins keeps the routing and tc programs they capture
            // with; one that keeps nothing removes them once its proxies drained (their open
            // TPROXY connections' replies, a VM's redirected ones, need them until then).
            if keeps_nothing {
                routing.extend(w.tproxy);
                // New connections from its VM go direct from now (tc finds no workload);
                // redirected ones keep their translation until the drain ends.
                let _ = self.maps.workloads.remove(&w.info.netns_cookie);
                virt.extend(w.virt);
            } else if let Some(v) = &w.virt {
                v.release();
            }
        }
        if keeps_nothing {
            // The workloads' sk_lookup links went with them, above.
            self.cgroup_links.clear();
            self.remove_everything();
        }
        drop(self.lock.take());
        Draining {
            proxies,
            routing,
            virt,
            grace: self.settings.sizing.drain,
        }
    }

    fn remove_everything(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        for (path, gone) in pins::remove_all(&self.settings.name) {
            if let Err(e) = gone {
                tracing::warn!(path = %path.display(), "removing: {e}");
            }
        }
        if let Some(lock) = self.lock.take() {
            lock.remove();
        }
    }
}

/// An instance that keeps nothing leaves nothing, also when it fails half-way: its links
/// close with their descriptors (after this), its pins, state and lock go here.
impl Drop for Engine {
    fn drop(&mut self) {
        // A run that took over a killed predecessor's pins and then failed leaves them
        // capturing (fail-closed); `stop` removes them on a deliberate stop.
        if self.settings.mode == Mode::Run && !self.settings.adopting {
            self.remove_everything();
        }
    }
}

/// The proxies of a stopped engine, finishing their open connections.
#[must_use = "open connections are reset unless they are drained"]
pub(crate) struct Draining {
    proxies: Vec<crate::proxy::Proxy>,
    /// TPROXY routing to remove once the proxies are done.
    routing: Vec<crate::tproxy_route::TproxyRouting>,
    /// `-k` tc programs to remove then.
    virt: Vec<virt::SharedVirt>,
    grace: Duration,
}

impl Draining {
    /// Open proxied connections may finish for the drain time; whatever is still open then
    /// is reset, never closed as if complete.
    pub(crate) async fn wait(self) {
        // Side by side: each proxy's grace runs from the stop, not from the previous one's end.
        let mut drains = tokio::task::JoinSet::new();
        for p in self.proxies {
            drains.spawn(p.drain(self.grace));
        }
        while drains.join_next().await.is_some() {}
        if !self.routing.is_empty() || !self.virt.is_empty() {
            let (routing, virt) = (self.routing, self.virt);
            let _ = tokio::task::spawn_blocking(move || {
                // The -k programs (which mark connections for TPROXY's table) first.
                virt.iter().for_each(|v| v.remove(virt::Removal::Stopped));
                routing.into_iter().for_each(|t| t.remove());
            })
            .await;
        }
    }
}

/// One workload as the metrics endpoint reads it.
pub(crate) struct View<'a> {
    pub info: &'a WorkloadInfo,
    /// Its `WORKLOADS` entry: the chain the programs evaluate.
    pub entry: Workload,
    /// Connections its embedded proxy holds now, and its counters.
    pub proxy: Option<(usize, &'a ProxyCounters)>,
}

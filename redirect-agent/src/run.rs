//! `redirect-agent run`: one workload (a cgroup and its network namespace), from attach to
//! detach.

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use redirect_common::{
    chain,
    config::{CaptureConfig, Include},
    maps,
};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    addrs::LocalAddrs,
    adopt, features,
    loader::{self, InboundListener, InstanceDirs, InstanceState, Loaded},
    proxy::{
        Dialer, FastPath, LISTEN_BACKLOG, Listeners, Listening, NetnsDialer, OrigDstTable, OriginalDst, Proxy,
        ProxyConfig, Side,
    },
    sys::{self, Netns},
};

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    /// Listeners on the capture ports inside the workload's namespace forward to the original
    /// destinations.
    Embedded,
    /// No listeners: another proxy (Envoy) owns the capture ports.
    None,
}

impl ProxyMode {
    /// As the command line and the node API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(s, false).ok()
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub name: String,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    pub proxy: ProxyMode,
    pub capture: CaptureConfig,
    pub max_tracked_connections: u32,
    pub max_proxy_connections: usize,
    pub connect_timeout: Duration,
    /// How long open proxied connections may finish after a stop.
    pub drain: Duration,
    /// `--fast-path`: sk_msg between the local ends of captured connections.
    pub fast_path: bool,
}

/// Runs until `shutdown` resolves, then detaches and removes everything it created. Any error
/// before that leaves nothing attached: each step's guard undoes it on the way out.
pub async fn run(opts: RunOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    sys::require_privileges("redirect-agent run")?;
    features::require_all()?;
    loader::validate_name(&opts.name)?;
    let rules = chain::compile(&opts.capture)?;
    check_ports(&opts)?;
    let cgroup = sys::open_cgroup2_dir(&opts.cgroup)?;
    let netns = Netns::open(&opts.netns)?;
    let netns_cookie = netns
        .cookie()
        .with_context(|| format!("netns cookie of {}", opts.netns.display()))?;
    sys::ensure_bpffs()?;
    if let Some(other) = crate::node::captured_elsewhere(netns_cookie, &opts.name) {
        anyhow::bail!(
            "network namespace {} is already captured by {other}: one namespace, one agent",
            opts.netns.display()
        );
    }

    let dirs = InstanceDirs::claim(&opts.name)?;
    let mut loaded = Loaded::load(dirs, opts.max_tracked_connections, opts.fast_path)?;
    let serving = chain::Serving {
        own_proxy: opts.proxy == ProxyMode::None,
        fast_path: opts.fast_path,
    };
    // A single-workload instance uses the first counter block.
    loaded.set_workload(netns_cookie, &chain::workload(&opts.capture, &rules, 0, serving))?;

    let local_map = loaded.take(maps::LOCAL_ADDRS)?;
    let owners_map = loaded.take(maps::ADDR_OWNERS)?;
    let local = LocalAddrs::install(&netns, local_map, owners_map, netns_cookie)
        .with_context(|| format!("reading the addresses of {}", opts.netns.display()))?;
    tracing::info!(addresses = ?local.addresses(), "local addresses of the workload");
    let watch_ns = netns.try_clone()?;
    let watcher = tokio::spawn(async move {
        if let Err(e) = local.watch(watch_ns).await {
            tracing::error!("local address watcher stopped: {e}; -o lo decisions may be stale");
        }
    });
    let _watcher = AbortOnDrop(watcher);

    let mut inbound_listener = InboundListener::new(loaded.take(maps::INBOUND_LISTENERS)?, netns_cookie);
    // Attached before sock_ops (sockets take a sockhash's programs when they join it).
    let mut programs = Vec::new();
    let mut fast_path = match opts.fast_path {
        true => {
            let (sockets, attached) = loaded.attach_fast_path()?;
            programs.extend(attached);
            Some(sockets)
        }
        false => None,
    };
    let proxy = match opts.proxy {
        ProxyMode::None => None,
        ProxyMode::Embedded => {
            let cfg = ProxyConfig {
                outbound: SocketAddrV4::new(Ipv4Addr::LOCALHOST, opts.capture.envoy_port),
                inbound: SocketAddrV4::new(Ipv4Addr::LOCALHOST, opts.capture.inbound_capture_port),
                connect_timeout: opts.connect_timeout,
                max_connections: opts.max_proxy_connections,
            }
            // Only now, with the instance claimed and loaded: a refused run prints one line.
            .fit_to_descriptors(sys::raise_nofile_limit(opts.max_proxy_connections));
            let listening = if opts.fast_path {
                // The workload's own sockets, so that sock_ops sees the proxy's accepted ends.
                crate::listen_in::listeners(&opts.cgroup, &opts.netns, &[cfg.outbound, cfg.inbound], LISTEN_BACKLOG)
                    .and_then(|fds| Listening::from_fds([Side::Outbound, Side::Inbound].into_iter().zip(fds)))
            } else {
                Listeners::bind(&netns, &cfg).and_then(Listeners::listen)
            }
            .with_context(|| format!("proxy listeners in {}", opts.netns.display()))?;
            // sk_lookup hands connections from other hosts to this socket; sock_ops cannot
            // register it because the agent is not in the workload's cgroup.
            if let Some(l) = listening.get(Side::Inbound) {
                inbound_listener.register(l)?;
            }
            let table = OriginalDst::Maps(Box::new(OrigDstTable::new(
                loaded.take(maps::ORIG_BY_TUPLE)?,
                loaded.take(maps::INBOUND_PENDING)?,
                netns_cookie,
            )));
            let dialer = Dialer::Netns(NetnsDialer::start(&netns)?);
            let fast_path = fast_path.take().map(|sockets| FastPath { sockets, netns_cookie });
            Some(Proxy::start(listening, table, dialer, cfg, fast_path)?)
        }
    };

    programs.push(loaded.attach_sock_ops(&cgroup, &opts.cgroup)?);
    if opts.proxy == ProxyMode::None && !opts.capture.inbound_ports.is_empty() {
        // sock_ops sees listen() calls from now on; a proxy that listened before is found here.
        adopt_listener(&netns, opts.capture.inbound_capture_port, &mut inbound_listener)?;
    }
    programs.extend(loaded.attach_capture(&cgroup, &opts.cgroup, &netns, &opts.netns)?);
    loaded.dirs().write_state(&InstanceState {
        name: opts.name.clone(),
        pid: std::process::id(),
        cgroup: opts.cgroup.clone(),
        netns: opts.netns.clone(),
        netns_cookie,
        proxy: format!("{:?}", opts.proxy).to_lowercase(),
        programs,
    })?;
    tracing::info!(
        name = %opts.name,
        cgroup = %opts.cgroup.display(),
        netns = %opts.netns.display(),
        netns_cookie,
        rules = rules.len(),
        "attached; capturing"
    );

    shutdown.await;

    // Detach first, so that new connections are no longer captured (they go direct, as with
    // the rules removed) while the proxy drains the ones it holds. The fast path (held by the
    // proxy, or here) stays attached until the connections on it are done.
    drop(loaded);
    if let Some(proxy) = proxy {
        let counters = proxy.counters.clone();
        proxy.drain(opts.drain).await;
        let c = &counters;
        tracing::info!(
            accepted = c.accepted.load(std::sync::atomic::Ordering::Relaxed),
            forwarded = c.forwarded.load(std::sync::atomic::Ordering::Relaxed),
            no_original_dst = c.no_original_dst.load(std::sync::atomic::Ordering::Relaxed),
            upstream_failed = c.upstream_failed.load(std::sync::atomic::Ordering::Relaxed),
            "proxy stopped"
        );
    }
    drop(fast_path);
    tracing::info!(name = %opts.name, "detached; pins removed");
    Ok(())
}

/// Registers a socket that already listens on the inbound capture port (another proxy's).
/// Not finding one is normal (the proxy starts later); failing to look is logged, not fatal:
/// sock_ops still registers the next listen().
fn adopt_listener(netns: &Netns, port: u16, slot: &mut InboundListener) -> anyhow::Result<()> {
    match adopt::existing_listener(netns, port) {
        Ok(Some((fd, pid))) => {
            slot.register(&fd)
                .with_context(|| format!("registering pid {pid}'s listener on port {port}"))?;
            tracing::info!(pid, port, "inbound capture listener (already listening) registered");
        }
        Ok(None) => tracing::info!(
            port,
            "nothing listens on the inbound capture port yet; connections from other hosts are refused until a \
             workload process listens on it"
        ),
        Err(e) => tracing::warn!(port, "looking for an inbound capture listener: {e}"),
    }
    Ok(())
}

/// Combinations the agent cannot serve, refused before anything is loaded; and the one that
/// istio-iptables accepts and ignores, said out loud.
fn check_ports(opts: &RunOptions) -> Result<(), crate::error::FlagError> {
    let c = &opts.capture;
    if c.envoy_port == c.inbound_capture_port {
        return Err(crate::error::FlagError::SamePort(c.envoy_port));
    }
    if matches!(c.inbound_ports, Include::List(_)) && !c.inbound_exclude_ports.is_empty() {
        tracing::warn!(
            excluded = ?c.inbound_exclude_ports,
            "-d only applies with -b '*' (as in istio-iptables): ignored, only the -b ports are captured"
        );
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SIGINT/SIGTERM, registered before any work starts: a stop that arrives while the agent is
/// still attaching is held until it can unwind, instead of killing it half-way (which would
/// leave pins and a lock behind).
pub struct Termination {
    int: Signal,
    term: Signal,
}

impl Termination {
    /// Must be called inside the runtime, before anything is created.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.int.recv() => tracing::info!("SIGINT: stopping"),
            _ = self.term.recv() => tracing::info!("SIGTERM: stopping"),
        }
    }
}

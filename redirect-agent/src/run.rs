//! `redirect-agent run`: the engine with one workload, enrolled from the command line, for as
//! long as the process lives: attached to the workload's own cgroup, nothing pinned that
//! outlives it, everything detached and removed on the way out.

use std::{future::Future, path::PathBuf, time::Duration};

use anyhow::Context as _;

use redirect_common::{chain, config::CaptureConfig};

use crate::{
    engine::{
        self, Engine, Settings, Sizing,
        pins::{self, Lock, LockError, Mode},
    },
    error::LoadError,
    flags::ProxyMode,
    sys::{self, Netns},
};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub name: String,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    /// `--host-netns`: the agent's own namespace is the workload, on purpose.
    pub host_netns: bool,
    /// `--fail-open`: links are not pinned, so that while no agent runs the workload's
    /// connections go direct instead of being refused.
    pub fail_open: bool,
    pub proxy: ProxyMode,
    pub capture: CaptureConfig,
    pub sizing: Sizing,
}

/// Runs until `shutdown` resolves, then detaches and removes everything it created. Any error
/// before that leaves nothing attached: the engine undoes what it did when it is dropped.
pub async fn run(opts: RunOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    sys::require_privileges("redirect-agent run")?;
    crate::features::require_all()?;
    pins::validate_name(&opts.name)?;
    // Every value is checked before anything is claimed or loaded.
    chain::compile(&opts.capture)?;
    crate::flags::check(&opts.capture)?;
    sys::open_cgroup2_dir(&opts.cgroup)?;
    let netns = Netns::open(&opts.netns)?;
    let netns_cookie = netns.cookie()?;
    if !opts.host_netns && netns_cookie == sys::current_netns_cookie()? {
        return Err(engine::EnrollError::HostNetns(opts.netns.clone()).into());
    }
    sys::ensure_bpffs()?;
    // Before anything is removed or made: directories others could rename are refused.
    pins::check_dirs(&opts.name)?;

    let lock = Lock::take(&opts.name, Duration::ZERO).map_err(|e| match e {
        LockError::Held(lock) => LoadError::AlreadyRunning {
            name: opts.name.clone(),
            lock,
        }
        .into(),
        LockError::Io(e) => anyhow::Error::from(e),
    })?;
    // Nobody holds the lock, so pins and state of this name are left over from a process
    // that was killed. Its pinned links kept capturing (the workload's connections refused
    // meanwhile): serving the same workload from the same cgroup, this run moves them to its
    // own programs without a gap. Anything else is removed.
    let adopting = !opts.fail_open && killed_run_of(&opts, netns_cookie);
    if adopting {
        tracing::warn!(
            name = %opts.name,
            "a run of this name was killed; its programs kept capturing (connections refused meanwhile): taking over"
        );
    } else {
        for (path, gone) in pins::remove_all(&opts.name) {
            gone.with_context(|| format!("removing {}, left by a run that was killed", path.display()))?;
            tracing::warn!(path = %path.display(), "removed what a run that was killed left");
        }
    }
    let settings = Settings {
        name: opts.name.clone(),
        mode: Mode::Run,
        attach: opts.cgroup.clone(),
        socket: None,
        metrics: None,
        sizing: opts.sizing,
        max_workloads: 1,
        allow_host_netns: opts.host_netns,
        keep_links: !opts.fail_open,
        adopting,
    };
    let mut engine = Engine::start(settings, Some(lock))?;
    let info = engine.enroll(engine::Request {
        id: opts.name.clone(),
        netns: opts.netns.clone(),
        cgroup: None,
        proxy: opts.proxy,
        capture: opts.capture.clone(),
        args: Vec::new(),
        fast_path: opts.sizing.fast_path,
    })?;
    tracing::info!(
        name = %opts.name,
        cgroup = %opts.cgroup.display(),
        netns = %opts.netns.display(),
        netns_cookie = info.netns_cookie,
        addresses = ?info.addresses,
        maps_kernel_memory_mib = engine.kernel_memory() >> 20,
        "attached; capturing"
    );

    shutdown.await;

    engine.stop().wait().await;
    tracing::info!(name = %opts.name, "detached; pins removed");
    Ok(())
}

/// Whether the pins of `opts.name` are those of a killed `run` that served this same workload
/// (namespace) from this same cgroup, with maps this agent reads the same way and of the same
/// sizes: then its links are taken over, not removed.
fn killed_run_of(opts: &RunOptions, netns_cookie: u64) -> bool {
    let Some(state) = pins::State::read(&opts.name) else {
        return false;
    };
    let size = |map: &str| {
        aya::maps::MapData::from_pin(pins::pin_dir(&opts.name).join(map))
            .ok()
            .and_then(|m| m.info().ok())
            .map(|i| i.max_entries())
    };
    state.mode == Mode::Run
        && state.layout == pins::layout()
        && state.cgroup_parent == opts.cgroup
        && state.workloads.iter().any(|w| w.netns_cookie == netns_cookie)
        && pins::links_dir(&opts.name).exists()
        && size(redirect_common::maps::ORIG_BY_TUPLE) == Some(opts.sizing.max_tracked_connections)
        && size(redirect_common::maps::FAST_PATH_SOCKETS).map(|n| n > 1) == Some(opts.sizing.fast_path)
}

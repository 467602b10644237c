//! `redirect-agent run`: the engine with one workload, enrolled from the command line, for as
//! long as the process lives: attached to the workload's own cgroup, nothing pinned that
//! outlives it, everything detached and removed on the way out.

use std::{future::Future, path::PathBuf, time::Duration};

use anyhow::Context as _;

use redirect_common::{addr::Family, chain, config::CaptureConfig};

use crate::{
    engine::{
        self, Engine, Settings, Sizing,
        pins::{self, Lock, LockError, Mode},
    },
    error::LoadError,
    flags::{Execution, FastPathWhen, ProxyMode},
    sys::{self, Netns},
};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub name: String,
    pub cgroup: PathBuf,
    /// `--netns`; istio-iptables' `--network-namespace` (in `execution`) says the same.
    pub netns: Option<PathBuf>,
    /// `--host-netns`: the agent's own namespace is the workload, on purpose.
    pub host_netns: bool,
    /// `--fail-open`: links are not pinned, so that while no agent runs the workload's
    /// connections go direct instead of being refused.
    pub fail_open: bool,
    pub proxy: ProxyMode,
    pub capture: CaptureConfig,
    /// istio-iptables' flags that say what to do besides capturing.
    pub execution: Execution,
    /// `--fast-path`: decided into `sizing.fast_path` (`on` already is, and `auto` follows
    /// pins the instance has) before the pins are checked; the decision is logged once the
    /// start succeeded, so that a refused start prints only why it was refused.
    pub fast_path: FastPathWhen,
    pub sizing: Sizing,
}

/// `run` as istio-iptables' flags ask: a dry run prints the tables and loads nothing,
/// `--cleanup-only` removes a killed run's leftovers, `--skip-rule-apply` installs nothing;
/// otherwise capture until `shutdown`.
pub async fn main(opts: RunOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let x = &opts.execution;
    x.log_without_effect();
    if x.run_validation && opts.capture.ambient.is_some() {
        anyhow::bail!(
            "--run-validation with --mode ambient: istio-validation's probe checks that 127.0.0.6:15002 is \
             redirected, as istio-iptables' rules do and ambient's do not (leave it off)"
        );
    }
    if x.dry_run {
        // Checked as a real run would check them, so a dry run that passes is one that runs.
        crate::flags::check(&opts.capture)?;
        for family in [Family::V4, Family::V6] {
            print!(
                "{}",
                crate::explain::Explanation::new(&opts.capture, family)?.render_text()
            );
        }
        return Ok(());
    }
    if x.cleanup_only {
        pins::validate_name(&opts.name)?;
        for path in pins::cleanup(&opts.name)? {
            tracing::info!(path = %path.display(), "removed");
        }
        // `-k`'s cls_bpf filters (before 6.6; tcx links went with the pins), on whichever
        // devices have them: the flags given now need not name them as the killed run's did.
        // Before the TPROXY routing: they mark connections for its table.
        if opts.netns.is_some() || x.network_namespace.is_some() || opts.host_netns {
            let netns = sys::Netns::open(&workload_netns(&opts)?)?;
            let n = crate::engine::cleanup_virt(&netns)?;
            if n > 0 {
                tracing::info!(devices = n, "-k tc filters removed");
            }
        }
        // So does TPROXY's or ambient's routing, not in the pins either: removed when the
        // flags say either and name the namespace (tcp_fwmark_accept stays: its earlier value
        // went with the killed run).
        if let Some(policy) = crate::tproxy_route::Policy::of(&opts.capture) {
            let netns = sys::Netns::open(&workload_netns(&opts)?)?;
            crate::tproxy_route::cleanup(&netns, policy)?;
            tracing::info!("policy routing removed ({policy})");
        }
        return Ok(());
    }
    if x.skip_rule_apply {
        tracing::info!("--skip-rule-apply: nothing installed");
        if x.run_validation {
            // Whatever captures the workload now (a node agent's enrollment, say) is proven.
            let probe = validation(&opts, &workload_netns(&opts)?);
            return tokio::task::spawn_blocking(move || crate::validate::validate(&probe)).await?;
        }
        return Ok(());
    }
    run(opts, shutdown).await
}

/// istio-validation's probe for this workload, as its proxy's first uid and gid.
fn validation(opts: &RunOptions, netns: &std::path::Path) -> crate::validate::ValidateInArgs {
    let c = &opts.capture;
    crate::validate::ValidateInArgs {
        cgroup: opts.cgroup.clone(),
        netns: netns.to_owned(),
        uid: c.proxy_uids.first().copied().unwrap_or(1337),
        gid: c.proxy_gids.first().copied().unwrap_or(1337),
        probe_port: opts.execution.probe_port,
        capture_port: c.inbound_capture_port,
        timeout_ms: opts.execution.probe_timeout.as_millis() as u64,
    }
}

/// The namespace to capture: `--netns`, istio-iptables' `--network-namespace` (the same one if
/// both), or with `--host-netns` the agent's own.
fn workload_netns(opts: &RunOptions) -> anyhow::Result<PathBuf> {
    let named = opts.execution.network_namespace.as_ref();
    match (opts.netns.as_ref(), named) {
        (Some(a), Some(b)) if !sys::same_file(a, b) => anyhow::bail!(
            "--network-namespace {} and --netns {} name two namespaces: expected one of them, or both naming the same",
            b.display(),
            a.display()
        ),
        (Some(p), _) | (None, Some(p)) if opts.host_netns => anyhow::bail!(
            "--host-netns captures the agent's own namespace, but {} names one: expected one of them",
            p.display()
        ),
        (Some(p), _) | (None, Some(p)) => Ok(p.clone()),
        (None, None) if opts.host_netns => Ok("/proc/self/ns/net".into()),
        (None, None) => anyhow::bail!(
            "the workload's namespace is missing: expected --netns PATH (or istio-iptables' --network-namespace PATH), \
             or --host-netns to capture the agent's own"
        ),
    }
}

/// Runs until `shutdown` resolves, then detaches and removes everything it created. Any error
/// before that leaves nothing attached: the engine undoes what it did when it is dropped.
async fn run(mut opts: RunOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let netns_path = workload_netns(&opts)?;
    sys::require_privileges("redirect-agent run")?;
    crate::features::require_all()?;
    pins::validate_name(&opts.name)?;
    // Every value is checked before anything is claimed or loaded.
    chain::compile(&opts.capture)?;
    crate::flags::check(&opts.capture)?;
    sys::open_cgroup2_dir(&opts.cgroup)?;
    let netns = Netns::open(&netns_path)?;
    let netns_cookie = netns.cookie()?;
    if !opts.host_netns && netns_cookie == sys::current_netns_cookie()? {
        return Err(engine::EnrollError::HostNetns(netns_path.clone()).into());
    }
    sys::ensure_bpffs()?;
    // Before anything is removed or made: directories others could rename are refused.
    pins::check_dirs(&opts.name)?;
    let fast_path = engine::fast_path_probe::decide(opts.fast_path, pins::pinned_fast_path(&opts.name, Mode::Run));
    opts.sizing.fast_path = fast_path.on;

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
        netns: netns_path.clone(),
        cgroup: None,
        proxy: opts.proxy,
        capture: opts.capture.clone(),
        args: Vec::new(),
        fast_path: opts.sizing.fast_path,
        // A run serves one workload by its own --name, pod or not.
        pod: None,
    })?;
    tracing::info!(
        name = %opts.name,
        cgroup = %opts.cgroup.display(),
        netns = %netns_path.display(),
        netns_cookie = info.netns_cookie,
        addresses = ?info.addresses,
        maps_kernel_memory_mib = engine.kernel_memory() >> 20,
        "attached; capturing"
    );
    fast_path.log();
    if opts.execution.run_validation {
        let probe = validation(&opts, &netns_path);
        let proven = tokio::task::spawn_blocking(move || crate::validate::validate(&probe)).await?;
        if let Err(e) = proven {
            engine.stop().wait().await;
            return Err(e);
        }
    }

    let sweeper = crate::node::sweep_pending(&opts.name);
    shutdown.await;
    drop(sweeper);

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
    let size = |map: &str| pins::pinned_size(&opts.name, map);
    state.mode == Mode::Run
        && state.layout == pins::layout()
        && state.cgroup_parent == opts.cgroup
        && state.workloads.iter().any(|w| w.netns_cookie == netns_cookie)
        && pins::links_dir(&opts.name).exists()
        && size(redirect_common::maps::ORIG_BY_TUPLE) == Some(opts.sizing.max_tracked_connections)
        && size(redirect_common::maps::FAST_PATH_SOCKETS).map(|n| n > 1) == Some(opts.sizing.fast_path)
}

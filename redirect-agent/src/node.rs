//! `redirect-agent node`: the engine for every meshed workload of a node, with a control
//! socket in front ([`crate::api`]) and a metrics endpoint.
//!
//! The programs attach once, at the cgroup v2 root (or a configured parent), and decide per
//! connection from the workload its network namespace names: a namespace that is not
//! enrolled is never touched. The pins outlive the process, so the kernel side keeps capturing
//! while no agent runs, and what the programs know survives it. A new process:
//! - asks a running predecessor over the socket to hand over ([`crate::engine::handover`]);
//! - or, with no predecessor (it crashed or was stopped), adopts the pins and the state file
//!   and opens the listeners again; in between, captured connections are refused (fail fast),
//!   as with istio-iptables while the sidecar is down;
//! - and moves every pinned link to its own programs.
//!
//! Stopping the agent leaves the pins (that is what a restart adopts); `redirect-agent
//! cleanup` removes them and so releases every workload.
//!
//! With `--ztunnel-socket`, the node also serves ztunnel over ZDS ([`ztunnel`]): its ambient
//! pods, handed over as they are enrolled and released.

mod endpoints;
mod ztunnel;

use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use redirect_api::WorkloadInfo;
use redirect_common::MAX_WORKLOADS;
use ztunnel::Ztunnel;

use crate::{
    api::{self, Ended},
    engine::{
        self, Engine, Settings, Sizing, gone,
        handover::{self, Adoption},
        pending::PendingSweep,
        pins::{self, Lock, LockError, Mode, State},
    },
    flags::FastPathWhen,
    metrics, stats, sys,
};

#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub name: String,
    /// Where the cgroup programs attach (default: the cgroup v2 root).
    pub cgroup_parent: Option<PathBuf>,
    pub socket: PathBuf,
    pub metrics: Option<SocketAddr>,
    /// `fast_path`: offer the fast path to workloads that ask for it.
    pub sizing: Sizing,
    /// `--fast-path`: decided into `sizing.fast_path` (`on` already is, and `auto` follows
    /// pins the instance has) before the pins are checked; the decision is logged once the
    /// start succeeded, so that a refused start prints only why it was refused.
    pub fast_path: FastPathWhen,
    /// The most workloads enrolled at once, which the descriptor reserve is planned for;
    /// `None`: as many as the descriptor limit holds (`engine::budget::fitting_workloads`).
    pub max_workloads: Option<usize>,
    /// Where ztunnel connects for ZDS (`--ztunnel-socket`); `None`: no ZDS server.
    pub ztunnel_socket: Option<PathBuf>,
}

fn held(name: &str, e: LockError) -> anyhow::Error {
    match e {
        LockError::Held(lock) => anyhow::anyhow!(
            "instance '{name}' is held by another agent (lock {} is taken and nothing answered a handover on its \
             socket); stop it, or give this one another --name",
            lock.display()
        ),
        LockError::Io(e) => e.into(),
    }
}

/// What this start takes over: a live predecessor's handover, a stopped one's pins, or nothing.
fn prior(
    opts: &NodeOptions,
    attach: &std::path::Path,
    handover: &mut Option<handover::Handover>,
) -> anyhow::Result<Vec<redirect_api::WorkloadInfo>> {
    if let Some(h) = handover {
        tracing::info!(workloads = h.infos.len(), "a running agent hands over");
        return Ok(std::mem::take(&mut h.infos));
    }
    let pin_dir = pins::pin_dir(&opts.name);
    match handover::adoption(&opts.name, State::read(&opts.name), pin_dir.exists(), attach)? {
        Adoption::Adopt(workloads) => {
            tracing::info!(workloads = workloads.len(), "adopting the pins of a stopped agent");
            Ok(workloads)
        }
        Adoption::RemovePins => {
            tracing::warn!(dir = %pin_dir.display(), "pins without a state file; removing them");
            crate::addrs::remove_pinned_probe_sources(&pin_dir.join(redirect_common::maps::PROBE_SNAT));
            std::fs::remove_dir_all(&pin_dir).with_context(|| format!("remove {}", pin_dir.display()))?;
            Ok(Vec::new())
        }
        Adoption::Fresh => Ok(Vec::new()),
    }
}

pub async fn run(mut opts: NodeOptions, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    sys::require_privileges("redirect-agent node")?;
    crate::features::require_all()?;
    pins::validate_name(&opts.name)?;
    sys::ensure_bpffs()?;
    // Before anything changes: directories others could rename are refused, not used.
    pins::check_dirs(&opts.name)?;
    let attach = match &opts.cgroup_parent {
        Some(p) => p.clone(),
        None => sys::cgroup2_root()?,
    };
    sys::open_cgroup2_dir(&attach)?;
    // Both endpoints are checked before anything changes, so that a bad path or a taken port
    // is refused like every other bad value.
    endpoints::check_socket_path(&opts.socket)?;
    let zds_socket = match &opts.ztunnel_socket {
        Some(path) => Some(endpoints::check_ztunnel_socket(path, &opts.socket)?),
        None => None,
    };
    let metrics_port = endpoints::bind_metrics(opts.metrics)?;
    let metrics_busy = matches!(metrics_port, endpoints::Metrics::Busy(_));

    // Checked before a handover is asked for, so a refused start leaves the running agent
    // serving.
    let fast_path =
        crate::engine::fast_path_probe::decide(opts.fast_path, pins::pinned_fast_path(&opts.name, Mode::Node));
    opts.sizing.fast_path = fast_path.on;
    pins::check_pins(&opts.name, opts.sizing.fast_path, opts.sizing.max_tracked_connections)?;
    // The predecessor holds the lock until it has stopped serving, which it does once this
    // process confirms it serves (below); without a handover, a held lock is an agent that
    // does not answer on this socket, and waiting will not help.
    let mut handover = tokio::task::block_in_place(|| handover::receive(&opts.socket, &opts.name, metrics_busy))?;
    // Refused here, the predecessor (if any) serves on: nothing has been attached.
    let metrics_listener = endpoints::settle_metrics(
        metrics_port,
        handover.is_some(),
        handover.as_mut().and_then(|h| h.metrics.take()),
    )?;
    // A listener on the ZDS socket is right only if it is a predecessor's that hands over.
    if let (Some(endpoints::ZdsSocket::Listened), Some(path), None) = (&zds_socket, &opts.ztunnel_socket, &handover) {
        return Err(endpoints::zds_in_use(path));
    }
    let took_over = handover.is_some();
    let lock = match handover {
        Some(_) => None,
        None => Some(
            tokio::task::block_in_place(|| Lock::take(&opts.name, Duration::ZERO)).map_err(|e| held(&opts.name, e))?,
        ),
    };
    let infos = prior(&opts, &attach, &mut handover)?;

    let settings = Settings {
        name: opts.name.clone(),
        mode: Mode::Node,
        attach: attach.clone(),
        socket: Some(opts.socket.clone()),
        metrics: opts.metrics,
        sizing: opts.sizing,
        max_workloads: match opts.max_workloads {
            Some(n) => n.clamp(1, MAX_WORKLOADS as usize),
            None => crate::engine::fitting_workloads(&opts.sizing),
        },
        allow_host_netns: false,
        keep_links: true,
        adopting: false,
    };
    let mut engine = Engine::start(settings, lock)?;
    let handed = handover
        .as_mut()
        .map(|h| std::mem::take(&mut h.handed))
        .unwrap_or_default();
    let unserved = engine.restore(infos, handed);
    if handover.is_some() && unserved > 0 {
        // The predecessor still serves them: saying "serving" would end that. Leaving now, it
        // serves on (and moves back any link this process moved).
        anyhow::bail!(
            "{unserved} handed-over workload(s) could not be served here (see the log); the running agent serves on"
        );
    }
    engine.pin_programs()?;
    if let Some(h) = handover {
        tokio::task::block_in_place(|| h.confirm())?;
        let lock = tokio::task::block_in_place(|| Lock::take(&opts.name, Duration::from_secs(30)))
            .map_err(|e| held(&opts.name, e))?;
        engine.hold(lock);
        tracing::info!("a running agent handed over");
    }
    engine.persist();

    let workloads = engine.workloads().len();
    let engine = Arc::new(tokio::sync::Mutex::new(engine));
    // The restored workloads' pods are in its first snapshot. A predecessor listens on the
    // socket until it has handed over; anyone else was refused above.
    let ztunnel = opts.ztunnel_socket.clone().map(Ztunnel::new);
    if let Some(z) = &ztunnel {
        match took_over {
            true => z.bind_in_background(engine.clone()).await,
            false => z.bind(&engine).await?,
        }
    }
    let handoff = ztunnel.clone().map(|z| z as Arc<dyn api::Handoff>);
    let ready = Arc::new(AtomicBool::new(true));
    // A second descriptor of the metrics listener, for a successor.
    let metrics_fd = match &metrics_listener {
        Some(l) => Some(Arc::new(l.as_fd().try_clone_to_owned()?)),
        None => None,
    };
    let metrics = metrics_listener.map(|l| {
        let engine = engine.clone();
        AbortOnDrop(metrics::serve(
            l,
            Arc::new(move || snapshot(&engine.blocking_lock())),
            ready.clone(),
        ))
    });
    let reaper = AbortOnDrop(tokio::spawn(release_gone_namespaces(engine.clone(), ztunnel.clone())));
    let sweeper = sweep_pending(&opts.name);
    tracing::info!(
        name = %opts.name,
        cgroup = %attach.display(),
        socket = %opts.socket.display(),
        workloads,
        "node agent ready"
    );
    fast_path.log();

    tokio::pin!(shutdown);
    let ended = loop {
        // The predecessor closed its socket before handing over; a crashed one (or a successor
        // that did not serve) left the file.
        let listener = endpoints::bind_socket(&opts.socket)?;
        let ended = tokio::select! {
            _ = &mut shutdown => Ended::Signal,
            r = api::serve(&listener, engine.clone(), metrics_fd.clone(), handoff.clone()) => r,
        };
        // Not ready from here: a successor (or nobody) serves new connections.
        ready.store(false, Ordering::Relaxed);
        drop(listener);
        // ztunnel's socket goes at once, before anything drains: the successor binds it as
        // soon as it is free, and ztunnel reconnects to it.
        if let Some(z) = &ztunnel {
            z.stop().await;
        }
        let Ended::HandedOver { successor } = ended else {
            break ended;
        };
        // The successor's word is not enough to exit on: it must take the lock this process
        // lets go of now, publish its state and answer on the socket.
        engine.lock().await.release_lock();
        let serves = tokio::task::block_in_place(|| {
            engine::successor_serves(&opts.name, &opts.socket, successor, SUCCESSOR_WITHIN)
        });
        let Err(why) = serves else { break ended };
        tracing::error!("{why}; serving on");
        match tokio::task::block_in_place(|| Lock::take(&opts.name, Duration::from_secs(5))) {
            Ok(lock) => engine.lock().await.resume(lock)?,
            // Whoever holds it now is an agent of this instance; two must not serve.
            Err(e) => {
                tracing::error!("the lock cannot be taken back ({}); stopping", held(&opts.name, e));
                break ended;
            }
        }
        if let Some(z) = &ztunnel {
            z.bind_in_background(engine.clone()).await;
        }
        ready.store(true, Ordering::Relaxed);
        tracing::info!("serving again");
    };
    if matches!(ended, Ended::Signal) {
        let _ = std::fs::remove_file(&opts.socket);
    }
    drop(metrics);
    drop(reaper);
    drop(sweeper);
    drop(handoff);
    drop(ztunnel);
    match ended {
        Ended::HandedOver { successor } => {
            tracing::info!(successor, "handed over; finishing open connections");
        }
        Ended::Signal => tracing::info!(
            "stopping; the pins stay (workloads remain captured, refused until an agent serves them): \
             `redirect-agent cleanup` releases them"
        ),
    }
    // Taken out under the lock, drained without it: a client that asks meanwhile is told
    // the agent handed over rather than kept waiting.
    let draining = engine.lock().await.stop();
    draining.wait().await;
    Ok(())
}

/// How long a successor that was handed everything may take to serve (take the lock, write
/// its state, bind the socket) before this process serves on.
const SUCCESSOR_WITHIN: Duration = Duration::from_secs(30);

/// The node's housekeeping, every [`gone::CHECK_EVERY`]: serves the workloads a restart could
/// not serve again, if it can now, and releases those whose namespace went away without an
/// unenroll. The engine's lock is held only to copy the workloads out and to release; the look
/// at `/proc` runs without it, and so does telling ztunnel of the workloads served again and
/// released.
async fn release_gone_namespaces(engine: Arc<tokio::sync::Mutex<Engine>>, ztunnel: Option<Arc<Ztunnel>>) {
    let mut tick = tokio::time::interval(gone::CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // What ztunnel is told needs the workloads before and after each step (none without it).
    let listed = |e: &Engine| ztunnel.as_ref().map(|_| e.workloads()).unwrap_or_default();
    loop {
        tick.tick().await;
        // Workloads a restart could not serve again (still refused meanwhile): tried again.
        let served = {
            let mut e = engine.lock().await;
            let before = listed(&e);
            e.retry_unserved();
            not_in(&before, listed(&e))
        };
        let candidates = engine.lock().await.gone_candidates();
        let gone = tokio::task::spawn_blocking(move || gone::gone(candidates))
            .await
            .unwrap_or_default();
        let released = match gone.is_empty() {
            true => Vec::new(),
            false => {
                let mut e = engine.lock().await;
                let before = listed(&e);
                e.release_gone(gone);
                not_in(&listed(&e), before)
            }
        };
        if let Some(z) = &ztunnel {
            for info in &served {
                z.served_again(&engine, info).await;
            }
            for info in &released {
                z.forget(info).await;
            }
        }
    }
}

/// The workloads of `of` that `from` does not hold.
fn not_in(from: &[WorkloadInfo], of: Vec<WorkloadInfo>) -> Vec<WorkloadInfo> {
    let ids: std::collections::HashSet<&str> = from.iter().map(|w| w.id.as_str()).collect();
    of.into_iter().filter(|w| !ids.contains(w.id.as_str())).collect()
}

/// What the metrics endpoint scrapes: the same rows as `stats`, per workload. A counter that
/// cannot be read leaves the workload out of this scrape rather than showing it as zero.
fn snapshot(engine: &Engine) -> metrics::Snapshot {
    use std::sync::atomic::Ordering::Relaxed;
    let (counters, events) = engine.counters();
    let workloads = engine
        .views()
        .into_iter()
        .filter_map(|v| {
            let rules = stats::rows(&v.entry, v.info.netns_cookie, &counters, &v.info.interfaces).ok()?;
            let events = stats::event_counts(&v.entry, events).ok()?;
            let proxy = v.proxy.map(|(active, c)| metrics::ProxySnapshot {
                active: active as u64,
                accepted: c.accepted.load(Relaxed),
                forwarded: c.forwarded.load(Relaxed),
                no_original_dst: c.no_original_dst.load(Relaxed),
                upstream_failed: c.upstream_failed.load(Relaxed),
                over_limit: c.over_limit.load(Relaxed),
                over_budget: c.over_budget.load(Relaxed),
                bytes_to_upstream: c.bytes_to_upstream.load(Relaxed),
                bytes_from_upstream: c.bytes_from_upstream.load(Relaxed),
                spliced: c.spliced.load(Relaxed),
            });
            Some(metrics::WorkloadSnapshot {
                id: v.info.id.clone(),
                pod: v.info.pod.clone(),
                rules,
                events,
                proxy,
            })
        })
        .collect();
    let plan = engine.plan();
    metrics::Snapshot {
        workloads,
        maps: metrics::map_occupancy(&pins::pin_dir(&engine.settings().name)),
        budget: metrics::BudgetSnapshot {
            nofile: plan.nofile,
            reserved: plan.reserved,
            connections: plan.budget.size() as u64,
            active: plan.budget.in_use() as u64,
        },
        uptime: engine.uptime(),
    }
}

/// The sweep of inbound records nothing took ([`engine::pending`]), while this process serves.
pub(crate) fn sweep_pending(name: &str) -> Option<AbortOnDrop> {
    match PendingSweep::open(name) {
        Ok(sweep) => Some(AbortOnDrop(tokio::spawn(sweep.run()))),
        Err(e) => {
            tracing::warn!("no sweep of {}: {e}", redirect_common::maps::INBOUND_PENDING);
            None
        }
    }
}

pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

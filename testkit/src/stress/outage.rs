//! Outage: the agent SIGKILLed or SIGSTOPped while connections churn both ways, for
//! `--outage-secs`, then started again (`run`: a new process of the same name takes the pinned
//! links over; `node`: a new process adopts the pins and the workload) or continued.
//!
//! Fail-closed means that meanwhile no connection reaches the remote host or the app around
//! the proxy: the servers count every peer that is not the proxy ([`super::servers`]), and
//! any is a problem. Connections may fail meanwhile (refused, reset, timed out); after the
//! recovery, once connections begun during the outage are past their bound, none may fail,
//! and both directions must be served again. Then the maps and the descriptors come back to
//! their idle values.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{
    StressArgs,
    churn::uncaptured,
    epoch_ms,
    load::{LoadProcess, Outcomes, TICK_MS},
    maps::{self, Counts},
    servers::{APP_PORT, GENERATOR_IP, REMOTE_PORT, TallyCounts},
    settled_fds,
    target::{Mode, Target},
    wait_fds_at_most,
};

/// Bound of each connection.
const TIMEOUT: Duration = Duration::from_secs(4);
/// Connections each generator keeps going at once.
const CONCURRENCY: usize = 16;
/// Served connections each way that show the load flowing (before) or flowing again (after).
const FLOWING: u64 = 50;
const SETTLE: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Signal {
    #[serde(rename = "SIGKILL")]
    Kill,
    #[serde(rename = "SIGSTOP")]
    Stop,
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kill => "SIGKILL",
            Self::Stop => "SIGSTOP",
        })
    }
}

/// What ended in one phase, by when it ended; what the servers accepted meanwhile.
#[derive(Debug, Default, Serialize)]
pub struct Phase {
    pub seconds: f64,
    pub outbound: Outcomes,
    pub inbound: Outcomes,
    pub remote: TallyCounts,
    pub app: TallyCounts,
}

#[derive(Debug, Serialize)]
pub struct OutageReport {
    pub mode: Mode,
    pub signal: Signal,
    pub concurrency: usize,
    pub before: Phase,
    /// From the signal until the restart began (or SIGCONT).
    pub during: Phase,
    /// From then on.
    pub after: Phase,
    /// Milliseconds until the new agent was ready (its state file written; for node mode its
    /// control socket answering); about 0 for SIGCONT.
    pub restart_ms: u64,
    /// Milliseconds (to 10) from starting the new agent (or SIGCONT) until the first
    /// connection served, each way.
    pub recovery_ms_outbound: Option<u64>,
    pub recovery_ms_inbound: Option<u64>,
    pub idle_fds: usize,
    pub after_fds: usize,
    pub idle_maps: Counts,
    pub after_maps: Counts,
    pub problems: Vec<String>,
}

/// Waits (bounded) until both servers have accepted `FLOWING` more proxied connections than
/// `since`.
fn wait_flowing(t: &Target, since: (TallyCounts, TallyCounts), within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let (r, a) = t.servers.counts();
        if r.proxied >= since.0.proxied + FLOWING && a.proxied >= since.1.proxied + FLOWING {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run(agent: &Path, mode: Mode, signal: Signal, args: &StressArgs) -> anyhow::Result<OutageReport> {
    let flags: &[&str] = if args.fail_open && mode == Mode::Run {
        &["--fail-open"]
    } else {
        &[]
    };
    let mut t = Target::start(agent, mode, "outage", flags)?;
    let pid = t.pid()?;
    let idle_fds = settled_fds(pid);
    let idle_maps = maps::counts(&t.name)?;
    let to_remote = SocketAddr::from(SocketAddrV4::new(t.pair.remote_ip, REMOTE_PORT));
    let to_app = SocketAddr::from(SocketAddrV4::new(t.pair.workload_ip, APP_PORT));
    let (cg, wns, rns) = (
        t.cgroup.path.clone(),
        t.pair.workload.path.clone(),
        t.pair.remote.path.clone(),
    );
    let out = LoadProcess::start(
        Some(&cg),
        &wns,
        Some(GENERATOR_IP.into()),
        to_remote,
        u64::MAX,
        CONCURRENCY,
        TIMEOUT,
    )?;
    let inb = LoadProcess::start(None, &rns, None, to_app, u64::MAX, CONCURRENCY, TIMEOUT)?;

    let t_start = epoch_ms();
    let zero = t.servers.counts();
    if !wait_flowing(&t, zero, Duration::from_secs(30)) {
        bail!(
            "the load did not flow through the agent before the {signal}: {:?}",
            t.servers.counts()
        );
    }
    // At least a second of load before the signal.
    while epoch_ms() < t_start + 1000 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_signal = t.servers.counts();
    let t_down = epoch_ms();
    match signal {
        Signal::Kill => t.kill()?,
        Signal::Stop => t.pause(true)?,
    }
    std::thread::sleep(Duration::from_secs(args.outage_secs));
    let t_restart = epoch_ms();
    let at_restart = t.servers.counts();
    match signal {
        Signal::Kill => t.start_agent().context("the restart after SIGKILL")?,
        Signal::Stop => t.pause(false)?,
    }
    let t_up = epoch_ms();
    let at_up = t.servers.counts();
    let flowing_again = wait_flowing(&t, at_up, Duration::from_secs(30));
    // Connections begun during the outage end within their bound; then a clean stretch.
    let clean_from = t_up + u64::try_from(TIMEOUT.as_millis()).unwrap_or(0) + 1000;
    while epoch_ms() < clean_from + 2000 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = out.finish(Duration::from_secs(30)).context("outbound load")?;
    let inb = inb.finish(Duration::from_secs(30)).context("inbound load")?;
    let t_end = epoch_ms();
    let at_end = t.servers.counts();
    let pid = t.pid()?;
    let after_fds = wait_fds_at_most(pid, idle_fds, SETTLE);
    let (after_maps, map_problems) = maps::back_to_idle(&t.name, &idle_maps, SETTLE)?;

    let phase = |from: u64, to: u64, a: (TallyCounts, TallyCounts), b: (TallyCounts, TallyCounts)| Phase {
        seconds: to.saturating_sub(from) as f64 / 1000.0,
        outbound: out.between(from, to),
        inbound: inb.between(from, to),
        remote: b.0 - a.0,
        app: b.1 - a.1,
    };
    let before = phase(t_start, t_down, zero, at_signal);
    let during = phase(t_down, t_restart, at_signal, at_restart);
    let after = phase(t_restart, t_end, at_restart, at_end);

    let mut problems = Vec::new();
    problems.extend(uncaptured("the remote host", at_end.0, &t.servers.remote));
    problems.extend(uncaptured("the app", at_end.1, &t.servers.app));
    for (what, o) in [("outbound", &before.outbound), ("inbound", &before.inbound)] {
        if o.failed() > 0 {
            problems.push(format!(
                "before the {signal}: {} {what} connections failed ({o:?})",
                o.failed()
            ));
        }
    }
    if !flowing_again {
        problems.push(format!(
            "after the {}: fewer than {FLOWING} connections each way served within 30 s ({:?})",
            if signal == Signal::Kill { "restart" } else { "SIGCONT" },
            t.servers.counts()
        ));
    }
    for (what, r) in [("outbound", &out), ("inbound", &inb)] {
        let late = r.between(clean_from, t_end);
        if late.failed() > 0 || late.ok == 0 {
            problems.push(format!(
                "{what}: {} s after the recovery, {} connections failed and {} were served ({late:?}; first errors: {})",
                (clean_from - t_up) / 1000,
                late.failed(),
                late.ok,
                r.first_errors.join("; ")
            ));
        }
    }
    if after_fds > idle_fds {
        problems.push(format!(
            "the agent holds {after_fds} descriptors {} s after the load, {idle_fds} when idle (before the {signal})",
            SETTLE.as_secs()
        ));
    }
    problems.extend(map_problems);
    Ok(OutageReport {
        mode,
        signal,
        concurrency: CONCURRENCY,
        restart_ms: t_up - t_restart,
        recovery_ms_outbound: out
            .first_ok_after(t_restart)
            .map(|t| t.saturating_sub(t_restart - t_restart % TICK_MS)),
        recovery_ms_inbound: inb
            .first_ok_after(t_restart)
            .map(|t| t.saturating_sub(t_restart - t_restart % TICK_MS)),
        before,
        during,
        after,
        idle_fds,
        after_fds,
        idle_maps,
        after_maps,
        problems,
    })
}

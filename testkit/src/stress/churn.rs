//! Churn: many short connections through one agent, outbound (the workload to the remote host)
//! and inbound (the remote host to the app) at once, then the per-connection maps and the
//! agent's descriptors back at their idle values. Every connection must succeed and every one
//! must reach its server through the proxy.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    StressArgs, fd_count,
    load::{LoadProcess, LoadReport, Outcomes},
    maps::{self, Counts},
    servers::{APP_PORT, GENERATOR_IP, REMOTE_PORT, TallyCounts},
    settled_fds,
    target::{Mode, Target},
    wait_fds_at_most,
};

/// How long maps and descriptors may take to come back once the load has ended.
const SETTLE: Duration = Duration::from_secs(15);
/// Bound of each connection.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
pub struct ChurnReport {
    pub mode: Mode,
    pub connections: u64,
    pub concurrency: usize,
    pub seconds: f64,
    pub outbound: Outcomes,
    pub inbound: Outcomes,
    /// What the remote host's and the app's servers accepted, by where it came from.
    pub remote: TallyCounts,
    pub app: TallyCounts,
    pub idle_fds: usize,
    pub peak_fds: usize,
    pub after_fds: usize,
    pub idle_maps: Counts,
    pub peak_maps: Counts,
    pub after_maps: Counts,
    pub problems: Vec<String>,
}

/// `args.churn` connections (half each way, `args.churn_concurrency` at once each way)
/// through an agent in `mode`.
pub fn run(agent: &Path, mode: Mode, args: &StressArgs) -> anyhow::Result<ChurnReport> {
    let t = Target::start(agent, mode, "churn", &[])?;
    let pid = t.pid()?;
    let idle_fds = settled_fds(pid);
    let idle_maps = maps::counts(&t.name)?;
    let t0 = Instant::now();
    let (n_out, n_in) = (args.churn / 2, args.churn - args.churn / 2);
    let to_remote = SocketAddr::from(SocketAddrV4::new(t.pair.remote_ip, REMOTE_PORT));
    let to_app = SocketAddr::from(SocketAddrV4::new(t.pair.workload_ip, APP_PORT));
    let mut out = LoadProcess::start(
        Some(&t.cgroup.path),
        &t.pair.workload.path,
        Some(GENERATOR_IP.into()),
        to_remote,
        n_out,
        args.churn_concurrency,
        TIMEOUT,
    )?;
    let mut inb = LoadProcess::start(
        None,
        &t.pair.remote.path,
        None,
        to_app,
        n_in,
        args.churn_concurrency,
        TIMEOUT,
    )?;
    // Generous, but a bound: 100 connections a second at the very least.
    let bound = Duration::from_secs(60 + args.churn / 100);
    let (mut peak_fds, mut peak_maps) = (idle_fds, idle_maps.clone());
    let mut next_sample = Instant::now();
    while !(out.done() && inb.done()) && t0.elapsed() < bound {
        if Instant::now() >= next_sample {
            peak_fds = peak_fds.max(fd_count(pid));
            for (m, n) in maps::counts(&t.name)? {
                let e = peak_maps.entry(m).or_default();
                *e = (*e).max(n);
            }
            next_sample = Instant::now() + Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let out = out.finish(Duration::from_secs(30)).context("outbound load")?;
    let inb = inb.finish(Duration::from_secs(30)).context("inbound load")?;
    let after_fds = wait_fds_at_most(pid, idle_fds, SETTLE);
    let (after_maps, map_problems) = maps::back_to_idle(&t.name, &idle_maps, SETTLE)?;
    let (remote, app) = t.servers.counts();

    let mut problems = Vec::new();
    for (what, r, wanted) in [("outbound", &out, n_out), ("inbound", &inb, n_in)] {
        problems.extend(load_problems(what, r, wanted));
    }
    problems.extend(uncaptured("the remote host", remote, &t.servers.remote));
    problems.extend(uncaptured("the app", app, &t.servers.app));
    if after_fds > idle_fds {
        problems.push(format!(
            "the agent holds {after_fds} descriptors {} s after the load, {idle_fds} when idle",
            SETTLE.as_secs()
        ));
    }
    problems.extend(map_problems);
    Ok(ChurnReport {
        mode,
        connections: args.churn,
        concurrency: args.churn_concurrency,
        seconds,
        outbound: out.outcomes,
        inbound: inb.outcomes,
        remote,
        app,
        idle_fds,
        peak_fds,
        after_fds,
        idle_maps,
        peak_maps,
        after_maps,
        problems,
    })
}

/// A generator's failures, and connections it did not make at all.
pub fn load_problems(what: &str, r: &LoadReport, wanted: u64) -> Vec<String> {
    let mut p = Vec::new();
    if r.outcomes.failed() > 0 {
        p.push(format!(
            "{} of {} {what} connections failed ({:?}; first: {})",
            r.outcomes.failed(),
            r.outcomes.total(),
            r.outcomes,
            r.first_errors.join("; ")
        ));
    }
    if r.outcomes.total() < wanted {
        p.push(format!(
            "{what}: {} of {wanted} connections made in the time allowed",
            r.outcomes.total()
        ));
    }
    p
}

/// Connections a server accepted from anywhere but the proxy.
pub fn uncaptured(server: &str, c: TallyCounts, tally: &super::servers::Tally) -> Vec<String> {
    if c.direct == 0 && c.other == 0 {
        return Vec::new();
    }
    vec![format!(
        "{} connections reached {server} around the proxy, {} from elsewhere (the first from {})",
        c.direct,
        c.other,
        tally
            .first_uncaptured()
            .map_or_else(|| "?".to_owned(), |a| a.to_string())
    )]
}

//! The bounded stress routines of `redirect-testkit stress` (run by `cargo xtask stress`, and
//! in a smaller form by `cargo xtask test`), each against agents of its own on throw-away
//! workloads, printing their figures as one JSON report:
//!
//! - [`memory`]: bursts of concurrent proxied connections, the agent's resident memory idle,
//!   at each peak and after each burst (issue 16, item 4);
//! - [`hold`]: many connections held open through the proxy at once, then closed;
//! - [`churn`]: many short connections, outbound and inbound at once, in `run` and `node`
//!   mode, and the pinned maps and the agent's descriptors back at their idle values after;
//! - [`outage`]: SIGKILL and SIGSTOP of the agent under load in both modes, no connection
//!   reaching the remote host or the app around the proxy meanwhile, and the load served
//!   again after the restart (or SIGCONT).
//!
//! A routine's checks that fail are its `problems` (the command still prints every figure);
//! one that cannot run at all is an `error`. `cargo xtask` fails on either. Every wait is
//! bounded, every loop counted; namespaces, cgroups, agents and pins are guards, removed also
//! when a routine fails.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;

pub mod churn;
pub mod hold;
pub mod load;
pub mod maps;
pub mod memory;
pub mod outage;
pub mod servers;
pub mod target;

pub use memory::{Burst, StressReport};

#[derive(Debug, Clone, Copy, clap::Args)]
pub struct StressArgs {
    /// Memory: bursts, one after the other (0: none).
    #[arg(long, default_value_t = 5)]
    pub bursts: usize,
    /// Memory: concurrent connections per burst (the test process holds two descriptors each,
    /// the agent two).
    #[arg(long, default_value_t = 3000)]
    pub connections: usize,
    /// Memory: bytes each connection sends and reads back.
    #[arg(long, default_value_t = 256 << 10)]
    pub bytes: usize,
    /// Connections held open at once through the proxy (0: skip).
    #[arg(long, default_value_t = 10_000)]
    pub hold: usize,
    /// Seconds the held connections stay open before their second exchange.
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
    /// Short connections per mode, half outbound and half inbound (0: skip).
    #[arg(long, default_value_t = 200_000)]
    pub churn: u64,
    /// Connections each churning client keeps going at once (each direction).
    #[arg(long, default_value_t = 64)]
    pub churn_concurrency: usize,
    /// Seconds each agent stays killed or stopped under load (0: skip the outages).
    #[arg(long, default_value_t = 5)]
    pub outage_secs: u64,
    /// Run the `run` outages with the agent's `--fail-open`: a check of the check, which must
    /// then report connections that went around the proxy.
    #[arg(long, hide = true)]
    pub fail_open: bool,
}

/// Every routine's figures; a routine left out by its arguments is `None` (or empty).
#[derive(Debug, Serialize, Default)]
pub struct Report {
    pub memory: Option<StressReport>,
    pub hold: Option<hold::HoldReport>,
    pub churn: Vec<churn::ChurnReport>,
    pub outages: Vec<outage::OutageReport>,
    /// Routines that could not run: "ROUTINE: error".
    pub errors: Vec<String>,
    pub seconds: f64,
}

impl Report {
    /// Every failed check and error, each prefixed with its routine.
    pub fn problems(&self) -> Vec<String> {
        let mut all = self.errors.clone();
        if let Some(m) = &self.memory
            && m.worst_ratio() > memory::MAX_RATIO
        {
            all.push(format!(
                "memory: after a burst the agent held {:.2} times its idle memory (at most {})",
                m.worst_ratio(),
                memory::MAX_RATIO
            ));
        }
        if let Some(h) = &self.hold {
            all.extend(h.problems.iter().map(|p| format!("hold: {p}")));
        }
        for c in &self.churn {
            all.extend(c.problems.iter().map(|p| format!("churn ({}): {p}", c.mode)));
        }
        for o in &self.outages {
            all.extend(
                o.problems
                    .iter()
                    .map(|p| format!("outage ({}, {}): {p}", o.mode, o.signal)),
            );
        }
        all
    }
}

/// Runs every routine the arguments ask for, one after the other; a routine's error is
/// recorded and the next one runs.
pub fn run_all(agent: &Path, args: &StressArgs) -> Report {
    let t0 = Instant::now();
    let mut report = Report::default();
    let mut record = |what: &str, e: anyhow::Error| report_error(&mut report.errors, what, &e);
    if args.bursts > 0 {
        match memory::run(agent, args) {
            Ok(m) => report.memory = Some(m),
            Err(e) => record("memory", e),
        }
    }
    if args.hold > 0 {
        match hold::run(agent, args) {
            Ok(h) => report.hold = Some(h),
            Err(e) => record("hold", e),
        }
    }
    if args.churn > 0 {
        for mode in [target::Mode::Run, target::Mode::Node] {
            match churn::run(agent, mode, args) {
                Ok(c) => report.churn.push(c),
                Err(e) => record(&format!("churn ({mode})"), e),
            }
        }
    }
    if args.outage_secs > 0 {
        for mode in [target::Mode::Run, target::Mode::Node] {
            for signal in [outage::Signal::Kill, outage::Signal::Stop] {
                match outage::run(agent, mode, signal, args) {
                    Ok(o) => report.outages.push(o),
                    Err(e) => record(&format!("outage ({mode}, {signal})"), e),
                }
            }
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    report
}

fn report_error(errors: &mut Vec<String>, what: &str, e: &anyhow::Error) {
    eprintln!("redirect-testkit stress: {what}: {e:#}");
    errors.push(format!("{what}: {e:#}"));
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// A `/proc/PID/status` size (`VmRSS`, `RssAnon`, `RssFile`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Descriptors `pid` holds now.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The agent's descriptor count once it stops changing for a while (its dialer makes spare
/// sockets ahead of demand; connections the proxy is still closing go): three readings 200 ms
/// apart that agree, at most 10 s.
pub fn settled_fds(pid: u32) -> usize {
    let mut last = fd_count(pid);
    let mut same = 0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = fd_count(pid);
        same = if now == last { same + 1 } else { 0 };
        if same >= 2 {
            return now;
        }
        last = now;
    }
    last
}

/// Waits (bounded by `within`) until `pid` holds at most `fds` descriptors; returns how many
/// it holds then.
pub fn wait_fds_at_most(pid: u32, fds: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let now = fd_count(pid);
        if now <= fds || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Milliseconds since the Unix epoch: a clock the load generators (other processes) and the
/// routine share, to tell which phase a connection ended in.
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

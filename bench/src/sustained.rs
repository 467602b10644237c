//! A sustained run (issue 19, goal 5): outbound CRR through B and through C for minutes, as a
//! user would load a workload, reported interval by interval: connections per second, errors,
//! the conntrack entries of the workload's namespace and the kernel's slab memory.

use std::{path::Path, time::Instant};

use anyhow::Context as _;

use crate::orchestrate::{Config, Env};

/// The section `cargo xtask bench --sustained` writes into docs/benchmarks.md.
pub const MARKERS: (&str, &str) = (
    "<!-- sustained: written by `cargo xtask bench --sustained` -->",
    "<!-- /sustained -->",
);

/// Seconds per interval: one CRR run each, back to back.
pub const INTERVAL_S: u64 = 10;

pub struct Interval {
    pub cps: f64,
    pub errors: u64,
    /// `nf_conntrack_count` of the workload's namespace after the interval (`None`: no
    /// conntrack there).
    pub conntrack: Option<u64>,
    /// `Slab:` of /proc/meminfo after the interval, KiB (the whole machine's).
    pub slab_kib: u64,
}

pub struct Outcome {
    pub seconds: u64,
    pub runs: Vec<(Config, Vec<Interval>)>,
    pub elapsed_s: f64,
}

fn slab_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Slab:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// B, then C, each for `seconds` (whole intervals).
pub fn run(agent: &Path, me: &Path, seconds: u64) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let intervals = seconds.div_ceil(INTERVAL_S).max(1);
    let mut runs = Vec::new();
    for config in [Config::Iptables, Config::Connect4] {
        let env = Env::new(config, agent, me).with_context(|| format!("setting up {}", config.label()))?;
        let mut out = Vec::new();
        for i in 1..=intervals {
            eprintln!("bench: sustained: {} interval {i}/{intervals}", config.label());
            let r = env.crr(me, std::time::Duration::from_secs(INTERVAL_S))?;
            out.push(Interval {
                cps: r.per_second,
                errors: r.errors,
                conntrack: env.conntrack_count(),
                slab_kib: slab_kib(),
            });
        }
        runs.push((config, out));
    }
    Ok(Outcome {
        seconds: intervals * INTERVAL_S,
        runs,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// The section's text.
pub fn markdown(o: &Outcome, machine: &crate::report::Machine) -> String {
    let col = |config: Config| o.runs.iter().find(|(c, _)| *c == config).map(|(_, v)| v.as_slice());
    let (b, c) = (
        col(Config::Iptables).unwrap_or(&[]),
        col(Config::Connect4).unwrap_or(&[]),
    );
    let ct = |v: Option<u64>| v.map_or_else(|| "–".to_owned(), |v| v.to_string());
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    let mut rows = String::new();
    for i in 0..b.len().max(c.len()) {
        let cell = |v: &[Interval]| match v.get(i) {
            Some(x) => format!(
                "{:.0} | {} | {} | {}",
                x.cps,
                x.errors,
                ct(x.conntrack),
                mib(x.slab_kib)
            ),
            None => "– | – | – | –".to_owned(),
        };
        rows.push_str(&format!(
            "| {} | {} | {} |\n",
            (i as u64 + 1) * INTERVAL_S,
            cell(b),
            cell(c)
        ));
    }
    let mean = |v: &[Interval]| v.iter().map(|x| x.cps).sum::<f64>() / v.len().max(1) as f64;
    let errors = |v: &[Interval]| v.iter().map(|x| x.errors).sum::<u64>();
    let (mb, mc) = (mean(b), mean(c));
    format!(
        "## Sustained CRR: B and C for {secs} s each\n\n\
         {written} \
         Outbound CRR as in the table at the top (a new connection per request, 1 KiB each way, \
         2 workers), through B for {secs} s and then through C for {secs} s, each in a fresh \
         namespace pair, as back-to-back runs of {iv} s. After each: the connections per \
         second and errors of that run, the conntrack entries of the workload's namespace \
         (`nf_conntrack_count` there; \"–\": no conntrack in that namespace) and the kernel's \
         slab memory (`Slab:` in /proc/meminfo, the whole machine's). Mean: B {mb:.0}, C {mc:.0} \
         connections/s (C/B {ratio:.2}); errors: B {eb}, C {ec}.\n\n\
         | s | B conn/s | B errors | B conntrack | B slab MiB | C conn/s | C errors | C conntrack | C slab MiB |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n{rows}",
        secs = o.seconds,
        written = machine.written_by("cargo xtask bench --sustained", o.elapsed_s),
        iv = INTERVAL_S,
        ratio = if mb > 0.0 { mc / mb } else { 0.0 },
        eb = errors(b),
        ec = errors(c),
    )
}

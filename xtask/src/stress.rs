//! `cargo xtask stress`: the stress routines of `redirect-testkit stress` against a built
//! agent (memory over bursts, held connections, churn in both modes, SIGKILL and SIGSTOP under
//! load in both modes), with their figures written into docs/reliability.md by this command
//! (never by hand), each routine between its own markers. `cargo xtask test` runs the same
//! routines in a bounded form ([`BOUNDED`]) after the integration tests, writing nothing.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};
use serde_json::Value;

mod render;

const RELIABILITY_MD: &str = "docs/reliability.md";

/// The counts of one run of the routines, as `redirect-testkit stress` flags.
pub struct Counts {
    pub bursts: usize,
    pub connections: usize,
    pub bytes: usize,
    pub hold: usize,
    pub hold_secs: u64,
    pub churn: u64,
    pub churn_concurrency: usize,
    pub outage_secs: u64,
}

/// What `cargo xtask test` runs: under 3 minutes on two busy cores with a debug build.
pub const BOUNDED: Counts = Counts {
    bursts: 2,
    connections: 1000,
    bytes: 64 << 10,
    hold: 2000,
    hold_secs: 2,
    churn: 10_000,
    churn_concurrency: 32,
    outage_secs: 2,
};

impl Counts {
    fn args(&self) -> Vec<String> {
        [
            ("--bursts", self.bursts.to_string()),
            ("--connections", self.connections.to_string()),
            ("--bytes", self.bytes.to_string()),
            ("--hold", self.hold.to_string()),
            ("--hold-secs", self.hold_secs.to_string()),
            ("--churn", self.churn.to_string()),
            ("--churn-concurrency", self.churn_concurrency.to_string()),
            ("--outage-secs", self.outage_secs.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect()
    }
}

/// The routines' outcome: each routine (a mode and signal of it counted on its own) passed or
/// failed, and every problem.
pub struct Outcome {
    pub passed: u64,
    pub failed: u64,
    pub problems: Vec<String>,
}

/// Runs the routines with `agent` (its test kit beside it). With `write_to` (the repository
/// root), writes their figures into docs/reliability.md; `profile` names the build.
pub fn run(agent: &Path, counts: &Counts, profile: &str, write_to: Option<&Path>) -> anyhow::Result<Outcome> {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let out = Command::new(agent.with_file_name("redirect-testkit"))
        .arg("stress")
        .arg("--agent")
        .arg(agent)
        .args(counts.args())
        .output()
        .context("stress: cannot start redirect-testkit stress")?;
    // Its problems are in the report; a report that is missing or not JSON is a failure of
    // its own.
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "stress: redirect-testkit stress gave no report ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let outcome = outcome(&report);
    if let Some(root) = write_to {
        let context = render::Context {
            profile,
            load: load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        };
        let path = root.join(RELIABILITY_MD);
        let mut doc = std::fs::read_to_string(&path).with_context(|| format!("stress: reading {}", path.display()))?;
        for (key, block) in render::blocks(&report, &context)? {
            doc = replace_section(&doc, key, &block).with_context(|| format!("stress: {}", path.display()))?;
            println!("{block}");
        }
        std::fs::write(&path, doc).with_context(|| format!("stress: writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    for p in &outcome.problems {
        println!("stress: FAILED: {p}");
    }
    println!(
        "stress: {} routines passed, {} failed ({:.0} s)",
        outcome.passed,
        outcome.failed,
        report["seconds"].as_f64().unwrap_or(0.0)
    );
    Ok(outcome)
}

/// Routines passed and failed, from the report.
fn outcome(r: &Value) -> Outcome {
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let (mut passed, mut failed, mut problems) = (0, 0, Vec::new());
    let mut judge = |name: String, p: Vec<String>| {
        if p.is_empty() {
            passed += 1;
        } else {
            failed += 1;
            problems.extend(p.into_iter().map(|p| format!("{name}: {p}")));
        }
    };
    if let Some(m) = r.get("memory").filter(|m| !m.is_null()) {
        let idle = m["idle_kib"].as_u64().unwrap_or(0).max(1) as f64;
        let worst = m["bursts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["after_kib"].as_u64())
            .max()
            .unwrap_or(0) as f64
            / idle;
        let p = if worst > render::MAX_RATIO {
            vec![format!(
                "after a burst the agent held {worst:.2} times its idle memory (at most {})",
                render::MAX_RATIO
            )]
        } else {
            Vec::new()
        };
        judge("memory".into(), p);
    }
    if let Some(h) = r.get("hold").filter(|h| !h.is_null()) {
        judge("hold".into(), strs(&h["problems"]));
    }
    for c in r["churn"].as_array().into_iter().flatten() {
        judge(
            format!("churn ({})", c["mode"].as_str().unwrap_or("?")),
            strs(&c["problems"]),
        );
    }
    for o in r["outages"].as_array().into_iter().flatten() {
        let name = format!(
            "outage ({}, {})",
            o["mode"].as_str().unwrap_or("?"),
            o["signal"].as_str().unwrap_or("?")
        );
        judge(name, strs(&o["problems"]));
    }
    for e in strs(&r["errors"]) {
        failed += 1;
        problems.push(e);
    }
    Outcome {
        passed,
        failed,
        problems,
    }
}

/// `doc` with the text between `<!-- stress:KEY:begin … -->` and `<!-- stress:KEY:end -->`
/// replaced by `block`.
fn replace_section(doc: &str, key: &str, block: &str) -> anyhow::Result<String> {
    let begin = format!("<!-- stress:{key}:begin (written by cargo xtask stress) -->");
    let end = format!("<!-- stress:{key}:end -->");
    let (Some(b), Some(e)) = (doc.find(&begin), doc.find(&end)) else {
        bail!("the markers {begin} and {end} are missing");
    };
    if e < b {
        bail!("{end} comes before {begin}");
    }
    Ok(format!("{}{begin}\n{}\n{}", &doc[..b], block.trim_end(), &doc[e..]))
}
